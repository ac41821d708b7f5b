"""Measure the cost model's parameters on the running job: ``model = gossip.probe()`` (collective).

Links are measured as the job will use them, all at once: every rank that has a partner on its
machine (local ranks 2j and 2j+1) ping-pongs with it at the same time, which gives the
intra-machine link; then every rank ping-pongs with the same local rank on the paired machine
(machines 2m and 2m+1), which gives the inter-machine link. α is the one-way time of a small
message (the fastest of its repeats), β the slope to the large one (the median of its repeats);
each the slowest pair's, the pace of a collective. The inter-machine β is per machine: the k pairs
shared the machine's interface, so the measured slope is divided by k. γ is the time per byte of
a weighted sum (``y += w·x``) of the large size, while every rank computes one. The per-op
``overhead`` is the median time of a real one-element
``gossip.allreduce`` (input check and Python included) less what the links predict for it, and
``gossip_overhead`` and ``hierarchical_overhead`` the same for a one-element one-peer
``gossip.neighbor_allreduce`` and ``gossip.hierarchical_neighbor_allreduce``.
Last, one large ``gossip.allreduce`` sets how much slower per byte than the ring model the MPI's
allreduce runs on this job, and one large one-peer ``gossip.neighbor_allreduce`` what a gossip op
spends per byte beyond its transfer and reduction (its copies). A link
class the job does not have (one machine, or one rank per machine) takes the other class's
values. Every rank returns the same :class:`gossip.plan.cost_model.CostModel`; it takes a few seconds.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from mpi4py import MPI

from gossip.ops.collectives import allreduce
from gossip.ops.hierarchical import hierarchical_neighbor_allreduce
from gossip.ops.neighbor import neighbor_allreduce
from gossip.plan.cost_model import CostModel, LinkCost
from gossip.runtime import current

TAG = 501


def _ping_pong(comm: MPI.Comm, peer: int, first: bool, nbytes: int, repeats: int, fastest: bool = False) -> float:
    """One-way seconds for ``nbytes`` between this rank and ``peer``: the median of ``repeats``
    round trips, or with ``fastest`` the fastest (the link's latency, without the scheduling delays
    of an oversubscribed host, which the measured per-op overheads hold)."""
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
    return float(np.min(times[2:]) if fastest else np.median(times[2:]))


def _pair_times(comm: MPI.Comm, peer: int | None, first: bool, small: int, large: int, repeats: int):
    """(one-way small, one-way large) seconds for this rank's pair, the slowest pair's over the job."""
    mine = np.zeros(2)
    if peer is not None:
        mine[0] = _ping_pong(comm, peer, first, small, repeats, fastest=True)
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


def _one_peer(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """One step of one-peer gossip at offset 1, as the library runs it."""
    return neighbor_allreduce(x, self_weight=0.5, src_weights={(rank - 1) % size: 0.5},
                              dst_weights={(rank + 1) % size: 1.0})


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
    one = torch.zeros(1)
    op_time = slowest_median(comm, lambda: allreduce(one), repeats)
    gossip_time = slowest_median(comm, lambda: _one_peer(one, comm.rank, size), repeats)
    overhead = max(0.0, op_time - min(bare.ring_allreduce(4), bare.tree_allreduce(4)))
    hierarchical_time = slowest_median(comm, lambda: hierarchical_neighbor_allreduce(one), repeats)
    gossip_overhead = max(0.0, gossip_time - bare.gossip(4, [1]))
    hierarchical_overhead = max(0.0, hierarchical_time - bare.hierarchical(4))
    model = CostModel(intra, inter, size, max(local_sizes), overhead=overhead, gossip_overhead=gossip_overhead,
                      hierarchical_overhead=hierarchical_overhead)
    return _calibrated(model, comm, large)


def slowest_median(comm: MPI.Comm, call, repeats: int = 3) -> float:
    """The slowest rank's median seconds per ``call()`` (after one warm-up call)."""
    call()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    slowest = np.array([float(np.median(times))])
    comm.Allreduce(MPI.IN_PLACE, slowest, op=MPI.MAX)
    return float(slowest[0])


def _per_byte_factor(measured: float, predict) -> float:
    """How much slower than ``predict(factor)`` the per-byte part of ``measured`` ran (its fixed part
    as the model says), within [0.1, 100]."""
    per_byte = predict(2.0) - predict(1.0)
    fixed = predict(1.0) - per_byte
    if per_byte <= 0:
        return 1.0
    return float(min(100.0, max(0.1, (measured - fixed) / per_byte)))


def _calibrated(model: CostModel, comm: MPI.Comm, large: int) -> CostModel:
    """The model with its per-byte calibration set by one large allreduce and one large one-peer
    neighbour exchange (offset 1) as this library runs them on this job."""
    x = torch.ones(max(1, large // 4))
    rank, size = comm.rank, comm.size
    allreduce_time = slowest_median(comm, lambda: allreduce(x))
    gossip_time = slowest_median(comm, lambda: _one_peer(x, rank, size))
    nbytes = x.numel() * x.element_size()
    allreduce_factor = _per_byte_factor(allreduce_time, lambda f: replace(
        model, allreduce_per_byte_factor=f).ring_allreduce(nbytes))
    copy_per_byte = max(0.0, (gossip_time - model.gossip(nbytes, [1])) / nbytes)
    return replace(model, allreduce_per_byte_factor=allreduce_factor, copy_per_byte=copy_per_byte)
