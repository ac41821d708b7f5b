"""BlueFog's ``topology_util``: its graph builders, weight readers and per-step peer generators.

Stands for ``bluefog.common.topology_util`` (and ``bluefog.torch.topology_util``). Every graph is a
weighted ``networkx.DiGraph`` in BlueFog's convention, which is this library's: the adjacency
matrix ``A`` has ``A[i, j]`` = the weight of edge ``i -> j``, i.e. the weight **receiver j gives
sender i** (``GetRecvWeights(G, j)`` reads column j), and self-loops carry self weights. So
``topologies.mixing_matrix(G)`` is ``A.T``. Where :mod:`topologies` builds the same graph it is
used (exponential, fully connected, 2-D mesh, star, rings); the tests check each graph against the
matrix BlueFog documents.

Two deliberate differences: :func:`isPowerOf` is exact (BlueFog's rounds ``log(x, base)`` in
floating point and misses, e.g., 243 = 3^5 and 1000 = 10^3, so its ``ExponentialGraph(n, 3)``
lacks the offset 243 when n > 243); and the collective ``Infer*`` functions normalise each column
of the adjacency matrix by its own sum, as documented (BlueFog's code divides by row sums, which
agrees whenever every rank has as many senders as receivers, e.g. one-peer schedules).

The graphs: the exponential graph (Assran et al., "Stochastic Gradient Push for Distributed Deep
Learning", ICML 2019; Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep
Training", NeurIPS 2021); Metropolis–Hastings weights on the mesh (Xiao and Boyd, "Fast linear
iterations for distributed averaging", Systems & Control Letters, 2004).
"""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx
import numpy as np

import gossip
import topologies
from gossip.compat.bluefog._objects import allgather_object
from topologies.static import circulant

__all__ = ["ExponentialGraph", "ExponentialTwoGraph", "FullyConnectedGraph", "GetDynamicOnePeerSendRecvRanks",
           "GetExp2DynamicSendRecvMachineRanks", "GetInnerOuterExpo2DynamicSendRecvRanks",
           "GetInnerOuterRingDynamicSendRecvRanks", "GetRecvWeights", "GetSendWeights",
           "InferDestinationFromSourceRanks", "InferSourceFromDestinationRanks", "IsRegularGraph",
           "IsTopologyEquivalent", "MeshGrid2DGraph", "RingGraph", "StarGraph", "SymmetricExponentialGraph",
           "isPowerOf"]


def _adjacency(topo: nx.DiGraph) -> np.ndarray:
    return nx.to_numpy_array(topo, nodelist=sorted(topo.nodes))


def IsTopologyEquivalent(topo1: nx.DiGraph | None, topo2: nx.DiGraph | None) -> bool:  # noqa: N802 - BlueFog's name
    """True if both graphs have the same number of nodes and edges and the same weighted adjacency
    matrix (not an isomorphism test); False if either is None."""
    if topo1 is None or topo2 is None:
        return False
    if topo1.number_of_nodes() != topo2.number_of_nodes() or topo1.number_of_edges() != topo2.number_of_edges():
        return False
    return bool(np.array_equal(_adjacency(topo1), _adjacency(topo2)))


def GetRecvWeights(topo: nx.DiGraph, rank: int) -> tuple[float, dict[int, float]]:  # noqa: N802
    """``(self_weight, {source: weight})``: what ``rank`` gives itself and each in-neighbour, read
    from the edges into it (``A[source, rank]``); self weight 0 without a self-loop."""
    return _split_self(rank, {src: topo[src][rank] for src in topo.predecessors(rank)})


def GetSendWeights(topo: nx.DiGraph, rank: int) -> tuple[float, dict[int, float]]:  # noqa: N802
    """``(self_weight, {destination: weight})``: the weights on the edges out of ``rank`` (``A[rank, dst]``)."""
    return _split_self(rank, {dst: topo[rank][dst] for dst in topo.successors(rank)})


def _split_self(rank: int, edges: dict) -> tuple[float, dict[int, float]]:
    """``(self_weight, {other: weight})`` from ``rank``'s edges (each weight 1 unless given); self
    weight 0 without a self-loop."""
    weights = {int(other): float(edge.get("weight", 1.0)) for other, edge in edges.items()}
    return weights.pop(rank, 0.0), weights


def isPowerOf(x: int, base: int) -> bool:  # noqa: N802
    """True if ``x = base^k`` for some integer k >= 0 (exact integer arithmetic)."""
    if not isinstance(base, int) or base < 2:
        raise ValueError(f"base has to be an integer larger than 1, got {base!r}")
    if x <= 0:
        raise ValueError(f"x has to be positive, got {x!r}")
    while x % base == 0:
        x //= base
    return x == 1


