"""Dynamic (per-call) neighbour exchanges: one-peer schedules, src/dst weights, push-sum scaling."""

import numpy as np
import torch
from _common import DTYPES, GROUP, assert_close, gathered, rank_values

import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def test_one_peer_exponential_two_matches_w_of_k():
    schedule = topologies.OnePeerExponentialTwo(N)
    x = rank_values((13,), torch.float64)
    for step in range(2 * schedule.period):
        peers = schedule.peers(step, R)
        rows = gathered(x)
        y = gossip.neighbor_allreduce(x, self_weight=peers.self_weight, src_weights=peers.src_weights,
                                      dst_weights=peers.dst_weights)
        assert_close(y, schedule.mixing_matrix(step)[R] @ rows, torch.float64, f"one-peer step {step}")
        x = y


def test_one_peer_exact_average_after_period_when_power_of_two():
    schedule = topologies.OnePeerExponentialTwo(N)
    x = rank_values((8,), torch.float64, seed=2)
    mean = gathered(x).mean(axis=0)
    for step in range(schedule.period):
        p = schedule.peers(step, R)
        x = gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                      dst_weights=p.dst_weights)
    if N & (N - 1) == 0:
        assert_close(x, mean, torch.float64, "exact average after log2(n) one-peer steps")


def test_every_dtype_dynamic():
    for dtype in DTYPES:
        x = rank_values((21, 2), dtype, seed=4)
        rows = gathered(x)
        if N == 1:
            y = gossip.neighbor_allreduce(x, self_weight=1.0, src_weights={}, dst_weights={})
            assert_close(y, rows[0], dtype, "n=1 dynamic")
            continue
        y = gossip.neighbor_allreduce(x, self_weight=0.5, src_weights={(R - 1) % N: 0.5},
                                      dst_weights=[(R + 1) % N])
        assert_close(y, 0.5 * rows[R] + 0.5 * rows[(R - 1) % N], dtype, "one-peer dynamic")


def test_push_sum_scaled_sends_conserve_mass():
    if N == 1:
        return
    x = rank_values((6,), torch.float64)
    weight = torch.ones(1, dtype=torch.float64, device=x.device)
    total = gathered(x).sum(axis=0)
    for step in range(5):
        hop = 1 + step % (N - 1)
        dst, src = (R + hop) % N, (R - hop) % N
        x = gossip.neighbor_allreduce(x, self_weight=0.5, src_weights={src: 1.0}, dst_weights={dst: 0.5})
        weight = gossip.neighbor_allreduce(weight, self_weight=0.5, src_weights={src: 1.0}, dst_weights={dst: 0.5})
    assert_close(torch.as_tensor(gathered(x).sum(axis=0)), total, torch.float64, "push-sum mass")
    assert abs(gathered(weight).sum() - N) < 1e-12


def test_scaled_send_is_applied_by_receiver():
    if N == 1:
        return
    x = rank_values((4,), torch.float64)
    rows = gathered(x)
    dst, src = (R + 1) % N, (R - 1) % N
    y = gossip.neighbor_allreduce(x, self_weight=0.75, src_weights={src: 1.0}, dst_weights={dst: 0.25})
    assert_close(y, 0.75 * rows[R] + 0.25 * rows[src], torch.float64, "receiver applies sender's scale")


def test_several_sources_and_destinations():
    if N < 3:
        return
    srcs = [(R - 1) % N, (R - 2) % N]
    dsts = [(R + 1) % N, (R + 2) % N]
    x = rank_values((10,), torch.float32)
    rows = gathered(x)
    y = gossip.neighbor_allreduce(x, self_weight=0.4, src_weights={srcs[0]: 0.3, srcs[1]: 0.3}, dst_weights=dsts)
    assert_close(y, 0.4 * rows[R] + 0.3 * rows[srcs[0]] + 0.3 * rows[srcs[1]], torch.float32, "two peers")


def test_dynamic_async_in_flight_together():
    if N == 1:
        return
    xs = [rank_values((50,), torch.float32, seed=k) for k in range(3)]
    handles = []
    for k, x in enumerate(xs):
        hop = 1 + k % (N - 1)
        handles.append(gossip.neighbor_allreduce_async(
            x, self_weight=0.5, src_weights={(R - hop) % N: 0.5}, dst_weights=[(R + hop) % N]))
    for k in (2, 0, 1):
        hop = 1 + k % (N - 1)
        rows = gathered(xs[k])
        assert_close(handles[k].wait(), 0.5 * rows[R] + 0.5 * rows[(R - hop) % N], torch.float32, f"async {k}")
    assert np.isfinite(gathered(xs[0])).all()
