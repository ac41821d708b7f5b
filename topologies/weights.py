"""Mixing weights: the matrix view of a weighted graph, and its basic checks."""

from __future__ import annotations

import networkx as nx
import numpy as np


def uniform_weights(graph: nx.DiGraph) -> nx.DiGraph:
    """Return a copy of ``graph`` where every receiver averages uniformly.

    Receiver i gives weight ``1 / (indegree(i) + 1)`` to itself and to each in-neighbour
    (the self-loop is added; an existing self-loop is not counted twice). Row-stochastic by
    construction; doubly stochastic when every node has the same in- and out-degree.
    """
    weighted = nx.DiGraph()
    weighted.add_nodes_from(graph.nodes)
    for i in graph.nodes:
        sources = [j for j in graph.predecessors(i) if j != i]
        w = 1.0 / (len(sources) + 1)
        weighted.add_edge(i, i, weight=w)
        for j in sources:
            weighted.add_edge(j, i, weight=w)
    return weighted


def mixing_matrix(graph: nx.DiGraph) -> np.ndarray:
    """Return W (n x n, float64) with ``W[i, j]`` = the weight receiver i gives to sender j.

    Nodes must be ``0..n-1``. A graph with no weights at all is read with uniform weights (see
    :func:`uniform_weights`); a graph where only some edges carry a weight is an error.
    """
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise ValueError(f"graph nodes must be 0..{n - 1}, got {sorted(graph.nodes)[:10]}...")
    has_weight = [("weight" in data) for _, _, data in graph.edges(data=True)]
    if not any(has_weight):
        graph = uniform_weights(graph)
    elif not all(has_weight):
        missing = [(j, i) for j, i, data in graph.edges(data=True) if "weight" not in data]
        raise ValueError(f"some edges have a weight and some do not, e.g. {missing[:5]}")
    w = np.zeros((n, n))
    for j, i, data in graph.edges(data=True):
        w[i, j] = float(data["weight"])
    return w


def from_matrix(w: np.ndarray) -> nx.DiGraph:
    """Return the weighted DiGraph of a mixing matrix: edge ``j -> i`` for every ``W[i, j] != 0``."""
    w = np.asarray(w, dtype=float)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    graph = nx.DiGraph()
    graph.add_nodes_from(range(w.shape[0]))
    for i, j in zip(*np.nonzero(w), strict=True):
        graph.add_edge(int(j), int(i), weight=float(w[i, j]))
    return graph


def is_row_stochastic(w: np.ndarray, tol: float = 1e-8) -> bool:
    """True if W is non-negative and every row sums to 1 (within ``tol``)."""
    return bool((w >= -tol).all() and np.allclose(w.sum(axis=1), 1.0, atol=tol))


def is_doubly_stochastic(w: np.ndarray, tol: float = 1e-8) -> bool:
    """True if W is non-negative and every row and every column sums to 1 (within ``tol``)."""
    return is_row_stochastic(w, tol) and bool(np.allclose(w.sum(axis=0), 1.0, atol=tol))


def spectral_gap(w: np.ndarray) -> float:
    """Return ``1 - rho`` with ``rho = ||W - 11^T/n||_2``: the per-step contraction of consensus error.

    For a doubly stochastic W, ``||W^k x - x_bar|| <= rho^k ||x - x_bar||``.
    """
    n = w.shape[0]
    rho = np.linalg.norm(w - np.ones((n, n)) / n, ord=2)
    return float(1.0 - rho)
