"""Periodic averaging (local SGD, SlowMo, BMUF, MAVG) and CR-PSGD against their equations in NumPy.

Each step the gradients of every rank are gathered and fed to an independent float64 NumPy
implementation: the base algorithm's update (the references of ``algorithms_sync``), then, at the
end of each round, the exact average and the outer momentum step. The gathered parameters must
follow it to float32 round-off.
"""

import itertools

import numpy as np
import torch
from _common import GROUP, device, expect_error
from algorithms_sync import TOL, check_round_trip, gather, loss_of, make_model, mixing, reference, trajectory

import algorithms
import gossip
import topologies

N = GROUP.size
R = GROUP.rank
STEPS = 10


def _lr_at(lr: float, step: int, decay_at: int | None) -> float:
    return lr * (0.5 if decay_at is not None and step >= decay_at else 1.0)


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _mean_rows(x: np.ndarray) -> np.ndarray:
    return np.tile(x.mean(axis=0), (N, 1))


def local_sgd_update(x, g, state, hyper, lr, step, period):
    """m ← β m + g ; x ← x − γ m (Nesterov: x − γ(g + β m)); an exact average after warm-up steps
    and every period-th step after them."""
    beta, wd = hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0)
    g = g + wd * x
    state["m"] = beta * state.get("m", 0.0) + g
    x = x - lr * (g + beta * state["m"] if hyper.get("nesterov") else state["m"])
    warmup = hyper.get("warmup_steps", 0)
    if step < warmup or (period is not None and (step - warmup + 1) % period == 0):
        x = _mean_rows(x)
    return x


def check_local_sgd(hyper, steps=STEPS):
    model = make_model()
    opt = algorithms.create("local-sgd", model.parameters(), **hyper)
    x_ref, state = gather(opt.x), {}
    for k in range(steps):
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        opt.step()
        x_ref = local_sgd_update(x_ref, g, state, hyper, hyper["lr"], k, hyper.get("period", 8))
        got = gather(opt.x)
        err = np.abs(got - x_ref).max() / max(1.0, np.abs(x_ref).max())
        assert err < TOL, f"rank {R}: local-sgd {hyper} step {k}: off by {err:.3g}"


