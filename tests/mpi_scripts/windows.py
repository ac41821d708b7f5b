"""One-sided windows: puts, accumulates and gets against closed forms, version counters, no tearing
under concurrent writers with the mutex, free and re-create, clear errors."""

import time

import numpy as np
import torch
from _common import GROUP, device, expect_error

import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def _value(rank: int, numel: int = 5, dtype=torch.float64) -> torch.Tensor:
    return (torch.arange(numel, dtype=dtype) + 10.0 * rank).to(device())


def test_put_then_update_is_the_weighted_average():
    for graph in (topologies.exponential_two(N), topologies.ring(N, bidirectional=False), topologies.star(N)):
        gossip.set_topology(graph)
        w = topologies.to_matrix(graph)
        for dtype, mutex in ((torch.float32, False), (torch.float64, False), (torch.float64, True)):
            x = _value(R, dtype=dtype)
            with gossip.Window(x, "x", mutex=mutex) as win:
                assert win.versions() == dict.fromkeys(gossip.in_neighbors(), 0)
                gossip.barrier()  # nobody writes before everybody has looked
                win.put()
                gossip.barrier()  # every put has completed at its target (put returns after flush/unlock)
                assert win.versions() == dict.fromkeys(gossip.in_neighbors(), 1), (dtype, mutex, win.versions())
                got = win.update()  # the static topology's weights
                assert got is x
                expected = sum(w[R, j] * _value(j, dtype=torch.float64).cpu().numpy() for j in range(N))
                assert np.allclose(x.cpu().numpy(), expected, rtol=1e-6, atol=1e-6), (x, expected)
                assert win.versions() == dict.fromkeys(gossip.in_neighbors(), 0)
                gossip.barrier()


def test_weighted_put_accumulate_and_get_closed_forms():
    gossip.set_topology(topologies.exponential_two(N))
    ins, outs = gossip.in_neighbors(), gossip.out_neighbors()
    x = _value(R)
    with gossip.Window(x, "weighted") as win:
        win.put(dst_weights={d: 0.5 + d for d in outs})
        gossip.barrier()
        for j, buffer in win.buffers().items():
            assert torch.allclose(buffer, (0.5 + R) * _value(j).cpu()), (j, buffer)
        gossip.barrier()
        win.accumulate(dst_weights=dict.fromkeys(outs, 2.0))
        win.accumulate(torch.ones_like(x))
        gossip.barrier()
        for j, buffer in win.buffers().items():
            assert torch.allclose(buffer, (0.5 + R + 2.0) * _value(j).cpu() + 1.0), (j, buffer)
        assert win.versions() == dict.fromkeys(ins, 3)
        gossip.barrier()
        win.update(self_weight=0.0, src_weights={j: 1.0 for j in ins[:1]})
        if ins:
            assert torch.allclose(x.cpu(), (0.5 + R + 2.0) * _value(ins[0]).cpu() + 1.0)
        gossip.barrier()  # x is now published; neighbours fetch it
        win.get(src_weights=dict.fromkeys(ins, 0.25))
        gossip.barrier()
        everyone = GROUP.allgather(x.cpu().numpy())
        for j, buffer in win.buffers().items():
            assert np.allclose(buffer.numpy(), 0.25 * everyone[j]), j
        assert win.versions() == dict.fromkeys(ins, 1)
        gossip.barrier()


def test_nonblocking_forms():
    gossip.set_topology(topologies.exponential_two(N))
    x = _value(R)
    with gossip.Window(x, "async") as win:
        handles = [win.put_async(), win.accumulate_async(dst_weights=dict.fromkeys(gossip.out_neighbors(), 3.0))]
        for handle in handles:
            assert handle.wait() is x
        gossip.barrier()
        for j, buffer in win.buffers().items():
            assert torch.allclose(buffer, 4.0 * _value(j).cpu())
        gossip.barrier()


