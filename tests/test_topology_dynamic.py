"""Time-varying families: per-rank peers agree with each other and with W(k), and the known facts hold.

Expected matrices are built here from each family's definition; the generic checks compare what
every rank is told (``peers``) with what every other rank is told, and with ``mixing_matrix``.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

import topologies

SIZES = (1, 2, 3, 5, 8, 16, 17, 64)


def families(n: int) -> dict[str, topologies.DynamicTopology]:
    out = {
        "one_peer_exp2": topologies.OnePeerExponentialTwo(n),
        "one_peer_ring": topologies.OnePeer(topologies.ring(n)),
        "one_peer_exp3": topologies.OnePeer(topologies.exponential(n, 3)),
        "one_peer_mesh": topologies.OnePeer(topologies.mesh(n)),
        "random_matching": topologies.RandomMatching(n, seed=5),
        "base_2": topologies.BaseGraph(n, 1),
        "base_4": topologies.BaseGraph(n, 3),
        "od_equidyn": topologies.OnePeerDirectedEquiDyn(n, seed=2),
        "ou_equidyn": topologies.OnePeerUndirectedEquiDyn(n, eta=0.5, seed=2),
    }
    for local in (1, 3, 4):
        if n % local == 0:
            out[f"inner_outer_ring_{local}"] = topologies.InnerOuterRing(n, local)
            out[f"inner_outer_exp2_{local}"] = topologies.InnerOuterExponentialTwo(n, local)
    return out


DOUBLY_STOCHASTIC_EXCEPTIONS = {"one_peer_mesh"}  # irregular base graph: row-stochastic only
CASES = [(name, n) for n in SIZES for name in families(n)]


def check_consistent(schedule: topologies.DynamicTopology, step: int) -> np.ndarray:
    """Every rank's peers against every other rank's, and against W(step); returns W(step)."""
    n = schedule.n
    everyone = [schedule.peers(step, r) for r in range(n)]
    w = schedule.mixing_matrix(step)
    expected = np.zeros((n, n))
    for r, p in enumerate(everyone):
        assert r not in p.src_weights and r not in p.dst_weights
        for d in p.dst_weights:
            assert r in everyone[d].src_weights, f"step {step}: {r} sends to {d}, which does not receive from it"
        for s in p.src_weights:
            assert r in everyone[s].dst_weights, f"step {step}: {r} receives from {s}, which does not send to it"
        expected[r, r] = p.self_weight
        for s, weight in p.src_weights.items():
            expected[r, s] = weight * everyone[s].dst_weights[r]
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert (w >= 0).all()
    return w


@pytest.mark.parametrize("name,n", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_family_peers_agree_and_rows_sum_to_one(name: str, n: int) -> None:
    schedule = families(n)[name]
    assert schedule.n == n
    steps = 2 * (schedule.period or 8) + 1
    for step in range(min(steps, 40)):
        w = check_consistent(schedule, step)
        if name not in DOUBLY_STOCHASTIC_EXCEPTIONS:
            assert topologies.is_doubly_stochastic(w), f"{name} step {step}"
        if name.startswith(("one_peer", "random_matching", "inner_outer", "od_", "ou_")):
            for r in range(n):
                assert len(schedule.peers(step, r).dst_weights) <= 1  # one peer: at most one send per step
        if schedule.period:
            np.testing.assert_array_equal(schedule.mixing_matrix(step + schedule.period), w)


@pytest.mark.parametrize("name,n", [c for c in CASES if c[1] in (5, 8, 16, 17)], ids=lambda c: str(c))
def test_family_reaches_consensus(name: str, n: int) -> None:
    schedule = families(n)[name]
    if name in DOUBLY_STOCHASTIC_EXCEPTIONS:
        return
    if name.startswith("inner_outer") and schedule.local_size == n:
        return  # one machine: the outer rank has nobody outside to talk to, and still mixes inside
    assert topologies.consensus_rate(schedule, 1500) < 1e-3, name


@pytest.mark.parametrize("n", SIZES)
def test_one_peer_of_exponential_graph_is_one_peer_exponential_two(n: int) -> None:
    a = topologies.OnePeer(topologies.exponential_two(n))
    b = topologies.OnePeerExponentialTwo(n)
    assert a.period == b.period
    for step in range(3 * b.period):
        np.testing.assert_array_equal(a.mixing_matrix(step), b.mixing_matrix(step))


@pytest.mark.parametrize("n", [4, 5, 8])
def test_one_peer_ring_alternates_directions(n: int) -> None:
    schedule = topologies.OnePeer(topologies.ring(n))
    assert schedule.period == 2
    for step in range(4):
        hop = 1 if step % 2 == 0 else n - 1  # offsets ordered: +1 first, then -1 (= n - 1)
        expected = np.eye(n) / 2
        for i in range(n):
            expected[(i + hop) % n, i] += 0.5
        np.testing.assert_array_equal(schedule.mixing_matrix(step), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_random_matching_is_a_seeded_matching(n: int) -> None:
    a, b, c = topologies.RandomMatching(n, 3), topologies.RandomMatching(n, 3), topologies.RandomMatching(n, 4)
    differs = False
    for step in range(20):
        w = a.mixing_matrix(step)
        np.testing.assert_array_equal(w, b.mixing_matrix(step))
        differs |= not np.array_equal(w, c.mixing_matrix(step))
        assert topologies.is_symmetric(w)
        pairs = [(r, next(iter(a.peers(step, r).dst_weights))) for r in range(n) if a.peers(step, r).dst_weights]
        assert len(pairs) == n - n % 2  # perfect matching, one idle rank when n is odd
        for r, d in pairs:
            assert next(iter(a.peers(step, d).dst_weights)) == r
            assert w[r, d] == 0.5 == w[r, r]
    assert differs or n <= 2


@pytest.mark.parametrize("machines,local", [(2, 4), (4, 3), (3, 3), (4, 4), (8, 5), (1, 4), (4, 1), (1, 2)])
@pytest.mark.parametrize("family", [topologies.InnerOuterRing, topologies.InnerOuterExponentialTwo])
def test_inner_outer_one_message_per_machine(machines: int, local: int, family) -> None:
    schedule = family(machines * local, local)
    outer_roles = set()
    for step in range(2 * schedule.period):
        crossing = [r for r in range(schedule.n) for d in schedule.peers(step, r).dst_weights
                    if d // local != r // local]
        assert len(crossing) == (machines if machines > 1 else 0)
        assert len({r // local for r in crossing}) == len(crossing)  # one per machine
        for r in crossing:
            (d,) = schedule.peers(step, r).dst_weights
            assert r % local == d % local == step % local  # outer rank talks to the same local rank
            outer_roles.add(r % local)
            hop = (d // local - r // local) % machines
            if family is topologies.InnerOuterRing:
                assert hop == 1
            else:
                assert hop == 2 ** (step % (machines - 1).bit_length())
    if machines > 1:
        assert outer_roles == set(range(local))


def test_graph_sequence_cycles_through_its_graphs() -> None:
    graphs = [topologies.ring(6), topologies.fully_connected(6), topologies.star(6)]
    schedule = topologies.GraphSequence(graphs)
    assert schedule.period == 3
    for step in range(7):
        np.testing.assert_array_equal(schedule.mixing_matrix(step), topologies.to_matrix(graphs[step % 3]))
        check_consistent(schedule, step)
    # Graphs without weights are read with uniform weights, by peers() as by mixing_matrix().
    unweighted = topologies.GraphSequence([nx.DiGraph([(0, 1), (1, 2), (2, 0)]), nx.DiGraph([(1, 0), (2, 1)])])
    for step in range(2):
        w = check_consistent(unweighted, step)
        assert topologies.is_row_stochastic(w)
    np.testing.assert_allclose(unweighted.mixing_matrix(0), [[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]])
    assert unweighted.peers(1, 0).src_weights == {1: 0.5} and unweighted.peers(1, 2).self_weight == 1.0
    with pytest.raises(ValueError, match="same nodes"):
        topologies.GraphSequence([topologies.ring(4), topologies.ring(5)])
    with pytest.raises(ValueError, match="at least one"):
        topologies.GraphSequence([])


def test_dynamic_bad_input() -> None:
    for bad in (0, -2, 4.0, "8"):
        for make in (topologies.OnePeerExponentialTwo, topologies.RandomMatching):
            with pytest.raises(ValueError, match="number of nodes"):
                make(bad)
    with pytest.raises(ValueError, match="do not split"):
        topologies.InnerOuterRing(10, 4)
    with pytest.raises(ValueError, match="never mix"):
        topologies.InnerOuterRing(8, 2)
    with pytest.raises(ValueError, match="local_size"):
        topologies.InnerOuterExponentialTwo(8, 0)
    with pytest.raises(ValueError, match="seed"):
        topologies.RandomMatching(4, seed=-1)
    schedule = topologies.OnePeerExponentialTwo(4)
    for rank in (4, -1):
        with pytest.raises(ValueError, match="out of range"):
            schedule.peers(0, rank)
    with pytest.raises(ValueError, match="step"):
        schedule.peers(-1, 0)


RESIZABLE = {  # family on 6 ranks -> the same family built directly on n ranks
    "one_peer_exp2": (topologies.OnePeerExponentialTwo(6), lambda n: topologies.OnePeerExponentialTwo(n)),
    "random_matching": (topologies.RandomMatching(6, seed=5), lambda n: topologies.RandomMatching(n, seed=5)),
    "base_3": (topologies.BaseGraph(6, 2, inner_edges=False), lambda n: topologies.BaseGraph(n, 2, inner_edges=False)),
    "od_equidyn": (topologies.OnePeerDirectedEquiDyn(6, seed=2),
                   lambda n: topologies.OnePeerDirectedEquiDyn(n, seed=2)),
    "ou_equidyn": (topologies.OnePeerUndirectedEquiDyn(6, eta=0.5, seed=2),
                   lambda n: topologies.OnePeerUndirectedEquiDyn(n, eta=0.5, seed=2)),
}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("name", list(RESIZABLE))
def test_resized_is_the_family_rebuilt_with_its_parameters(name: str, n: int) -> None:
    family, direct = RESIZABLE[name]
    resized, expected = family.resized(n), direct(n)
    assert type(resized) is type(family) and resized.n == n and resized.period == expected.period
    for step in range(2 * (expected.period or 8)):
        np.testing.assert_array_equal(resized.mixing_matrix(step), expected.mixing_matrix(step))
    assert family.resized(6) is family  # nothing changes: the family itself


def test_resized_equidyn_recomputes_defaults_and_keeps_what_was_given() -> None:
    default = topologies.OnePeerDirectedEquiDyn(6, seed=1).resized(3)
    assert default.eta == 3 / 4 and default.shifts == [1, 2] and default.seed == 1
    given = topologies.OnePeerUndirectedEquiDyn(6, eta=0.4, seed=1, shifts=[1, 2]).resized(4)
    assert given.eta == 0.4 and given.shifts == [1, 2]
    with pytest.raises(ValueError, match=r"OnePeerUndirectedEquiDyn cannot be rebuilt for 3 ranks: shifts must be"):
        topologies.OnePeerUndirectedEquiDyn(6, shifts=[1, 5]).resized(3)


@pytest.mark.parametrize("family", [topologies.InnerOuterRing, topologies.InnerOuterExponentialTwo])
def test_resized_machine_families_take_the_new_local_size(family) -> None:
    schedule = family(12, 3)  # 4 machines of 3
    for n, local, expected in ((9, None, family(9, 3)), (8, 4, family(8, 4)), (12, 4, family(12, 4))):
        resized = schedule.resized(n, local_size=local)
        assert (resized.n, resized.local_size) == (expected.n, expected.local_size)
        for step in range(expected.period):
            np.testing.assert_array_equal(resized.mixing_matrix(step), expected.mixing_matrix(step))
    assert schedule.resized(12, local_size=3) is schedule
    with pytest.raises(ValueError, match=rf"{family.__name__} cannot be rebuilt for 10 ranks: 10 ranks do not split"):
        schedule.resized(10)
    with pytest.raises(ValueError, match="inner/outer schedules need 1 or at least 3 local ranks"):
        schedule.resized(8, local_size=2)


def test_resized_refuses_families_of_fixed_graphs() -> None:
    with pytest.raises(ValueError, match="OnePeer cannot be rebuilt for 3 ranks: it follows a fixed base graph on 4"):
        topologies.OnePeer(topologies.ring(4)).resized(3)
    sequence = topologies.GraphSequence([topologies.ring(4), topologies.fully_connected(4)])
    with pytest.raises(ValueError, match="GraphSequence cannot be rebuilt for 5 ranks: it is a fixed list of 2 graphs"):
        sequence.resized(5)
    assert sequence.resized(4) is sequence
    with pytest.raises(ValueError, match="number of nodes must be a positive int, got 0"):
        topologies.OnePeerExponentialTwo(4).resized(0)