def test_local_sgd_is_k_step_averaging():
    check_local_sgd({"lr": 0.1, "period": 3})
    check_local_sgd({"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "period": 2})
    check_local_sgd({"lr": 0.05, "momentum": 0.5, "period": 4, "warmup_steps": 3})
    check_local_sgd({"lr": 0.1, "period": None}, steps=4)
    schedule = gossip.plan.schedule
    ops = [schedule.PeriodicGlobalAverage(schedule.NoCommunication(), 3, warmup_steps=2).plan(k).op
           for k in range(8)]
    assert ops == ["allreduce", "allreduce", "none", "none", "allreduce", "none", "none", "allreduce"], ops


def _base_update(name, base_hyper, x, g, state, lr, step, topology):
    if name == "local-sgd":
        return local_sgd_update(x, g, state, base_hyper, lr, step, base_hyper.get("period"))
    w = mixing("allreduce" if name == "pmsgd" else topology, step, None)
    return reference(name, {**base_hyper, "lr": lr})(x, g, w, state)


def _restart_base(name, x, state, base_buffers):
    """What the optimizer does to the base's state when every rank is set to the new start x."""
    if base_buffers == "reset":
        for key in ("m", "x_prev", "d_prev", "wy", "g_prev"):
            state.pop(key, None)
    elif base_buffers == "average" and "m" in state:
        state["m"] = _mean_rows(state["m"])
    if name == "sgp":  # push-sum restarts from numerator = z, mass = 1
        state["numerator"], state["mass"] = x.copy(), np.ones((N, 1))


def check_outer(name, hyper, base="local-sgd", base_hyper=None, topology=None, steps=STEPS, decay_at=None):
    """``name`` (slowmo, bmuf, mavg) over ``base`` against the NumPy recursion of the module docstring."""
    base_hyper = dict(base_hyper or {})
    comm = {} if topology is None else {"topology": topology}
    model = make_model(seed=1)
    if name == "mavg":
        opt = algorithms.create("mavg", model.parameters(), **hyper, **base_hyper)
        base, base_hyper = "local-sgd", {**base_hyper, "period": None}
    else:
        opt = algorithms.create(name, model.parameters(), base=base, **hyper, **base_hyper, **comm)
        if base == "local-sgd":
            base_hyper["period"] = None
    lr, period = hyper["lr"], hyper["period"]
    slow_lr = hyper.get("slow_lr", 1.0)
    beta = hyper.get("slow_momentum", 1 - 1 / N if name == "bmuf" else 0.5)
    x_ref = gather(opt.x)
    start, u, state = x_ref[0].copy(), np.zeros(x_ref.shape[1]), {"topology": topology, "every": None}
    for k in range(steps):
        lr_k = _lr_at(lr, k, decay_at)
        _set_lr(opt, lr_k)
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        opt.step()
        x_ref = _base_update(base, base_hyper, x_ref, g, state, lr_k, k, topology)
        if (k + 1) % period == 0:
            average = x_ref.mean(axis=0)
            if name == "slowmo":
                u = beta * u + (start - average) / lr_k
                start = start - slow_lr * lr_k * u
                new = start
            else:
                u = beta * u + slow_lr * (average - start)
                start = start + u
                new = start + beta * u if hyper.get("block_nesterov") else start
            x_ref = np.tile(new, (N, 1))
            _restart_base(base, x_ref, state, hyper.get("base_buffers", "maintain"))
        got = gather(opt.x)
        err = np.abs(got - x_ref).max() / max(1.0, np.abs(x_ref).max())
        assert err < TOL, f"rank {R}: {name} {hyper} over {base} {base_hyper} on {topology} step {k}: off by {err:.3g}"
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.x)
    opt.synchronize()


def test_slowmo_bmuf_mavg_follow_their_equations():
    ring, one_peer = topologies.ring(N), topologies.OnePeerExponentialTwo(N)
    check_outer("slowmo", {"lr": 0.05, "period": 3, "slow_lr": 1.5, "slow_momentum": 0.5},
                base_hyper={"momentum": 0.9, "weight_decay": 1e-3}, decay_at=5)
    check_outer("slowmo", {"lr": 0.1, "period": 4, "slow_lr": 1.0, "slow_momentum": 0.6}, base="dsgd", topology=ring)
    for buffers in ("maintain", "reset", "average"):
        check_outer("slowmo", {"lr": 0.05, "period": 3, "slow_momentum": 0.4, "base_buffers": buffers},
                    base="dmsgd", base_hyper={"momentum": 0.9}, topology=one_peer, decay_at=4)
    check_outer("slowmo", {"lr": 0.05, "period": 2, "slow_momentum": 0.5}, base="decentlam",
                base_hyper={"momentum": 0.8}, topology=ring)
    check_outer("slowmo", {"lr": 0.05, "period": 3, "slow_momentum": 0.5}, base="dsgd-awc", topology=one_peer)
    check_outer("slowmo", {"lr": 0.05, "period": 3, "slow_momentum": 0.5, "base_buffers": "reset"}, base="sgp",
                base_hyper={"momentum": 0.5}, topology=topologies.exponential_two(N))
    check_outer("slowmo", {"lr": 0.05, "period": 3, "slow_lr": 0.8, "slow_momentum": 0.5}, base="pmsgd",
                base_hyper={"momentum": 0.9})
    check_outer("bmuf", {"lr": 0.1, "period": 3, "slow_lr": 1.0})
    check_outer("bmuf", {"lr": 0.1, "period": 2, "slow_lr": 0.9, "slow_momentum": 0.7, "block_nesterov": True},
                base_hyper={"momentum": 0.5})
    check_outer("bmuf", {"lr": 0.05, "period": 3, "slow_momentum": 0.5, "block_nesterov": True}, base="dmsgd",
                base_hyper={"momentum": 0.9}, topology=ring)
    check_outer("mavg", {"lr": 0.1, "period": 3, "slow_momentum": 0.6})
    check_outer("mavg", {"lr": 0.1, "period": 1, "slow_momentum": 0.3}, base_hyper={"weight_decay": 1e-3})


def _trajectory(name, hyper):
    return trajectory(name, hyper, steps=9, seed=2)


def _close(a_list, b_list, what):
    for k, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        assert torch.allclose(a, b, rtol=0, atol=2e-6), f"{what}: step {k} differs by {(a - b).abs().max():.3g}"


def test_special_cases():
    ring = topologies.ring(N)
    # α = 1, β = 0 is the base: over local SGD, K-step averaging; over DSGD, Gossip-PGA with H = τ
    # (the boundary's gossip is then averaged exactly: mean(W v) = mean(v) for doubly stochastic W).
    _close(_trajectory("slowmo", {"lr": 0.1, "period": 3, "slow_lr": 1.0, "slow_momentum": 0.0, "momentum": 0.9}),
           _trajectory("local-sgd", {"lr": 0.1, "period": 3, "momentum": 0.9}), "slowmo(1, 0) over local-sgd")
    _close(_trajectory("slowmo", {"lr": 0.1, "period": 3, "slow_lr": 1.0, "slow_momentum": 0.0, "base": "dsgd",
                                  "topology": ring}),
           _trajectory("dsgd", {"lr": 0.1, "topology": ring, "global_avg_every": 3}), "slowmo(1, 0) over dsgd")
    # Over local SGD with a constant lr, α = 1 and β = μ: MAVG; BMUF with ζ = 1, classic, is MAVG too.
    mavg = _trajectory("mavg", {"lr": 0.1, "period": 3, "slow_momentum": 0.6})
    _close(_trajectory("slowmo", {"lr": 0.1, "period": 3, "slow_lr": 1.0, "slow_momentum": 0.6}), mavg,
           "slowmo(1, μ) over local-sgd vs mavg")
    _close(_trajectory("bmuf", {"lr": 0.1, "period": 3, "slow_lr": 1.0, "slow_momentum": 0.6}), mavg, "bmuf vs mavg")
    # Local SGD with K = 1 and heavy-ball momentum is PmSGD (the mean of local buffers is PmSGD's buffer).
    _close(_trajectory("local-sgd", {"lr": 0.1, "period": 1, "momentum": 0.9}),
           _trajectory("pmsgd", {"lr": 0.1, "momentum": 0.9}), "local-sgd K=1 vs pmsgd")


def test_state_dict_round_trip_mid_period_is_bitwise():
    ring = topologies.ring(N)
    for name, hyper in (("slowmo", {"lr": 0.05, "period": 4, "base": "dmsgd", "momentum": 0.9, "topology": ring}),
                        ("slowmo", {"lr": 0.05, "period": 3, "base": "dsgd-awc",
                                    "topology": topologies.OnePeerExponentialTwo(N)}),
                        ("bmuf", {"lr": 0.1, "period": 4, "block_nesterov": True, "momentum": 0.5}),
                        ("mavg", {"lr": 0.1, "period": 4}),
                        ("local-sgd", {"lr": 0.1, "period": 4, "momentum": 0.9}),
                        ("cr-psgd-catalyst", {"lr": 0.1, "budget": 49 * N, "first_batch": 1, "growth": 1.5})):
        check_round_trip(name, hyper, 6, 11)  # mid-round: periods 3 and 4, catalyst rounds of 4 steps


def _growing_batch(step: int, size: int):
    g = torch.Generator().manual_seed(7000 + 100 * step + R)
    x, y = torch.randn(size, 6, generator=g) + R, torch.randint(0, 3, (size,), generator=g)
    return x.to(device()), y.to(device())


def test_cr_psgd_and_catalyst_follow_their_equations():
    assert algorithms.growing_batch_sizes(2, 2.0, 30) == [2, 4, 8, 16]
    assert algorithms.growing_batch_sizes(3, 1.5, 40) == [3, 4, 6, 10, 15]  # floor(1.5^t * 3), total 38 <= 40
    budget = 40
    for name, hyper in (("cr-psgd", {"lr": 0.2, "budget": budget, "first_batch": 3, "growth": 1.5}),
                        ("cr-psgd", {"lr": 0.1, "budget": budget, "first_batch": 2, "growth": 2.0, "momentum": 0.5,
                                     "weight_decay": 1e-3}),
                        ("cr-psgd-catalyst", {"lr": 0.2, "budget": 49 * N, "theta": 0.5, "first_batch": 1,
                                              "growth": 2.0})):
        model = make_model(seed=3)
        opt = algorithms.create(name, model.parameters(), **hyper)
        x_ref, m = gather(opt.x), 0.0
        anchor = x_ref.copy()
        lr, beta, wd = hyper["lr"], hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0)
        if name == "cr-psgd-catalyst":
            assert opt.inner_budget == 7 and opt.inner_steps == 3  # floor(sqrt(T/N)) = 7: batches [1, 2, 4]
            assert opt.rounds == 7 * N and opt.batch_sizes == [1, 2, 4] * opt.rounds  # floor(sqrt(N T)) rounds
        sampler = gossip.tools.data.ScheduledBatchSampler(1000, opt.batch_sizes, seed=R)
        for k, indices in enumerate(itertools.islice(sampler, 11)):  # all of CR-PSGD, the catalyst's first 11
            assert len(indices) == opt.batch_size(k)
            x, y = _growing_batch(k, len(indices))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            g = gather(opt.g) + wd * x_ref
            opt.step()
            g_mean = np.tile(g.mean(axis=0), (N, 1))
            if name == "cr-psgd":
                m = beta * m + g_mean
                x_ref = x_ref - lr * m
            else:
                x_ref = x_ref - lr * (g_mean + hyper["theta"] * (x_ref - anchor))
                if (k + 1) % opt.inner_steps == 0:
                    anchor = x_ref.copy()
            err = np.abs(gather(opt.x) - x_ref).max() / max(1.0, np.abs(x_ref).max())
            assert err < TOL, f"rank {R}: {name} {hyper} step {k}: off by {err:.3g}"
        if name == "cr-psgd":
            try:
                opt.step()
            except RuntimeError as error:
                assert "budget" in str(error)
            else:
                raise AssertionError(f"{name} stepped past its sample budget")


