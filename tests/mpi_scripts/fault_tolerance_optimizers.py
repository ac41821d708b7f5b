"""Optimizers carry on after gossip.recover(), a rank killed: every synchronous algorithm (test_fault_tolerance.py).

``python fault_tolerance_optimizers.py OUTDIR`` under ``mpirun --with-ft ulfm`` on 4 ranks (the flags of
``gossiprun --fault-tolerant``), with machines of two ranks pretended (``ranks_per_machine=2``) and no
cross-rank input checks (so that neighbour ops are point to point only, and a survivor whose peers
all live completes its step while another's fails).

One optimizer per case of :func:`cases` (every synchronous algorithm of the registry, on the runtime's
static topology and on a time-varying family where it takes one; push-sum on a family whose masses
drift; hierarchical gossip, Gossip-PGA, the scheduler's choice; three with 8 MB messages; four that
cannot continue), each over its own parameters, on a quadratic that differs per rank. The iterations
step every optimizer once. At iteration ``KILL`` rank 2 steps the first case (whose step ends by
starting the next step's 8 MB gossip) and dies by SIGKILL; each survivor steps the optimizers until
one raises :class:`gossip.RankFailure` (which one differs: a survivor none of whose peers died at that
step completes it), recovers once, checks what the recovery did to each optimizer against every
survivor's state before it, and steps them all on.

After the recovery each of the first ``CHECKED`` steps of every optimizer, and its last, is checked
against its equation, computed in NumPy from every survivor's state (gathered with plain mpi4py on a
communicator of the test's own, shrunk alongside) with the new mixing matrix, and the gradients
computed in NumPy from the problem's data; at the end the loss on the survivors' problem must have
fallen close to its minimum and the models must agree. Each survivor prints ``RESULT {json}``; a
failed check raises, which ends the job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import algorithms
import gossip
import topologies
from gossip.plan.cost_model import CostModel, LinkCost

OUTDIR = Path(sys.argv[1])
VICTIM, KILL = 2, 5  # old rank 2 dies at iteration 5: a round end of every periodic case (period 3)
AFTER, CHECKED, AFTER_LARGE = 45, 15, 6  # iterations after the recovery; the first CHECKED checked step by step
SMALL, LARGE = 12, 1 << 20  # parameters per model; 8 MB of float64 per message for the large ones
TOL = 1e-10
LR, BETA, PERIOD = 0.1, 0.5, 3

TEST = MPI.COMM_WORLD.Dup()  # the test's own view of the job, shrunk after the recovery
TEST.Set_errhandler(MPI.ERRORS_RETURN)
ORIGIN = MPI.COMM_WORLD.rank
report: dict = {"origin": ORIGIN, "checked": 0}


def lazy_ring(n: int):
    """The runtime's static topology: symmetric with λ_min > −1/3 (D² needs it) at every size."""
    return topologies.lazy(topologies.ring(n))


class Hub(topologies.OnePeerFamily):
    """At step k every rank sends to rank k mod n, which sends to the next: the in-degrees differ, so
    push-sum masses drift from 1 (on the regular families they stay 1). Follows the number of ranks."""

    def __init__(self, n: int) -> None:
        self.n, self.period = n, n

    def targets(self, step: int) -> list[int]:
        hub = step % self.n
        return [(hub + 1) % self.n if i == hub else hub for i in range(self.n)]

    def _resized(self, n: int, local_size: int | None) -> Hub:
        return Hub(n)


# --- the problem: f_o(x) = ½ Σ_j a_oj (x_j − c_oj)², a different one per origin -------------------

def data(origin: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + origin)
    return rng.uniform(0.5, 1.5, dim), rng.normal(origin, 1.0, dim)


