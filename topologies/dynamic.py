"""Time-varying (dynamic) topologies: per-step peers and weights, identical on every rank.

A :class:`DynamicTopology` answers, for step k and rank i, whom i sends to, whom it receives from
and with which weights (:class:`StepPeers`, the arguments ``gossip.neighbor_allreduce`` takes),
and the step's mixing matrix W(k) for analysis. Every family is a pure function of (step, rank)
and its construction arguments (including any random seed), so ranks agree without communicating.
One gossip step computes ``x_i <- self_weight * x_i + sum_j src_weights[j] * dst_weights_j[i] * x_j``,
so ``W(k)[i, j] = src_weights_i[j] * dst_weights_j[i]`` and ``W(k)[i, i] = self_weight_i``.

:meth:`DynamicTopology.resized` gives the same family on another number of ranks (the survivors of a
failed rank, after ``gossip.recover()``): each family is rebuilt from its construction arguments,
and a family that is a fixed list of graphs (:class:`GraphSequence`, :class:`OnePeer` over a given
graph) raises ValueError naming itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from topologies.static import ceil_log, check_seed, check_size
from topologies.weights import from_matrix, mixing_matrix, with_weights


@dataclass(frozen=True)
class StepPeers:
    """One rank's exchange at one step, in the form ``neighbor_allreduce`` takes.

    ``dst_weights`` maps each rank this rank sends to to the scale applied to what it sends
    (1.0 for plain averaging); ``src_weights`` maps each rank it receives from to the weight it
    gives that value; ``self_weight`` is the weight it gives its own value.
    """

    self_weight: float
    src_weights: dict[int, float]
    dst_weights: dict[int, float]


class DynamicTopology(ABC):
    """A sequence of mixing matrices W(0), W(1), ... given rank by rank.

    ``n`` is the number of ranks; ``period`` the number of steps after which the sequence repeats,
    or None for a random sequence that does not.
    """

    n: int
    period: int | None

    @abstractmethod
    def peers(self, step: int, rank: int) -> StepPeers:
        """Return ``rank``'s send/receive ranks and weights at ``step`` (step >= 0)."""

    def mixing_matrix(self, step: int) -> np.ndarray:
        """W(step): ``W[i, j]`` is the weight rank i gives to rank j's value at this step."""
        everyone = [self.peers(step, r) for r in range(self.n)]
        w = np.zeros((self.n, self.n))
        for i, p in enumerate(everyone):
            w[i, i] = p.self_weight
            for j, weight in p.src_weights.items():
                w[i, j] += weight * everyone[j].dst_weights[i]
        return w

    def graph(self, step: int) -> nx.DiGraph:
        """The step's weighted graph (edge ``j -> i`` carries ``W(step)[i, j]``)."""
        return from_matrix(self.mixing_matrix(step))

    def resized(self, n: int, *, local_size: int | None = None) -> DynamicTopology:
        """The same family, with the same parameters (seed, degree, ...), on ``n`` ranks; itself when
        nothing changes. ``local_size`` is the new number of ranks per machine, read by the
        machine-aware families only (default: theirs). Pure: no communication. ValueError naming the
        family where it has no rule to be rebuilt (a fixed list of graphs) or no graph on ``n`` ranks.
        """
        check_size(n)
        if n == self.n and local_size in (None, getattr(self, "local_size", None)):
            return self
        try:
            return self._resized(n, local_size)
        except ValueError as error:
            raise ValueError(f"{type(self).__name__} cannot be rebuilt for {n} ranks: {error}") from None

    def _resized(self, n: int, local_size: int | None) -> DynamicTopology:
        """The family on ``n`` ranks (:meth:`resized` has checked that something changes)."""
        raise ValueError("it has no rule to follow a change in the number of ranks")

    def _check(self, step: int, rank: int) -> None:
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(rank, int | np.integer) or not 0 <= rank < self.n:
            raise ValueError(f"rank {rank!r} out of range for {self.n} nodes")


