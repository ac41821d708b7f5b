"""The base of every decentralized optimizer: fused buffers, a schedule, state that round-trips.

At construction the parameters become views into one flat tensor ``x`` (in parameter-group
order, so each group is one contiguous segment), their gradients views into one flat ``g``, and
rank 0's values are broadcast so that all ranks start equal. A step then communicates one flat
message whatever the number of parameters, executing the plan its :class:`gossip.plan.schedule.Schedule`
gives for that step. Subclasses implement :meth:`_step` with the arithmetic of their equation on
the flat tensors, one group segment at a time.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch

import gossip
from gossip import runtime
from gossip.plan import schedule as schedules
from gossip.plan.schedule import Schedule, schedule_for


def check_rates(lr: float, momentum: float = 0.0, **more: float) -> None:
    """Raise ValueError unless lr > 0 and momentum (and every other named coefficient) is in [0, 1)."""
    bad = {name: v for name, v in {"momentum": momentum, **more}.items() if not 0 <= v < 1}
    if not lr > 0 or bad:
        raise ValueError(f"need lr > 0 and {', '.join(['momentum', *more])} in [0, 1), got lr={lr}, "
                         + ", ".join(f"{name}={v}" for name, v in {"momentum": momentum, **more}.items()))


def _graph_text(topology) -> str:
    """A topology in a few words: a static graph by its largest in-degree, a family by its class name."""
    if topology is None:
        topology = runtime.topology()
    if isinstance(topology, nx.Graph):
        degree = max((sum(1 for j in topology.predecessors(i) if j != i) if topology.is_directed()
                      else topology.degree(i) - topology.has_edge(i, i)) for i in topology.nodes)
        return f"a static graph (up to {degree} neighbour{'s' if degree != 1 else ''} per rank)"
    return type(topology).__name__  # a time-varying family


def describe_schedule(schedule: Schedule) -> str:
    """What a schedule communicates and when, in words (e.g. "an exact average every 4 steps, nothing in between")."""
    if isinstance(schedule, schedules.NoCommunication):
        return "nothing"
    if isinstance(schedule, schedules.AllreduceSchedule):
        return "an allreduce every step"
    if isinstance(schedule, schedules.StaticSchedule):
        return f"neighbour averaging on {_graph_text(None)} every step"
    if isinstance(schedule, schedules.DynamicSchedule):
        return f"neighbour averaging on {_graph_text(schedule.topology)} every step"
    if isinstance(schedule, schedules.PushSumSchedule):
        return f"push-sum (column-stochastic) mixing on {_graph_text(schedule.topology)} every step"
    if isinstance(schedule, schedules.HierarchicalSchedule):
        return f"{schedule.describe()}, every step"
    if isinstance(schedule, schedules.PeriodicGlobalAverage):
        base = describe_schedule(schedule.base)
        averages = []
        if schedule.warmup_steps:
            averages.append(f"an exact average after each of the first {schedule.warmup_steps} steps")
        if schedule.every is not None:
            after = " after that" if schedule.warmup_steps else ""
            averages.append(f"an exact average every {schedule.every} steps{after}" if base == "nothing" else
                            f"an exact average instead every {schedule.every} steps{after}")
        if not averages:
            return base
        if base == "nothing":
            return ", ".join(averages) + ", nothing in between"
        return f"{base}; " + ", ".join(averages)
    return schedule.describe()


class DecentralizedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` over fused flat buffers, communicating by schedule.

    Every parameter must have the same dtype and device. ``topology`` is a ``networkx`` graph, a
    ``topologies`` time-varying family, a :class:`Schedule`, ``"allreduce"``/``"none"``, or None for
    the runtime's topology; ``global_avg_every`` = H replaces every H-th step's communication with
    an exact global average (Gossip-PGA). ``zero_grad`` zeroes the fused gradient in place.
    """

    buffer_names: tuple[str, ...] = ()  # per-element state, one flat tensor each, saved in state_dict
    sends = "the model"  # what one message carries, for describe()
    overlap = False  # adapt-while-combine forms: the next step's gossip starts at the end of this one
    usable_as_base = True  # whether an outer loop (SlowMo, BMUF) may run it between its averages
    batch_sizes: list[int] | None = None  # the per-step batch sizes when the optimizer fixes them (CR-PSGD)

    def __init__(self, params, defaults: dict[str, Any], *, topology=None, global_avg_every: int | None = None,
                 schedule: Schedule | None = None) -> None:
        super().__init__(params, defaults)
        params = [p for group in self.param_groups for p in group["params"]]
        if not params:
            raise ValueError("the optimizer got no parameters")
        first = params[0]
        for k, p in enumerate(params):
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"all parameters must share dtype and device: parameter 0 is {first.dtype} on "
                                 f"{first.device}, parameter {k} is {p.dtype} on {p.device}")
            if not p.dtype.is_floating_point:
                raise ValueError(f"parameter {k} has dtype {p.dtype}; decentralized optimizers need floating point")
        self._params = params
        self._buffer = gossip.FlatBuffer(params, bind=True)
        self.x = self._buffer.flat
        with torch.no_grad():
            self.x.copy_(gossip.broadcast(self.x, root=0))
        self.g = torch.zeros_like(self.x)
        self._grad_views = [self.g[a:b].view(p.shape) for a, b, p in
                            zip(self._buffer.offsets[:-1], self._buffer.offsets[1:], params, strict=True)]
        for p, view in zip(params, self._grad_views, strict=True):
            p.grad = view
        self.segments = []
        start = 0
        for group in self.param_groups:
            end = start + sum(p.numel() for p in group["params"])
            self.segments.append((start, end))
            start = end
        self.schedule = schedule if schedule is not None else schedule_for(topology, global_avg_every)
        self.buffers = {name: torch.zeros_like(self.x) for name in self.buffer_names}
        self.step_count = 0
        self._received = torch.empty_like(self.x)  # where neighbour averages land
        self._joined: torch.Tensor | None = None  # several vectors sent as one message
        self._joined_received: torch.Tensor | None = None
        self._decayed: torch.Tensor | None = None  # g + wd x, when some group has weight decay
        self._pending = None  # adapt-while-combine: the gossip of x^{k+1} in flight between steps
        self.fresh = True  # the next step is the recursion's first (set again by reset_state)

    # --- what subclasses use ------------------------------------------------------------------

    def gradient(self) -> torch.Tensor:
        """The fused gradient with each group's weight decay added (``g + wd x``), as torch.optim does."""
        self._collect_gradients()
        if not any(group.get("weight_decay", 0.0) for group in self.param_groups):
            return self.g
        if self._decayed is None:
            self._decayed = torch.empty_like(self.g)  # allocated once, reused every step
        for (a, b), group in zip(self.segments, self.param_groups, strict=True):
            torch.add(self.g[a:b], self.x[a:b], alpha=group.get("weight_decay", 0.0), out=self._decayed[a:b])
        return self._decayed

    def communicate(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run this step's plan on ``tensor`` (blocking); returns the received average in ``out``
        (default: a buffer reused every step, the size of the parameters)."""
        out = self._received if out is None else out
        return self.schedule.plan(self.step_count).start(tensor, out).wait()

    def mix_in_place(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by this step's plan applied to it; a step whose plan is "nothing"
        (a local step) costs nothing, not even a copy."""
        plan = self.schedule.plan(self.step_count)
        if plan.communicates:
            tensor.copy_(plan.start(tensor, self._received).wait())

    def pack(self, *parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy several flat tensors into one message buffer; returns (message, buffer for its average),
        both allocated once and reused."""
        total = sum(p.numel() for p in parts)
        if self._joined is None or self._joined.numel() != total:
            self._joined = torch.empty(total, dtype=self.x.dtype, device=self.x.device)
            self._joined_received = torch.empty_like(self._joined)
        torch.cat(parts, out=self._joined)
        return self._joined, self._joined_received

    def communicate_together(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """Run this step's plan on several flat tensors as one message (e.g. [x; m]); returns the
        received averages, one view per part, into buffers allocated once."""
        message, received = self.pack(*parts)
        return list(self.communicate(message, out=received).split([p.numel() for p in parts]))

    def _mix_message(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the adapt-while-combine forms gossip, packed at the moment it starts, and where its
        average lands. The model alone by default; a subclass may send more in the same message."""
        return self.x, self._received

    def mixed_parameters(self) -> torch.Tensor:
        """Gossip(x^k) for adapt-while-combine forms: the result of the communication started at the
        end of the previous step (or started now, at the first step). A reused buffer."""
        handle = self._pending or self.schedule.plan(self.step_count).start(*self._mix_message())
        self._pending = None
        return handle.wait()

    def start_next_mix(self) -> None:
        """Start Gossip(x^{k+1}) for the next step: it runs while the next forward and backward compute.

        With ``overlap = False`` (an optimizer argument of the AWC forms) nothing starts here and
        :meth:`mixed_parameters` communicates at the next step, blocking: the baseline for overlap.
        """
        if self.overlap:
            self._pending = self.schedule.plan(self.step_count + 1).start(*self._mix_message())

    def synchronize(self) -> None:
        """Finish (and discard) any communication in flight, so that the parameters may be modified."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def groups(self):
        """``(group, slice)`` for every parameter group: the group's segment of the flat tensors."""
        for (a, b), group in zip(self.segments, self.param_groups, strict=True):
            yield group, slice(a, b)

    # --- lifecycle -----------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: what this optimizer communicates and when (e.g. "the model: neighbour averaging on
        OnePeerExponentialTwo every step")."""
        overlap = ", overlapped with the next forward and backward" if self.overlap else ""
        return f"{self.sends}: {describe_schedule(self.schedule)}{overlap}"

    def close(self) -> None:
        """Finish the communication in flight and free what the optimizer owns (collective for those
        that own MPI resources: call it on every rank). Idempotent; the optimizer does not step after it."""
        self.synchronize()

    # --- what outer loops (SlowMo, BMUF) use ---------------------------------------------------

    def set_parameters(self, values: torch.Tensor) -> None:
        """Overwrite the model with ``values`` (a flat tensor) between steps, e.g. with the average at
        the end of an outer round. Communication in flight is finished and discarded first."""
        self.synchronize()
        self.x.copy_(values)

    def reset_state(self) -> None:
        """Restart the recursion from the current parameters: zero every buffer, and the next step
        is treated as the first (e.g. D² and gradient tracking take their first-step form again)."""
        self.synchronize()
        for buffer in self.buffers.values():
            buffer.zero_()
        self.fresh = True

    # --- torch.optim interface ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One iteration of the algorithm (see the subclass's equation); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        self.step_count += 1
        self.fresh = False
        return loss

    def _step(self) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the fused gradient in place (the gradients stay views of it; ``set_to_none`` is ignored)."""
        self.g.zero_()
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is not view:
                p.grad = view

    def _collect_gradients(self) -> None:
        """If someone replaced a ``.grad`` (e.g. ``model.zero_grad()`` sets them to None), fold it back."""
        for p, view in zip(self._params, self._grad_views, strict=True):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["decentralized"] = {"step": self.step_count, "fresh": self.fresh,
                                  "buffers": {name: t.detach().clone() for name, t in self.buffers.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.synchronize()
        state_dict = dict(state_dict)
        ours = state_dict.pop("decentralized", None)
        if ours is None:
            raise ValueError("not a decentralized optimizer's state_dict: the 'decentralized' entry is missing")
        super().load_state_dict(state_dict)
        missing = set(self.buffer_names) - set(ours["buffers"])
        if missing:
            raise ValueError(f"state_dict lacks the buffers {sorted(missing)}")
        for name in self.buffer_names:
            saved = ours["buffers"][name]
            if saved.shape != self.x.shape:
                raise ValueError(f"buffer {name!r} has {saved.numel()} elements, the parameters {self.x.numel()}")
            self.buffers[name].copy_(saved)
        self.step_count = int(ours["step"])
        self.fresh = bool(ours.get("fresh", self.step_count == 0))