DATA = {(o, dim): data(o, dim) for o in range(4) for dim in (SMALL, LARGE)}
TORCH_DATA = {dim: tuple(torch.from_numpy(v) for v in DATA[ORIGIN, dim]) for dim in (SMALL, LARGE)}
# The coordinates whose values are gathered and checked: all of a small model, 66 of a large one (the
# problem and every update are elementwise, so the equations hold coordinate by coordinate).
INDICES = {SMALL: np.arange(SMALL),
           LARGE: np.unique([0, LARGE - 1, *np.random.default_rng(7).integers(0, LARGE, 64).tolist()])}


def gradients(x: np.ndarray, origins: list[int], dim: int, wd: float = 0.0) -> np.ndarray:
    """Each survivor's gradient at its row of ``x`` (on the coordinates checked), in NumPy."""
    idx = INDICES[dim]
    return np.stack([DATA[o, dim][0][idx] * (row - DATA[o, dim][1][idx]) + wd * row
                     for row, o in zip(x, origins, strict=True)])


def loss(x: np.ndarray, origins: list[int], dim: int) -> float:
    """The survivors' mean objective at the point ``x`` (on the coordinates checked)."""
    idx = INDICES[dim]
    return float(np.mean([0.5 * np.sum(DATA[o, dim][0][idx] * (x - DATA[o, dim][1][idx]) ** 2) for o in origins]))


def minimum(origins: list[int], dim: int) -> float:
    idx = INDICES[dim]
    a = sum(DATA[o, dim][0][idx] for o in origins)
    return loss(sum(DATA[o, dim][0][idx] * DATA[o, dim][1][idx] for o in origins) / a, origins, dim)


def heterogeneity(origins: list[int], dim: int) -> float:
    """(1/n) Σ_i ‖c_i − c̄‖² over the survivors' minimisers: what consensus distances are measured against."""
    c = np.stack([DATA[o, dim][1][INDICES[dim]] for o in origins])
    return float(np.mean(np.sum((c - c.mean(axis=0)) ** 2, axis=1)))


# --- the cases ---------------------------------------------------------------------------------------
# Those that cannot continue: a one-peer family over a given graph, a machine-aware family on the
# survivors' machines of 2 and 1 ranks, push-sum over a static graph given to the optimizer, AD-PSGD.

@dataclass
class Case:
    label: str
    name: str  # registry name
    hyper: dict
    topology: str  # a key of build()'s table: static (the runtime's), dynamic (one-peer exponential-2), ...
    every: int | None = None  # Gossip-PGA's H
    cannot_continue: str | None = None  # a fragment of the error after the recovery
    dim: int = SMALL
    opt: object = None
    params: list = field(default_factory=list)
    trace: dict = field(default_factory=dict)

    @property
    def inner(self):
        return self.opt.base if isinstance(self.opt, algorithms.OuterMomentum) else self.opt

    @property
    def idx(self) -> np.ndarray:
        return INDICES[self.dim]