class GraphSequence(DynamicTopology):
    """Cycle through a fixed list of weighted graphs: step k uses ``graphs[k mod len(graphs)]``.

    The graphs' own weights are used (edge ``j -> i`` is the weight receiver i gives j); sends are
    unscaled. Any finite schedule, e.g. the Base-(k+1) graphs, is one of these.
    """

    def __init__(self, graphs: Sequence[nx.DiGraph]) -> None:
        if not graphs:
            raise ValueError("a graph sequence needs at least one graph")
        sizes = {g.number_of_nodes() for g in graphs}
        if len(sizes) != 1:
            raise ValueError(f"every graph of a sequence must have the same nodes, got sizes {sorted(sizes)}")
        self.n = sizes.pop()
        check_size(self.n)
        self.period = len(graphs)
        self._graphs = [with_weights(g) for g in graphs]  # validates nodes and weights, as mixing_matrix reads them
        self._peers = [_peers_from_graph(g, self.n) for g in self._graphs]

    def peers(self, step: int, rank: int) -> StepPeers:
        self._check(step, rank)
        return self._peers[step % self.period][rank]

    def mixing_matrix(self, step: int) -> np.ndarray:
        self._check(step, 0)
        return mixing_matrix(self._graphs[step % self.period])

    def _resized(self, n: int, local_size: int | None) -> DynamicTopology:
        raise ValueError(f"it is a fixed list of {self.period} graph{'s' if self.period != 1 else ''} on {self.n} "
                         f"nodes; build the sequence for {n} ranks, or use a family that follows the number of "
                         "ranks (BaseGraph, OnePeerExponentialTwo, ...)")


def _peers_from_graph(graph: nx.DiGraph, n: int) -> list[StepPeers]:
    """Every rank's peers from the graph's edges (sparse: no n x n matrix)."""
    self_weight = [0.0] * n
    sources: list[dict[int, float]] = [{} for _ in range(n)]
    destinations: list[dict[int, float]] = [{} for _ in range(n)]
    for j, i, data in graph.edges(data=True):
        weight = float(data["weight"])
        if i == j:
            self_weight[i] = weight
        elif weight != 0.0:
            sources[i][j] = weight
            destinations[j][i] = 1.0
    return [StepPeers(self_weight[r], sources[r], destinations[r]) for r in range(n)]


class OnePeerFamily(DynamicTopology):
    """A family where each rank sends to at most one rank per step, given by :meth:`targets`.

    A receiver gives itself and each of its senders the same weight ``1 / (senders + 1)`` (1/2 with
    one sender), or, with ``neighbor_weight`` set, gives each sender that weight and keeps the rest.
    When every rank has at most one sender, W(k) = the identity's rows mixed with a partial
    permutation: doubly stochastic.
    """

    neighbor_weight: float | None = None

    _CACHE_STEPS = 256  # periodic schedules keep this many steps' targets

    @abstractmethod
    def targets(self, step: int) -> list[int | None] | np.ndarray:
        """For every rank, the rank it sends to at ``step``: a list (None: nobody) or an int array (-1: nobody)."""

    def _targets(self, step: int) -> np.ndarray:
        """The step's targets as an int64 array (-1: sends to nobody), cached by step (mod period)."""
        key = step % self.period if self.period else step
        cache = self.__dict__.setdefault("_target_cache", {})
        found = cache.get(key)
        if found is None:
            raw = self.targets(step)
            if isinstance(raw, np.ndarray):
                found = raw.astype(np.int64, copy=False)
            else:
                found = np.array([-1 if t is None else t for t in raw], dtype=np.int64)
            if len(cache) >= (self._CACHE_STEPS if self.period else 1):
                cache.clear()
            cache[key] = found
        return found

    def peers(self, step: int, rank: int) -> StepPeers:
        self._check(step, rank)
        targets = self._targets(step)
        mine = [int(j) for j in np.flatnonzero(targets == rank) if j != rank]
        if self.neighbor_weight is None:
            weight = 1.0 / (len(mine) + 1)
            self_weight = weight
        else:
            weight = self.neighbor_weight
            self_weight = 1.0 - weight * len(mine)
        target = int(targets[rank])
        dst = {target: 1.0} if target >= 0 and target != rank else {}
        return StepPeers(self_weight, dict.fromkeys(mine, weight), dst)


