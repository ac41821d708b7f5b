"""GossipWrapper (any torch.optim optimizer with gossip) against its equations in NumPy, step by step.

Every rank trains a small float64 network on its own data. Each step the gradients and parameters of
every rank are gathered with plain mpi4py and fed to an independent NumPy implementation: the inner
optimizer (SGD with momentum, or AdamW, as torch.optim defines them, reimplemented here) and the
combination (W of the static topology, of a time-varying family's step, of per-call weights, the
exact mean, the hierarchical average). The gathered parameters after the step must follow it to
float64 round-off:

    ATC  x_i ← Σ_j w_ij OPT(x_j)          AWC  x_i ← OPT(Σ_j w_ij x_j)   (gradient at x_i)
    gradient allreduce  x_i ← OPT(x_i; mean_j g_j), with K-step accumulation
    window (barrier)    the same iterations as neighbour averaging on the same graph

Also: bitwise state_dict round trips (with an overlapped average in flight), describe(), and the
input checks.
"""

import numpy as np
import torch
from _common import GROUP, Skip, adamw_reference, expect_error, gather_rows, param, small_model, small_model_loss

import algorithms
import gossip
import topologies
from algorithms.wrapper import GossipWrapper
from gossip.ops.window import open_windows

N = GROUP.size
R = GROUP.rank
TOL = 1e-10
HIDDEN = int(param("hidden", 5))  # 3000 with 16 KiB chunks: float64 messages of 210 kB in 13 chunks
STEPS = 3 if HIDDEN > 1000 else 6


def make_model(seed: int = 0) -> torch.nn.Module:
    return small_model(HIDDEN, seed)


loss_of = small_model_loss
gather = gather_rows


# --- the NumPy reference ------------------------------------------------------------------------

def sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """torch.optim.SGD on the (n, d) state: g + wd x, heavy ball with m⁰ = g."""
    def update(x, g, state):
        g = g + weight_decay * x
        if momentum:
            state["m"] = g.copy() if "m" not in state else momentum * state["m"] + g
            g = state["m"]
        return x - lr * g
    return update


adamw = adamw_reference


def static_w() -> np.ndarray:
    return topologies.mixing_matrix(gossip.topology())