def cases() -> list[Case]:
    m = {"momentum": BETA}
    out = [Case("dsgd-awc/static/8MB", "dsgd-awc", {}, "static", dim=LARGE),  # the victim dies after its step
           Case("slowmo(dsgd)/dynamic", "slowmo", {"base": "dsgd", "period": PERIOD, "slow_momentum": 0.3},
                "dynamic")]  # in the iteration of the failure, some survivors complete its base step, others not
    for where in ("static", "dynamic"):
        out += [Case(f"dsgd/{where}", "dsgd", {"weight_decay": 1e-2}, where),
                Case(f"dsgd-awc/{where}", "dsgd-awc", {}, where),
                Case(f"dmsgd/{where}", "dmsgd", dict(m), where),
                Case(f"decentlam/{where}", "decentlam", dict(m), where),
                Case(f"awc-dmsgd/{where}", "awc-dmsgd", {**m, "share_momentum": where == "dynamic"}, where),
                Case(f"da-dmsgd/{where}", "da-dmsgd", dict(m), where),
                Case(f"qg-dmsgd/{where}", "qg-dmsgd", {**m, "mu": 0.7}, where),
                Case(f"gradient-tracking/{where}", "gradient-tracking", {}, where),
                Case(f"sgp/{where}", "sgp", dict(m), where)]
    out.append(Case("sgp/hub", "sgp", dict(m), "hub"))
    out += [Case("d2/builder", "d2", {}, "builder"),  # topology=lazy_ring, the runtime's builder
            Case("pmsgd", "pmsgd", dict(m), "none"),
            Case("cr-psgd", "cr-psgd", {"budget": 4000, "first_batch": 2, "growth": 1.05}, "none"),
            Case("cr-psgd-catalyst", "cr-psgd-catalyst", {"budget": 20000, "first_batch": 2, "growth": 1.2,
                                                          "theta": 0.1}, "none"),
            Case("local-sgd", "local-sgd", {**m, "period": PERIOD}, "none"),
            Case("mavg", "mavg", {"period": PERIOD, "slow_momentum": 0.3}, "none"),
            Case("slowmo", "slowmo", {"period": PERIOD, "slow_momentum": 0.3, "slow_lr": 1.0}, "none"),
            Case("bmuf", "bmuf", {"period": PERIOD, "slow_momentum": 0.3, "block_nesterov": True}, "none"),
            Case("dsgd/hierarchical", "dsgd", {}, "hierarchical"),
            Case("dsgd/dynamic+pga", "dsgd", {}, "dynamic", every=4),
            Case("dsgd/scheduler", "dsgd", {}, "scheduler"),
            Case("sgp/dynamic/8MB", "sgp", {}, "dynamic", dim=LARGE),
            Case("pmsgd/8MB", "pmsgd", dict(m), "none", dim=LARGE),
            Case("dsgd/one-peer-ring", "dsgd", {}, "one-peer-ring", cannot_continue="OnePeer cannot be rebuilt for 3"),
            Case("dsgd/inner-outer", "dsgd", {}, "inner-outer", cannot_continue="the same number of ranks on every"),
            Case("sgp/given-graph", "sgp", {}, "given-graph", cannot_continue="static graph on 4 nodes given to it"),
            Case("adpsgd", "adpsgd", {}, "adpsgd", cannot_continue="adpsgd cannot continue after gossip.recover()")]
    return out


def scheduler() -> gossip.Scheduler:
    """The cost model's choice: one-peer exponential-2 with a global average every 4 steps."""
    link = LinkCost(latency=1e-3, inverse_bandwidth=0.0)
    chosen = gossip.Scheduler.auto(SMALL * 8, CostModel(link, link, size=4, ranks_per_machine=4), global_avg_every=4)
    assert chosen.choice.name == "one-peer exponential-2" and chosen.choice.global_avg_every == 4, chosen.describe()
    return chosen


def build(case: Case) -> None:
    torch.manual_seed(ORIGIN)  # different on every rank: the optimizers start from rank 0's
    half = case.dim // 2
    case.params = [torch.nn.Parameter(torch.randn(half, dtype=torch.float64)),
                   torch.nn.Parameter(torch.randn(case.dim - half, dtype=torch.float64))]
    topology = {"static": None, "builder": lazy_ring, "dynamic": topologies.OnePeerExponentialTwo(gossip.size()),
                "hierarchical": "hierarchical", "scheduler": scheduler() if case.topology == "scheduler" else None,
                "one-peer-ring": topologies.OnePeer(topologies.ring(gossip.size())), "none": None,
                "inner-outer": topologies.InnerOuterRing(gossip.size(), 1),
                "given-graph": topologies.ring(gossip.size()),
                "adpsgd": topologies.OnePeerExponentialTwo(gossip.size()), "hub": Hub(gossip.size())}[case.topology]
    hyper = {"lr": LR, **case.hyper}
    if case.topology != "none":
        hyper["topology"] = topology
    if case.every is not None:
        hyper["global_avg_every"] = case.every
    case.opt = algorithms.create(case.name, case.params, **hyper)