class OnePeerExponentialTwo(OnePeerFamily):
    """One-peer exponential-2 graph (Ying et al., "Exponential Graph is Provably Efficient for
    Decentralized Deep Training", NeurIPS 2021).

    At step k, with ``tau = ceil(log2 n)`` and hop ``2^(k mod tau)``, rank i sends to
    ``(i + hop) mod n`` and receives from ``(i - hop) mod n``; each rank averages its value
    with the one it receives, weight 1/2 each. Every W(k) is doubly stochastic; when n is a power
    of two, the product of any tau consecutive W(k) is exactly the averaging matrix 11^T/n.
    """

    def __init__(self, n: int) -> None:
        check_size(n)
        self.n = n
        self.period = max(1, ceil_log(n, 2))

    def offset(self, step: int) -> int:
        """The step's hop distance ``2^(step mod period)``; 0 when n = 1."""
        return 0 if self.n == 1 else 2 ** (step % self.period)

    def targets(self, step: int) -> np.ndarray:
        hop = self.offset(step)
        return (np.arange(self.n) + hop) % self.n if hop else np.full(self.n, -1)

    def _resized(self, n: int, local_size: int | None) -> OnePeerExponentialTwo:
        return OnePeerExponentialTwo(n)


class OnePeer(OnePeerFamily):
    """One-peer version of any static graph: at step k each rank sends to one of its out-neighbours.

    Rank j orders its out-neighbours d by their offset ``(d - j) mod n`` and at step k sends to the
    one at position ``k mod outdegree(j)``; receivers average uniformly with whoever sent to them.
    On a circulant (ring, exponential graphs) every rank uses the same offset, so each W(k) is
    doubly stochastic and ``OnePeer(exponential_two(n))`` is :class:`OnePeerExponentialTwo`;
    on an irregular graph W(k) is row-stochastic only. ``period`` is the lcm of the out-degrees.
    """

    def __init__(self, base: nx.DiGraph) -> None:
        w = mixing_matrix(base)
        self.n = w.shape[0]
        check_size(self.n)
        self._out = []
        for j in range(self.n):
            outs = [int(i) for i in np.flatnonzero(w[:, j]) if i != j]
            self._out.append(sorted(outs, key=lambda d, j=j: (d - j) % self.n))
        self.period = math.lcm(*(len(o) for o in self._out if o)) if any(self._out) else 1

    def targets(self, step: int) -> list[int | None]:
        return [outs[step % len(outs)] if outs else None for outs in self._out]

    def _resized(self, n: int, local_size: int | None) -> DynamicTopology:
        raise ValueError(f"it follows a fixed base graph on {self.n} nodes; build OnePeer over a graph on {n} "
                         "nodes, or use OnePeerExponentialTwo, which follows the number of ranks")


class RandomMatching(OnePeerFamily):
    """A fresh random perfect matching every step; matched pairs average (weight 1/2 each).

    The matching at step k pairs consecutive entries of a permutation drawn from
    ``numpy.random.default_rng([seed, k])``, so every rank computes the same one without
    communicating; with n odd, one rank (the last of the permutation) sits the step out.
    W(k) is symmetric and doubly stochastic (randomized gossip: Boyd et al., "Randomized Gossip
    Algorithms", IEEE Trans. Inf. Theory, 2006).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        check_size(n)
        check_seed(seed)
        self.n = n
        self.seed = seed
        self.period = None

    def targets(self, step: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, step]).permutation(self.n)
        pairs = self.n // 2
        targets = np.full(self.n, -1)
        targets[order[0:2 * pairs:2]] = order[1:2 * pairs:2]
        targets[order[1:2 * pairs:2]] = order[0:2 * pairs:2]
        return targets

    def _resized(self, n: int, local_size: int | None) -> RandomMatching:
        return RandomMatching(n, self.seed)
