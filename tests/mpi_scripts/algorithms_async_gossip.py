"""AD-PSGD on one-sided windows: with the ranks' steps in a scripted order it follows its
equation, simulated in NumPy from the gathered state, on several topologies; run freely, with ranks at
different paces, nobody waits and the models still agree; clear errors."""

import time

import numpy as np
from _common import GROUP, expect_error
from algorithms_sync import TOL, gather, loss_of, make_model

import algorithms
import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def destinations(topology, step: int, rank: int) -> list[int]:
    if isinstance(topology, topologies.DynamicTopology):
        return sorted(topology.peers(step, rank).dst_weights)
    return sorted(d for d in topology.successors(rank) if d != rank)


def scripted(topology, hyper, steps=6, seed=0):
    """Ranks take their steps one at a time in a scripted order (a fresh permutation every round),
    each push complete before the next rank moves; the run must match a NumPy simulation of the
    equation with per-receiver buffers and arrival flags, including stale and overwritten pushes."""
    model = make_model(seed=4)
    kwargs = {} if topology is None else {"topology": topology}
    opt = algorithms.create("adpsgd", model.parameters(), **hyper, **kwargs)
    family = topologies.OnePeerExponentialTwo(N) if topology is None else topology
    lr, beta, wd = hyper["lr"], hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0)
    x = gather(opt.x)
    m = np.zeros_like(x)
    buffer = np.zeros((N, N, x.shape[1]))  # buffer[i, j]: the newest model j pushed to i
    arrived = np.zeros((N, N), dtype=bool)
    folded = 0
    rng = np.random.default_rng(seed)
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, t).backward()  # at this rank's model: only its own step changes it
        plan = opt.schedule.plan(t)  # this step's push, a plan like every other communication
        assert plan.op == "window_put" and sorted(plan.dst_weights or destinations(family, t, R)) == \
            destinations(family, t, R), (t, plan)
        order = rng.permutation(N)
        for turn in order:
            if turn == R:
                opt.step()
                opt.synchronize()  # the push has reached its peer before anybody else moves
            gossip.barrier()
        g = gather(opt.g)
        for i in order:
            senders = np.flatnonzero(arrived[i])
            assert (sorted(opt.last_arrived) == list(senders)) or i != R, (t, i, opt.last_arrived, senders)
            gradient = g[i] + wd * x[i]
            x[i] = (x[i] + buffer[i, senders].sum(axis=0)) / (1 + len(senders))
            folded += len(senders) if i == R else 0
            arrived[i] = False
            m[i] = beta * m[i] + gradient
            x[i] = x[i] - lr * m[i]
            for d in destinations(family, t, i):
                buffer[d, i] = x[i]
                arrived[d, i] = True
        got = gather(opt.x)
        assert np.allclose(got, x, rtol=TOL, atol=TOL), (t, np.abs(got - x).max())
    assert opt.arrivals == folded
    if N > 2:
        assert folded > 0
    opt.finish()
    assert np.allclose(gather(opt.x), x.mean(axis=0, keepdims=True), rtol=TOL, atol=TOL)


def test_scripted_arrival_order_follows_the_equation_on_several_topologies():
    for topology in (None, topologies.OnePeer(topologies.ring(N)), topologies.ring(N, bidirectional=False),
                     topologies.exponential_two(N)):
        scripted(topology, {"lr": 0.1})
    scripted(None, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, seed=1)
    sequence = topologies.GraphSequence([topologies.ring(N), topologies.exponential_two(N)])  # several peers a step
    scripted(sequence, {"lr": 0.1}, steps=4, seed=2)


def test_free_running_ranks_at_different_paces():
    """Rank r sleeps r ms per step; each runs its own number of steps; no rank waits for another."""
    model = make_model(seed=5)
    opt = algorithms.create("adpsgd", model.parameters(), lr=0.05, momentum=0.5)
    steps = 30 + 10 * R  # different step counts: nobody could wait for everybody
    for t in range(steps):
        opt.zero_grad()
        loss_of(model, t).backward()
        opt.step()
        time.sleep(0.001 * R)
    spread = gather(opt.x).std(axis=0).max()
    assert np.isfinite(spread)
    if N > 1:
        assert opt.arrivals > 0  # models did arrive and were folded in
    opt.finish()
    assert gather(opt.x).std(axis=0).max() < 1e-6
    expect_error(lambda: opt.step(), "has finished", error=RuntimeError)


def test_bad_input():
    model = make_model()
    if N > 1:
        expect_error(lambda: algorithms.create("adpsgd", model.parameters(), lr=0.1,
                                               topology=topologies.RandomMatching(N)), "not periodic")
    expect_error(lambda: algorithms.create("adpsgd", model.parameters(), lr=0.1,
                                           topology=topologies.OnePeerExponentialTwo(N + 1)), f"{N + 1} nodes")
    expect_error(lambda: algorithms.create("adpsgd", model.parameters(), lr=0.1, topology="ring"),
                 "static graph or a periodic")
    expect_error(lambda: algorithms.create("adpsgd", model.parameters(), lr=-1.0), "need lr > 0")