def step(case: Case) -> None:
    """One iteration: the gradient of this rank's f at the optimizer's parameters, then its step."""
    case.opt.zero_grad()
    a, c = TORCH_DATA[case.dim]
    x = torch.cat([p.reshape(-1) for p in case.params])
    (0.5 * (a * (x - c) ** 2).sum()).backward()
    case.opt.step()


# --- state, gathered ---------------------------------------------------------------------------------

def local_state(case: Case) -> dict:
    inner, idx = case.inner, case.idx
    state = {"x": inner.x.detach().numpy()[idx].copy(), "step": inner.step_count, "fresh": inner.fresh}
    for name, buffer in inner.buffers.items():
        state[name] = buffer.numpy()[idx].copy()
    if isinstance(inner, algorithms.SGP):
        state["mass"] = np.array([inner.mass])
    if isinstance(case.opt, algorithms.OuterMomentum):
        state.update(start=case.opt.slow_start.numpy()[idx].copy(), u=case.opt.slow_momentum_buffer.numpy()[idx].copy(),
                     rounds=case.opt.rounds)
    return state


def gathered(case: Case) -> dict:
    rows = TEST.allgather(local_state(case))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) / scale
    assert err < TOL, f"rank {gossip.rank()} (origin {ORIGIN}): {what} off by {err:.3g}"
    report["checked"] += 1


# --- the equations on the survivors ------------------------------------------------------------------

def mixing(case: Case, k: int, m: int) -> np.ndarray:
    """W(k) on the m survivors, from the topologies package (not from the optimizer)."""
    if case.every is not None and (k + 1) % case.every == 0 or case.topology == "scheduler" and (k + 1) % 4 == 0:
        return np.full((m, m), 1.0 / m)
    if case.topology in ("static", "builder"):
        return topologies.to_matrix(lazy_ring(m))
    if case.topology in ("dynamic", "scheduler"):
        return topologies.OnePeerExponentialTwo(m).mixing_matrix(k)
    if case.topology == "hierarchical":
        machine_of = np.array(TEST.allgather(gossip.machine_rank()))
        w = topologies.OnePeerExponentialTwo(int(machine_of.max()) + 1).mixing_matrix(k)
        sizes = np.bincount(machine_of)
        keep = sizes.min() / sizes  # unequal machines: rows scaled so that the average over ranks is kept
        machines = keep[:, None] * w
        np.fill_diagonal(machines, 1 - keep * (1 - np.diag(w)))
        return machines[np.ix_(machine_of, machine_of)] / sizes[machine_of][None, :]
    raise AssertionError(case.topology)


def push(case: Case, k: int, m: int) -> np.ndarray:
    """Push-sum's column-stochastic P(k): sender j keeps and sends 1/(out-degree_j + 1)."""
    p = np.zeros((m, m))
    for j in range(m):
        if case.topology == "static":
            outs = [d for d in lazy_ring(m).successors(j) if d != j]
        else:
            family = Hub(m) if case.topology == "hub" else topologies.OnePeerExponentialTwo(m)
            outs = list(family.peers(k, j).dst_weights)
        for i in [j, *outs]:
            p[i, j] = 1.0 / (len(outs) + 1)
    return p


