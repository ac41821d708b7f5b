"""The base of every decentralized optimizer: fused buffers, a schedule, state that round-trips.

At construction the parameters become views into one flat tensor ``x`` (in parameter-group
order, so each group is one contiguous segment), their gradients views into one flat ``g``, and
rank 0's values are broadcast so that all ranks start equal. A step then communicates one flat
message whatever the number of parameters, executing the plan its :class:`gossip.plan.schedule.Schedule`
gives for that step. Subclasses implement :meth:`_step` with the arithmetic of their equation on
the flat tensors, one group segment at a time.

After a rank failure (fault-tolerant mode), :func:`gossip.recover` calls every optimizer's
:meth:`DecentralizedOptimizer.after_recovery` (registered at construction with
:func:`gossip.on_recover`) on the survivors, collectively: the communication in flight is dropped,
the schedule rebuilt for the new number of ranks (:meth:`gossip.plan.schedule.Schedule.resized`: the
rebuilt static topology, the time-varying family on the new size, ...), the step count becomes the
survivors' largest (they may have completed different numbers of steps), and each algorithm adapts
its state:

=========================  ==========================================================================
algorithm                  on recovery
=========================  ==========================================================================
dsgd, dsgd-awc, dmsgd,     continues: each rank keeps its model and momentum (any state is a valid
decentlam, awc-dmsgd,      iterate; the next steps mix on the survivors' W)
da-dmsgd, qg-dmsgd
local-sgd                  continues: each rank keeps its model and momentum; the next average is
                           over the survivors
d2                         restarts from the current models (``reset_state``: the next step takes
                           the first-step form, x = W(x − γd)); the rebuilt static topology must
                           still meet λ_min(W) > −1/3, or the next step raises
gradient-tracking          restarts the trackers (y = g at the next step): the dead ranks took their
                           share of Σ_i y_i, and Σ_i y_i = Σ_i g_i holds again from there
sgp                        push-sum restarts from each rank's de-biased z_i = x_i / w_i with mass 1,
                           so the masses sum to the new size; momentum kept
pmsgd, cr-psgd             the most advanced survivor's model and momentum on every rank (an
                           allreduce may have completed on some survivors only)
cr-psgd-catalyst           the most advanced survivor's model and proximal centre on every rank; the
                           batch sizes (and rounds) fixed at construction go on
slowmo, bmuf, mavg         the base adapts as above; the outer start point and momentum of the
                           survivor that ended the most rounds on every rank, and a survivor that
                           missed that round's end starts the next round from it; a round that no
                           survivor ended ends in the recovery (the survivors' exact average and the
                           outer step); BMUF's default η = 1 − 1/n keeps the old n
diloco, streaming-diloco   averages in flight dropped (the fragment keeps its local values); with the
                           exact average the most advanced survivor's start point and outer state
                           on every rank; each rank keeps its inner state and parameters
choco-sgd                  continues: each rank keeps its model and momentum; the public copies
                           (x̂, s, and the per-edge copies) restart from zero on every survivor
adpsgd                     cannot continue: the recovery freed its window; the next step raises
                           :class:`gossip.GossipError`; ``finish(average=True)`` still averages
asgd, asgdm, ormo, ormo-da a dead worker needs no recovery (the server goes on without it); after
                           a recovery the optimizer does not step: it closed the parameter server
=========================  ==========================================================================

Where a schedule cannot be rebuilt (:class:`topologies.OnePeer` over a given graph,
:class:`topologies.GraphSequence`, a static graph given to the optimizer itself), the optimizer's
:attr:`DecentralizedOptimizer.unusable` says why and its next step raises :class:`gossip.GossipError`.

A step interrupted by :class:`gossip.RankFailure` raises it without counting the step. What it
applied before the communication that failed stays, what it was to receive does not: the rank took a
local step (W = I for it), which the equations above continue from. The adapt-then-combine forms
(dsgd, dmsgd, da-dmsgd, local-sgd) keep their local update; those that communicate before updating
(dsgd-awc, awc-dmsgd, decentlam, qg-dmsgd, pmsgd, cr-psgd, cr-psgd-catalyst) applied nothing, and the
step's gradient is lost (unless the AWC forms failed when starting the next step's gossip, after their
update); sgp's numerator keeps its gradient step, which the restart's z includes; d2
and gradient tracking restart anyway. An outer loop's round end communicates before it changes
anything, so an interrupted one leaves the outer state as it was.
"""

