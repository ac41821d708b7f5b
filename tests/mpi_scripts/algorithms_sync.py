"""Synchronous optimizers against their update equations, computed in NumPy float64 from the gathered state.

Every rank trains a small network on its own data. Each step, the gradients every rank computed
are gathered and fed to an independent NumPy implementation of the equation (with the step's
mixing matrix W(k) from the topology); the gathered parameters must follow it to float32 round-off.
"""

import numpy as np
import torch
from _common import GROUP, device, param, take_steps

import algorithms
import gossip
import topologies

N = GROUP.size
R = GROUP.rank
STEPS = 7
TOL = 2e-5
# Hidden width of the test network (the run's ``hidden`` parameter): 3000 makes every message 120 kB (several
# chunks of 16 KiB).
HIDDEN = int(param("hidden", 5))


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(100 * seed + R)  # different on every rank: the optimizer must broadcast rank 0's
    return torch.nn.Sequential(torch.nn.Linear(6, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 3)).to(device())


def local_batch(step: int):
    g = torch.Generator().manual_seed(1000 * step + R)
    x = torch.randn(16, 6, generator=g) + R  # heterogeneous data: a different mean per rank
    y = torch.randint(0, 3, (16,), generator=g)
    return x.to(device()), y.to(device())


def loss_of(model, step):
    x, y = local_batch(step)
    return torch.nn.functional.cross_entropy(model(x), y)


def gather(t: torch.Tensor) -> np.ndarray:
    return np.stack(GROUP.allgather(t.detach().double().cpu().numpy().copy()))


def dsgd_follows(schedule, mixing_at, steps: int = 3, seed: int = 3) -> None:
    """DSGD on ``schedule`` against x ← W(k)(x − γ g), W(k) = ``mixing_at(k)``, step by step."""
    model = make_model(seed=seed)
    opt = algorithms.create("dsgd", model.parameters(), lr=0.1, topology=schedule)
    x = gather(opt.x)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        g = gather(opt.g)
        opt.step()
        x = mixing_at(step) @ (x - 0.1 * g)
        assert np.allclose(gather(opt.x), x, rtol=TOL, atol=TOL), (schedule.describe(), step)


def mixing(topology, step: int, every: int | None) -> np.ndarray:
    if every is not None and (step + 1) % every == 0:
        return np.full((N, N), 1.0 / N)
    if topology is None:
        return topologies.to_matrix(gossip.topology())
    if topology == "allreduce":
        return np.full((N, N), 1.0 / N)
    if isinstance(topology, topologies.DynamicTopology):
        return topology.mixing_matrix(step)
    return topologies.to_matrix(topology)


def push_matrix(topology, step: int, every: int | None) -> np.ndarray:
    """Column-stochastic P(k): sender j keeps and sends 1/(out-degree_j + 1) of what it holds."""
    if every is not None and (step + 1) % every == 0:
        return np.full((N, N), 1.0 / N)
    outs = []
    for j in range(N):
        if isinstance(topology, topologies.DynamicTopology):
            outs.append(sorted(topology.peers(step, j).dst_weights))
        else:
            graph = gossip.topology() if topology is None else topology
            outs.append(sorted(d for d in graph.successors(j) if d != j))
    p = np.zeros((N, N))
    for j, targets in enumerate(outs):
        for i in [j, *targets]:
            p[i, j] = 1.0 / (len(targets) + 1)
    return p