def base_update(name: str, hyper: dict, case: Case, s: dict, g: np.ndarray, k: int) -> dict:
    """The after-state of one step of ``name`` from the before-state ``s`` (rows: survivors)."""
    m = len(s["x"])
    x, lr, beta = s["x"], LR, hyper.get("momentum", 0.0)
    mean = np.tile(g.mean(axis=0), (m, 1))
    out: dict = {}
    if name in ("pmsgd", "cr-psgd"):
        out["momentum_buffer"] = beta * s["momentum_buffer"] + mean
        out["x"] = x - lr * out["momentum_buffer"]
        return out
    if name == "cr-psgd-catalyst":
        out["x"] = x - lr * (mean + hyper["theta"] * (x - s["anchor"]))
        out["anchor"] = out["x"] if (k + 1) % case.inner.inner_steps == 0 else s["anchor"]
        return out
    if name == "local-sgd":
        out["momentum_buffer"] = beta * s["momentum_buffer"] + g
        half = x - lr * out["momentum_buffer"]
        averages = hyper.get("period") is not None and (k + 1) % hyper["period"] == 0
        out["x"] = np.tile(half.mean(axis=0), (m, 1)) if averages else half
        return out
    if name == "sgp":
        p = push(case, k, m)
        direction = g
        if beta:
            direction = out["momentum_buffer"] = beta * s["momentum_buffer"] + g
        out["numerator"] = p @ (s["numerator"] - lr * direction)
        out["mass"] = p @ s["mass"]
        out["x"] = out["numerator"] / out["mass"]
        return out
    w = mixing(case, k, m)
    if name == "dsgd":
        out["x"] = w @ (x - lr * g)
    elif name == "dsgd-awc":
        out["x"] = w @ x - lr * g
    elif name == "dmsgd":
        out["momentum_buffer"] = beta * s["momentum_buffer"] + g
        out["x"] = w @ (x - lr * out["momentum_buffer"])
    elif name == "decentlam":
        mixed = w @ (x - lr * g)
        out["momentum_buffer"] = beta * s["momentum_buffer"] + (x - mixed) / lr
        out["x"] = x - lr * out["momentum_buffer"]
    elif name == "awc-dmsgd":
        shared = w @ s["momentum_buffer"] if hyper.get("share_momentum") else s["momentum_buffer"]
        out["momentum_buffer"] = beta * shared + g
        out["x"] = w @ x - lr * out["momentum_buffer"]
    elif name == "da-dmsgd":
        half = beta * s["momentum_buffer"] + g
        out["x"], out["momentum_buffer"] = w @ (x - lr * half), w @ half
    elif name == "qg-dmsgd":
        d = beta * s["quasi_global_momentum"] + g
        out["x"] = w @ (x - lr * d)
        mu = hyper["mu"]
        out["quasi_global_momentum"] = mu * s["quasi_global_momentum"] + (1 - mu) * (x - out["x"]) / lr
    elif name == "d2":
        first = bool(s["fresh"][0])
        combined = x - lr * g if first else 2 * x - s["previous_x"] - lr * g + lr * s["previous_direction"]
        out["x"], out["previous_x"], out["previous_direction"] = w @ combined, x, g
    elif name == "gradient-tracking":
        y = g if bool(s["fresh"][0]) else s["mixed_tracker"] + g - s["previous_gradient"]
        out["x"], out["tracker"], out["mixed_tracker"], out["previous_gradient"] = w @ x - lr * y, y, w @ y, g
    else:
        raise AssertionError(name)
    return out


def expected(case: Case, s: dict, g: np.ndarray, k: int) -> dict:
    if not isinstance(case.opt, algorithms.OuterMomentum):
        return base_update(case.name, case.hyper, case, s, g, k)
    base = case.hyper.get("base", "local-sgd")
    out = base_update(base, {"momentum": 0.0} if base == "local-sgd" else {}, case, s, g, k)
    out["start"], out["u"] = s["start"], s["u"]
    opt = case.opt
    if (k + 1) % opt.period == 0:
        mean = out["x"].mean(axis=0)
        start, u = s["start"], s["u"]
        if opt.lr_scaled:  # SlowMo
            out["u"] = opt.slow_momentum * u + (start - mean) / LR
            out["start"] = start - opt.slow_lr * LR * out["u"]
            out["x"] = out["start"]
        else:  # BMUF, MAVG
            out["u"] = opt.slow_momentum * u + opt.slow_lr * (mean - start)
            out["start"] = start + out["u"]
            out["x"] = out["start"] + opt.slow_momentum * out["u"] if opt.block_nesterov else out["start"]
        out["rounds"] = s["rounds"] + 1
    return out


# --- the run ----------------------------------------------------------------------------------------