from __future__ import annotations

import io
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
        self.unusable: str | None = None  # why the optimizer cannot step after a recovery (None: it can)
        self._stop_listening = gossip.on_recover(self.after_recovery)  # held weakly by the runtime

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
        self._stop_listening()
        self.synchronize()

    # --- after a rank failure ---------------------------------------------------------------------

    @torch.no_grad()
    def after_recovery(self, record: gossip.Recovery) -> None:
        """Continue on the survivors of a rank failure: :func:`gossip.recover` calls this on every
        survivor (registered at construction; collective over the survivors, in the order the
        optimizers were built). The communication in flight is dropped, the schedule rebuilt for
        the new number of ranks (:meth:`gossip.plan.schedule.Schedule.resized`), the step count
        agreed (the survivors' largest, so that every schedule indexed by step agrees), and the
        algorithm's own state adapted (:meth:`_recover_state`; the module docstring's table). A
        schedule that cannot be rebuilt makes :attr:`unusable` say why, and the next step raises
        :class:`gossip.GossipError` with it.
        """
        self._forget_in_flight()
        try:
            self.schedule = self.schedule.resized()
        except ValueError as error:
            self.unusable = (f"{type(self).__name__} cannot continue on the {record.new_size} ranks left after "
                             f"gossip.recover(): {error}")
        self._recover_state(self._agree_on_step())

    def _forget_in_flight(self) -> None:
        """Drop the communication in flight (its handle would raise :class:`gossip.RankFailure`) and
        take fresh receive buffers: a request of the failed job may still write into the old ones."""
        self._pending = None
        self._received = torch.empty_like(self.x)
        self._joined = self._joined_received = None

    def _agree_on_step(self) -> int:
        """Collective: every survivor takes the largest step count among them, and ``fresh`` only if
        all are fresh; returns the lowest rank that had that step count (the most advanced)."""
        mine = torch.tensor([[self.step_count, int(self.fresh)]], dtype=torch.int64)
        everyone = gossip.allgather(mine)
        steps = everyone[:, 0]
        self.step_count = int(steps.max())
        self.fresh = bool(everyone[:, 1].min())
        return int((steps == self.step_count).nonzero()[0, 0])

    def _recover_state(self, leader: int) -> None:
        """Adapt the algorithm's state to the survivors (collective); ``leader`` is the most advanced
        survivor (:meth:`_agree_on_step`). By default every rank keeps its own state (parameters,
        momentum): what each of them holds is a valid iterate of the algorithm on the survivors."""

    def _adopt(self, leader: int, *tensors: torch.Tensor) -> None:
        """Collective: ``leader``'s values of ``tensors`` (flat, the parameters' size) on every rank, in one message."""
        message, _ = self.pack(*tensors)
        agreed = gossip.broadcast(message, root=leader)
        for tensor, value in zip(tensors, agreed.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(value)

    @staticmethod
    def _adopt_state(leader: int, state: dict | None) -> dict:
        """Collective: ``leader``'s ``state`` (a dict of tensors and ``state_dict()``s, given on the leader
        only) on every rank, serialized with ``torch.save`` and sent in one broadcast after its size."""
        data = torch.empty(0, dtype=torch.uint8)
        if gossip.rank() == leader:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size = gossip.broadcast(torch.tensor([data.numel()], dtype=torch.int64), root=leader)
        if gossip.rank() != leader:
            data = torch.empty(int(size), dtype=torch.uint8)
        data = gossip.broadcast(data, root=leader)
        return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)

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
        """One iteration of the algorithm (see the subclass's equation); returns the closure's loss.

        A step interrupted by :class:`gossip.RankFailure` raises it without counting the step; what
        it left (module docstring) is a valid state to continue from after :func:`gossip.recover`.
        """
        if self.unusable is not None:
            raise gossip.GossipError(f"rank {gossip.rank()}: {self.unusable}")
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
