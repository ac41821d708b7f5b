"""Base-(k+1) graphs: finite sequences of graphs, max degree k, that average exactly, for any n.

Takezawa, Sato, Bao, Niwa and Yamada, "Beyond Exponential Graph: Communication-Efficient
Topologies for Decentralized Learning via Finite-time Convergence", NeurIPS 2023. With b = k + 1:

* **k-peer hyper-hypercube** H(n), for n whose prime factors are all <= b. Factor n greedily
  (largest factor <= b first), sort the factors ascending: f_0 <= f_1 <= ... Step t groups the
  nodes whose mixed-radix digits (radices f_0, f_1, ...) differ only in digit t into cliques of
  f_t nodes, weight 1/f_t each. After all steps every node holds the exact average.
* **Simple Base-(k+1) graph** S(n), any n. Write n in base b, keeping nonzero digits:
  ``n = sum_l a_l b^(p_l)`` with p_0 > p_1 > ..., 1 <= a_l <= k. Group V_l is the next run of
  ``n_l = a_l b^(p_l)`` consecutive ids, cut into a_l sub-blocks of b^(p_l). Phase 1
  (len H(n_0) steps): every group runs H on itself, shorter ones repeating. Now each group holds
  its own average. Phase 2 (p_0 + 1 steps), step t, groups l from last to first:
  - l > t ("gather"): each node i of V_l pairs with one unused node j of every sub-block of
    V_t: ``w_ij = w_ji = n_t / (N_t a_t)`` with ``N_t = sum_{s >= t} n_s``, ``w_ii = 1 - n_t/N_t``,
    ``w_jj = 1 - n_t/(N_t a_t)``: V_l now holds the average of V_t, V_t+1, ...;
  - l = t, not the last group: the unused nodes of V_t, in chunks of b, form cliques
    (``inner_edges``; they already agree, so this only changes what the graphs look like);
  - otherwise: the group runs its next H step, on each sub-block (a single clique when p_l = 0).
  Total ``2 p_0 + 1 + [a_0 > 1]`` steps, at most ``2 log_b n + 2``.
* **Base-(k+1) graph** B(n): with q the largest divisor of n whose prime factors are <= b and
  r = n / q, either S(n), or S(r) on the q blocks of r consecutive ids followed by H(q) on the r
  strided sets ``{j, j + r, ..., j + (q - 1) r}``; the split is used unless S(n) is shorter.

Every step's W is symmetric and doubly stochastic, each node has at most k neighbours, and
``W(m) ... W(1) = 11^T / n`` exactly (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from topologies.dynamic import GraphSequence
from topologies.static import check_size

Step = dict[tuple[int, int], float]  # (i, j) -> W[i, j]; a missing diagonal entry means 1


def _check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"the maximum degree k must be an int >= 1, got {k!r}")
    return k + 1


def _factors(n: int, b: int) -> list[int] | None:
    """n's greedy factors <= b, ascending; None if n has a prime factor > b."""
    factors = []
    for f in range(b, 1, -1):
        while n % f == 0:
            factors.append(f)
            n //= f
    return sorted(factors) if n == 1 else None


def _clique(step: Step, members: Sequence[int]) -> None:
    weight = 1.0 / len(members)
    for i in members:
        for j in members:
            step[i, j] = weight


def _in_parallel(sequences: list[list[Step]], count: int) -> list[Step]:
    """``count`` steps in which every sequence (on disjoint nodes) runs its step m, shorter ones repeating."""
    merged: list[Step] = []
    for m in range(count):
        step: Step = {}
        for sequence in sequences:
            step.update(sequence[m % len(sequence)])
        merged.append(step)
    return merged