def die() -> None:
    (OUTDIR / f"killed{ORIGIN}").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def step_all(all_cases: list[Case], iteration: int) -> bool:
    """Step every optimizer once, in order; True (at once) if a step raised RankFailure: the optimizers
    after it are not stepped in this iteration, as a training loop would go straight to the recovery."""
    for n, case in enumerate(all_cases):
        try:
            step(case)
        except gossip.RankFailure:
            kills = [float(p.read_text()) for p in OUTDIR.glob("killed*") if p.read_text()]
            report["detect_s"] = time.time() - max(kills) if kills else None
            case.trace["interrupted"] = True
            return True
        if iteration == KILL and n == 0 and ORIGIN == VICTIM:
            die()  # the 8 MB gossip of the next step is in flight
    return False


def check_recovery(all_cases: list[Case], before: dict) -> None:
    """What the recovery did to each optimizer, against every survivor's state before it."""
    origins = TEST.allgather(ORIGIN)
    for case in all_cases:
        inner = case.inner
        pre = TEST.allgather(before[case.label])
        now = gathered(case)
        steps = [p["step"] for p in pre]
        leader = steps.index(max(steps))
        assert (now["step"] == max(steps)).all(), (case.label, steps, now["step"])  # the most advanced
        if case.cannot_continue:
            assert inner.unusable and case.cannot_continue in inner.unusable, (case.label, inner.unusable)
            try:
                step(case)
                raise AssertionError(f"{case.label} stepped after the recovery")
            except gossip.GossipError as error:
                assert case.cannot_continue in str(error), str(error)
            continue
        assert inner.unusable is None, inner.unusable
        if case.topology in ("dynamic", "scheduler"):
            family = inner.schedule.schedule if case.topology == "scheduler" else inner.schedule
            family = getattr(family, "base", family)
            assert family.topology.n == 3 and isinstance(family.topology, topologies.OnePeerExponentialTwo), family
        if case.name == "sgp":  # z = numerator / mass before, restarted with mass 1: the masses sum to 3
            mine = before[case.label]
            case.trace["mass_before"] = float(mine["mass"][0])
            close(now["x"][gossip.rank()], mine["numerator"] / mine["mass"], f"{case.label} de-biased restart")
            close(now["numerator"], now["x"], f"{case.label} numerator = z")
            assert (now["mass"] == 1.0).all() and now["mass"].sum() == 3.0, now["mass"]
        if case.name in ("gradient-tracking", "d2"):  # restarted: first-step form next
            assert now["fresh"].all() and all(not now[b].any() for b in inner.buffers), case.label
        if case.name in ("pmsgd", "cr-psgd", "cr-psgd-catalyst"):  # every rank holds the leader's state
            for key in inner.buffer_names + ("x",):
                close(now[key], np.tile(pre[leader][key], (3, 1)), f"{case.label} {key} from the leader")
        if isinstance(case.opt, algorithms.OuterMomentum):
            for key in ("start", "u"):
                close(now[key], np.tile(now[key][0], (3, 1)), f"{case.label} outer {key} agreed")
            rounds = case.opt.outer.averages_before(int(now["step"][0]))
            assert (now["rounds"] == rounds).all(), (case.label, now["rounds"], rounds)
            ended_here = max(p["rounds"] for p in pre) < rounds
            case.trace["round_ended_in_recovery"] = ended_here
            for r, p in enumerate(pre):
                if ended_here or p["rounds"] < rounds:  # started the next round from the agreed point
                    want = now["start"][0] + case.opt.slow_momentum * now["u"][0] if case.opt.block_nesterov \
                        else now["start"][0]
                    close(now["x"][r], want, f"{case.label} rank {r} restarted the round")
        case.trace.update(steps_before=steps, loss_at_recovery=loss(now["x"].mean(axis=0), origins, case.dim))
    assert topologies.to_matrix(gossip.topology()).tolist() == topologies.to_matrix(lazy_ring(3)).tolist()