def reference(name, hyper):
    """The equation in NumPy: a function (X, G, W, state) -> X_next on the full (n, d) state."""
    lr, beta, wd = hyper["lr"], hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0)

    def update(x, g, w, state):
        g = g + wd * x
        if name == "dsgd":
            return w @ (x - lr * g)
        if name == "dsgd-awc":
            return w @ x - lr * g
        if name == "dmsgd":
            state["m"] = beta * state.get("m", 0.0) + g
            return w @ (x - lr * state["m"])
        if name == "decentlam":
            mixed = w @ (x - lr * g)
            state["m"] = beta * state.get("m", 0.0) + (x - mixed) / lr
            return x - lr * state["m"]
        if name == "awc-dmsgd":
            m = state.get("m", np.zeros_like(x))
            state["m"] = beta * (w @ m if hyper.get("share_momentum") else m) + g
            return w @ x - lr * state["m"]
        if name == "da-dmsgd":
            m_half = beta * state.get("m", 0.0) + g
            state["m"] = w @ m_half
            return w @ (x - lr * m_half)
        if name == "qg-dmsgd":
            m_hat = state.get("m", np.zeros_like(x))
            d = beta * m_hat + g
            if hyper.get("nesterov"):
                d = g + beta * d
            x_new = w @ (x - lr * d)
            state["m"] = hyper.get("mu", beta) * m_hat + (1 - hyper.get("mu", beta)) * (x - x_new) / lr
            return x_new
        if name == "d2":
            if beta:
                state["m"] = beta * state.get("m", 0.0) + g
                g = state["m"]
            first = "x_prev" not in state
            combined = x - lr * g if first else 2 * x - state["x_prev"] - lr * g + lr * state["d_prev"]
            state["x_prev"], state["d_prev"] = x, g
            return w @ combined
        if name == "gradient-tracking":
            y = g if "wy" not in state else state["wy"] + g - state["g_prev"]
            state["wy"], state["g_prev"] = w @ y, g
            return w @ x - lr * y
        if name == "sgp":
            k = state.get("k", 0)
            state["k"] = k + 1
            p = push_matrix(state["topology"], k, state["every"])
            numerator = state.get("numerator", x.copy())
            mass = state.get("mass", np.ones((N, 1)))
            if beta:
                state["m"] = beta * state.get("m", 0.0) + g
                g = state["m"]
            state["numerator"], state["mass"] = p @ (numerator - lr * g), p @ mass
            return state["numerator"] / state["mass"]
        if name == "pmsgd" and hyper.get("lars"):
            raw = np.tile((g - wd * x).mean(axis=0), (N, 1))  # LARS averages the raw gradients
            direction = np.empty_like(x)
            for a, b in state["layers"]:
                xn, gn = np.linalg.norm(x[0, a:b]), np.linalg.norm(raw[0, a:b])
                trust = hyper["trust_coefficient"] * xn / (gn + wd * xn) if xn > 0 and gn + wd * xn > 0 else 1.0
                direction[:, a:b] = trust * (raw[:, a:b] + wd * x[:, a:b])
            state["m"] = beta * state.get("m", 0.0) + direction
            return x - lr * state["m"]
        if name == "pmsgd":
            mean = np.tile(g.mean(axis=0), (N, 1))
            state["m"] = beta * state.get("m", 0.0) + mean
            step = mean + beta * state["m"] if hyper.get("nesterov") else state["m"]
            return x - lr * step
        raise AssertionError(name)

    return update


def check(name, hyper, topology=None, every=None, steps=STEPS):
    model = make_model()
    opt = algorithms.create(name, model.parameters(), topology=topology, global_avg_every=every, **hyper)
    x_ref = gather(opt.x)
    assert np.all(x_ref == x_ref[0]), "ranks did not start equal"
    sizes = np.cumsum([0] + [p.numel() for p in model.parameters()])
    update = reference(name, hyper)
    state = {"topology": topology, "every": every, "layers": list(zip(sizes[:-1], sizes[1:], strict=True))}
    for k in range(steps):
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        w = mixing(topology if name != "pmsgd" else "allreduce", k, every)
        opt.step()
        x_ref = update(x_ref, g, w, state)
        got = gather(opt.x)
        err = np.abs(got - x_ref).max() / max(1.0, np.abs(x_ref).max())
        assert err < TOL, f"rank {R}: {name} {hyper} on {topology} (H={every}) step {k}: off by {err:.3g}"
        assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.x)
    opt.synchronize()
    return opt


def _topologies():
    return [topologies.ring(N), topologies.OnePeerExponentialTwo(N), topologies.BaseGraph(N, 1), None]