def test_concurrent_writers_never_tear_with_the_mutex():
    """Every rank but 0 writes constant-valued 1M-element messages into rank 0 as fast as it can;
    rank 0 reads its buffers under the mutex the whole time: each must be constant."""
    gossip.set_topology(topologies.star(N))  # rank 0 <-> everyone
    numel = 1 << 20
    x = torch.zeros(numel, dtype=torch.float64)
    with gossip.Window(x, "tear", mutex=True) as win:
        if R == 0:
            deadline, reads = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline:
                for j, buffer in win.buffers().items():
                    b = buffer.numpy()
                    assert b.min() == b.max(), f"buffer of rank {j} torn: {b.min()} .. {b.max()}"
                reads += 1
            assert reads > 0
        else:
            deadline, k = time.monotonic() + 2.0, 0
            while time.monotonic() < deadline:
                win.put(torch.full((numel,), float(1000 * R + k), dtype=torch.float64), dst_weights={0: 1.0})
                k += 1
        gossip.barrier()


def test_own_graph_and_folding_only_what_arrived():
    """A window on a graph other than the static topology (a one-peer family's union); only the
    in-neighbours that wrote since the last fold are folded, uniformly."""
    gossip.set_topology(topologies.ring(N, bidirectional=False))
    family = topologies.OnePeerExponentialTwo(N)
    union = topologies.exponential_two(N)
    for mutex in (False, True):
        x = _value(R)
        with gossip.Window(x, "union", graph=union, mutex=mutex) as win:
            assert win.sources == sorted(j for j in union.predecessors(R) if j != R)
            assert win.update_arrived() == []  # nothing arrived: x unchanged
            assert np.array_equal(x.cpu().numpy(), _value(R).cpu().numpy())
            gossip.barrier()
            for step in range(family.period):
                before = gossip.allgather(x.reshape(1, -1)).cpu().numpy()
                peers = family.peers(step, R)
                win.put(dst_weights=peers.dst_weights)  # this step's one peer only
                gossip.barrier()
                arrived = win.update_arrived()
                assert arrived == sorted(peers.src_weights), (step, arrived, peers)
                expected = (before[R] + sum(before[j] for j in arrived)) / (1 + len(arrived))
                assert np.allclose(x.cpu().numpy(), expected, rtol=1e-12), (step, x, expected)
                gossip.barrier()
    if N > 1:
        expect_error(lambda: gossip.Window(_value(R), "bad", graph=topologies.ring(N + 1)), "invalid graph",
                     f"{N + 1} nodes")
        if not nx_equal(topologies.ring(N), topologies.exponential_two(N)):  # the same on every rank
            other = topologies.ring(N) if R == 0 else topologies.exponential_two(N)
            expect_error(lambda: gossip.Window(_value(R), "differs", graph=other), "different graph")


def nx_equal(a, b) -> bool:
    return sorted(a.edges(data="weight")) == sorted(b.edges(data="weight"))


def test_free_recreate_and_bad_input():
    gossip.set_topology(topologies.exponential_two(N))
    x = _value(R)
    win = gossip.Window(x, "again")
    assert "again" in gossip.open_windows()
    expect_error(lambda: win.put(torch.zeros(3, dtype=torch.float64)), "holds 5 elements")
    if gossip.out_neighbors() != list(range(N)) and N > 1:
        outsider = next(d for d in range(N) if d not in gossip.out_neighbors())
        expect_error(lambda: win.put(dst_weights={outsider: 1.0}), "are not out-neighbours")
    win.free()
    win.free()  # idempotent
    assert "again" not in gossip.open_windows()
    expect_error(lambda: win.update(), "has been freed")
    with gossip.Window(x, "again") as again:  # the name is free again
        again.put()
    expect_error(lambda: gossip.Window(x, ""), "non-empty string name")
    expect_error(lambda: gossip.Window(torch.zeros(4, dtype=torch.int64), "ints"), "not supported")
    if N > 1:
        shape = 5 if R != N - 1 else 6  # the last rank disagrees: every rank raises, naming the other
        expect_error(lambda: gossip.Window(torch.zeros(shape, dtype=torch.float64), "mismatch"), "asked for")
    with gossip.Window(x, "held"):
        expect_error(lambda: gossip.Window(x, "held"), "already open")
