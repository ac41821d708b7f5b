"""Asynchronous parameter-server SGD over real MPI: the server's updates, replayed in NumPy from the
recorded arrivals (worker, iteration index, gradient), follow each rule's equations; K = 1 OrMo is
momentum SGD; staleness is recorded; a slow worker does not hold the others back."""

import time

import numpy as np
import torch
from _common import GROUP, device

import algorithms
import gossip

N = GROUP.size
R = GROUP.rank
UPDATES = 30


def _model():
    torch.manual_seed(R)  # different per rank: the optimizer broadcasts rank 0's
    return torch.nn.Linear(4, 3).double().to(device())


def _batch(step: int):
    g = torch.Generator().manual_seed(100 * R + step)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    return x.to(device()), y.to(device())


def _train(name: str, hyper: dict, slow_worker: int | None = None):
    """Run ``name`` to UPDATES updates; on a server return (its shard of w⁰, of the final w,
    arrivals, rule), else None."""
    model = _model()
    opt = algorithms.create(name, model.parameters(), **hyper)
    if N < 2:
        return None
    if opt.is_server:
        shard = opt.server.shard
        start, arrivals = opt.x[shard].cpu().numpy().copy(), []
        opt.serve(UPDATES, on_update=lambda w, g, ite, worker: arrivals.append((worker, ite, g.cpu().numpy().copy())))
        return start, opt.x[shard].cpu().numpy().copy(), arrivals, opt.rule
    step = 0
    while not opt.stopped:
        if R == slow_worker:
            time.sleep(0.05)
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        step += 1
    return None


def _replay(name, start, arrivals, lr, beta, workers):
    w, u, latest = start.copy(), np.zeros_like(start), 0
    for t, (_, ite, g) in enumerate(arrivals):
        if name == "asgd":
            w = w - lr * g
        elif name == "asgdm":
            u = beta * u + lr * g
            w = w - u
        else:
            if -(-t // workers) > latest:
                w, u, latest = w - beta * u, beta * u, latest + 1
            delay = latest - -(-ite // workers)
            assert delay >= 0
            u = u + beta**delay * lr * g
            w = w - (1 - beta ** (delay + 1)) / (1 - beta) * lr * g
    return w


def test_server_updates_follow_the_rules():
    if N < 2:
        try:
            algorithms.create("ormo", _model().parameters(), lr=0.1)
        except ValueError as error:
            assert "at least 2 ranks" in str(error)
            return
        raise AssertionError("a one-rank parameter server was accepted")
    for name in ("asgd", "asgdm", "ormo"):
        hyper = {"lr": 0.1, **({} if name == "asgd" else {"momentum": 0.8})}
        result = _train(name, hyper)
        if result is not None:
            start, final, arrivals, rule = result
            assert len(arrivals) == UPDATES
            expected = _replay(name, start, arrivals, 0.1, 0.8, N - 1)
            assert np.allclose(final, expected, atol=1e-12), f"{name}: off by {np.abs(final - expected).max()}"
            assert rule.staleness == [t - ite for t, (_, ite, _) in enumerate(arrivals)]
            if N > 2:  # all workers start at index 0 and only one can be first: someone is stale
                assert max(rule.staleness) >= 1
            if N == 2:  # one worker: every gradient is fresh and OrMo is momentum SGD
                assert rule.staleness == [0] * UPDATES
                if name == "ormo":
                    w, u = start.copy(), np.zeros_like(start)
                    for _, _, g in arrivals:
                        u = 0.8 * u + 0.1 * g
                        w = w - u
                    assert np.allclose(final, w, atol=1e-12)
        gossip.barrier()


def test_a_slow_worker_does_not_hold_back_the_others():
    if N < 3:
        return
    result = _train("ormo", {"lr": 0.05, "momentum": 0.9}, slow_worker=1)
    if result is not None:
        _, _, arrivals, rule = result
        counts = {w: sum(1 for a in arrivals if a[0] == w) for w in range(1, N)}
        fast = [counts[w] for w in range(2, N)]
        assert counts[1] < min(fast), counts  # the fast workers kept going
        slow = [s for s, a in zip(rule.staleness, arrivals, strict=True) if a[0] == 1]
        assert all(s >= 1 for s in slow[1:]), slow  # what the slow worker sends is always stale
    gossip.barrier()


def test_a_model_sharded_over_two_servers():
    """Ranks 0 and 1 each serve half of the model with their own rule and iteration count; every
    shard follows the rule's equation replayed from its own arrivals."""
    if N < 3:
        return
    workers = N - 2
    for name in ("ormo", "asgdm"):
        result = _train(name, {"lr": 0.1, "momentum": 0.8, "server": [0, 1]})
        if result is not None:
            start, final, arrivals, rule = result
            assert len(start) in (7, 8)  # Linear(4, 3): 15 parameters, split 7 + 8 or 8 + 7
            assert len(arrivals) == UPDATES
            expected = _replay(name, start, arrivals, 0.1, 0.8, workers)
            assert np.allclose(final, expected, atol=1e-12), f"{name}: off by {np.abs(final - expected).max()}"
            assert rule.workers == workers if name == "ormo" else True
            if workers == 1:  # one worker: OrMo and naive ASGDm are momentum SGD on each shard
                assert rule.staleness == [0] * UPDATES
        gossip.barrier()