def run_checked(all_cases: list[Case]) -> None:
    """Step every optimizer that can continue on, each step against its equation; then the loss and
    the consensus of the small ones."""
    origins = TEST.allgather(ORIGIN)
    live = [c for c in all_cases if not c.cannot_continue]
    states = {c.label: gathered(c) for c in live}
    for iteration in range(AFTER):
        for case in live:
            if case.dim == LARGE and iteration >= AFTER_LARGE:
                continue
            if CHECKED <= iteration < AFTER - 1 and case.name != "local-sgd":
                step(case)  # on to convergence, unchecked (the last iteration is checked again)
                continue
            s = states[case.label] if iteration <= CHECKED else gathered(case)
            k = int(s["step"][0])
            assert (s["step"] == k).all(), (case.label, s["step"])
            g = gradients(s["x"], origins, case.dim, case.hyper.get("weight_decay", 0.0))
            step(case)
            want = expected(case, s, g, k)
            now = states[case.label] = gathered(case)
            for key, value in want.items():
                close(now[key], np.broadcast_to(value, now[key].shape), f"{case.label} {key} at step {k}")
            if case.name == "gradient-tracking":  # the tracker invariant: Σ_i y_i = Σ_i g_i
                close(now["tracker"].sum(axis=0), g.sum(axis=0), f"{case.label} Σy = Σg at step {k}")
            if case.name == "sgp":
                close(now["mass"].sum(), np.array(3.0), f"{case.label} Σ mass at step {k}")
            if case.name in ("pmsgd", "cr-psgd", "cr-psgd-catalyst"):
                close(now["x"], np.tile(now["x"][0], (3, 1)), f"{case.label} equal models at step {k}")
            if case.name == "local-sgd" and (k + 1) % PERIOD == 0:  # its models agree right after an average
                case.trace["consensus"] = float(np.sum((now["x"] - now["x"].mean(axis=0)) ** 2))
    for case in live:
        if case.dim == LARGE:
            continue
        x = states[case.label]["x"]
        mean = x.mean(axis=0)
        best = minimum(origins, case.dim)
        gap, start_gap = loss(mean, origins, case.dim) - best, case.trace["loss_at_recovery"] - best
        spread = case.trace.get("consensus", float(np.mean(np.sum((x - mean) ** 2, axis=1))))
        case.trace.update(loss_gap=gap, loss_gap_at_recovery=start_gap, consensus=spread)
        assert gap < 0.02 * start_gap, \
            f"{case.label}: the loss did not fall close to its minimum: {case.trace}"
        assert spread < 0.1 * heterogeneity(origins, case.dim), f"{case.label}: no consensus: {case.trace}"


def main() -> None:
    global TEST
    began = time.perf_counter()
    gossip.init(fault_tolerant=True, ranks_per_machine=2, op_timeout=60, check=False)  # ops: point to point only
    gossip.set_topology(lazy_ring)
    all_cases = cases()
    for case in all_cases:
        build(case)
    for iteration in range(10 * KILL):
        if step_all(all_cases, iteration):
            break
    else:
        raise AssertionError(f"rank {ORIGIN}: no RankFailure after rank {VICTIM} died")
    before = {case.label: local_state(case) for case in all_cases}
    record = gossip.recover()
    TEST = TEST.Shrink()
    TEST.Set_errhandler(MPI.ERRORS_RETURN)
    assert record.failed == (VICTIM,) and record.new_size == 3 == TEST.size, record
    report.update(recovery_s=record.seconds, iteration=iteration, size=gossip.size(), rank=gossip.rank())
    report["phases_s"] = [time.perf_counter() - began]
    check_recovery(all_cases, before)
    run_checked(all_cases)
    report["phases_s"].append(time.perf_counter() - began)
    for case in all_cases:
        if case.name == "adpsgd":  # finish() still averages the survivors' models
            case.opt.finish(average=True)
            rows = gathered(case)["x"]
            close(rows, np.tile(rows[0], (3, 1)), "adpsgd finish(average=True) on the survivors")
        case.opt.close()
    report["cases"] = {c.label: c.trace for c in all_cases}
    gossip.shutdown()
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
