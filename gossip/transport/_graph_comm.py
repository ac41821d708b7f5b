"""A static topology bound to MPI: validated weights and its dist-graph communicator."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import networkx as nx
import numpy as np
from mpi4py import MPI

from gossip.errors import InputMismatchError
from gossip.transport._waiting import Watchdog

WEIGHT_TOLERANCE = 1e-6


def graph_problems(graph: object, size: int, allow_negative: bool = False, any_row_sums: bool = False) -> list[str]:
    """Everything wrong with ``graph`` as a topology for ``size`` ranks (empty list if valid).

    Checks: a ``networkx.DiGraph``; nodes exactly ``0..size-1``; either no edge weighted (uniform
    weights are then used) or every edge weighted; finite weights, non-negative unless
    ``allow_negative``; each receiver's weights (self-loop included) summing to 1 unless
    ``any_row_sums``.
    """
    if not isinstance(graph, nx.DiGraph):
        return [f"topology must be a networkx.DiGraph, got {type(graph).__name__}"]
    nodes = set(graph.nodes)
    expected = set(range(size))
    if nodes != expected:
        extra = sorted(nodes - expected, key=repr)[:5]
        missing = sorted(expected - nodes)[:5]
        return [f"graph nodes must be exactly 0..{size - 1} (one per rank); extra {extra}, missing {missing}"]
    weighted = [("weight" in d) for _, _, d in graph.edges(data=True)]
    if not any(weighted):
        return []
    problems = []
    if not all(weighted):
        missing_w = [(j, i) for j, i, d in graph.edges(data=True) if "weight" not in d][:5]
        problems.append(f"some edges have no 'weight' while others do, e.g. edges {missing_w}")
        return problems
    row_sums = np.zeros(size)
    for j, i, d in graph.edges(data=True):
        w = float(d["weight"])
        if not np.isfinite(w):
            problems.append(f"edge {j}->{i} has non-finite weight {w}")
        elif w < 0 and not allow_negative:
            problems.append(f"edge {j}->{i} has negative weight {w}")
        row_sums[i] += w
    if any_row_sums:
        return problems
    bad = [i for i in range(size) if abs(row_sums[i] - 1.0) > WEIGHT_TOLERANCE]
    for i in bad[:10]:
        problems.append(f"weights received by rank {i} (self-loop included) sum to {row_sums[i]:.9g}, not 1 "
                        "(set_topology(..., allow_any_row_sums=True) takes weights as given)")
    return problems


def graph_fingerprint(graph: nx.DiGraph) -> int:
    """A 62-bit hash of the edges and weights (rounded to 12 digits), equal on equal graphs."""
    edges = sorted((int(j), int(i), round(float(d.get("weight", 0.0)), 12)) for j, i, d in graph.edges(data=True))
    digest = hashlib.blake2b(repr(edges).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class StaticTopology:
    """One rank's view of a validated static topology.

    ``sources`` are the in-neighbours in the order their values arrive from
    ``Neighbor_allgather``; ``src_weights[k]`` is the weight for ``sources[k]``. ``allow_negative``
    and ``any_row_sums`` are the checks the graph was accepted under (:func:`graph_problems`), for
    a graph rebuilt from the same builder.
    """

    graph: nx.DiGraph
    sources: list[int]
    destinations: list[int]
    self_weight: float
    src_weights: list[float]
    dist_comm: MPI.Topocomm
    allow_negative: bool = False
    any_row_sums: bool = False

    def free(self) -> None:
        """Release the dist-graph communicator."""
        if self.dist_comm != MPI.COMM_NULL:
            self.dist_comm.Free()


def build_static_topology(comm: MPI.Comm, graph: nx.DiGraph, allow_negative: bool = False,
                          any_row_sums: bool = False, *, watchdog: Watchdog | None = None,
                          what: str = "set_topology") -> StaticTopology:
    """Collective: validate ``graph`` on every rank (:func:`graph_problems`), check that all ranks
    hold the same graph, and create its dist-graph communicator
    (``MPI_Dist_graph_create_adjacent``, MPI-3.1 §7.5.4).

    Raises :class:`InputMismatchError` on every rank if any rank's graph is invalid or differs.
    With a ``watchdog``, the agreement (one ``MPI_Iallreduce``, which every rank must reach
    before the blocking creation) waits under it: a rank far behind raises
    :class:`gossip.OpTimeoutError` naming ``what`` on the others.
    """
    problems = graph_problems(graph, comm.size, allow_negative, any_row_sums)
    fingerprint = 0 if problems else graph_fingerprint(graph)
    local = np.array([1 if problems else 0, fingerprint, -fingerprint], dtype=np.int64)
    agreed = np.zeros_like(local)
    if watchdog is None:
        comm.Allreduce(local, agreed, op=MPI.MAX)
    else:
        watchdog.wait([comm.Iallreduce(local, agreed, op=MPI.MAX)], what)
    if agreed[0] or agreed[1] != -agreed[2]:
        fingerprints = comm.allgather(fingerprint)
        lines = [f"rank {comm.rank}: {p}" for p in problems]
        if not agreed[0]:
            groups: dict[int, list[int]] = {}
            for r, f in enumerate(fingerprints):
                groups.setdefault(f, []).append(r)
            lines.append(
                "ranks passed different graphs to set_topology: "
                + "; ".join(f"ranks {rs} hold graph #{k}" for k, rs in enumerate(groups.values()))
            )
        elif not problems:
            lines.append("another rank's graph is invalid (see its message)")
        details = "\n  ".join(lines)
        raise InputMismatchError(f"set_topology failed on rank {comm.rank}:\n  {details}")

    rank = comm.rank
    has_weights = graph.number_of_edges() > 0 and all("weight" in d for _, _, d in graph.edges(data=True))
    sources = sorted(j for j in graph.predecessors(rank) if j != rank)
    destinations = sorted(i for i in graph.successors(rank) if i != rank)
    if has_weights:
        self_weight = float(graph[rank][rank]["weight"]) if graph.has_edge(rank, rank) else 0.0
        src_weights = [float(graph[j][rank]["weight"]) for j in sources]
    else:
        self_weight = 1.0 / (len(sources) + 1)
        src_weights = [self_weight] * len(sources)
    dist_comm = comm.Create_dist_graph_adjacent(sources, destinations, reorder=False)
    return StaticTopology(graph, sources, destinations, self_weight, src_weights, dist_comm, allow_negative,
                          any_row_sums)
