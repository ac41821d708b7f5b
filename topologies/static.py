"""Static graph families, each a function returning a weighted ``networkx.DiGraph``.

Edge ``j -> i`` carries the weight receiver i gives to sender j; self-loops carry self weights.
"""

from __future__ import annotations

import math

import networkx as nx

from topologies.weights import uniform_weights


def _check_size(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of nodes must be a positive int, got {n!r}")


def _circulant(n: int, offsets: set[int]) -> nx.DiGraph:
    """Node i sends to ``(i + o) mod n`` for each offset o (0 and duplicates dropped), uniform weights."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for o in offsets:
            if o % n:
                graph.add_edge(i, (i + o) % n)
    return uniform_weights(graph)


def ring(n: int) -> nx.DiGraph:
    """Bidirectional ring: i exchanges with ``i-1`` and ``i+1`` (mod n), weight 1/3 each (n >= 3).

    n = 2 gives one neighbour with weight 1/2; n = 1 a single node with self weight 1.
    Doubly stochastic; for n >= 3 the spectral gap is ``(1 - cos(2 pi / n)) * 2/3``, i.e. O(1/n^2).
    """
    _check_size(n)
    return _circulant(n, {1, n - 1})


def exponential_two(n: int) -> nx.DiGraph:
    """Static exponential-2 graph: i sends to ``(i + 2^k) mod n`` for ``k = 0 .. ceil(log2 n) - 1``.

    Every node has the same in- and out-degree (a circulant graph), so uniform weights
    ``1 / (degree + 1)`` are doubly stochastic. Its spectral gap is O(1/log n) (Ying et al.,
    "Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021).
    This is the runtime's default topology.
    """
    _check_size(n)
    steps = math.ceil(math.log2(n)) if n > 1 else 0
    return _circulant(n, {2**k for k in range(steps)})


def fully_connected(n: int) -> nx.DiGraph:
    """Complete graph with weights 1/n: one gossip step is the exact average."""
    _check_size(n)
    return _circulant(n, set(range(1, n)))


def star(n: int, center: int = 0, leaf_self_weight: float | None = None) -> nx.DiGraph:
    """Star: every leaf exchanges with ``center``; symmetric, doubly stochastic weights.

    Each leaf keeps ``leaf_self_weight`` (default ``1 - 1/n``, the maximum-degree rule) and gives
    ``a = 1 - leaf_self_weight`` to the center; the center gives ``a`` to each leaf and keeps
    ``1 - (n - 1) a``. Requires ``0 <= a <= 1/(n-1)`` so that the center's self weight is >= 0.
    """
    _check_size(n)
    if not 0 <= center < n:
        raise ValueError(f"center {center} is not a node of a {n}-node graph")
    if leaf_self_weight is None:
        leaf_self_weight = 1.0 - 1.0 / n
    a = 1.0 - leaf_self_weight
    if not 0.0 <= a <= 1.0 / max(n - 1, 1) + 1e-12:
        raise ValueError(
            f"leaf_self_weight must be in [1 - 1/(n-1), 1] = [{1 - 1 / max(n - 1, 1):.4g}, 1] "
            f"for n = {n}, got {leaf_self_weight}"
        )
    graph = nx.DiGraph()
    graph.add_nodes_from(range(n))
    leaves = [i for i in range(n) if i != center]
    graph.add_edge(center, center, weight=1.0 - a * len(leaves))
    for leaf in leaves:
        graph.add_edge(leaf, leaf, weight=leaf_self_weight)
        graph.add_edge(center, leaf, weight=a)
        graph.add_edge(leaf, center, weight=a)
    return graph
