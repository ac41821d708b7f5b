"""Mixing weights: the matrix view of a weighted graph, and the standard weight rules.

A graph's mixing matrix W has ``W[i, j]`` = the weight receiver i gives to sender j, read from
edge ``j -> i``; self weights are self-loops. The rules below take any graph (its own weights are
ignored) and return a new weighted ``networkx.DiGraph`` on the same nodes.
"""

from __future__ import annotations

import networkx as nx
import numpy as np


def _neighbours(graph: nx.DiGraph | nx.Graph) -> dict[int, set[int]]:
    """Undirected neighbour sets (edge direction and self-loops ignored)."""
    out: dict[int, set[int]] = {i: set() for i in graph.nodes}
    for a, b in graph.edges():
        if a != b:
            out[a].add(b)
            out[b].add(a)
    return out


def _from_undirected(nodes, neighbours: dict[int, set[int]], weight) -> nx.DiGraph:
    """Symmetric weights ``weight(i, j)`` on every undirected edge; self weight = the rest of the row."""
    weighted = nx.DiGraph()
    weighted.add_nodes_from(nodes)
    for i, peers in neighbours.items():
        total = 0.0
        for j in sorted(peers):
            w = weight(i, j)
            weighted.add_edge(j, i, weight=w)
            total += w
        weighted.add_edge(i, i, weight=1.0 - total)
    return weighted


def uniform_weights(graph: nx.DiGraph) -> nx.DiGraph:
    """Return a copy of ``graph`` where every receiver averages uniformly ("equal-neighbour" rule).

    Receiver i gives weight ``1 / (indegree(i) + 1)`` to itself and to each in-neighbour
    (the self-loop is added; an existing self-loop is not counted twice). Row-stochastic by
    construction; doubly stochastic when every node has the same in- and out-degree and the
    graph is a circulant or symmetric, e.g. every regular undirected graph.
    """
    weighted = nx.DiGraph()
    weighted.add_nodes_from(graph.nodes)
    for i in graph.nodes:
        sources = sorted(j for j in graph.predecessors(i) if j != i)
        w = 1.0 / (len(sources) + 1)
        weighted.add_edge(i, i, weight=w)
        for j in sources:
            weighted.add_edge(j, i, weight=w)
    return weighted


def metropolis_hastings_weights(graph: nx.DiGraph | nx.Graph) -> nx.DiGraph:
    """Metropolis–Hastings weights on the undirected version of ``graph``.

    ``w_ij = 1 / (1 + max(d_i, d_j))`` for each edge {i, j} (d = undirected degree, self-loops not
    counted), ``w_ii = 1 - sum_j w_ij``. Symmetric and doubly stochastic for any graph, and equal
    to the uniform rule ``1 / (d + 1)`` on a regular graph (Xiao and Boyd, "Fast linear iterations
    for distributed averaging", Systems & Control Letters, 2004).
    """
    neighbours = _neighbours(graph)
    degree = {i: len(p) for i, p in neighbours.items()}
    return _from_undirected(graph.nodes, neighbours, lambda i, j: 1.0 / (1 + max(degree[i], degree[j])))


def maximum_degree_weights(graph: nx.DiGraph | nx.Graph) -> nx.DiGraph:
    """Maximum-degree weights on the undirected version of ``graph``.

    Every edge gets ``1 / (d_max + 1)`` with d_max the largest degree in the graph; each self
    weight is the rest of its row. Symmetric and doubly stochastic (Xiao and Boyd, 2004).
    """
    neighbours = _neighbours(graph)
    d_max = max((len(p) for p in neighbours.values()), default=0)
    return _from_undirected(graph.nodes, neighbours, lambda i, j: 1.0 / (d_max + 1))


def lazy(graph: nx.DiGraph) -> nx.DiGraph:
    """The lazy version ``(I + W) / 2`` of a weighted graph: every weight halved, self weights plus 1/2.

    Keeps row and column sums, moves every eigenvalue λ to (1 + λ)/2 ≥ 0: λ_min(W) > -1/3, which
    D² needs (Tang, Lian, Yan, Zhang and Liu, "D²: Decentralized Training over Decentralized Data",
    ICML 2018), holds for any lazy symmetric W.
    """
    return from_matrix((np.eye(graph.number_of_nodes()) + mixing_matrix(graph)) / 2)


def with_weights(graph: nx.DiGraph) -> nx.DiGraph:
    """``graph`` as it is read everywhere: a weighted DiGraph on nodes ``0..n-1``.

    A graph with no weights at all gets uniform weights (see :func:`uniform_weights`); a graph where
    only some edges carry a weight is an error. An undirected ``nx.Graph`` is read as the DiGraph
    with both directions of every edge. A fully weighted DiGraph is returned as it is.
    """
    if not isinstance(graph, nx.DiGraph):
        if isinstance(graph, nx.Graph):
            graph = graph.to_directed()
        else:
            raise TypeError(f"expected a networkx graph, got {type(graph).__name__}")
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise ValueError(f"graph nodes must be 0..{n - 1}, got {sorted(graph.nodes, key=str)[:10]}...")
    has_weight = [("weight" in data) for _, _, data in graph.edges(data=True)]
    if not any(has_weight):
        graph = uniform_weights(graph)
    elif not all(has_weight):
        missing = [(j, i) for j, i, data in graph.edges(data=True) if "weight" not in data]
        raise ValueError(f"some edges have a weight and some do not, e.g. {missing[:5]}")
    return graph


def mixing_matrix(graph: nx.DiGraph) -> np.ndarray:
    """Return W (n x n, float64) with ``W[i, j]`` = the weight receiver i gives to sender j.

    The graph is read as :func:`with_weights` says (nodes ``0..n-1``; no weights at all means
    uniform weights).
    """
    graph = with_weights(graph)
    n = graph.number_of_nodes()
    w = np.zeros((n, n))
    for j, i, data in graph.edges(data=True):
        w[i, j] = float(data["weight"])
    return w


to_matrix = mixing_matrix


def from_matrix(w: np.ndarray) -> nx.DiGraph:
    """Return the weighted DiGraph of a mixing matrix: edge ``j -> i`` for every ``W[i, j] != 0``.

    This is how user-given weights enter: build W, check it (:func:`topologies.validate`), convert.
    """
    w = np.asarray(w, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    graph = nx.DiGraph()
    graph.add_nodes_from(range(w.shape[0]))
    for i, j in zip(*np.nonzero(w), strict=True):
        graph.add_edge(int(j), int(i), weight=float(w[i, j]))
    return graph
