"""Measure the cost model's parameters on the running job: ``model = gossip.probe()`` (collective).

Ping-pong between rank 0 and another rank of its machine gives the intra-machine link, and
between rank 0 and the first rank of machine 1 the inter-machine link: α is the one-way time of a
small message, β the slope of the one-way time between the small and the large message. γ is the
time per byte of a weighted sum (``y += w·x``) of the large message's size on rank 0. Every other
rank waits without spinning (a polled ``MPI_Ibarrier`` with sleeps), so the measured pair has the
cores. A link class the job does not have (one machine, or one rank per machine) takes the other
class's values. Every rank returns the same :class:`gossip.cost_model.CostModel`. Takes well under
a second on one machine with the defaults.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from gossip.context import current
from gossip.cost_model import CostModel, LinkCost

TAG = 501


def _ping_pong(comm: MPI.Comm, me: int, peer: int, first: bool, nbytes: int, repeats: int) -> float:
    """One-way seconds for ``nbytes`` between ``me`` and ``peer`` (the median of ``repeats`` round trips)."""
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


def _link(comm: MPI.Comm, rank: int, pair: tuple[int, int], small: int, large: int, repeats: int) -> LinkCost | None:
    if rank not in pair:
        return None
    peer = pair[1] if rank == pair[0] else pair[0]
    t_small = _ping_pong(comm, rank, peer, rank == pair[0], small, repeats)
    t_large = _ping_pong(comm, rank, peer, rank == pair[0], large, max(3, repeats // 4))
    beta = max(0.0, (t_large - t_small) / (large - small))
    return LinkCost(latency=max(0.0, t_small - beta * small), inverse_bandwidth=beta)


def _reduce_cost(nbytes: int, repeats: int = 5) -> float:
    x = torch.ones(nbytes // 4)
    y = torch.zeros_like(x)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        y.add_(x, alpha=0.5)
        times.append(time.perf_counter() - began)
    return float(np.median(times)) / nbytes


def _idle_until_done(comm: MPI.Comm) -> None:
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.0005)


def probe(small: int = 8, large: int = 4 << 20, repeats: int = 20) -> CostModel:
    """Collective: measure α, β per link class and γ on this job; returns the same model on every rank."""
    if not 0 < small < large:
        raise ValueError(f"need 0 < small < large message sizes, got {small} and {large}")
    rt = current()
    comm, rank, size = rt.comm, rt.rank, rt.size
    machine_of = comm.allgather(rt.machine_rank)
    local_sizes = comm.allgather(rt.local_comm.size)
    same = [r for r in range(1, size) if machine_of[r] == machine_of[0]]
    other = [r for r in range(1, size) if machine_of[r] != machine_of[0]]
    measured = {}
    for name, peers in (("intra", same), ("inter", other)):
        if peers:
            link = _link(comm, rank, (0, peers[0]), small, large, repeats)
            if link is None:
                _idle_until_done(comm)
            else:
                comm.Ibarrier().Wait()
            measured[name] = link
    reduce = _reduce_cost(large) if rank == 0 else None
    layout = {name: (link.latency, link.inverse_bandwidth) for name, link in measured.items() if link is not None}
    layout, reduce = comm.bcast((layout, reduce) if rank == 0 else None, root=0)
    if not layout:  # a single rank: nothing to measure
        layout = {"intra": (0.0, 0.0)}
    intra = layout.get("intra", layout.get("inter"))
    inter = layout.get("inter", intra)
    return CostModel(intra=LinkCost(*intra, reduce=reduce), inter=LinkCost(*inter, reduce=reduce), size=size,
                     ranks_per_machine=max(local_sizes))
