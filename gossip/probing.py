"""Measure the cost model's parameters on the running job: ``model = gossip.probe()`` (collective).

Links are measured as the job will use them, all at once: every rank that has a partner on its
machine (local ranks 2j and 2j+1) ping-pongs with it at the same time, which gives the
intra-machine link; then every rank ping-pongs with the same local rank on the paired machine
(machines 2m and 2m+1), which gives the inter-machine link. α is the one-way time of a small
message, β the slope between the small and the large one (each the median of its repeats, then
the slowest pair's: the pace of a collective). The inter-machine β is per machine: the k pairs
shared the machine's interface, so the measured slope is divided by k. γ is the time per byte of
a weighted sum (``y += w·x``) of the large size, while every rank computes one. The per-op
``overhead`` is the median time of a real one-element
``gossip.allreduce`` (input check and Python included) less what the links predict for it. A link
class the job does not have (one machine, or one rank per machine) takes the other class's
values. Every rank returns the same :class:`gossip.cost_model.CostModel`; it takes one to two seconds.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from gossip.collectives import allreduce
from gossip.context import current
from gossip.cost_model import CostModel, LinkCost

TAG = 501


def _ping_pong(comm: MPI.Comm, peer: int, first: bool, nbytes: int, repeats: int) -> float:
    """One-way seconds for ``nbytes`` between this rank and ``peer`` (the median of ``repeats`` round trips)."""
    buf = np.zeros(max(1, nbytes), dtype=np.uint8)
    times = []
    for _ in range(repeats + 2):  # two warm-up round trips
        began = time.perf_counter()
        if first:
            comm.Send(buf, dest=peer, tag=TAG)
            comm.Recv(buf, source=peer, tag=TAG)
        else:
            comm.Recv(buf, source=peer, tag=TAG)
            comm.Send(buf, dest=peer, tag=TAG)
        times.append((time.perf_counter() - began) / 2)
    return float(np.median(times[2:]))


def _pair_times(comm: MPI.Comm, peer: int | None, first: bool, small: int, large: int, repeats: int):
    """(one-way small, one-way large) seconds for this rank's pair, the slowest pair's over the job."""
    mine = np.zeros(2)
    if peer is not None:
        mine[0] = _ping_pong(comm, peer, first, small, repeats)
        mine[1] = _ping_pong(comm, peer, first, large, max(3, repeats // 4))
    slowest = np.empty(2)
    comm.Allreduce(mine, slowest, op=MPI.MAX)
    return float(slowest[0]), float(slowest[1])


def _link_cost(times: tuple[float, float], small: int, large: int, reduce: float, sharing: int = 1) -> LinkCost:
    """α and β from the slowest pair's times; ``sharing`` pairs crossed one machine's interface at once."""
    t_small, t_large = times
    slope = (t_large - t_small) / (large - small)
    if slope <= 0:  # the small message was slower than the large one: noise; bound β by the large alone
        slope, t_small = t_large / large, 0.0
    beta = slope / sharing
    return LinkCost(latency=max(0.0, t_small - beta * small), inverse_bandwidth=beta, reduce=reduce)


def _reduce_cost(nbytes: int, repeats: int = 5) -> float:
    x = torch.ones(nbytes // 4)
    y = torch.zeros_like(x)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        y.add_(x, alpha=0.5)
        times.append(time.perf_counter() - began)
    return float(np.median(times)) / nbytes


def _op_time(repeats: int) -> float:
    one = torch.zeros(1)
    times = []
    for _ in range(repeats + 2):
        began = time.perf_counter()
        allreduce(one)
        times.append(time.perf_counter() - began)
    return float(np.median(times[2:]))


def probe(small: int = 8, large: int = 32 << 20, repeats: int = 20) -> CostModel:
    """Collective: measure α, β per link class, γ and the per-op overhead on this job; returns the
    same model on every rank."""
    if not 0 < small < large:
        raise ValueError(f"need 0 < small < large message sizes, got {small} and {large}")
    rt = current()
    comm, size = rt.comm, rt.size
    local, machine, machines = rt.local_comm, rt.machine_rank, rt.machine_size
    local_sizes = comm.allgather(local.size)
    by_place = {place: r for r, place in enumerate(comm.allgather((machine, local.rank)))}
    links = {}
    partner = local.rank ^ 1
    if max(local_sizes) > 1:
        peer = by_place.get((machine, partner))
        links["intra"] = _pair_times(comm, peer, local.rank < partner, small, large, repeats)
    if machines > 1:
        peer = by_place.get((machine ^ 1, local.rank))
        links["inter"] = _pair_times(comm, peer, machine < (machine ^ 1), small, large, repeats)
    slowest = np.array([_reduce_cost(large)])
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    reduce = float(slowest[0])
    if not links:  # a single rank: nothing to measure
        return CostModel(LinkCost(0.0, 0.0, reduce), LinkCost(0.0, 0.0, reduce), size, 1)
    intra = _link_cost(links.get("intra", links.get("inter")), small, large, reduce)
    inter = (_link_cost(links["inter"], small, large, reduce, sharing=min(local_sizes)) if "inter" in links
             else intra)
    bare = CostModel(intra, inter, size, max(local_sizes))
    op = np.array([_op_time(repeats)])
    comm.Allreduce(MPI.IN_PLACE, op, op=MPI.MAX)
    overhead = max(0.0, float(op[0]) - min(bare.ring_allreduce(4), bare.tree_allreduce(4)))
    return CostModel(intra, inter, size, max(local_sizes), overhead=overhead)
