"""Asynchronous server rules (ASGD, naive ASGDm, OrMo) against their equations in NumPy, on scripted
arrival orders (deterministic asynchrony: which worker's gradient arrives at each server iteration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms.server_rules import ASGD, NaiveASGDm, OrMo, OrMoDA, staleness_summary

DIM = 7


def _gradient(worker: int, ite: int) -> np.ndarray:
    return np.random.default_rng(1000 * worker + ite).standard_normal(DIM)


def _run(rule, order: list[int], workers: int):
    """Drive ``rule`` with the arrival ``order`` (a worker per server iteration); each worker's
    gradient is computed at the iteration index it last received. Returns w after each update and
    the (worker, ite) of each arrival."""
    w = torch.zeros(DIM, dtype=torch.float64)
    holding = dict.fromkeys(range(workers), 0)  # everybody starts from (w⁰, 0)
    trajectory, arrivals = [], []
    for worker in order:
        ite = holding[worker]
        holding[worker] = rule.apply(w, torch.from_numpy(_gradient(worker, ite)), ite)
        trajectory.append(w.numpy().copy())
        arrivals.append((worker, ite))
    return trajectory, arrivals


def _ormo_reference(arrivals, workers: int, lr: float, beta: float, first_t: int = 0,
                    delay_adaptive: bool = False) -> list[np.ndarray]:
    """The OrMo recursion of Shi, Yang, Li (NeurIPS 2024), server iterations counted from ``first_t``;
    ``delay_adaptive``: OrMo-DA, η scaled by min(1, K/τ) for a gradient of staleness τ = t − ite."""
    w, u, latest, out = np.zeros(DIM), np.zeros(DIM), 0, []
    for t, (worker, ite) in enumerate(arrivals, start=first_t):
        if int(np.ceil(t / workers)) > latest:
            w, u, latest = w - beta * u, beta * u, latest + 1
        delay = latest - int(np.ceil(ite / workers))
        g = _gradient(worker, ite)
        if delay_adaptive and t - ite > workers:
            g = g * workers / (t - ite)
        u = u + beta**delay * lr * g
        w = w - (1 - beta ** (delay + 1)) / (1 - beta) * lr * g
        out.append(w)
    return out


def test_one_worker_ormo_is_momentum_sgd_and_asgd_is_sgd():
    lr, beta = 0.1, 0.9
    ormo, _ = _run(OrMo(lr, beta, workers=1), [0] * 12, 1)
    heavy_ball, _ = _run(NaiveASGDm(lr, beta), [0] * 12, 1)
    w, u = np.zeros(DIM), np.zeros(DIM)
    for t in range(12):
        u = beta * u + lr * _gradient(0, t)
        w = w - u
        assert np.allclose(ormo[t], w, atol=1e-12) and np.allclose(heavy_ball[t], w, atol=1e-12), t
    sgd, _ = _run(ASGD(lr), [0] * 5, 1)
    assert np.allclose(sgd[-1], -lr * sum(_gradient(0, t) for t in range(5)))
    # the rounding matters: counting server iterations from 1 would not give momentum SGD at K = 1
    _, arrivals = _run(OrMo(lr, beta, workers=1), [0] * 4, 1)
    assert np.allclose(_ormo_reference(arrivals, 1, lr, beta, first_t=0)[-1], ormo[3], atol=1e-12)
    assert not np.allclose(_ormo_reference(arrivals, 1, lr, beta, first_t=1)[-1], ormo[3], atol=1e-3)


@pytest.mark.parametrize("workers,order", [
    (3, [0, 1, 2, 0, 0, 2, 1, 1, 0, 2, 2, 2, 1, 0, 1]),
    (4, [3, 2, 1, 0, 0, 0, 0, 1, 3, 2, 2, 1, 0, 3, 3, 1, 2, 0]),
    (2, [1, 1, 1, 1, 0, 0, 1, 0, 1, 0]),  # one slow worker: its gradients arrive 4 iterations stale
])
def test_scripted_asynchrony_follows_the_equations(workers, order):
    lr, beta = 0.05, 0.8
    got, arrivals = _run(OrMo(lr, beta, workers=workers), order, workers)
    for t, (a, b) in enumerate(zip(got, _ormo_reference(arrivals, workers, lr, beta), strict=True)):
        assert np.allclose(a, b, atol=1e-12), f"OrMo, K = {workers}, server iteration {t}"
    adaptive, arrivals = _run(OrMoDA(lr, beta, workers=workers), order, workers)
    reference = _ormo_reference(arrivals, workers, lr, beta, delay_adaptive=True)
    for t, (a, b) in enumerate(zip(adaptive, reference, strict=True)):
        assert np.allclose(a, b, atol=1e-12), f"OrMo-DA, K = {workers}, server iteration {t}"
    if max(t - ite for t, (_, ite) in enumerate(arrivals)) > workers:  # some step was shrunk
        assert not np.allclose(adaptive[-1], got[-1])
    naive, arrivals = _run(NaiveASGDm(lr, beta), order, workers)
    w, u = np.zeros(DIM), np.zeros(DIM)
    for t, (worker, ite) in enumerate(arrivals):
        u = beta * u + lr * _gradient(worker, ite)
        w = w - u
        assert np.allclose(naive[t], w, atol=1e-12), f"naive ASGDm, server iteration {t}"
    rule = ASGD(lr)
    asgd, arrivals = _run(rule, order, workers)
    expected = -lr * sum(_gradient(worker, ite) for worker, ite in arrivals)
    assert np.allclose(asgd[-1], expected)
    assert rule.staleness == [t - ite for t, (_, ite) in enumerate(arrivals)]
    assert staleness_summary(rule)["max"] == max(rule.staleness) > 0


def test_state_round_trip_and_bad_input():
    order = [0, 1, 2, 0, 2, 1, 1, 0]
    rule = OrMo(0.1, 0.9, workers=3)
    _run(rule, order[:4], 3)
    saved = rule.state_dict()
    copy = OrMo(0.1, 0.9, workers=3)
    copy.load_state_dict(saved)
    assert copy.t == 4 and copy.latest_group == rule.latest_group and torch.equal(copy.u, rule.u)
    with pytest.raises(ValueError, match="from the future"):
        rule.apply(torch.zeros(DIM, dtype=torch.float64), torch.zeros(DIM, dtype=torch.float64), 99)
    for bad in (lambda: OrMo(0.1, 1.0), lambda: OrMo(-1.0), lambda: OrMo(0.1, 0.5, workers=0)):
        with pytest.raises(ValueError):
            bad()