def _hyper_hypercube(nodes: Sequence[int], b: int) -> list[Step]:
    factors = _factors(len(nodes), b)
    if factors is None:
        raise ValueError(f"a {b - 1}-peer hyper-hypercube needs every prime factor of n <= {b}, got n = {len(nodes)}")
    steps: list[Step] = []
    stride = 1
    for f in factors:
        step: Step = {}
        for first in range(len(nodes)):
            if (first // stride) % f == 0:  # digit t is 0: the clique's first member
                _clique(step, [nodes[first + d * stride] for d in range(f)])
        steps.append(step)
        stride *= f
    return steps or [{}]


def _simple(nodes: Sequence[int], b: int, inner_edges: bool) -> list[Step]:
    n = len(nodes)
    if n == 1 or _factors(n, b) is not None:
        return _hyper_hypercube(nodes, b)
    digits, power, rest = [], 0, n  # (a_l, p_l) for the nonzero base-b digits, largest p first
    while rest:
        if rest % b:
            digits.append((rest % b, power))
        rest //= b
        power += 1
    digits.reverse()
    groups, blocks, start = [], [], 0
    for a, p in digits:
        size = b**p
        groups.append(list(nodes[start:start + a * size]))
        blocks.append([list(nodes[start + c * size:start + (c + 1) * size]) for c in range(a)])
        start += a * size
    count = len(groups)
    own = [_hyper_hypercube(g, b) for g in groups]
    steps = _in_parallel(own, len(own[0]))  # phase 1: every group averages itself
    sub_steps = [[_hyper_hypercube(block, b) for block in blocks[lv]] for lv in range(count)]
    counters = [0] * count
    sizes = [len(g) for g in groups]
    for t in range(digits[0][1] + 1):  # phase 2
        step = {}
        unused = [list(block) for block in blocks[t]] if t < count else []
        for lv in range(count - 1, -1, -1):
            if t < lv:
                a_t, n_t, total = len(blocks[t]), sizes[t], sum(sizes[t:])
                for i in groups[lv]:
                    step[i, i] = 1.0 - n_t / total
                    for block in unused:
                        j = block.pop()
                        step[i, j] = step[j, i] = n_t / (total * a_t)
                        step[j, j] = 1.0 - n_t / (total * a_t)
            elif t == lv and lv != count - 1:
                if inner_edges:
                    left = [j for block in unused for j in block]
                    for c in range(0, len(left), b):
                        if len(left[c:c + b]) > 1:
                            _clique(step, left[c:c + b])
            else:
                for sequence in sub_steps[lv]:
                    step.update(sequence[counters[lv] % len(sequence)])
                counters[lv] += 1
        steps.append(step)
    return steps


def _base(n: int, b: int, inner_edges: bool) -> list[Step]:
    nodes = list(range(n))
    simple = _simple(nodes, b, inner_edges)
    q, rest = 1, n  # q: the largest divisor of n with every prime factor <= b
    for f in range(2, b + 1):
        while rest % f == 0:
            rest //= f
            q *= f
    r = n // q
    if q == 1 or r == 1:
        return simple
    inner = [_simple(nodes[i * r:(i + 1) * r], b, inner_edges) for i in range(q)]
    outer = [_hyper_hypercube(nodes[j::r], b) for j in range(r)]
    if len(simple) < len(inner[0]) + len(outer[0]):
        return simple
    return _in_parallel(inner, len(inner[0])) + _in_parallel(outer, len(outer[0]))


def _graphs(n: int, steps: list[Step]) -> list[nx.DiGraph]:
    graphs = []
    for step in steps:
        graph = nx.DiGraph()
        graph.add_nodes_from(range(n))
        for (i, j), weight in step.items():
            graph.add_edge(j, i, weight=weight)
        for i in range(n):
            if not graph.has_edge(i, i):
                graph.add_edge(i, i, weight=1.0)
        graphs.append(graph)
    return graphs


def hyper_hypercube(n: int, k: int) -> list[nx.DiGraph]:
    """The k-peer hyper-hypercube sequence on n nodes (every prime factor of n must be <= k + 1)."""
    check_size(n)
    return _graphs(n, _hyper_hypercube(list(range(n)), _check_k(k)))


def simple_base_graph(n: int, k: int, inner_edges: bool = True) -> list[nx.DiGraph]:
    """The simple Base-(k+1) sequence on n nodes: ``2 p_0 + 1 + [a_0 > 1]`` graphs (module docstring)."""
    check_size(n)
    return _graphs(n, _simple(list(range(n)), _check_k(k), inner_edges))


def base_graph(n: int, k: int, inner_edges: bool = True) -> list[nx.DiGraph]:
    """The Base-(k+1) sequence on n nodes: max degree k per graph, exact average after all of them.

    ``inner_edges=False`` drops the phase-2 cliques among nodes that already agree (fewer
    messages, same exact average; the paper's graphs keep them).
    """
    check_size(n)
    return _graphs(n, _base(n, _check_k(k), inner_edges))


class BaseGraph(GraphSequence):
    """The Base-(k+1) graph as a time-varying topology: cycles through :func:`base_graph` (n, k).

    Any ``period`` consecutive steps starting at a multiple of ``period`` average exactly.
    """

    def __init__(self, n: int, k: int = 1, inner_edges: bool = True) -> None:
        super().__init__(base_graph(n, k, inner_edges))
        self.k = k
        self.inner_edges = inner_edges

    def _resized(self, n: int, local_size: int | None) -> BaseGraph:
        return BaseGraph(n, self.k, self.inner_edges)