def check_steps(opt, model, reference, combine, form: str, steps=range(STEPS), period: int = 1) -> None:
    """Take ``steps``; before each, gather x and (after backward) g; the gathered x after the step must equal
    the reference: ``combine(r, X)`` is W(r) X for round r, applied after (ATC) or before (AWC) the inner step
    on communicating steps (every ``period``-th)."""
    state: dict = {}
    for k in steps:
        before = gather(opt.x)
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        opt.step()
        talk = (k + 1) % period == 0
        if form == "atc":
            expected = reference(before, g, state)
            expected = combine(k // period, expected) if talk else expected
        else:
            expected = reference(combine(k // period, before) if talk else before, g, state)
        got = gather(opt.x)
        err = np.abs(got - expected).max()
        assert err < TOL * max(1.0, np.abs(expected).max()), f"rank {R}: step {k}: |x - reference| = {err:.3e}"


def wrap(inner_cls, hyper: dict, communication: str = "neighbor_allreduce", seed: int = 0, **kw):
    model = make_model(seed)
    return model, GossipWrapper(inner_cls(model.parameters(), **hyper), communication, **kw)


# --- the tests ------------------------------------------------------------------------------------------

def test_atc_with_sgd_is_w_of_the_sgd_step() -> None:
    """SGD (momentum 0.9, weight decay) inside ATC on the static topology: x ← W(x − γ m)."""
    hyper = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    model, opt = wrap(torch.optim.SGD, hyper)
    w = static_w()
    assert np.abs(gather(opt.x) - gather(opt.x)[0]).max() == 0  # rank 0's model everywhere
    check_steps(opt, model, sgd(**hyper), lambda r, x: w @ x, "atc")
    assert "combined after each SGD step" in opt.describe(), opt.describe()
    opt.close()


def test_atc_with_adamw_on_one_peer_exponential_two() -> None:
    """AdamW inside ATC on a time-varying family: the AdamW step, then W(k) of the family's step k."""
    hyper = {"lr": 0.01, "weight_decay": 0.05}
    family = topologies.OnePeerExponentialTwo(N)
    model, opt = wrap(torch.optim.AdamW, hyper, topology=family)
    check_steps(opt, model, adamw(**hyper), lambda r, x: family.mixing_matrix(r) @ x, "atc")
    opt.close()


def test_awc_is_the_step_applied_to_the_average() -> None:
    """AWC, overlapped: x ← OPT(W x) with the gradient taken at x; SGD (x ← Wx − γ g) and AdamW."""
    w = static_w()
    hyper = {"lr": 0.05}
    model, opt = wrap(torch.optim.SGD, hyper, form="awc")
    check_steps(opt, model, sgd(**hyper), lambda r, x: w @ x, "awc")
    assert opt._pending is not None and "overlapped" in opt.describe()  # the next step's average is in flight
    opt.close()
    hyper = {"lr": 0.01, "weight_decay": 0.05}
    model, opt = wrap(torch.optim.AdamW, hyper, form="awc", overlap=False)
    check_steps(opt, model, adamw(**hyper), lambda r, x: w @ x, "awc")
    assert opt._pending is None
    opt.close()


def test_steps_per_communication_and_global_average() -> None:
    """K = 3 local steps per communication (AWC: the average started after the second local step); and
    parameter allreduce every 2 steps, i.e. local SGD."""
    family = topologies.OnePeerExponentialTwo(N)
    hyper = {"lr": 0.01}
    model, opt = wrap(torch.optim.Adam, hyper, topology=family, form="awc", steps_per_communication=3)
    reference = adamw(lr=0.01, weight_decay=0.0)  # Adam without weight decay is AdamW with none
    check_steps(opt, model, reference, lambda r, x: family.mixing_matrix(r) @ x, "awc", period=3)
    opt.close()
    mean = np.full((N, N), 1.0 / N)
    model, opt = wrap(torch.optim.SGD, {"lr": 0.05, "momentum": 0.5}, "allreduce", steps_per_communication=2)
    check_steps(opt, model, sgd(0.05, 0.5), lambda r, x: mean @ x, "atc", period=2)
    assert "an allreduce every 2 steps" in opt.describe(), opt.describe()
    opt.close()


def test_gradient_allreduce_is_one_optimizer_on_the_mean_gradient() -> None:
    """Gradient allreduce: every rank takes the inner step on the mean gradient (one model on every rank);
    with K = 2 the mean of two steps' gradients, one inner step every 2 steps."""
    hyper = {"lr": 0.01, "weight_decay": 0.05}
    model, opt = wrap(torch.optim.AdamW, hyper, "gradient_allreduce")
    state: dict = {}
    reference = adamw(**hyper)
    for k in range(STEPS):
        x = gather(opt.x)
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        opt.step()
        expected = reference(x[:1], g.mean(axis=0, keepdims=True), state)
        assert np.abs(gather(opt.x) - expected).max() < TOL, f"rank {R}: step {k}"
    opt.close()
    model, opt = wrap(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "gradient_allreduce", steps_per_communication=2)
    state, reference, summed = {}, sgd(0.1, 0.9), 0.0
    for k in range(STEPS):
        x = gather(opt.x)
        opt.zero_grad()
        model.zero_grad(set_to_none=True)  # either way of zeroing: the accumulation is the wrapper's
        loss_of(model, k).backward()
        summed = summed + gather(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
        expected = x[:1]
        if k % 2 == 1:
            expected, summed = reference(x[:1], summed.mean(axis=0, keepdims=True) / 2, state), 0.0
        assert np.abs(gather(opt.x) - expected).max() < TOL, f"rank {R}: step {k}"
    assert "accumulated over 2 steps" in opt.describe(), opt.describe()
    opt.close()


def test_per_call_weights() -> None:
    """set_weights with one-peer exponential-2's peers of each step (BlueFog's per-step attributes): the
    same iterations as the family itself; and plain sums (self weight 1, neighbour weights 1) pass
    through as given."""
    if N == 1:
        raise Skip("no neighbours on one rank")
    family = topologies.OnePeerExponentialTwo(N)
    hyper = {"lr": 0.05}
    model, opt = wrap(torch.optim.SGD, hyper)
    state: dict = {}
    for k in range(STEPS):
        p = family.peers(k, R)
        opt.set_weights(p.self_weight, p.src_weights, p.dst_weights)
        before = gather(opt.x)
        opt.zero_grad()
        loss_of(model, k).backward()
        g = gather(opt.g)
        opt.step()
        expected = family.mixing_matrix(k) @ sgd(**hyper)(before, g, state)
        assert np.abs(gather(opt.x) - expected).max() < TOL, f"rank {R}: step {k}"
    assert "per-call weights" in opt.describe()
    opt.set_weights()
    assert opt.weights is None
    opt.close()


def test_window_in_lock_step_is_neighbour_averaging() -> None:
    """One-sided pushes with barrier=True fold exactly this step's models: ATC and AWC windows give the
    iterations of neighbour averaging on the static topology."""
    w = static_w()
    for form in ("atc", "awc"):
        hyper = {"lr": 0.01, "weight_decay": 0.05}
        model, opt = wrap(torch.optim.AdamW, hyper, "window", form=form, barrier=True)
        check_steps(opt, model, adamw(**hyper), lambda r, x: w @ x, form)
        assert "one-sided pushes" in opt.describe()
        opt.close()
        assert opt.window is None and not open_windows()


def test_window_without_barrier_trains() -> None:
    """Without the barrier each rank folds whatever its buffers hold (the models as pushed by then, which
    depends on timing): it steps without waiting for its neighbours and its iterates stay finite."""
    model, opt = wrap(torch.optim.SGD, {"lr": 0.05}, "window")
    for k in range(STEPS):
        opt.zero_grad()
        loss_of(model, k).backward()
        opt.step()
    assert torch.isfinite(opt.x).all()
    opt.synchronize()
    opt.close()


def test_hierarchical_on_two_machines_is_the_exact_average() -> None:
    """hierarchical_neighbor_allreduce on 2 machines of 2 ranks: the machine averages gossiped on one-peer
    exponential-2 over 2 machines, i.e. every rank gets the exact average."""
    if N != 4 or gossip.machine_size() != 2:
        raise Skip("needs 4 ranks as 2 machines (ranks_per_machine=2)")
    mean = np.full((N, N), 1.0 / N)
    hyper = {"lr": 0.05, "momentum": 0.9}
    model, opt = wrap(torch.optim.SGD, hyper, "hierarchical_neighbor_allreduce")
    check_steps(opt, model, sgd(**hyper), lambda r, x: mean @ x, "atc")
    assert "hierarchical" in opt.describe(), opt.describe()
    opt.close()


def test_state_dict_round_trip_is_bitwise() -> None:
    """Save after 3 steps (AWC: an average in flight), take 3 more; a fresh wrapper loaded from the saved
    model and state takes the same 3 steps bitwise; also the registry's name and train.py's keywords."""
    for communication, kw in (("neighbor_allreduce", {"form": "awc"}),
                              ("gradient_allreduce", {"steps_per_communication": 2})):
        model = make_model()
        opt = algorithms.create("gossip-wrapper", model.parameters(), lr=0.01, inner="adamw", weight_decay=0.01,
                                communication=communication, **kw)
        for k in range(3):
            opt.zero_grad()
            loss_of(model, k).backward()
            opt.step()
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved = opt.state_dict()
        ahead = []
        for k in range(3, 6):
            opt.zero_grad()
            loss_of(model, k).backward()
            opt.step()
            ahead.append(opt.x.clone())
        opt.close()
        other = make_model(seed=7)
        again = algorithms.create("gossip-wrapper", other.parameters(), lr=0.01, inner="adamw", weight_decay=0.01,
                                  communication=communication, **kw)
        other.load_state_dict(saved_model)
        again.load_state_dict(saved)
        assert again.step_count == 3
        for k in range(3, 6):
            again.zero_grad()
            loss_of(other, k).backward()
            again.step()
            assert torch.equal(again.x, ahead[k - 3]), f"rank {R}: {communication} differs after resuming, step {k}"
        again.close()


def test_lr_scheduler_drives_the_inner_lr() -> None:
    model, opt = wrap(torch.optim.SGD, {"lr": 0.1})
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    loss_of(model, 0).backward()
    opt.step()
    scheduler.step()
    assert opt.inner.param_groups[0]["lr"] == 0.05
    opt.close()


def test_bad_input_is_refused() -> None:
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    expect_error(lambda: GossipWrapper(inner, "gossip"), "communication must be one of")
    expect_error(lambda: GossipWrapper(inner, "gradient_allreduce", form="awc"), "form='awc'")
    expect_error(lambda: GossipWrapper(inner, "allreduce", topology=topologies.ring(N)), "uses no topology")
    expect_error(lambda: GossipWrapper(inner, steps_per_communication=0), "steps_per_communication")
    expect_error(lambda: GossipWrapper(inner, "window", topology=topologies.OnePeerExponentialTwo(N)),
                 "static graph")
    expect_error(lambda: GossipWrapper(inner, barrier=True), "barrier applies to window")
    expect_error(lambda: GossipWrapper(model.parameters()), "optimizer instance", error=TypeError)
    opt = GossipWrapper(inner, "allreduce")
    expect_error(lambda: opt.set_weights(0.5, {}), "per-call weights apply")
    expect_error(lambda: opt.load_state_dict({"inner": {}}), "'decentralized' entry is missing")
    opt.close()
    expect_error(lambda: algorithms.create("gossip-wrapper", make_model().parameters(), lr=0.1, inner="nope"),
                 "inner must be a torch.optim optimizer")
