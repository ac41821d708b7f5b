"""The window's options against closed forms: push-sum weights carried through put, accumulate, get
and update; zeroed buffers at creation and after an update; the mutex chosen per call (no tearing,
ranks mixing choices, no deadlock, the op timeout); reads of a neighbour's current tensor; and
several-MB windows."""

import contextlib
import time

import numpy as np
import torch
from _common import GROUP, Skip, device, expect_error, gathered

import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def _value(rank: int, numel: int = 5, dtype=torch.float64) -> torch.Tensor:
    return (torch.arange(numel, dtype=dtype) + 10.0 * rank).to(device())


def _outs(graph, j: int) -> list[int]:
    return sorted(d for d in graph.successors(j) if d != j)


def _push_sum_matrix(graph) -> np.ndarray:
    """Column-stochastic A: rank j keeps 1/(k_j + 1) of its mass and sends as much to each of its
    k_j out-neighbours."""
    a = np.zeros((N, N))
    for j in range(N):
        outs = _outs(graph, j)
        for i in (j, *outs):
            a[i, j] = 1.0 / (len(outs) + 1)
    return a


def test_push_sum_by_accumulate_and_reset_converges_to_the_average():
    """x_i ← x_i/(k_i+1), p_i likewise, accumulated into each out-neighbour; the owner folds with
    weight 1 and zeroes the buffers: (x, p) ← A (x, p) every round, Σ x and Σ p conserved, and on a
    graph that is not regular x/p → the average while x alone does not."""
    graph = topologies.star(N)  # the centre has N - 1 out-neighbours, every leaf one
    gossip.set_topology(graph)
    a = _push_sum_matrix(graph)
    outs, ins = gossip.out_neighbors(), gossip.in_neighbors()
    share = 1.0 / (len(outs) + 1)
    rows = np.stack([_value(j).cpu().numpy() for j in range(N)])
    p_all = np.ones(N)
    x = _value(R)
    with gossip.Window(x, "push-sum", push_sum=True, zero_init=True) as win:
        assert win.associated_p() == 1.0
        assert all(win.associated_p(j) == 0.0 for j in ins), [win.associated_p(j) for j in ins]
        assert all(float(b.abs().max()) == 0.0 for b in win.buffers().values())
        gossip.barrier()  # nobody writes before everybody has looked
        for step in range(40):
            win.accumulate(dst_weights=dict.fromkeys(outs, share), self_weight=share, mutex=True)
            if step == 0:  # after the send: the share kept here, the shares arrived there
                assert np.allclose(x.cpu().numpy(), rows[R] * share, rtol=1e-14)
                assert abs(win.associated_p() - share) < 1e-15
            gossip.barrier()  # every accumulate has completed at its target
            if step == 0:
                for j, buffer in win.buffers().items():
                    k_j = len(_outs(graph, j)) + 1
                    assert np.allclose(buffer.cpu().numpy(), rows[j] / k_j, rtol=1e-14), (j, buffer)
                    assert abs(win.associated_p(j) - 1.0 / k_j) < 1e-15
            win.update(self_weight=1.0, src_weights=dict.fromkeys(ins, 1.0), reset=True, mutex=True)
            rows, p_all = a @ rows, a @ p_all
            assert np.allclose(x.cpu().numpy(), rows[R], rtol=1e-12, atol=1e-12), (step, x, rows[R])
            assert abs(win.associated_p() - p_all[R]) < 1e-12, (step, win.associated_p(), p_all[R])
            assert all(win.associated_p(j) == 0.0 for j in ins)
            assert all(float(b.abs().max()) == 0.0 for b in win.buffers().values())  # reset
            gossip.barrier()  # nobody accumulates into a buffer before its owner has folded it
        everyone, ps = gathered(x), np.array(GROUP.allgather(win.associated_p()))
        initial = np.stack([_value(j).cpu().numpy() for j in range(N)])
        assert np.allclose(everyone.sum(axis=0), initial.sum(axis=0), rtol=1e-12)  # mass conserved
        assert abs(ps.sum() - N) < 1e-12
        average = initial.mean(axis=0)
        assert np.allclose(x.cpu().numpy() / win.associated_p(), average, rtol=1e-6), (x, average)
        if N >= 3:  # not doubly stochastic: the tensor alone is a weighted average, not the mean
            assert not np.allclose(everyone, average, rtol=1e-3)


