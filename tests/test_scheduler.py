"""The scheduler's choice (pure part, no MPI): predicted times, mixing, the global averaging period."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from gossip.plan.cost_model import CostModel, LinkCost
from gossip.plan.profiles import cluster_profile
from gossip.plan.scheduler import describe_candidates, rank_candidates

NVLINK = LinkCost(latency=10e-6, inverse_bandwidth=1 / 130e9)
ETHERNET = LinkCost(latency=30e-6, inverse_bandwidth=1 / 3.125e9)


def _chosen(candidates):
    (chosen,) = [c for c in candidates if c.chosen]
    return chosen


def test_bandwidth_bound_across_machines_picks_hierarchical_gossip():
    cluster = CostModel(NVLINK, ETHERNET, size=256, ranks_per_machine=8, overhead=20e-6)
    candidates = rank_candidates(cluster, 102e6)  # ResNet-50 in float32
    chosen = _chosen(candidates)
    assert chosen.name == "hierarchical" and chosen.global_avg_every is None
    by_name = {c.name: c for c in candidates}
    assert by_name["allreduce"].seconds_per_step == pytest.approx(min(cluster.ring_allreduce(102e6),
                                                                      cluster.tree_allreduce(102e6)))
    assert by_name["hierarchical"].plan_seconds == pytest.approx(cluster.hierarchical(102e6))
    assert by_name["one-peer exponential-2"].consensus_rate == pytest.approx(0, abs=1e-9)  # exact over its period
    assert by_name["one-peer exponential-2"].mixing_steps <= 8  # log2(256)
    assert 0.7 < by_name["exponential-2"].consensus_rate < 0.8  # 1 - 2/(1 + log2 n) = 0.78
    text = describe_candidates(candidates)
    assert "chosen: hierarchical: hierarchical saves" in text and "<- chosen" in text


def test_one_rank_per_machine_picks_one_peer_and_compute_time_can_make_it_allreduce():
    flat = CostModel(ETHERNET, ETHERNET, size=64, ranks_per_machine=1)
    assert _chosen(rank_candidates(flat, 102e6)).name == "one-peer exponential-2"
    # the same saving is small next to a second of compute: exact averaging is kept
    assert _chosen(rank_candidates(flat, 102e6, compute_seconds=1.0)).name == "allreduce"


def test_small_messages_dominated_by_the_per_op_overhead_pick_allreduce():
    cluster = CostModel(NVLINK, ETHERNET, size=16, ranks_per_machine=8, overhead=1e-3)
    candidates = rank_candidates(cluster, 4e3)  # 1.25 ms tree allreduce vs 1.03 ms one-peer: under 20 %
    assert _chosen(candidates).name == "allreduce"
    assert "no gossip plan saves 20%" in describe_candidates(candidates)


def test_slow_mixing_gets_a_global_average_every_target_steps():
    flat = CostModel(ETHERNET, ETHERNET, size=8, ranks_per_machine=1)
    by_name = {c.name: c for c in rank_candidates(flat, 1e8, mixing_steps=2)}
    one_peer, allreduce = by_name["one-peer exponential-2"], by_name["allreduce"]
    assert one_peer.mixing_steps == 3 and one_peer.global_avg_every == 2  # 3 steps to mix > target 2
    assert one_peer.seconds_per_step == pytest.approx(one_peer.plan_seconds + allreduce.seconds_per_step / 2)
    assert by_name["exponential-2"].global_avg_every is None  # it mixes within 2 steps
    fixed = {c.name: c for c in rank_candidates(flat, 1e8, global_avg_every=5)}
    assert fixed["exponential-2"].global_avg_every == 5 and fixed["allreduce"].global_avg_every is None


def test_one_rank_and_bad_arguments():
    alone = rank_candidates(CostModel(ETHERNET, ETHERNET, size=1, ranks_per_machine=1), 1e6)
    assert [c.name for c in alone] == ["allreduce"] and alone[0].chosen and alone[0].seconds_per_step == 0
    flat = CostModel(ETHERNET, ETHERNET, size=8, ranks_per_machine=1)
    for bad, message in (({"compute_seconds": -1.0}, "compute_seconds"), ({"min_saving": 1.0}, "min_saving"),
                         ({"mixing_steps": 0}, "mixing_steps"), ({"global_avg_every": 1.5}, "global_avg_every")):
        with pytest.raises(ValueError, match=message):
            rank_candidates(flat, 1e6, **bad)
    with pytest.raises(ValueError, match="model_bytes"):
        rank_candidates(flat, math.nan)


def test_cluster_profiles_and_the_scale_simulation():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import simulate_scale
    finally:
        sys.path.pop(0)
    ethernet = cluster_profile("ethernet-25g", 256)
    assert (ethernet.machines, ethernet.ranks_per_machine) == (32, 8)
    assert ethernet.inter.bandwidth == pytest.approx(3.125e9)
    row = simulate_scale.predict("ethernet-25g", simulate_scale.MODELS["ResNet-50"], 256)
    assert row["hierarchical"] < row["ring allreduce"] < row["one-peer exponential-2"] < row["static exponential-2"]
    assert row["scheduler"] == "hierarchical"
    table = {"ethernet-25g": {m: {"256": simulate_scale.predict("ethernet-25g", b, 256)}
                              for m, b in simulate_scale.MODELS.items()}}
    lines = simulate_scale.compare_with_paper(table)
    assert any("ResNet-50" in line and "/ 278 =" in line and "/ 150 =" in line for line in lines)
    with pytest.raises(ValueError, match="unknown cluster profile 'token-ring'"):
        cluster_profile("token-ring", 8)