def test_every_algorithm_follows_its_equation_on_several_topologies():
    for topology in _topologies():
        check("dsgd", {"lr": 0.1, "weight_decay": 1e-3}, topology)
        check("dsgd-awc", {"lr": 0.1}, topology)
        check("dsgd-awc", {"lr": 0.1, "overlap": False}, topology)
        check("dmsgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, topology)
        check("decentlam", {"lr": 0.05, "momentum": 0.9}, topology)
        check("awc-dmsgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, topology)
        check("awc-dmsgd", {"lr": 0.05, "momentum": 0.9, "share_momentum": True}, topology)
        check("awc-dmsgd", {"lr": 0.05, "momentum": 0.9, "share_momentum": True, "overlap": False}, topology)
        check("da-dmsgd", {"lr": 0.05, "momentum": 0.9}, topology)
        check("qg-dmsgd", {"lr": 0.05, "momentum": 0.9}, topology)
        check("qg-dmsgd", {"lr": 0.05, "momentum": 0.8, "mu": 0.5, "nesterov": True, "weight_decay": 1e-3}, topology)
        check("gradient-tracking", {"lr": 0.05, "weight_decay": 1e-3}, topology)
    for topology in (topologies.exponential_two(N), topologies.star(N), topologies.OnePeerExponentialTwo(N),
                     topologies.OnePeer(topologies.exponential(N, 3)), None):
        check("sgp", {"lr": 0.05}, topology)
        check("sgp", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, topology)
    check("sgp", {"lr": 0.05}, topologies.exponential_two(N), every=3)
    for graph in (topologies.lazy(topologies.ring(N)), topologies.symmetric_exponential(N), topologies.torus(N)):
        if topologies.lambda_min(graph) > -1 / 3 + 1e-9:
            check("d2", {"lr": 0.05}, graph)
            check("d2", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}, graph)
    check("pmsgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3})
    check("pmsgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True})
    check("pmsgd", {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "lars": True, "trust_coefficient": 0.02})


def test_gossip_pga_replaces_every_h_th_step_with_a_global_average():
    for topology in (topologies.ring(N), topologies.OnePeerExponentialTwo(N)):
        check("dmsgd", {"lr": 0.05, "momentum": 0.9}, topology, every=3)
        check("decentlam", {"lr": 0.05, "momentum": 0.8}, topology, every=2)
    check("dsgd-awc", {"lr": 0.1}, topologies.ring(N), every=4)
    check("qg-dmsgd", {"lr": 0.05, "momentum": 0.9}, topologies.ring(N), every=3)
    check("d2", {"lr": 0.05}, topologies.lazy(topologies.ring(N)), every=3)


def train_steps(opt, model, steps) -> list[torch.Tensor]:
    """Take the steps ``steps`` (step indices: each picks its batch); the parameters after each."""
    return take_steps(opt, model, steps, loss_of)


def trajectory(name, hyper, steps=5, seed=3, **comm):
    model = make_model(seed=seed)
    opt = algorithms.create(name, model.parameters(), **hyper, **comm)
    out = train_steps(opt, model, range(steps))
    opt.synchronize()
    return out


def check_round_trip(name, hyper, saved_after: int, end: int) -> None:
    """Train to step ``saved_after``, save the model's and optimizer's state, go on to ``end``; a
    fresh model and optimizer loaded from the saved state must repeat those steps bitwise."""
    model = make_model(seed=5)
    opt = algorithms.create(name, model.parameters(), **hyper)
    train_steps(opt, model, range(saved_after))
    saved_model = {key: v.clone() for key, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    continued = train_steps(opt, model, range(saved_after, end))
    opt.synchronize()
    fresh_model = make_model(seed=6)
    fresh = algorithms.create(name, fresh_model.parameters(), **hyper)
    fresh_model.load_state_dict(saved_model)  # after construction: the parameters are views of its buffer
    fresh.load_state_dict(saved_opt)
    for k, expected in zip(range(saved_after, end), continued, strict=True):
        assert torch.equal(train_steps(fresh, fresh_model, [k])[0], expected), f"{name}: resumed step {k} differs"
    fresh.synchronize()


def test_special_cases():
    ring = topologies.ring(N)
    # beta = 0: DmSGD is DSGD-ATC (bitwise: m = 0 m + g), DecentLaM too (to round-off: x - (x - Wx_half) = Wx_half).
    for a, b in zip(trajectory("dmsgd", {"lr": 0.1, "momentum": 0.0}, topology=ring),
                    trajectory("dsgd", {"lr": 0.1}, topology=ring), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(trajectory("decentlam", {"lr": 0.1, "momentum": 0.0}, topology=ring),
                    trajectory("dsgd", {"lr": 0.1}, topology=ring), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    # H = 1: every step is a global average, every rank holds the same model.
    for x in trajectory("dsgd", {"lr": 0.1}, topology=ring, global_avg_every=1):
        rows = gather(x)
        assert np.abs(rows - rows[0]).max() < 1e-6
    # Fully connected uniform W: DSGD is parallel SGD (PmSGD without momentum).
    for a, b in zip(trajectory("dsgd", {"lr": 0.1}, topology=topologies.fully_connected(N)),
                    trajectory("pmsgd", {"lr": 0.1, "momentum": 0.0}), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_state_dict_round_trip_mid_run_is_bitwise():
    for name, hyper, topology in (("dmsgd", {"lr": 0.05, "momentum": 0.9}, topologies.OnePeerExponentialTwo(N)),
                                  ("decentlam", {"lr": 0.05, "momentum": 0.9}, topologies.ring(N)),
                                  ("dsgd-awc", {"lr": 0.1}, topologies.ring(N)),
                                  ("awc-dmsgd", {"lr": 0.05, "momentum": 0.9}, topologies.OnePeerExponentialTwo(N)),
                                  ("awc-dmsgd", {"lr": 0.05, "momentum": 0.9, "share_momentum": True},
                                   topologies.ring(N)),
                                  ("da-dmsgd", {"lr": 0.05, "momentum": 0.9}, topologies.ring(N)),
                                  ("qg-dmsgd", {"lr": 0.05, "momentum": 0.9}, topologies.ring(N)),
                                  ("d2", {"lr": 0.05, "momentum": 0.5}, topologies.lazy(topologies.ring(N))),
                                  ("gradient-tracking", {"lr": 0.05}, topologies.BaseGraph(N, 1)),
                                  ("sgp", {"lr": 0.05, "momentum": 0.5}, topologies.OnePeerExponentialTwo(N)),
                                  ("pmsgd", {"lr": 0.05, "momentum": 0.9}, None)):
        check_round_trip(name, {**hyper, **({} if topology is None else {"topology": topology})}, 3, 6)


def test_schedules_and_bad_input():
    from gossip.plan import schedule

    pga = schedule.schedule_for(topologies.OnePeerExponentialTwo(N), global_avg_every=3)
    ops = [pga.plan(k).op for k in range(7)]
    assert ops == ["neighbor_allreduce", "neighbor_allreduce", "allreduce"] * 2 + ["neighbor_allreduce"]
    assert pga.plan(0).dst_weights == topologies.OnePeerExponentialTwo(N).peers(0, R).dst_weights
    assert schedule.schedule_for("none").plan(5).op == "none"
    assert schedule.schedule_for("allreduce").plan(0).op == "allreduce"
    assert schedule.schedule_for(None).plan(0) == schedule.Plan("neighbor_allreduce")
    assert "every 3 steps" in pga.describe()
    for bad in ("bogus", 3):
        try:
            schedule.schedule_for(bad)
        except ValueError as error:
            assert "topology must be" in str(error)
        else:
            raise AssertionError(f"schedule_for({bad!r}) did not raise")
    for call, match in ((lambda: schedule.schedule_for(None, global_avg_every=0), "period H"),
                        (lambda: schedule.schedule_for(topologies.OnePeerExponentialTwo(N + 1)), "ranks"),
                        (lambda: algorithms.create("nope", make_model().parameters(), lr=0.1), "unknown algorithm"),
                        (lambda: algorithms.create("dsgd", [torch.zeros(2), torch.zeros(2, dtype=torch.float64)],
                                                   lr=0.1), "share dtype"),
                        (lambda: algorithms.create("dmsgd", make_model().parameters(), lr=0.1, momentum=1.0),
                         "momentum"),
                        (lambda: algorithms.create("dsgd", [], lr=0.1), "empty parameter list|no parameters")):
        try:
            call()
        except ValueError as error:
            import re

            assert re.search(match, str(error)), str(error)
        else:
            raise AssertionError(f"no error for {match}")
    assert set(algorithms.available()) == {"dsgd", "dsgd-awc", "dmsgd", "decentlam", "pmsgd", "awc-dmsgd",
                                           "da-dmsgd", "qg-dmsgd", "d2", "gradient-tracking", "sgp", "local-sgd",
                                           "mavg", "bmuf", "slowmo", "cr-psgd", "cr-psgd-catalyst",
                                           "asgd", "asgdm", "ormo", "ormo-da", "adpsgd", "diloco",
                                           "streaming-diloco", "choco-sgd", "gossip-wrapper"}
    if N >= 4 and N % 2 == 0:  # the even ring has lambda_min = -1/3 exactly: D² must refuse it
        for topology, match in ((topologies.ring(N), "lambda_min"), (topologies.exponential_two(N), "symmetric"),
                                (topologies.OnePeerExponentialTwo(N), "static")):
            try:
                algorithms.create("d2", make_model().parameters(), lr=0.1, topology=topology)
            except ValueError as error:
                assert match in str(error), str(error)
            else:
                raise AssertionError(f"D² accepted {topology}")