def test_put_get_and_update_carry_p_like_the_tensor():
    gossip.set_topology(topologies.exponential_two(N))
    outs, ins = gossip.out_neighbors(), gossip.in_neighbors()
    x = _value(R)
    with gossip.Window(x, "carried", push_sum=True) as win:
        assert all(win.associated_p(j) == 1.0 for j in ins)  # buffers start as copies, with p = 1
        for buffer in win.buffers().values():
            assert torch.equal(buffer.cpu(), _value(R).cpu())
        gossip.barrier()
        win.put(dst_weights={d: 0.5 + d for d in outs})
        gossip.barrier()
        for j in ins:
            assert win.associated_p(j) == 0.5 + R, (j, win.associated_p(j))
        win.update(self_weight=0.5, src_weights=dict.fromkeys(ins, 0.25))
        p = 0.5 + 0.25 * (0.5 + R) * len(ins)
        assert abs(win.associated_p() - p) < 1e-15
        expected = 0.5 * _value(R).cpu() + sum(0.25 * (0.5 + R) * _value(j).cpu() for j in ins)
        assert torch.allclose(x.cpu(), expected, rtol=1e-14)
        gossip.barrier()  # published: x and p
        ps = GROUP.allgather(win.associated_p())
        published = gathered(x)
        win.get(src_weights=dict.fromkeys(ins, 2.0))
        for j, buffer in win.buffers().items():
            assert np.allclose(buffer.cpu().numpy(), 2.0 * published[j], rtol=1e-14), j
            assert abs(win.associated_p(j) - 2.0 * ps[j]) < 1e-14, (j, win.associated_p(j), ps[j])
        expect_error(lambda: win.get(current=True), "expose_tensor=True")
        if ins:
            expect_error(lambda: win.associated_p(R), "is not an in-neighbour")
        gossip.barrier()
    with gossip.Window(x, "plain") as win:
        expect_error(win.associated_p, "push_sum=True")
    if N > 1:  # every rank must agree on push_sum: every rank raises, naming the other
        expect_error(lambda: gossip.Window(x, "odd", push_sum=R == 0), "push_sum=")


def test_zero_init_and_reset_of_the_buffers_read_only():
    gossip.set_topology(topologies.exponential_two(N))
    ins = gossip.in_neighbors()
    x = _value(R)
    with gossip.Window(x, "zeroed", zero_init=True) as win:
        assert all(float(b.abs().max()) == 0.0 for b in win.buffers().values())
        win.update(self_weight=1.0)  # the graph's weights times zeroed buffers: x unchanged
        assert torch.equal(x.cpu(), _value(R).cpu())
        gossip.barrier()
    x = _value(R)
    with gossip.Window(x, "copies") as win:  # the default: every buffer starts as a copy of the tensor
        assert all(torch.equal(b.cpu(), _value(R).cpu()) for b in win.buffers().values())
        gossip.barrier()
        win.put()
        gossip.barrier()
        first = ins[:1]
        win.update(self_weight=0.0, src_weights=dict.fromkeys(first, 1.0), reset=True)
        if first:
            assert torch.equal(x.cpu(), _value(first[0]).cpu())
        for j, buffer in win.buffers().items():
            want = torch.zeros(5, dtype=torch.float64) if j in first else _value(j).cpu()
            assert torch.equal(buffer.cpu(), want), (j, buffer)
        gossip.barrier()


def test_current_get_reads_the_live_tensor_and_p():
    gossip.set_topology(topologies.exponential_two(N))
    outs, ins = gossip.out_neighbors(), gossip.in_neighbors()
    x = _value(R)
    if x.is_cuda:
        expect_error(lambda: gossip.Window(x, "cuda", expose_tensor=True), "needs a CPU tensor")
        raise Skip("a CUDA tensor's memory is not exposed")
    expect_error(lambda: gossip.Window(torch.zeros(4, 3, dtype=torch.float64).t(), "strided", expose_tensor=True),
                 "contiguous")
    with gossip.Window(x, "live", push_sum=True, expose_tensor=True) as win:
        assert win.expose_tensor
        x.add_(100.0)  # an ordinary in-place change: not published
        win.put(dst_weights=dict.fromkeys(outs, 1.0), self_weight=0.5)  # sends x, then x ← x/2, p ← 1/2
        assert torch.equal(x, (_value(R) + 100.0) / 2) and win.associated_p() == 0.5
        gossip.barrier()
        win.get()  # the published copies: as at creation
        for j, buffer in win.buffers().items():
            assert torch.equal(buffer, _value(j)), (j, buffer)
            assert win.associated_p(j) == 1.0
        win.get(src_weights=dict.fromkeys(ins, 3.0), current=True)  # the tensors and p as they are now
        for j, buffer in win.buffers().items():
            assert torch.equal(buffer, 3.0 * (_value(j) + 100.0) / 2), (j, buffer)
            assert win.associated_p(j) == 1.5
        assert win.versions() == dict.fromkeys(ins, 3)  # the put and two gets
        gossip.barrier()
        win.update(self_weight=1.0, src_weights=dict.fromkeys(ins, 0.0), mutex=True)  # x unchanged, published
        gossip.barrier()
        win.get(mutex=True)
        for j, buffer in win.buffers().items():
            assert torch.equal(buffer, (_value(j) + 100.0) / 2), (j, buffer)
            assert win.associated_p(j) == 0.5
        gossip.barrier()
    if N > 1:
        expect_error(lambda: gossip.Window(x, "odd", expose_tensor=R == 0), "expose_tensor=")


