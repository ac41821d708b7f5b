"""DiLoCo and streaming DiLoCo: any ``torch.optim`` optimizer for local steps, an outer optimizer on the
averaged pseudo-gradient every H steps.

* **DiLoCo** (Douillard, Feng, Rusu, Chhaparia, Donchev, Kuncoro, Ranzato, Szlam, Shen, "DiLoCo:
  Distributed Low-Communication Training of Language Models", arXiv:2311.08105, 2023). Every rank
  starts a round from the shared start point θ, takes H steps of its inner optimizer (AdamW in the
  paper; its state stays on the rank across rounds), then

      Δ = θ − (1/n) Σ_i x_i        (the outer gradient, or pseudo-gradient)
      θ ← OuterOpt(θ, Δ)           (Nesterov SGD, lr 0.7, momentum 0.9 in the paper)

  and every rank restarts from x_i = θ. ``outer`` may be any ``torch.optim`` optimizer: Δ is handed
  to it as the gradient of θ. With inner SGD and outer SGD(lr 1, momentum 0) this is local SGD with
  period H (θ ← the average); with inner SGD without momentum and outer heavy-ball SGD (lr α,
  momentum β, constant inner lr γ) it is SlowMo over local SGD with slow lr α and slow momentum β
  (Wang, Tantia, Ballas, Rabbat, ICLR 2020: their u is this momentum buffer divided by γ).

* **Streaming DiLoCo** (Douillard, Donchev, Rush, Kale, Charles, Garrett, Teston, Lacey, McIlroy,
  Shen, Ramé, Szlam, Ranzato, Barham, "Streaming DiLoCo with overlapping communication: Towards a
  Distributed Free Lunch", arXiv:2501.18512, 2025). The parameters are split into P fragments and
  fragment p runs the rounds above on its own clock, offset by p·H/P steps: its outer gradient
  Δ_p = θ_p − avg(x_p) is taken and its average started at the steps t ≡ p·⌊H/P⌋ (mod H) (fragment
  0 at H, 2H, ...), so only a fraction of the model is on the wire at a time. The average is
  applied τ inner steps later (the overlap), while the ranks keep training, and merged with the
  local fragment, which has moved on meanwhile:

      θ_p ← OuterOpt(θ_p, Δ_p) ;  x_p ← α x_p + (1 − α) θ_p

  α = 0 takes the outer-updated fragment (DiLoCo's restart; with P = 1, τ = 0 this is DiLoCo);
  α = 1 ignores it. Fragments are contiguous runs of whole parameters in the flat buffer, balanced by
  size (the paper groups layers, strided or sequential; contiguous runs keep each fragment one
  message). Each fragment is its own parameter of the outer optimizer, so its momentum moves only
  when it syncs.

**The average is a plan** (:mod:`gossip.plan.schedule`), executed once per round of a fragment
(round r of every fragment uses the schedule's plan r): an exact allreduce (``topology=None``, the
default), or gossip on a graph, a time-varying family, ``"hierarchical"``, or a
:class:`gossip.Scheduler`'s choice: decentralized DiLoCo. With the exact average every rank holds
the same θ, and the message is the pseudo-gradient θ − x_i (the quantity to compress). With gossip
the ranks' start points differ, so each rank mixes the *models*: Δ_i = θ_i − Σ_j w_ij x_j, with its
own θ_i and outer state; with outer SGD(lr 1, momentum 0) that is periodic gossip averaging of local
SGD (mixing pseudo-gradients instead would never contract the differences between the θ_i).

Communication is one fused message per fragment round, started at the fragment's sync step and
waited for at its merge τ steps later, as the paper overlaps it: the exact average is one
``MPI_Iallreduce`` (:func:`gossip.allreduce_async`, also for the exact rounds of a
:class:`gossip.plan.schedule.PeriodicGlobalAverage` or of a scheduler's choice), neighbour averaging
a nonblocking neighbour exchange; both proceed while the ranks take their inner steps, and the
merged values are those a blocking average at the sync step would give, bitwise. Hierarchical
rounds complete their machine allreduce at the start and overlap the exchange between machines.
``state_dict()`` finishes the averages in flight (their results do not depend on when they are
waited for) and saves them; a resumed optimizer merges them at the same steps, bitwise.

With ``compressor`` (a :class:`gossip.Compressor` or its name: ``"bf16"``, ``"int8"``, ``"int4"``,
``"topk-0.01"``, ...; exact average only) the pseudo-gradients go on the wire compressed, through
the compressed reduce-scatter and allgather of :func:`gossip.compressed_allreduce`: every rank
decompresses the same bytes, so θ stays equal on every rank, and each rank sends about 2(n − 1)/n
compressed copies of the fragment. The reduce-scatter completes at the sync step and the allgather
overlaps the τ steps (:func:`gossip.ops.compressed.compressed_allreduce_async`). There is no error
feedback. ``opt.compressor.bytes_sent`` counts the bytes handed to MPI.

After a rank failure in fault-tolerant mode (:func:`gossip.recover`;
:meth:`DecentralizedOptimizer.after_recovery`) the survivors agree on the step (the largest), drop
the averages in flight (each such fragment keeps its local values, and its next round measures Δ
from the same start), rebuild the schedule for the new size, and, with the exact average, take the
most advanced survivor's start point and outer state; each rank keeps its inner state and parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import gossip
from algorithms.base import DecentralizedOptimizer, _graph_text
from gossip.ops.compressed import compressed_allreduce_async
from gossip.plan import schedule as schedules
from gossip.plan.schedule import AllreduceSchedule, Schedule, schedule_for

_EXCLUDED = {"Optimizer", "LBFGS", "SparseAdam"}  # the base class, closure-driven and sparse-only optimizers
OPTIMIZERS = {name.lower(): cls for name in dir(torch.optim) if name not in _EXCLUDED
              and isinstance(cls := getattr(torch.optim, name), type) and issubclass(cls, torch.optim.Optimizer)}


def inner_keywords(inner_kwargs: dict | None, weight_decay: float | None) -> dict:
    """The inner optimizer's keywords: ``inner_kwargs`` with ``weight_decay`` (when given) added;
    ValueError when both give a different weight decay."""
    keywords = dict(inner_kwargs or {})
    if weight_decay is not None:
        if keywords.get("weight_decay", weight_decay) != weight_decay:
            raise ValueError(f"weight_decay={weight_decay} and inner_kwargs weight_decay="
                             f"{keywords['weight_decay']} disagree")
        keywords["weight_decay"] = weight_decay
    return keywords


def optimizer_class(spec: str | type, role: str) -> type:
    """A ``torch.optim`` optimizer class from its name (``"adamw"``, case-insensitive) or the class itself."""
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        return spec
    if isinstance(spec, str) and spec.lower() in OPTIMIZERS:
        return OPTIMIZERS[spec.lower()]
    raise ValueError(f"{role} must be a torch.optim optimizer class or one of {', '.join(sorted(OPTIMIZERS))}; "
                     f"got {spec!r}")


def fragment_offsets(period: int, fragments: int) -> list[int]:
    """The step count (1-based: steps taken) of each fragment's first sync: H for fragment 0, p·⌊H/P⌋ for p ≥ 1;
    fragment p then syncs every H steps."""
    return [p * period // fragments or period for p in range(fragments)]


def fragment_bounds(offsets: list[int], fragments: int) -> list[tuple[int, int]]:
    """Split a flat buffer whose parameters end at ``offsets`` (``[0, ..., numel]``) into ``fragments``
    contiguous runs of whole parameters, each cut at the parameter boundary nearest to k·numel/P."""
    count, total = len(offsets) - 1, offsets[-1]
    if fragments > count:
        raise ValueError(f"cannot split {count} parameter tensor{'s' if count != 1 else ''} into {fragments} "
                         f"fragments (fragments are whole parameters)")
    cuts = [0]
    for k in range(1, fragments):
        target = k * total / fragments
        candidates = range(cuts[-1] + 1, count - (fragments - k) + 1)
        cuts.append(min(candidates, key=lambda i: (abs(offsets[i] - target), i)))
    cuts.append(count)
    return [(offsets[cuts[p]], offsets[cuts[p + 1]]) for p in range(fragments)]


def _average_text(schedule: Schedule) -> str:
    """How a schedule's plans average, in words, without "every step" (DiLoCo runs one per round)."""
    inner = getattr(schedule, "schedule", None)
    if isinstance(schedule, gossip.Scheduler) and inner is not None:
        return f"the scheduler's choice, {_average_text(inner)}"
    if isinstance(schedule, AllreduceSchedule):
        return "an exact average (allreduce)"
    if isinstance(schedule, schedules.NoCommunication):
        return "no average (every rank on its own)"
    if isinstance(schedule, schedules.StaticSchedule):
        return f"neighbour averaging on {_graph_text(None)}"
    if isinstance(schedule, schedules.DynamicSchedule):
        return f"neighbour averaging on {_graph_text(schedule.topology)}"
    if isinstance(schedule, schedules.PeriodicGlobalAverage):
        every = f", an exact average instead every {schedule.every} rounds" if schedule.every else ""
        return f"{_average_text(schedule.base)}{every}"
    return schedule.describe().splitlines()[0]