def test_bad_configuration_is_refused_clearly():
    params = lambda: make_model().parameters()  # noqa: E731
    expect_error(lambda: algorithms.create("slowmo", params(), lr=0.1, period=0), "period")
    expect_error(lambda: algorithms.create("slowmo", params(), lr=0.1, slow_momentum=1.0), "slow_momentum")
    expect_error(lambda: algorithms.create("slowmo", params(), lr=0.1, base="bmuf"), "single-level")
    expect_error(lambda: algorithms.create("slowmo", params(), lr=0.1, base="nope"), "unknown algorithm")
    expect_error(lambda: algorithms.create("slowmo", params(), lr=0.1, base_buffers="keep"), "base_buffers")
    expect_error(lambda: algorithms.create("local-sgd", params(), lr=0.1, topology=topologies.ring(N)),
                 "does not gossip")
    expect_error(lambda: algorithms.create("local-sgd", params(), lr=0.1, warmup_steps=-1), "warmup_steps")
    expect_error(lambda: algorithms.create("mavg", params(), lr=0.1, topology=topologies.ring(N)), "does not gossip")
    expect_error(lambda: algorithms.create("cr-psgd", params(), lr=0.1, budget=100, growth=1.0), "rho")
    expect_error(lambda: algorithms.create("cr-psgd", params(), lr=0.1, budget=4, first_batch=8), "budget")
    expect_error(lambda: algorithms.create("cr-psgd-catalyst", params(), lr=0.1, budget=10 * N, first_batch=8),
            "below the first batch")
    expect_error(lambda: gossip.tools.data.ScheduledBatchSampler(10, [4, 0]), "batch size")
