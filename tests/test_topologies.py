"""Graphs, mixing matrices and the one-peer schedule, checked against matrices built in NumPy.

Pure networkx/numpy: no MPI. Expected matrices are written out entry by entry from each family's
definition (or from the DFT of a circulant), never by calling the function under test again.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

import topologies
from topologies import OnePeerExponentialTwo

SIZES = range(1, 13)
POWERS_OF_TWO = (1, 2, 4, 8, 16, 32)


def circulant(n: int, offsets: set[int]) -> np.ndarray:
    """Node i hears ``i - o`` for each distinct nonzero offset o (mod n); all d+1 weights ``1/(d+1)``."""
    distinct = {o % n for o in offsets} - {0}
    w = np.eye(n) / (len(distinct) + 1)
    for i in range(n):
        for o in distinct:
            w[i, (i - o) % n] = 1.0 / (len(distinct) + 1)
    return w


def exp2_offsets(n: int) -> set[int]:
    """``2^k`` for ``k < ceil(log2 n)``; ``(n - 1).bit_length()`` is ``ceil(log2 n)`` for n >= 1."""
    return {2**k for k in range((n - 1).bit_length())}


def expected_ring(n: int) -> np.ndarray:
    if n == 1:
        return np.ones((1, 1))
    if n == 2:
        return np.full((2, 2), 0.5)
    w = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            w[i, j % n] = 1.0 / 3.0
    return w


def expected_star(n: int, center: int, a: float) -> np.ndarray:
    w = np.eye(n) * (1.0 - a)
    for leaf in range(n):
        if leaf != center:
            w[leaf, center] = a
            w[center, leaf] = a
    w[center, center] = 1.0 - a * (n - 1)
    return w


EXPECTED = {
    "ring": (topologies.ring, expected_ring),
    "exponential_two": (topologies.exponential_two, lambda n: circulant(n, exp2_offsets(n))),
    "fully_connected": (topologies.fully_connected, lambda n: np.full((n, n), 1.0 / n)),
    "star": (topologies.star, lambda n: expected_star(n, 0, 1.0 / n)),
}
FAMILIES = sorted(EXPECTED)


def second_singular_value(w: np.ndarray) -> float:
    """``||W - 11^T/n||_2`` from the SVD (independent of ``topologies.spectral_gap``)."""
    n = w.shape[0]
    return float(np.linalg.svd(w - np.full((n, n), 1.0 / n), compute_uv=False)[0])


# --- static families -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", SIZES)
def test_family_matches_definition(family: str, n: int) -> None:
    make, expected = EXPECTED[family]
    graph = make(n)
    assert isinstance(graph, nx.DiGraph)
    assert sorted(graph.nodes) == list(range(n))
    np.testing.assert_allclose(topologies.mixing_matrix(graph), expected(n), rtol=0, atol=1e-15)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", SIZES)
def test_family_is_doubly_stochastic(family: str, n: int) -> None:
    w = topologies.mixing_matrix(EXPECTED[family][0](n))
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    assert topologies.is_doubly_stochastic(w)
    assert topologies.is_row_stochastic(w)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", SIZES)
def test_weight_convention_edge_j_to_i_is_w_ij(family: str, n: int) -> None:
    graph = EXPECTED[family][0](n)
    w = topologies.mixing_matrix(graph)
    seen = np.zeros((n, n), dtype=bool)
    for j, i, data in graph.edges(data=True):
        assert w[i, j] == data["weight"], f"edge {j}->{i}"
        assert graph[j][i]["weight"] == w[i, j]
        seen[i, j] = True
    assert not w[~seen].any(), "W has an entry without an edge"


@pytest.mark.parametrize("n", SIZES)
def test_exponential_two_in_neighbours_are_i_minus_powers_of_two(n: int) -> None:
    graph = topologies.exponential_two(n)
    steps = math.ceil(math.log2(n)) if n > 1 else 0
    for i in range(n):
        expected = {(i - 2**k) % n for k in range(steps)}
        assert set(graph.predecessors(i)) - {i} == expected
        assert set(graph.successors(i)) - {i} == {(i + 2**k) % n for k in range(steps)}
        assert graph.has_edge(i, i)


def test_exponential_two_known_case() -> None:
    w = topologies.mixing_matrix(topologies.exponential_two(8))  # in-neighbours of 0: 7, 6, 4
    np.testing.assert_allclose(w[0], [0.25, 0, 0, 0, 0.25, 0, 0.25, 0.25])


@pytest.mark.parametrize("n", SIZES)
def test_spectral_gap_fully_connected_is_one(n: int) -> None:
    # W = 11^T/n, so W - 11^T/n = 0: rho = 0, gap = 1 (one step averages exactly).
    assert topologies.spectral_gap(topologies.mixing_matrix(topologies.fully_connected(n))) == pytest.approx(1.0)


@pytest.mark.parametrize("n", range(3, 13))
def test_spectral_gap_star_closed_form(n: int) -> None:
    # W = I - L/n with the star Laplacian's eigenvalues 0, 1 (n-2 times), n: rho = 1 - 1/n.
    assert topologies.spectral_gap(topologies.mixing_matrix(topologies.star(n))) == pytest.approx(1.0 / n)


@pytest.mark.parametrize("n", range(3, 13))
def test_spectral_gap_ring_closed_form(n: int) -> None:
    gap = topologies.spectral_gap(topologies.mixing_matrix(topologies.ring(n)))
    assert gap == pytest.approx((1 - math.cos(2 * math.pi / n)) * 2 / 3)


@pytest.mark.parametrize("n", SIZES)
def test_spectral_gap_of_circulants_from_dft(n: int) -> None:
    # A circulant's eigenvalues are the DFT of its first row; it is normal, so rho = max |lambda_m|, m != 0.
    for offsets in (exp2_offsets(n), {1, n - 1}):
        w = circulant(n, offsets)
        eigenvalues = np.fft.fft(w[0])
        rho = float(np.abs(eigenvalues[1:]).max(initial=0.0))
        assert topologies.spectral_gap(w) == pytest.approx(1.0 - rho, abs=1e-12)
        assert 1.0 - topologies.spectral_gap(w) == pytest.approx(second_singular_value(w), abs=1e-12)


def test_star_center_and_leaf_weight() -> None:
    w = topologies.mixing_matrix(topologies.star(5, center=2, leaf_self_weight=0.8))
    np.testing.assert_allclose(w, expected_star(5, 2, 0.2), atol=1e-15)
    assert topologies.is_doubly_stochastic(w)
    with pytest.raises(ValueError):
        topologies.star(5, leaf_self_weight=0.5)  # a = 0.5 > 1/(n-1): negative center self weight
    with pytest.raises(ValueError):
        topologies.star(5, center=5)


@pytest.mark.parametrize("make", [topologies.ring, topologies.exponential_two, topologies.fully_connected,
                                  topologies.star])
@pytest.mark.parametrize("bad", [0, -1, 2.0, "4"])
def test_bad_sizes_raise(make, bad) -> None:
    with pytest.raises(ValueError):
        make(bad)


# --- mixing matrices, weights and round trips ------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", SIZES)
def test_from_matrix_round_trips(family: str, n: int) -> None:
    graph = EXPECTED[family][0](n)
    w = topologies.mixing_matrix(graph)
    back = topologies.from_matrix(w)
    assert sorted(back.nodes) == list(range(n))
    assert set(back.edges) == set(graph.edges)
    for j, i, data in graph.edges(data=True):
        assert back[j][i]["weight"] == data["weight"]
    np.testing.assert_array_equal(topologies.mixing_matrix(back), w)


def test_from_matrix_direction() -> None:
    w = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.75]])
    graph = topologies.from_matrix(w)
    assert set(graph.edges) == {(0, 0), (1, 0), (1, 1), (0, 2), (2, 2)}  # j -> i for W[i, j] != 0
    assert graph[1][0]["weight"] == 0.5 and graph[0][2]["weight"] == 0.25
    with pytest.raises(ValueError):
        topologies.from_matrix(np.ones((2, 3)))


def test_unweighted_graph_gets_uniform_weights_and_is_row_stochastic() -> None:
    graph = nx.DiGraph([(1, 0), (2, 0), (0, 1)])  # 0 hears 1 and 2; 1 hears 0; 2 hears nobody
    w = topologies.mixing_matrix(graph)
    np.testing.assert_allclose(w, [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert topologies.is_row_stochastic(w)
    assert not topologies.is_doubly_stochastic(w)
    np.testing.assert_array_equal(topologies.mixing_matrix(topologies.uniform_weights(graph)), w)


def test_is_stochastic_rejects() -> None:
    assert not topologies.is_row_stochastic(np.array([[0.5, 0.4], [0.5, 0.5]]))
    assert not topologies.is_row_stochastic(np.array([[1.5, -0.5], [0.5, 0.5]]))  # negative entry
    column_heavy = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert topologies.is_row_stochastic(column_heavy) and not topologies.is_doubly_stochastic(column_heavy)


def test_mixing_matrix_rejects_bad_graphs() -> None:
    partly_weighted = nx.DiGraph()
    partly_weighted.add_edge(0, 1, weight=1.0)
    partly_weighted.add_edge(1, 0)
    with pytest.raises(ValueError):
        topologies.mixing_matrix(partly_weighted)
    with pytest.raises(ValueError):
        topologies.mixing_matrix(nx.DiGraph([(1, 2), (2, 1)]))  # nodes must be 0..n-1


# --- one-peer exponential-2 ------------------------------------------------------------------


def expected_one_peer(n: int, step: int) -> np.ndarray:
    """(I + P^hop)/2 with ``hop = 2^(step mod ceil(log2 n))``: rank i averages with i - hop."""
    if n == 1:
        return np.ones((1, 1))
    hop = 2 ** (step % (n - 1).bit_length())
    w = np.eye(n) / 2
    for i in range(n):
        w[i, (i - hop) % n] += 0.5
    return w


@pytest.mark.parametrize("n", SIZES)
def test_one_peer_matches_definition_and_is_doubly_stochastic(n: int) -> None:
    schedule = OnePeerExponentialTwo(n)
    assert schedule.period == max(1, (n - 1).bit_length())
    for step in range(3 * schedule.period + 1):
        w = schedule.mixing_matrix(step)
        np.testing.assert_array_equal(w, expected_one_peer(n, step))
        np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-15)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-15)
        assert topologies.is_doubly_stochastic(w)


@pytest.mark.parametrize("n", POWERS_OF_TWO)
def test_one_peer_product_over_period_is_exact_average(n: int) -> None:
    schedule = OnePeerExponentialTwo(n)
    assert 2**schedule.period == max(n, 2)
    for start in range(2 * schedule.period + 1):  # any window of log2(n) consecutive steps
        product = np.eye(n)
        for step in range(start, start + schedule.period):
            product = schedule.mixing_matrix(step) @ product
        np.testing.assert_allclose(product, np.full((n, n), 1.0 / n), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_one_peer_product_over_period_is_not_exact_otherwise(n: int) -> None:
    schedule = OnePeerExponentialTwo(n)
    product = np.eye(n)
    for step in range(schedule.period):
        product = schedule.mixing_matrix(step) @ product
    assert topologies.is_doubly_stochastic(product)
    assert not np.allclose(product, np.full((n, n), 1.0 / n))


@pytest.mark.parametrize("n", SIZES)
def test_one_peer_peers_agree_with_each_other_and_with_w(n: int) -> None:
    schedule = OnePeerExponentialTwo(n)
    for step in range(2 * schedule.period):
        w = schedule.mixing_matrix(step)
        expected = expected_one_peer(n, step)
        for r in range(n):
            p = schedule.peers(step, r)
            assert r not in p.src_weights and r not in p.dst_weights
            assert p.self_weight == expected[r, r]
            assert p.self_weight + sum(p.src_weights.values()) == pytest.approx(1.0)
            # r sends to d  <=>  d receives from r  <=>  W[d, r] != 0 (off the diagonal)
            sends_to = {d for d in range(n) if d != r and expected[d, r] != 0}
            receives_from = {s for s in range(n) if s != r and expected[r, s] != 0}
            assert set(p.dst_weights) == sends_to
            assert set(p.src_weights) == receives_from
            for d in p.dst_weights:
                assert r in schedule.peers(step, d).src_weights
                assert p.dst_weights[d] == 1.0  # plain averaging: unscaled sends
            for s, weight in p.src_weights.items():
                assert r in schedule.peers(step, s).dst_weights
                assert weight == w[r, s] == expected[r, s]


def test_one_peer_rejects_bad_input() -> None:
    for bad in (0, -2, 4.0):
        with pytest.raises(ValueError):
            OnePeerExponentialTwo(bad)
    schedule = OnePeerExponentialTwo(4)
    with pytest.raises(ValueError):
        schedule.peers(0, 4)
    with pytest.raises(ValueError):
        schedule.peers(0, -1)