def ExponentialGraph(size: int, base: int = 2) -> nx.DiGraph:  # noqa: N802
    """Node i sends to ``i + base^k mod size`` for every ``base^k < size``; each receiver gives itself
    and each sender ``1/(degree + 1)``. The same graph as ``topologies.exponential(size, base)``."""
    return topologies.exponential(size, base)


def ExponentialTwoGraph(size: int) -> nx.DiGraph:  # noqa: N802
    """``ExponentialGraph(size, 2)``: BlueFog's default topology (and this library's)."""
    return topologies.exponential(size, 2)


def SymmetricExponentialGraph(size: int, base: int = 4) -> nx.DiGraph:  # noqa: N802
    """Node i sends to ``i + d mod size`` for every ``d`` in 1..size-1 whose distance around the ring,
    ``min(d, size - d)`` (d itself when ``d <= size // 2``), is a power of ``base``; uniform weights.

    Not always ``topologies.symmetric_exponential``: that one takes every ``±base^k`` with
    ``base^k < size``, which adds offsets such as 6 and 16 on 22 nodes with base 2."""
    topologies.static.check_size(size)
    offsets = {d for d in range(1, size) if isPowerOf(d if d <= size // 2 else size - d, base)}
    return circulant(size, offsets)


def MeshGrid2DGraph(size: int, shape: tuple[int, int] | None = None) -> nx.DiGraph:  # noqa: N802
    """2-D grid of ``rows x cols`` nodes (node ``r * cols + c``; default: the closest factor pair,
    rows <= cols) with Metropolis–Hastings weights ``1/(1 + max(d_i, d_j))``: ``topologies.mesh``."""
    return topologies.mesh(size, None if shape is None else tuple(int(s) for s in shape))


def StarGraph(size: int, center_rank: int = 0) -> nx.DiGraph:  # noqa: N802
    """Every node exchanges with ``center_rank``: leaves keep ``1 - 1/size`` and give ``1/size`` to
    the center, the center keeps ``1/size`` and gives ``1/size`` to each leaf (``topologies.star``)."""
    return topologies.star(size, center_rank)


def RingGraph(size: int, connect_style: int = 0) -> nx.DiGraph:  # noqa: N802
    """Ring. ``connect_style`` 0: node i exchanges with i ± 1, weight 1/3 each; 1 (left): i sends to
    i - 1, weight 1/2; 2 (right): i sends to i + 1, weight 1/2. One node: self weight 1; two nodes:
    every weight 1/2 whatever the style."""
    if connect_style not in (0, 1, 2):
        raise ValueError(f"connect_style has to be 0 (both sides), 1 (left) or 2 (right), got {connect_style!r}")
    topologies.static.check_size(size)
    if size <= 2 or connect_style == 0:
        return topologies.ring(size)
    return circulant(size, {size - 1} if connect_style == 1 else {1})


def FullyConnectedGraph(size: int) -> nx.DiGraph:  # noqa: N802
    """Every node exchanges with every other, weight ``1/size`` everywhere: ``topologies.fully_connected``."""
    return topologies.fully_connected(size)


def IsRegularGraph(topo: nx.DiGraph) -> bool:  # noqa: N802
    """True if every node has the same degree (in + out edges, a self-loop counting twice), as BlueFog."""
    degrees = {d for _, d in topo.degree()}
    return len(degrees) <= 1


def GetDynamicOnePeerSendRecvRanks(topo: nx.DiGraph, self_rank: int) -> Iterator[tuple[list[int], list[int]]]:  # noqa: N802
    """Yield, step after step, ``([send_rank], recv_ranks)`` of a one-peer schedule over ``topo``.

    Each rank orders its out-neighbours clockwise (by ``(d - rank) mod size``) and at step k sends to
    the one at position ``k mod outdegree``; ``recv_ranks`` are the ranks sending to ``self_rank`` at
    that step, in rank order. The schedule of ``topologies.OnePeer(topo)``."""
    family = topologies.OnePeer(topo)
    step = 0
    while True:
        targets = family.targets(step)
        send = targets[self_rank]
        recv = [j for j, t in enumerate(targets) if t == self_rank and j != self_rank]
        yield ([] if send is None else [int(send)]), recv
        step += 1


def _machines(world_size: int, local_size: int) -> int:
    if local_size < 1 or world_size % local_size:
        raise ValueError(f"{world_size} ranks do not split into machines of {local_size}: it should be used "
                         "under homogeneous environment only")
    return world_size // local_size


def GetExp2DynamicSendRecvMachineRanks(world_size: int, local_size: int, self_rank: int,  # noqa: N802
                                       local_rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_machine], [recv_machine])`` of one-peer exponential-2 over the machines: at step
    k machine m sends to ``m + 2^(k mod t)`` and receives from ``m - 2^(k mod t)`` (mod the number of
    machines M), ``t = floor(log2(M - 1)) + 1`` (1 for M = 1). Needs at least two machines."""
    machines = _machines(world_size, local_size)
    if self_rank % local_size != local_rank:
        raise ValueError("it should be used under homogeneous environment only: rank "
                         f"{self_rank} is not local rank {local_rank} of machines of {local_size}")
    if machines < 2:
        raise ValueError("it should be used with at least two machines")
    machine, period = self_rank // local_size, (machines - 1).bit_length()
    step = 0
    while True:
        hop = 2 ** (step % period)
        yield [(machine + hop) % machines], [(machine - hop) % machines]
        step += 1


def _inner_outer(world_size: int, local_size: int, self_rank: int, ring: bool) -> Iterator[tuple[list[int], list[int]]]:
    machines = _machines(world_size, local_size)
    if local_size <= 2:
        raise ValueError("inner/outer schedules need more than 2 ranks per machine; use "
                         "hierarchical_neighbor_allreduce or GetDynamicOnePeerSendRecvRanks")
    machine, local = divmod(self_rank, local_size)
    if not ring and machines < 2:
        raise ValueError("the inner/outer exponential-2 schedule needs at least two machines")
    out_period = 1 if ring else (machines - 1).bit_length()  # floor(log2(M - 1)) + 1
    in_period = 1 if ring else (local_size - 2).bit_length()
    step = 0
    while True:
        outer = step % local_size
        if local == outer:  # this rank talks to the same local rank of another machine
            hop = 1 if ring else 2 ** (step % out_period)
            send = ((machine + hop) % machines) * local_size + local
            recv = ((machine - hop) % machines) * local_size + local
        else:  # among the other local ranks, skipping the outer one
            hop = 1 if ring else 2 ** (step % in_period)
            forward = hop + 1 if hop >= (outer - local) % local_size else hop
            backward = hop + 1 if hop >= (local - outer) % local_size else hop
            send = machine * local_size + (local + forward) % local_size
            recv = machine * local_size + (local - backward) % local_size
        yield [send], [recv]
        step += 1


def GetInnerOuterRingDynamicSendRecvRanks(world_size: int, local_size: int,  # noqa: N802
                                          self_rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_rank], [recv_rank])`` of the inner/outer ring: at step k local rank
    ``o = k mod local_size`` of every machine sends to local rank o of the next machine (and receives
    from the previous one); the other local ranks pass to the next local rank of their machine,
    skipping o. Homogeneous machines of more than 2 ranks."""
    return _inner_outer(world_size, local_size, self_rank, ring=True)


def GetInnerOuterExpo2DynamicSendRecvRanks(world_size: int, local_size: int,  # noqa: N802
                                           self_rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``([send_rank], [recv_rank])`` of the inner/outer exponential-2 schedule: as the inner/outer
    ring, but the outer rank's hop is ``2^(k mod (floor(log2(M - 1)) + 1))`` machines and the inner
    hop ``2^(k mod (floor(log2(local_size - 2)) + 1))`` local ranks, one more when the hop reaches or
    passes the outer rank. Homogeneous machines of more than 2 ranks, at least two machines."""
    return _inner_outer(world_size, local_size, self_rank, ring=False)


def _infer(ranks: list[int], transpose: bool, construct_adjacency_matrix: bool, what: str):
    size, me = gossip.size(), gossip.rank()
    ranks = list(ranks)
    if any(not isinstance(r, int | np.integer) or not 0 <= r < size for r in ranks) or len(set(ranks)) != len(ranks) \
            or me in ranks:
        raise ValueError(f"rank {me}: {what} must be distinct ranks in 0..{size - 1} other than this rank, got {ranks}")
    every = allgather_object(sorted(int(r) for r in ranks))
    adjacency = np.eye(size)
    for k, listed in enumerate(every):
        adjacency[k, listed] = 1.0
    if transpose:  # rank k listed its sources: the edges point into k
        adjacency = adjacency.T
    found = [k for k in range(size) if k != me and (adjacency[me, k] if transpose else adjacency[k, me])]
    if not construct_adjacency_matrix:
        return found
    return found, adjacency / adjacency.sum(axis=0, keepdims=True)


def InferSourceFromDestinationRanks(dst_ranks: list[int], construct_adjacency_matrix: bool = False):  # noqa: N802
    """Collective: every rank names the ranks it sends to; returns the ranks that send to this one
    (sorted), and with ``construct_adjacency_matrix`` also the matrix ``W`` with ``W[i, j] > 0`` when
    i sends to j (self-loops included), each column scaled to sum to 1 (uniform receive weights)."""
    return _infer(dst_ranks, False, construct_adjacency_matrix, "dst_ranks")


def InferDestinationFromSourceRanks(src_ranks: list[int], construct_adjacency_matrix: bool = False):  # noqa: N802
    """Collective: every rank names the ranks it receives from; returns the ranks this one sends to
    (sorted), and optionally the column-normalised adjacency matrix as
    :func:`InferSourceFromDestinationRanks`."""
    return _infer(src_ranks, True, construct_adjacency_matrix, "src_ranks")