def test_mutex_per_call_excludes_writers_and_never_deadlocks():
    """Writers with the mutex never tear a reader's view with the mutex though the window's default
    is off; every rank writing to all its out-neighbours and folding, all with the mutex, at once,
    ends; writes without the mutex beside them still complete."""
    gossip.set_topology(topologies.star(N))
    numel = 1 << 19  # 4 MB of float64 per message
    x = torch.zeros(numel, dtype=torch.float64)
    with gossip.Window(x, "mixed") as win:
        assert win.mutex is False
        if R == 0:
            deadline, reads = time.monotonic() + 1.5, 0
            while time.monotonic() < deadline:
                for j, buffer in win.buffers(mutex=True).items():
                    b = buffer.cpu().numpy()
                    assert b.min() == b.max(), f"buffer of rank {j} torn: {b.min()} .. {b.max()}"
                reads += 1
            assert reads > 0
        else:
            deadline, k = time.monotonic() + 1.5, 0
            while time.monotonic() < deadline:
                win.put(torch.full((numel,), float(1000 * R + k), dtype=torch.float64), dst_weights={0: 1.0},
                        mutex=True)
                k += 1
        gossip.barrier()
    gossip.set_topology(topologies.exponential_two(N))
    x = _value(R, numel=1 << 16)
    with gossip.Window(x, "everyone", mutex=True) as win:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # a cycle of ranks, each holding one mutex at a time
            win.put()
            win.accumulate(mutex=R % 2 == 0)  # ranks mixing choices
            win.update_arrived()
        gossip.barrier()
        last = gathered(x)
        win.put(mutex=False)
        gossip.barrier()
        for j, buffer in win.buffers().items():
            assert np.array_equal(buffer.cpu().numpy(), last[j]), j
        gossip.barrier()


def test_a_held_mutex_honours_the_op_timeout():
    """Rank 0 holds its own mutex (``hold_mutex``) and folds inside the hold, which uses it; the
    others' puts with the mutex time out naming the holder, without it they go through."""
    if N == 1:
        return
    gossip.set_topology(topologies.star(N))
    with gossip.Window(_value(R), "held") as win:
        expect_error(lambda: win.hold_mutex([N]).__enter__(), f"ranks [{N}] outside the job")
        with win.hold_mutex([0]) if R == 0 else contextlib.nullcontext():
            gossip.barrier()
            if R == 0:
                win.update(mutex=True)  # re-entrant: the hold serves it
            else:
                gossip.set_op_timeout(0.5)
                try:
                    started = time.monotonic()
                    expect_error(lambda: win.put(mutex=True), "window 'held' put has waited more than 0.5 s for the "
                                 "mutex of rank 0's window, held by rank 0", error=gossip.OpTimeoutError)
                    assert time.monotonic() - started < 5.0
                    win.put(mutex=False)  # without the mutex nothing is waited for
                finally:
                    gossip.set_op_timeout(None)
            gossip.barrier()
        if R != 0:
            win.put(mutex=True)  # given back: free again
        gossip.barrier()


def test_several_mb_push_sum_window():
    """1.5 M float32 elements (6 MB per message): accumulate, update with reset, against NumPy."""
    gossip.set_topology(topologies.ring(N, bidirectional=False))
    numel = 3 << 19
    g = torch.Generator().manual_seed(R)
    start = (torch.randint(-64, 64, (numel,), generator=g).to(torch.float32) / 8.0).to(device())
    x = start.clone()
    rows = gathered(start)
    outs, ins = gossip.out_neighbors(), gossip.in_neighbors()
    with gossip.Window(x, "large", push_sum=True, zero_init=True) as win:
        for _ in range(2):
            win.accumulate(dst_weights=dict.fromkeys(outs, 0.5), self_weight=0.5 if outs else 1.0)
            gossip.barrier()
            win.update(self_weight=1.0, src_weights=dict.fromkeys(ins, 1.0), reset=True)
            gossip.barrier()
            rows = 0.5 * rows + 0.5 * np.roll(rows, 1, axis=0) if N > 1 else rows
        assert np.allclose(x.cpu().numpy(), rows[R], rtol=1e-6, atol=1e-6)
        assert win.associated_p() == 1.0  # a regular graph: p stays 1
