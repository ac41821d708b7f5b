"""Every time-varying family gossiped for several steps with neighbor_allreduce, against W(k)...W(0) X in NumPy.

Each rank asks the family for its own peers only (no communication to agree on them); the result
must match the product of the family's mixing matrices applied to the gathered start values.
Static families run through ``set_topology`` and the default neighbour averaging.
"""

import torch
from _common import GROUP, assert_close, gathered, rank_values

import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def _families():
    out = {
        "one-peer exp-2": topologies.OnePeerExponentialTwo(N),
        "one-peer ring": topologies.OnePeer(topologies.ring(N)),
        "one-peer exp-3": topologies.OnePeer(topologies.exponential(N, 3)),
        "Base-2": topologies.BaseGraph(N, 1),
        "Base-3": topologies.BaseGraph(N, 2),
        "random matching": topologies.RandomMatching(N, seed=11),
        "OD-EquiDyn": topologies.OnePeerDirectedEquiDyn(N, seed=3),
        "OU-EquiDyn": topologies.OnePeerUndirectedEquiDyn(N, eta=0.5, seed=3),
    }
    for local in (1, 3, 4):
        if N % local == 0:
            out[f"inner/outer ring x{local}"] = topologies.InnerOuterRing(N, local)
            out[f"inner/outer exp-2 x{local}"] = topologies.InnerOuterExponentialTwo(N, local)
    return out


def test_dynamic_families_match_products_of_mixing_matrices():
    for name, schedule in _families().items():
        x = rank_values((17,), torch.float64, seed=5)
        expected = gathered(x)
        steps = 2 * (schedule.period or 4) + 1
        for step in range(steps):
            p = schedule.peers(step, R)
            x = gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                          dst_weights=p.dst_weights)
            expected = schedule.mixing_matrix(step) @ expected
            assert_close(x, expected[R], torch.float64, f"{name} after step {step}")


def test_base_graph_averages_exactly_over_one_period():
    for k in (1, 2, 3):
        schedule = topologies.BaseGraph(N, k)
        x = rank_values((9,), torch.float64, seed=6)
        mean = gathered(x).mean(axis=0)
        for step in range(schedule.period):
            p = schedule.peers(step, R)
            x = gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                          dst_weights=p.dst_weights)
        assert_close(x, mean, torch.float64, f"Base-{k + 1} exact average after {schedule.period} steps")


def test_static_families_as_runtime_topology():
    graphs = {"torus": topologies.torus(N), "mesh": topologies.mesh(N),
              "symmetric exp-2": topologies.symmetric_exponential(N),
              "D-EquiStatic": topologies.d_equi_static(N, seed=1), "U-EquiStatic": topologies.u_equi_static(N, seed=1)}
    if N & (N - 1) == 0:
        graphs["hypercube"] = topologies.hypercube(N)
    if N > 3 and N % 2 == 0:
        graphs["random 3-regular"] = topologies.random_regular(N, 3, seed=2)
    for name, graph in graphs.items():
        gossip.set_topology(graph)
        w = topologies.to_matrix(graph)
        x = rank_values((5, 3), torch.float64, seed=7)
        expected = gathered(x)
        for step in range(3):
            x = gossip.neighbor_allreduce(x)
            expected = w @ expected
            assert_close(x, expected[R], torch.float64, f"{name} step {step}")
