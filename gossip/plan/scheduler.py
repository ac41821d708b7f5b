"""The topology-aware scheduler: which communication plan a job should run, chosen from the cost model.

``Scheduler.auto(model_bytes)`` (collective) probes the links (:func:`gossip.probe`), or takes a
:class:`gossip.CostModel`, and weighs these candidates for the job's layout:

* ``allreduce``: the exact average every step (the faster of ring and tree in the model);
* ``exponential-2``: static exponential-2 graph over the ranks (degree ⌈log2 n⌉);
* ``one-peer exponential-2``: one peer per step, cycling through the exponential-2 offsets;
* ``hierarchical``: exact average within each machine, one-peer exponential-2 between machines
  (only with several machines of several ranks).

For each it predicts the plan's seconds per step and measures its mixing: the per-step consensus
rate ρ (geometric mean over the family's period of ``||W(k)…W(0) − 11ᵀ/n||``) and the mixing time
τ, the fewest steps that shrink the worst-case distance to the average by a factor e. A gossip plan
whose τ exceeds the target (``mixing_steps``, default ⌈log2 n⌉, what exponential graphs reach) gets
a global average every H = target steps: Gossip-PGA (Chen, Yuan et al., ICML 2021) bounds the
consensus error through min(H, τ), so the averages cap it at what a well-mixing graph would give.
Its time per step then includes the amortised allreduce, t_plan + t_allreduce / H.

The fastest gossip candidate is chosen only if it saves at least ``min_saving`` (default 20 %) of
the step time that allreduce would take, counting ``compute_seconds`` (forward and backward, if
known) in both: gossip is inexact, so it must buy a real saving. Otherwise allreduce is chosen:
that happens when messages are small and the per-op cost dominates (latency-bound), or when
communication is a small part of the step. Large messages across machines (bandwidth-bound) favour
one-peer and hierarchical gossip, which move one model copy per step instead of allreduce's two.

:func:`rank_candidates` is the pure part (no MPI), which ``benchmarks/simulate_scale.py`` reuses
with cluster profiles. :class:`Scheduler` is a :class:`gossip.plan.schedule.Schedule`: pass it to any
optimizer as ``topology=``; ``describe()`` lists the candidates and why the choice was made. After a
rank failure and ``gossip.recover()``, :meth:`Scheduler.resized` keeps the choice (and H) and
rebuilds its schedule for the survivors; it does not weigh the candidates again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from gossip import runtime
from gossip.errors import InputMismatchError
from gossip.plan.cost_model import CostModel
from gossip.plan.schedule import (
    AllreduceSchedule,
    DynamicSchedule,
    HierarchicalSchedule,
    PeriodicGlobalAverage,
    Plan,
    Schedule,
    StaticSchedule,
)
from topologies import OnePeerExponentialTwo, analysis, exponential_two

ALLREDUCE = "allreduce"
EXPONENTIAL = "exponential-2"
ONE_PEER = "one-peer exponential-2"
HIERARCHICAL = "hierarchical"


@dataclass(frozen=True)
class Candidate:
    """One plan the scheduler weighed, with what the model predicts for it."""

    name: str
    plan_seconds: float  # the plan alone, per step
    consensus_rate: float  # per-step contraction of the distance to the average (0: exact)
    mixing_steps: float  # steps to shrink that distance by e (math.inf: never)
    global_avg_every: int | None  # H, or None: no global averages
    seconds_per_step: float  # plan + amortised global averages
    chosen: bool = False


@lru_cache(maxsize=64)
def _mixing(kind: str, n: int) -> tuple[float, float]:
    """(per-step consensus rate, mixing time in steps) of a topology family on n nodes."""
    if n == 1:
        return 0.0, 1.0
    topology = exponential_two(n) if kind == EXPONENTIAL else OnePeerExponentialTwo(n)
    period = getattr(topology, "period", None) or 1
    rate = analysis.consensus_rate(topology, period) ** (1.0 / period)
    steps = analysis.consensus_steps(topology, tol=math.exp(-1.0), max_steps=64 * period)
    return rate, (math.inf if steps is None else float(steps))


def _check(model_bytes: float, compute_seconds: float, min_saving: float, mixing_steps: int | None,
           global_avg_every: int | None) -> None:
    if not (model_bytes > 0 and math.isfinite(model_bytes)):
        raise ValueError(f"model_bytes must be a finite number > 0, got {model_bytes!r}")
    if not (compute_seconds >= 0 and math.isfinite(compute_seconds)):
        raise ValueError(f"compute_seconds must be a finite number >= 0, got {compute_seconds!r}")
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving must be in [0, 1), got {min_saving!r}")
    for name, value in (("mixing_steps", mixing_steps), ("global_avg_every", global_avg_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")


def rank_candidates(cost: CostModel, model_bytes: float, *, compute_seconds: float = 0.0, min_saving: float = 0.2,
                    mixing_steps: int | None = None, global_avg_every: int | None = None) -> list[Candidate]:
    """Every candidate plan for ``cost``'s layout with its predicted time and mixing; exactly one
    has ``chosen`` set (module docstring). ``global_avg_every`` fixes H for every gossip plan
    instead of deriving it from the mixing time. Pure: no MPI."""
    _check(model_bytes, compute_seconds, min_saving, mixing_steps, global_avg_every)
    n, machines, per_machine = cost.size, cost.machines, cost.ranks_per_machine
    target = mixing_steps if mixing_steps is not None else max(1, math.ceil(math.log2(n)))
    allreduce_seconds = min(cost.ring_allreduce(model_bytes), cost.tree_allreduce(model_bytes))
    result = [Candidate(ALLREDUCE, allreduce_seconds, 0.0, 1.0, None, allreduce_seconds)]
    if n > 1:
        gossip = [(EXPONENTIAL, cost.exponential(model_bytes), *_mixing(EXPONENTIAL, n)),
                  (ONE_PEER, cost.one_peer(model_bytes), *_mixing(ONE_PEER, n))]
        if machines > 1 and per_machine > 1:  # the rank-level W is W_machines ⊗ 11ᵀ/k: the machines' mixing
            gossip.append((HIERARCHICAL, cost.hierarchical(model_bytes, 1), *_mixing(ONE_PEER, machines)))
        for name, seconds, rate, steps in gossip:
            every = global_avg_every if global_avg_every is not None else (target if steps > target else None)
            total = seconds + (allreduce_seconds / every if every else 0.0)
            result.append(Candidate(name, seconds, rate, steps, every, total))
    best = min(result[1:], key=lambda c: c.seconds_per_step, default=None)
    exact = compute_seconds + allreduce_seconds
    pick = best if best is not None and compute_seconds + best.seconds_per_step <= (1 - min_saving) * exact \
        else result[0]
    return [Candidate(**{**c.__dict__, "chosen": c is pick}) for c in result]


def describe_candidates(candidates: list[Candidate], compute_seconds: float = 0.0, min_saving: float = 0.2) -> str:
    """A table of the candidates (predicted ms per step, H, consensus rate, mixing time) and the choice."""
    lines = [f"{'plan':<24}{'plan ms':>10}{'H':>6}{'ms/step':>10}{'rate':>7}{'mixing':>8}"]
    for c in candidates:
        mark = "  <- chosen" if c.chosen else ""
        lines.append(f"{c.name:<24}{c.plan_seconds * 1e3:>10.3f}{c.global_avg_every or '-':>6}"
                     f"{c.seconds_per_step * 1e3:>10.3f}{c.consensus_rate:>7.3f}{c.mixing_steps:>8.0f}{mark}")
    chosen = next(c for c in candidates if c.chosen)
    exact = candidates[0].seconds_per_step + compute_seconds
    if chosen.name == ALLREDUCE:
        why = (f"no gossip plan saves {min_saving:.0%} of the {exact * 1e3:.3f} ms allreduce step"
               f"{f' (compute {compute_seconds * 1e3:.3f} ms included)' if compute_seconds else ''}: exact averaging")
    else:
        saving = 1 - (compute_seconds + chosen.seconds_per_step) / exact
        why = f"{chosen.name} saves {saving:.0%} of the allreduce step"
        if chosen.global_avg_every:
            why += f", with a global average every {chosen.global_avg_every} steps (its mixing time is " \
                   f"{chosen.mixing_steps:.0f} steps)"
    return "\n".join(lines) + f"\nchosen: {chosen.name}: {why}"


class Scheduler(Schedule):
    """The schedule the cost model picks for this job: build with :meth:`auto`; use as ``topology=``."""

    def __init__(self, schedule: Schedule, candidates: list[Candidate], cost: CostModel, model_bytes: float,
                 compute_seconds: float, min_saving: float) -> None:
        self.schedule = schedule
        self.candidates = candidates
        self.cost = cost
        self.model_bytes = model_bytes
        self.compute_seconds = compute_seconds
        self.min_saving = min_saving

    @property
    def choice(self) -> Candidate:
        """The chosen candidate."""
        return next(c for c in self.candidates if c.chosen)

    @classmethod
    def auto(cls, model_bytes: float, cost: CostModel | None = None, *, compute_seconds: float = 0.0,
             min_saving: float = 0.2, mixing_steps: int | None = None, global_avg_every: int | None = None,
             warmup_steps: int = 0) -> Scheduler:
        """Collective: choose and build the schedule for a model of ``model_bytes`` (module docstring).

        ``cost`` defaults to :func:`gossip.probe` on this job (about a second). ``warmup_steps``:
        a gossip choice averages exactly (allreduce) for that many first steps. Every rank must
        pass the same arguments; a choice that differs between ranks raises on every rank.
        """
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if cost is None:
            from gossip.plan.probing import probe

            cost = probe()
        layout = runtime.layout()
        if cost.size != layout.size:
            raise ValueError(f"the cost model is for {cost.size} ranks, the job has {layout.size}")
        candidates = rank_candidates(cost, model_bytes, compute_seconds=compute_seconds, min_saving=min_saving,
                                     mixing_steps=mixing_steps, global_avg_every=global_avg_every)
        chosen = next(c for c in candidates if c.chosen)
        rt = runtime.current()
        choices = rt.comm.allgather((chosen.name, chosen.global_avg_every))
        if len(set(choices)) > 1:
            first = next(r for r, c in enumerate(choices) if c != choices[0])
            raise InputMismatchError(f"Scheduler.auto chose {choices[0]} on rank 0 but {choices[first]} on rank "
                                     f"{first}: pass the same cost model and model size on every rank")
        n = layout.size
        if chosen.name == ALLREDUCE:
            schedule: Schedule = AllreduceSchedule()
        elif chosen.name == EXPONENTIAL:
            schedule = StaticSchedule(exponential_two)  # the builder: gossip.recover() rebuilds it for the survivors
        elif chosen.name == ONE_PEER:
            schedule = DynamicSchedule(OnePeerExponentialTwo(n))
        else:
            schedule = HierarchicalSchedule(OnePeerExponentialTwo(layout.machines))
        if chosen.name != ALLREDUCE and (chosen.global_avg_every is not None or warmup_steps):
            schedule = PeriodicGlobalAverage(schedule, chosen.global_avg_every, warmup_steps)
        return cls(schedule, candidates, cost, model_bytes, compute_seconds, min_saving)

    def plan(self, step: int) -> Plan:
        return self.schedule.plan(step)

    def resized(self) -> Scheduler:
        """The same choice rebuilt for the job's current ranks (after ``gossip.recover()``): the
        candidates stay those weighed for the :attr:`cost` model's size."""
        schedule = self.schedule.resized()
        if schedule is self.schedule:
            return self
        return Scheduler(schedule, self.candidates, self.cost, self.model_bytes, self.compute_seconds, self.min_saving)

    def describe(self) -> str:
        size = runtime.size()
        rebuilt = f" (chosen for {self.cost.size} ranks, rebuilt for {size})" if size != self.cost.size else ""
        return (f"auto: {self.schedule.describe()}{rebuilt}\n"
                f"{describe_candidates(self.candidates, self.compute_seconds, self.min_saving)}")
