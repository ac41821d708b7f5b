"""The α–β–γ cost model's formulas, against hand-computed values and their limiting cases."""

from __future__ import annotations

import math

import pytest

from gossip.cost_model import CostModel, LinkCost

INTRA = LinkCost(latency=1e-6, inverse_bandwidth=1e-10, reduce=1e-11)
INTER = LinkCost(latency=1e-5, inverse_bandwidth=1e-9, reduce=1e-11)


def test_plans_by_hand():
    model = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)  # 2 machines of 4
    n, N = 8, 1e6
    assert model.machines == 2
    assert model.ring_allreduce(N) == pytest.approx(2 * (n - 1) * 1e-5 + 2 * (n - 1) / n * N * 1e-9
                                                    + (n - 1) / n * N * 1e-11)
    assert model.tree_allreduce(N) == pytest.approx(2 * 3 * (1e-5 + N * 1e-9) + 3 * N * 1e-11)
    assert model.gossip(N, 2) == pytest.approx(2 * (1e-5 + N * 1e-9 + N * 1e-11))
    assert model.one_peer(N) == pytest.approx(1e-5 + N * 1e-9 + N * 1e-11)
    inside = 2 * 3 * 1e-6 + 2 * 0.75 * N * 1e-10 + 0.75 * N * 1e-11 + 2 * (1e-6 + N * 1e-10)
    assert model.hierarchical(N, 1) == pytest.approx(inside + 1e-5 + N * 1e-9 + N * 1e-11)
    table = model.predict(N, degree=3)
    assert table["no communication"] == 0 and table["static gossip (degree 3)"] == pytest.approx(model.gossip(N, 3))


def test_limits_and_orderings():
    one_machine = CostModel(INTRA, INTER, size=4, ranks_per_machine=4)
    assert one_machine.machines == 1
    assert one_machine.one_peer(1e6) == pytest.approx(INTRA.message(1e6) + 1e6 * INTRA.reduce)  # no inter link used
    assert CostModel(INTRA, INTER, size=1, ranks_per_machine=1).ring_allreduce(1e6) == 0
    big = CostModel(INTRA, INTER, size=256, ranks_per_machine=8)
    # bandwidth-bound: one-peer gossip moves N bytes, the ring about 2N; latency-bound: the ring pays 2(n-1)α
    assert big.one_peer(1e8) < big.ring_allreduce(1e8) < 2.1 * big.one_peer(1e8)
    assert big.ring_allreduce(8) > 100 * big.one_peer(8)
    assert big.tree_allreduce(8) < big.ring_allreduce(8)  # small messages: the tree's log n latency wins
    assert big.hierarchical(1e8) < big.ring_allreduce(1e8)  # the slow link carries N, not about 2N
    assert math.isinf(LinkCost(0.0, 0.0).bandwidth) and INTER.bandwidth == pytest.approx(1e9)


def test_overhead_is_paid_once_per_communicating_op():
    plain = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)
    loaded = CostModel(INTRA, INTER, size=8, ranks_per_machine=4, overhead=1e-3)
    for plan in ("ring_allreduce", "tree_allreduce", "one_peer", "hierarchical"):
        assert getattr(loaded, plan)(1e6) == pytest.approx(getattr(plain, plan)(1e6) + 1e-3), plan
    assert loaded.gossip(1e6, 0) == 0 and loaded.predict(1e6)["no communication"] == 0
    with pytest.raises(ValueError, match="overhead"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2, overhead=-1.0)


def test_bad_parameters():
    with pytest.raises(ValueError, match="latency"):
        LinkCost(latency=-1.0, inverse_bandwidth=0.0)
    with pytest.raises(ValueError, match="inverse_bandwidth"):
        LinkCost(latency=0.0, inverse_bandwidth=float("nan"))
    with pytest.raises(ValueError, match="ranks_per_machine"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=8)
    with pytest.raises(ValueError, match="degree"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2).gossip(10, -1)
