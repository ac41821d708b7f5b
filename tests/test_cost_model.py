"""The α–β–γ cost model's formulas, against hand-computed values and their limiting cases."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import topologies
from gossip.plan.cost_model import CostModel, LinkCost

INTRA = LinkCost(latency=1e-6, inverse_bandwidth=1e-10, reduce=1e-11)
INTER = LinkCost(latency=1e-5, inverse_bandwidth=1e-9, reduce=1e-11)


def test_collectives_by_hand():
    model = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)  # 2 machines of 4
    n, N = 8, 1e6
    assert model.machines == 2
    assert model.ring_allreduce(N) == pytest.approx(2 * (n - 1) * 1e-5 + 2 * (n - 1) / n * N * 1e-9
                                                    + (n - 1) / n * N * 1e-11)
    assert model.tree_allreduce(N) == pytest.approx(2 * 3 * (1e-5 + N * 1e-9) + 3 * N * 1e-11)
    inside = 2 * 3 * 1e-6 + 2 * 0.75 * N * 1e-10 + 0.75 * N * 1e-11 + 2 * (1e-6 + N * 1e-10)
    assert model.hierarchical(N, 1) == pytest.approx(inside + 1e-5 + N * 1e-9 + N * 1e-11)


def test_gossip_counts_the_messages_that_share_a_machines_interface():
    model = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)  # machines {0..3}, {4..7}
    N = 1e6
    # offset 1: only rank 3's message leaves machine 0; ranks 0-2 send inside
    assert model.gossip(N, [1]) == pytest.approx(1e-5 + N * max(1 * 1e-9, 1 * 1e-10) + N * 1e-11)
    # offset 4: all four ranks' messages leave and share the interface
    assert model.gossip(N, [4]) == pytest.approx(1e-5 + 4 * N * 1e-9 + N * 1e-11)
    # static exponential-2 (1, 2, 4): 1 + 2 + 4 messages leave; rank 0 sends 2 inside
    assert model.exponential(N) == pytest.approx(3 * 1e-5 + 7 * N * 1e-9 + 3 * N * 1e-11)
    assert model.one_peer(N) == pytest.approx((model.gossip(N, [1]) + model.gossip(N, [2]) + model.gossip(N, [4])) / 3)
    table = model.predict(N)
    assert table["no communication"] == 0 and table["static exponential-2"] == model.exponential(N)
    one_machine = CostModel(INTRA, INTER, size=4, ranks_per_machine=4)
    assert one_machine.gossip(N, [1, 2]) == pytest.approx(2 * 1e-6 + 2 * N * 1e-10 + 2 * N * 1e-11)  # no inter link


def test_any_static_graph_by_its_edges():
    model = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)
    N = 1e6
    for n, k in ((8, 4), (12, 4), (16, 8), (8, 1)):
        other = CostModel(INTRA, INTER, size=n, ranks_per_machine=k)
        assert other.graph(N, topologies.exponential_two(n)) == pytest.approx(other.exponential(N)), (n, k)
    # ring both ways on machines {0..3}, {4..7}: 3 -> 4 and 0 -> 7 leave machine 0; rank 0 sends 1 inside, 1 out
    assert model.graph(N, topologies.ring(8)) == pytest.approx(1e-6 + 1e-5 + N * (2 * 1e-9 + 2 * 1e-11))
    assert model.graph(N, np.eye(8)) == 0.0
    with pytest.raises(ValueError, match="the graph has 4 nodes, the model 8 ranks"):
        model.graph(N, topologies.ring(4))


def test_limits_and_orderings():
    assert CostModel(INTRA, INTER, size=1, ranks_per_machine=1).ring_allreduce(1e6) == 0
    flat = CostModel(INTRA, INTER, size=256, ranks_per_machine=1)  # one rank per machine: nothing is shared
    # bandwidth-bound: one-peer gossip moves N bytes, the ring about 2N; latency-bound: the ring pays 2(n-1)α
    assert flat.one_peer(1e8) < flat.ring_allreduce(1e8) < 2.1 * flat.one_peer(1e8)
    assert flat.ring_allreduce(8) > 100 * flat.one_peer(8)
    assert flat.tree_allreduce(8) < flat.ring_allreduce(8)  # small messages: the tree's log n latency wins
    big = CostModel(INTRA, INTER, size=256, ranks_per_machine=8)
    # 8 ranks sharing an interface: flat one-peer gossip is worse than the ring, hierarchical better
    assert big.hierarchical(1e8) < big.ring_allreduce(1e8) < big.one_peer(1e8)
    assert math.isinf(LinkCost(0.0, 0.0).bandwidth) and INTER.bandwidth == pytest.approx(1e9)


def test_overhead_is_paid_once_per_communicating_op():
    plain = CostModel(INTRA, INTER, size=8, ranks_per_machine=4)
    loaded = CostModel(INTRA, INTER, size=8, ranks_per_machine=4, overhead=1e-3)
    for plan in ("ring_allreduce", "tree_allreduce", "exponential", "hierarchical"):
        assert getattr(loaded, plan)(1e6) == pytest.approx(getattr(plain, plan)(1e6) + 1e-3), plan
    assert loaded.one_peer(1e6) == pytest.approx(plain.one_peer(1e6) + 1e-3)
    assert loaded.gossip(1e6, []) == 0 and loaded.predict(1e6)["no communication"] == 0
    with pytest.raises(ValueError, match="overhead"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2, overhead=-1.0)


def test_calibration_fields_scale_their_own_terms():
    plain = CostModel(INTRA, INTER, size=8, ranks_per_machine=4, overhead=1e-4)
    tuned = CostModel(INTRA, INTER, size=8, ranks_per_machine=4, overhead=1e-4, gossip_overhead=3e-4,
                      allreduce_per_byte_factor=5.0, copy_per_byte=2e-9)
    N = 1e6
    ring_fixed = 1e-4 + 2 * 7 * 1e-5  # overhead + 2(n-1)α: not scaled
    assert tuned.ring_allreduce(N) - ring_fixed == pytest.approx(5 * (plain.ring_allreduce(N) - ring_fixed))
    assert tuned.tree_allreduce(8) > plain.tree_allreduce(8)  # its per-byte part scaled too
    # gossip: its own fixed cost, and the copies once, whatever the degree
    assert tuned.gossip(N, [4]) == pytest.approx(plain.gossip(N, [4]) + 2e-4 + 2e-9 * N)
    assert tuned.exponential(N) == pytest.approx(plain.exponential(N) + 2e-4 + 2e-9 * N)
    assert tuned.graph(N, topologies.exponential_two(8)) == pytest.approx(tuned.exponential(N))
    # hierarchical: the machine ring as derived (the factor is the job-wide allreduce's), plus the copies
    assert tuned.hierarchical(N) == pytest.approx(plain.hierarchical(N) + 2e-9 * N)
    assert replace(tuned, hierarchical_overhead=5e-4).hierarchical(N) == pytest.approx(tuned.hierarchical(N) + 4e-4)


def test_bad_parameters():
    with pytest.raises(ValueError, match="latency"):
        LinkCost(latency=-1.0, inverse_bandwidth=0.0)
    with pytest.raises(ValueError, match="inverse_bandwidth"):
        LinkCost(latency=0.0, inverse_bandwidth=float("nan"))
    with pytest.raises(ValueError, match="ranks_per_machine"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=8)
    with pytest.raises(ValueError, match="multiples of the job size"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2).gossip(10, [4])
    with pytest.raises(ValueError, match="gossip_overhead"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2, gossip_overhead=-1.0)
    with pytest.raises(ValueError, match="allreduce_per_byte_factor"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2, allreduce_per_byte_factor=0.0)
    with pytest.raises(ValueError, match="copy_per_byte"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2, copy_per_byte=-1.0)
    with pytest.raises(ValueError, match="machine_degree"):
        CostModel(INTRA, INTER, size=4, ranks_per_machine=2).hierarchical(10, -1)