class DiLoCo(DecentralizedOptimizer):
    """DiLoCo: ``period`` steps of ``inner`` (a ``torch.optim`` class or name, built with ``lr`` and
    ``inner_kwargs`` over the model's parameters; ``weight_decay``, when given, is its weight decay), then
    ``outer`` (default: SGD with ``outer_lr``, ``outer_momentum``, ``nesterov``; any other class or name
    is built with ``outer_lr`` and ``outer_kwargs``) on the averaged pseudo-gradient (module docstring).

    ``topology``: None for the exact average, or what :func:`gossip.plan.schedule.schedule_for` takes
    (a graph, a time-varying family, ``"hierarchical"``, a :class:`Schedule` such as a
    :class:`gossip.Scheduler`). ``compressor``: a :class:`gossip.Compressor` or its name, for the
    pseudo-gradient on the wire (exact average only). ``opt.inner`` and ``opt.outer`` are the two
    optimizers; the parameter groups are the inner optimizer's, so LR schedulers drive the inner lr.
    """

    usable_as_base = False  # it runs its own inner optimizer; no SlowMo/BMUF over it

    def __init__(self, params, lr: float, period: int = 50, inner: str | type = "adamw",
                 inner_kwargs: dict | None = None, weight_decay: float | None = None, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, outer: str | type | None = None,
                 outer_kwargs: dict | None = None, topology=None, compressor=None) -> None:
        self._setup(params, lr, period, inner, inner_kwargs, weight_decay, outer_lr, outer_momentum, nesterov, outer,
                     outer_kwargs, topology, compressor, fragments=1, delay=0, mix=0.0)

    def _setup(self, params, lr, period, inner, inner_kwargs, weight_decay, outer_lr, outer_momentum, nesterov,
               outer, outer_kwargs, topology, compressor, *, fragments: int, delay: int, mix: float) -> None:
        inner_cls, outer_cls = optimizer_class(inner, "inner"), optimizer_class(outer or "sgd", "outer")
        if not lr > 0 or not outer_lr > 0:
            raise ValueError(f"need lr > 0 and outer_lr > 0, got lr={lr} and outer_lr={outer_lr}")
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not isinstance(fragments, int) or not 1 <= fragments <= period:
            raise ValueError(f"fragments must be an int in [1, period={period}], got {fragments!r}")
        if not isinstance(delay, int) or not 0 <= delay < period:
            raise ValueError(f"delay must be an int in [0, period={period}), got {delay!r}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix!r}")
        if outer_cls is torch.optim.SGD and not 0 <= outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
        if outer_cls is torch.optim.SGD and nesterov and outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0 (pass nesterov=False for plain outer SGD)")
        inner_kwargs = inner_keywords(inner_kwargs, weight_decay)
        schedule = AllreduceSchedule() if topology is None else schedule_for(topology)
        super().__init__(params, {"lr": lr}, schedule=schedule)
        self.period, self.delay, self.mix = period, delay, float(mix)
        self.inner = inner_cls([dict(group) for group in self.param_groups], lr=lr, **inner_kwargs)
        self.param_groups = self.inner.param_groups  # one set of groups: LR schedulers drive the inner lr
        self.start = self.x.detach().clone()  # θ: the start point of the rounds (per rank when gossiping)
        self.fragments = fragment_bounds(self._buffer.offsets, fragments)
        self.offsets = fragment_offsets(period, fragments)
        self._views = [self.start[a:b] for a, b in self.fragments]  # the outer optimizer's parameters
        outer_kwargs = dict(outer_kwargs or {})
        if outer_cls is torch.optim.SGD:
            outer_kwargs = {"momentum": outer_momentum, "nesterov": nesterov, **outer_kwargs}
        self.outer = outer_cls(self._views, lr=outer_lr, **outer_kwargs)
        self.exact = isinstance(getattr(schedule, "schedule", schedule), AllreduceSchedule)
        if compressor is not None and not self.exact:
            raise ValueError("compressor needs the exact average (topology=None): gossip mixes the models, "
                             "which do not compress as pseudo-gradients do")
        self.compressor = None if compressor is None else gossip.compressor_by_name(compressor)
        self._message = torch.empty_like(self.x)  # what each fragment sends, untouched while in flight
        self._in_flight: dict[int, gossip.Handle | None] = {}  # fragment -> its average's handle (None: arrived)
        self._names = (inner_cls.__name__, outer_cls.__name__, outer_lr, outer_momentum, nesterov)

    # --- the schedule of the fragments ------------------------------------------------------------

    def _round(self, p: int, steps: int) -> int | None:
        """The round of fragment ``p`` whose average starts after ``steps`` steps, or None."""
        since = steps - self.offsets[p]
        return since // self.period if since >= 0 and since % self.period == 0 else None

    def in_flight_after(self, steps: int) -> list[int]:
        """The fragments whose average has started but is not yet merged after ``steps`` steps."""
        return [p for p in range(len(self.fragments))
                if any(self._round(p, s) is not None for s in range(max(1, steps - self.delay + 1), steps + 1))]

    # --- the step ---------------------------------------------------------------------------------

    def _step(self) -> None:
        self._collect_gradients()  # a .grad replaced by model.zero_grad() folds back into the fused gradient
        self.inner.step()
        steps = self.step_count + 1
        for p in range(len(self.fragments)):
            round_ = self._round(p, steps)
            if round_ is not None:
                self._start_average(p, round_)
            if p in self._in_flight and self._round(p, steps - self.delay) is not None:
                self._merge(p)

    def _start_average(self, p: int, round_: int) -> None:
        a, b = self.fragments[p]
        message, out = self._message[a:b], self._received[a:b]
        if self.exact:
            torch.sub(self.start[a:b], self.x[a:b], out=message)  # Δ_i = θ − x_i
        else:
            message.copy_(self.x[a:b])  # the model: Δ_i = θ_i − Σ_j w_ij x_j at the merge
        plan = self.schedule.plan(round_)
        if self.compressor is not None:
            self._in_flight[p] = compressed_allreduce_async(message, self.compressor, out=out)
        elif plan.op == schedules.ALLREDUCE:  # the plan's own allreduce blocks; these overlap the τ steps
            self._in_flight[p] = gossip.allreduce_async(message, "mean", out=out)
        elif plan.op == schedules.HIERARCHICAL:
            self._in_flight[p] = gossip.hierarchical_neighbor_allreduce_async(
                message, plan.machine_topology, plan.machine_step, out=out)
        else:
            self._in_flight[p] = plan.start(message, out)

    def _merge(self, p: int) -> None:
        a, b = self.fragments[p]
        self._finish(p)
        del self._in_flight[p]
        average = self._received[a:b]
        if not self.exact:
            average.neg_().add_(self.start[a:b])  # Δ_i = θ_i − Σ_j w_ij x_j, in place
        view = self._views[p]
        view.grad = average
        self.outer.step()
        view.grad = None
        x = self.x[a:b]
        if self.mix == 0.0:
            x.copy_(view)
        else:
            x.mul_(self.mix).add_(view, alpha=1.0 - self.mix)  # x_p ← α x_p + (1 − α) θ_p

    # --- lifecycle --------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: what is averaged, how and when, and the inner and outer optimizers."""
        inner, outer, outer_lr, momentum, nesterov = self._names
        if outer == "SGD":
            kind = "Nesterov " if nesterov else ""
            outer = f"SGD (lr {outer_lr}, {kind}momentum {momentum})" if momentum else f"SGD (lr {outer_lr})"
        else:
            outer = f"{outer} (lr {outer_lr})"
        what = "the pseudo-gradient" if self.exact else "the model"
        if self.compressor is not None:
            what += f" compressed ({self.compressor.describe()})"
        how = _average_text(self.schedule)
        if len(self.fragments) == 1 and self.delay == 0:
            return (f"DiLoCo: every {self.period} steps {what}: {how}, then an outer {outer} step; "
                    f"{inner} steps in between, no communication")
        sizes = [b - a for a, b in self.fragments]
        return (f"Streaming DiLoCo: {len(sizes)} fragments ({min(sizes):,}-{max(sizes):,} parameters), each every "
                f"{self.period} steps, staggered by about {self.period // len(sizes)}: {what}: {how}, merged "
                f"{self.delay} step{'s' if self.delay != 1 else ''} later (mix {self.mix}) after an outer {outer} "
                f"step; {inner} steps in between")

    def _finish(self, p: int) -> None:
        """Wait for fragment ``p``'s average, into its slice of the receive buffer."""
        handle = self._in_flight[p]
        if handle is not None:
            a, b = self.fragments[p]
            result = handle.wait()
            if result.data_ptr() != self._received[a:b].data_ptr():
                self._received[a:b].copy_(result)
            self._in_flight[p] = None

    def synchronize(self) -> None:
        """Finish the averages in flight; their results are kept for the merges τ steps after they started."""
        for p in list(self._in_flight):
            self._finish(p)

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner and outer optimizers' states, the start point, the step and the averages in flight
        (finished here and saved: a resumed optimizer merges them at the same steps); a copy, which
        later steps leave unchanged."""
        self.synchronize()
        pending = sorted(self._in_flight)
        received = torch.cat([self._received[a:b] for a, b in (self.fragments[p] for p in pending)]) if pending \
            else self._received[:0]
        return {"decentralized": {"step": self.step_count, "fresh": self.fresh,
                                  "buffers": {"start": self.start.detach().clone()}},
                "inner": copy.deepcopy(self.inner.state_dict()), "outer": copy.deepcopy(self.outer.state_dict()),
                "in_flight": {"fragments": pending, "received": received.detach().clone()},
                "compressor": copy.deepcopy(self.compressor.state_dict()) if self.compressor is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("decentralized", "inner", "outer", "in_flight"):
            if key not in state_dict:
                raise ValueError(f"not a DiLoCo state_dict: the {key!r} entry is missing")
        ours, flight = state_dict["decentralized"], state_dict["in_flight"]
        start = ours["buffers"]["start"]
        if start.shape != self.start.shape:
            raise ValueError(f"the saved start point has {start.numel()} elements, the parameters {self.x.numel()}")
        step, pending = int(ours["step"]), sorted(int(p) for p in flight["fragments"])
        if not set(pending) <= set(self.in_flight_after(step)):  # after a recovery some may have been dropped
            raise ValueError(f"the saved averages in flight (fragments {pending}) are not those of step {step} "
                             f"with {len(self.fragments)} fragments, period {self.period} and delay {self.delay} "
                             f"({self.in_flight_after(step)})")
        self.synchronize()
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self.outer.load_state_dict(state_dict["outer"])
        self.start.copy_(start)
        self.step_count, self.fresh = step, bool(ours.get("fresh", step == 0))
        self._in_flight = dict.fromkeys(pending)
        if self.compressor is not None and state_dict.get("compressor") is not None:
            self.compressor.load_state_dict(state_dict["compressor"])
        at = 0
        for p in pending:
            a, b = self.fragments[p]
            self._received[a:b].copy_(flight["received"][at:at + b - a])
            at += b - a

    # --- recovery after a rank failure (called by DecentralizedOptimizer.after_recovery) ----------------

    def _forget_in_flight(self) -> None:
        """Drop the averages in flight and take fresh message buffers (the failed job's requests may still
        use the old ones); each dropped fragment keeps its local values and its start point."""
        super()._forget_in_flight()
        self._in_flight.clear()
        self._message = torch.empty_like(self.x)

    def _recover_state(self, leader: int) -> None:
        """With the exact average, the most advanced survivor's start point and outer state on every rank
        (one broadcast of their bytes: the outer state's shape may differ between ranks, e.g. momentum
        created at an outer step that completed on some ranks only). Gossip keeps each rank's own."""
        if not self.exact:
            return
        mine = {"start": self.start.cpu(), "outer": self.outer.state_dict()} if gossip.rank() == leader else None
        shared = self._adopt_state(leader, mine)
        self.start.copy_(shared["start"])
        self.outer.load_state_dict(shared["outer"])


class StreamingDiLoCo(DiLoCo):
    """Streaming DiLoCo: DiLoCo with the parameters in ``fragments`` contiguous fragments synced at staggered
    steps, each average applied ``delay`` (τ) steps after it starts and merged with weight ``mix`` (α) on the
    local fragment (module docstring)."""

    def __init__(self, params, lr: float, period: int = 50, fragments: int = 4, delay: int = 1, mix: float = 0.5,
                 inner: str | type = "adamw", inner_kwargs: dict | None = None, weight_decay: float | None = None,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 outer: str | type | None = None, outer_kwargs: dict | None = None, topology=None,
                 compressor=None) -> None:
        self._setup(params, lr, period, inner, inner_kwargs, weight_decay, outer_lr, outer_momentum, nesterov, outer,
                    outer_kwargs, topology, compressor, fragments=fragments, delay=delay, mix=mix)
