"""Any ``torch.optim`` optimizer with decentralized communication: the wrapper BlueFog and Horovod users know.

``GossipWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3), "neighbor_allreduce")`` keeps the
inner optimizer's arithmetic (Adam, AdamW, SGD, LAMB, any ``torch.optim.Optimizer``) and adds, at
every ``steps_per_communication``-th step, one fused message of the whole model. With OPT the inner
optimizer's step (its state advanced, its gradient g_i(x_i^k) computed at x_i^k) and W the step's
mixing weights:

* ``"neighbor_allreduce"``, ``form="atc"`` (adapt-then-combine; Chen, Sayed, "Diffusion Adaptation
  Strategies for Distributed Optimization and Learning over Networks", IEEE Trans. Signal Process.
  2012; with momentum or Adam inside as in Yuan, Chen, Huang, Zhang, Pan, Xu, Yin, ICCV 2021, and
  BlueFog's adapt-then-combine optimizer, Ying et al., "BlueFog: Make Decentralized Algorithms
  Practical for Optimization and Deep Learning", arXiv:2111.04287, 2021)::

      x_i^{k+1} = Σ_j w_ij OPT(x_j^k)

* ``form="awc"`` (adapt-while-combine, BlueFog's default: the average of x^k is started at the end
  of the previous step and overlaps the forward and backward; the inner step is applied to it)::

      x_i^{k+1} = OPT(Σ_j w_ij x_j^k)      (with SGD: Σ_j w_ij x_j^k − γ g_i(x_i^k))

* ``"hierarchical_neighbor_allreduce"``: W is hierarchical gossip (the exact average within each
  machine, ``topology`` = the graph or time-varying family between machines, default one-peer
  exponential-2); ``"allreduce"``: W = 11ᵀ/n, exact parameter averaging (with K > 1: local SGD);
* ``"gradient_allreduce"``: Horovod/DDP semantics, x_i^{k+1} = OPT(x_i^k; (1/n) Σ_j g_j); with
  ``steps_per_communication`` K > 1 the gradients of K steps are accumulated and their mean taken
  (a K-times larger batch, one inner step every K steps);
* ``"window"``: one-sided pushes (BlueFog's window-put optimizer): each rank writes its model into
  its out-neighbours' :class:`gossip.Window` buffers without their help and folds what its buffers
  hold, x ← w_ii x + Σ_j w_ij b_j, b_j the last model j pushed (ATC: push and fold after OPT; AWC:
  push x^k, overlapped, fold, then OPT). Ranks do not wait for each other, so b_j may be a step old
  or new; ``barrier=True`` makes every rank fold exactly the models of this step (two barriers per
  communication), which is then the same iteration as ``neighbor_allreduce`` on the same graph;
* ``"empty"``: no communication (each rank trains alone; the baseline for the others).

W comes from ``topology`` as in every optimizer here (:func:`gossip.plan.schedule.schedule_for`:
None for the runtime's static topology, a graph, a time-varying family, a :class:`gossip.Scheduler`),
indexed by the communication round (step // K), with an exact average every ``global_avg_every``
rounds (Gossip-PGA). :meth:`GossipWrapper.set_weights` overrides it with per-call weights for the
steps that follow (``self_weight``, ``src_weights``, ``dst_weights``, as BlueFog's per-step
attributes, e.g. from ``topologies.OnePeerExponentialTwo(n).peers(step, rank)``): the values are
passed to :func:`gossip.neighbor_allreduce` (or to the window's put and update) as they are.

The parameters become views into one flat buffer (:class:`algorithms.base.DecentralizedOptimizer`)
and rank 0's values are broadcast at construction; the wrapper shares the inner optimizer's
parameter groups, so LR schedulers on either drive the inner lr. ``state_dict()`` holds the inner
optimizer's state, the step and the gradients being accumulated; with an average in flight it is
finished first (its result does not depend on when it is waited for), so a resumed run is bitwise
the same, except with unsynchronized windows, whose buffers depend on timing anyway. After a rank
failure (:func:`gossip.recover`) the gossip forms continue with each rank's own model and state; the
allreduce forms take the most advanced survivor's model and inner state; windows cannot continue
(the recovery freed them) and the next step raises.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import networkx as nx
import torch

import gossip
from algorithms.base import DecentralizedOptimizer, describe_schedule
from algorithms.diloco import inner_keywords, optimizer_class
from gossip import runtime
from gossip.ops.window import Window
from gossip.plan.schedule import (
    AllreduceSchedule,
    HierarchicalSchedule,
    NoCommunication,
    PeriodicGlobalAverage,
    WindowPushSchedule,
    schedule_for,
)

NEIGHBOR = "neighbor_allreduce"
HIERARCHICAL = "hierarchical_neighbor_allreduce"
ALLREDUCE = "allreduce"
GRADIENT = "gradient_allreduce"
WINDOW = "window"
EMPTY = "empty"
COMMUNICATIONS = (NEIGHBOR, HIERARCHICAL, ALLREDUCE, GRADIENT, WINDOW, EMPTY)
FORMS = ("atc", "awc")
_WEIGHTED = (NEIGHBOR, WINDOW)  # the communications that take per-call weights


def _window_name() -> str:
    """The first ``gossip-wrapper-k`` not open in this runtime (the same on every rank: windows are
    created and freed collectively, in the same order everywhere)."""
    taken = runtime.current().windows
    return next(name for k in itertools.count() if (name := f"gossip-wrapper-{k}") not in taken)


class GossipWrapper(DecentralizedOptimizer):
    """``optimizer`` (a ``torch.optim.Optimizer`` instance, any state it holds kept) with decentralized
    communication (module docstring).

    ``communication``: one of :data:`COMMUNICATIONS`; ``form``: ``"atc"`` (combine after the inner
    step) or ``"awc"`` (combine the pre-step model, its communication overlapped with the next forward
    and backward unless ``overlap=False``), for the averaging communications and windows;
    ``steps_per_communication`` K: communicate at every K-th step only (local steps in between;
    gradient accumulation for ``"gradient_allreduce"``); ``topology``, ``global_avg_every``: W, as
    for the library's other optimizers (window: a static graph, or None for the runtime's);
    ``barrier``: windows only, fold exactly this step's models.
    """

    usable_as_base = False  # it runs its own inner optimizer: no SlowMo/BMUF over it

    def __init__(self, optimizer: torch.optim.Optimizer, communication: str = NEIGHBOR, *, form: str = "atc",
                 topology=None, steps_per_communication: int = 1, global_avg_every: int | None = None,
                 overlap: bool = True, barrier: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DecentralizedOptimizer):
            raise TypeError(f"GossipWrapper wraps a torch.optim optimizer instance, got {type(optimizer).__name__}")
        if communication not in COMMUNICATIONS:
            raise ValueError(f"communication must be one of {', '.join(COMMUNICATIONS)}; got {communication!r}")
        if form not in FORMS:
            raise ValueError(f"form must be 'atc' or 'awc', got {form!r}")
        if form == "awc" and communication in (GRADIENT, EMPTY):
            raise ValueError(f"form='awc' combines models; {communication} does not: drop form")
        k = steps_per_communication
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"steps_per_communication must be an int >= 1, got {k!r}")
        if topology is not None and communication in (ALLREDUCE, GRADIENT, EMPTY):
            raise ValueError(f"{communication} uses no topology: drop topology")
        if global_avg_every is not None and communication not in (NEIGHBOR, HIERARCHICAL):
            raise ValueError(f"global_avg_every applies to neighbour averaging, not {communication}")
        if communication == WINDOW and not (topology is None or isinstance(topology, nx.Graph)):
            raise ValueError(f"window pushes need a static graph (or None for the runtime's topology), "
                             f"got {type(topology).__name__}")
        if barrier and communication != WINDOW:
            raise ValueError("barrier applies to window pushes only")
        groups = [{"params": group["params"]} for group in optimizer.param_groups]
        super().__init__(groups, {}, schedule=NoCommunication())  # collective: broadcasts rank 0's model
        self.inner = optimizer
        self.param_groups = optimizer.param_groups  # one set of groups: LR schedulers drive the inner lr
        self.defaults = optimizer.defaults
        self.communication, self.form, self.period = communication, form, k
        self.barrier = barrier
        self.overlap = overlap and form == "awc"
        self.window: Window | None = None
        if communication == NEIGHBOR:
            self.schedule = schedule_for(topology, global_avg_every)
        elif communication == HIERARCHICAL:
            if isinstance(topology, str | AllreduceSchedule):
                raise ValueError(f"hierarchical_neighbor_allreduce takes a graph or time-varying family between "
                                 f"machines as topology, got {topology!r}")
            between = HierarchicalSchedule(topology)
            self.schedule = between if global_avg_every is None else PeriodicGlobalAverage(between, global_avg_every)
        elif communication in (ALLREDUCE, GRADIENT):
            self.schedule = AllreduceSchedule()
        elif communication == WINDOW:
            self.window = Window(self.x, _window_name(), graph=topology)  # collective
            self.schedule = WindowPushSchedule(self.window)
        if communication == GRADIENT and k > 1:
            self.buffers["accumulated_gradient"] = torch.zeros_like(self.x)
        self.weights: dict[str, Any] | None = None  # per-call weights set by set_weights, else None

    # --- per-step weights -------------------------------------------------------------------------

    def set_weights(self, self_weight: float | None = None, src_weights: dict[int, float] | None = None,
                    dst_weights: dict[int, float] | None = None) -> None:
        """Use these weights for the communications that follow, until called again (all None: back to
        the schedule). ``neighbor_allreduce``: passed to :func:`gossip.neighbor_allreduce` as they are
        (``src_weights`` alone: other weights on the static topology; with ``dst_weights``: a dynamic
        exchange, sends scaled by them). ``window``: ``dst_weights`` choose and scale the pushes,
        ``self_weight`` and ``src_weights`` weigh the fold. Not collective; every rank must set weights
        that match its neighbours' (the cross-rank check says which do not)."""
        if self.communication not in _WEIGHTED:
            raise ValueError(f"per-call weights apply to {' and '.join(_WEIGHTED)}, not {self.communication}")
        given = {"self_weight": self_weight, "src_weights": src_weights, "dst_weights": dst_weights}
        self.weights = None if all(v is None for v in given.values()) else given

    # --- the step -------------------------------------------------------------------------------------

    def communicates(self, step: int) -> bool:
        """Whether step ``step`` (0-based) communicates: every ``steps_per_communication``-th one."""
        return (step + 1) % self.period == 0

    def _step(self) -> None:
        self._collect_gradients()  # a .grad replaced by model.zero_grad() folds back into the fused gradient
        k = self.step_count
        talk = self.communicates(k) and self.communication != EMPTY
        if self.communication == GRADIENT:
            self._gradient_step(talk, k // self.period)
        elif self.form == "atc":
            self.inner.step()
            if talk:
                self._combine(self._start(k // self.period))
        else:
            if talk:
                handle = self._pending or self._start(k // self.period)
                self._pending = None
                self._combine(handle)
            self.inner.step()
            if self.overlap and self.communicates(k + 1):
                self._pending = self._start((k + 1) // self.period)

    def _gradient_step(self, talk: bool, round_: int) -> None:
        """g ← (1/n) Σ_j g_j (the mean of the last K steps' gradients when accumulating); then OPT."""
        accumulated = self.buffers.get("accumulated_gradient")
        if accumulated is not None:
            accumulated.add_(self.g)
            if not talk:
                return
            accumulated.div_(self.period)
            self.g.copy_(self.schedule.plan(round_).start(accumulated, self._received).wait())
            accumulated.zero_()
        else:
            self.g.copy_(self.schedule.plan(round_).start(self.g, self._received).wait())
        self.inner.step()

    def _start(self, round_: int):
        """Start round ``round_``'s combination of the model: a handle whose ``wait()`` gives W x (for a
        window: the push of x, completed at the destinations when waited for)."""
        weights = self.weights
        if self.communication == WINDOW:
            return self.window.put_async(self.x, None if weights is None else weights["dst_weights"])
        if weights is not None:
            return gossip.neighbor_allreduce_async(self.x, **weights, out=self._received)
        return self.schedule.plan(round_).start(self.x, self._received)

    def _combine(self, handle) -> None:
        """x ← the combination ``handle`` started (a window: fold the buffers once the push has landed)."""
        if self.communication != WINDOW:
            self.x.copy_(handle.wait())
            return
        handle.wait()
        if self.barrier:
            gossip.barrier()  # every rank's push of this step has landed
        weights = self.weights or {}
        self.window.update(weights.get("self_weight"), weights.get("src_weights"))
        if self.barrier:
            gossip.barrier()  # nobody pushes the next model before every rank has folded this one

    # --- lifecycle ------------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: the inner optimizer, what is communicated, how and when."""
        inner = type(self.inner).__name__
        every = "" if self.period == 1 else f" every {self.period} steps"
        if self.communication == EMPTY:
            return f"{inner} steps, no communication"
        if self.communication == GRADIENT:
            accumulate = f" (gradients accumulated over {self.period} steps)" if self.period > 1 else ""
            return f"the gradient: an allreduce{every}{accumulate}, then the {inner} step"
        how = describe_schedule(self.schedule).removesuffix(", every step").removesuffix(" every step")
        if self.communication == WINDOW:
            sync = ", lock-step (barriers)" if self.barrier else ", never waiting for them"
            how = f"one-sided pushes into the out-neighbours' windows, folded{sync}"
        if self.weights is not None:
            how += " (with per-call weights)"
        order = (f"combined after each {inner} step" if self.form == "atc" else
                 f"combined before each {inner} step" + (", overlapped with forward and backward" if self.overlap
                                                         else ""))
        return f"the model: {how}{every}, {order}"

    def synchronize(self) -> None:
        """Finish the communication in flight (an overlapped average or push; the next step starts it again)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def close(self) -> None:
        """Finish the communication in flight and free the window (collective for ``"window"``). Idempotent."""
        super().close()
        if self.window is not None:
            self.window.free()
            self.window = None

    # --- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, the step and the gradients being accumulated (a copy)."""
        self.synchronize()
        return {"decentralized": {"step": self.step_count, "fresh": self.fresh,
                                  "buffers": {name: t.detach().clone() for name, t in self.buffers.items()}},
                "inner": copy.deepcopy(self.inner.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("decentralized", "inner"):
            if key not in state_dict:
                raise ValueError(f"not a GossipWrapper state_dict: the {key!r} entry is missing")
        ours = state_dict["decentralized"]
        missing = set(self.buffers) - set(ours["buffers"])
        if missing:
            raise ValueError(f"state_dict lacks the buffers {sorted(missing)}")
        self.synchronize()
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        for name, buffer in self.buffers.items():
            saved = ours["buffers"][name]
            if saved.shape != buffer.shape:
                raise ValueError(f"buffer {name!r} has {saved.numel()} elements, the parameters {buffer.numel()}")
            buffer.copy_(saved)
        self.step_count = int(ours["step"])
        self.fresh = bool(ours.get("fresh", self.step_count == 0))

    # --- recovery after a rank failure (called by DecentralizedOptimizer.after_recovery) ----------------

    def _recover_state(self, leader: int) -> None:
        """Allreduce forms: the most advanced survivor's model, inner state and accumulated gradients on every
        rank (one broadcast of their bytes); gossip forms keep each rank's own; a window cannot continue."""
        if self.communication == WINDOW:
            self.window = None  # gossip.recover() freed it
            self.unusable = ("GossipWrapper(communication='window') cannot continue after gossip.recover(): its "
                             "window was freed with the failed job's communicator; build a new optimizer")
            return
        if self.communication not in (ALLREDUCE, GRADIENT):
            return
        mine = None
        if gossip.rank() == leader:
            mine = {"x": self.x.cpu(), "buffers": {k: v.cpu() for k, v in self.buffers.items()},
                    "inner": self.inner.state_dict()}
        shared = self._adopt_state(leader, mine)
        self.x.copy_(shared["x"])
        for name, buffer in self.buffers.items():
            buffer.copy_(shared["buffers"][name])
        self.inner.load_state_dict(shared["inner"])
        self.param_groups = self.inner.param_groups


class GossipWrapperByName(GossipWrapper):
    """:class:`GossipWrapper` over an inner optimizer built here, for ``algorithms.create`` and ``train.py``:
    ``inner`` (a ``torch.optim`` class or name, ``"adamw"`` by default) over ``params`` with ``lr``,
    ``inner_kwargs`` and, when given, ``weight_decay``; the other keywords are :class:`GossipWrapper`'s."""

    def __init__(self, params, lr: float, inner: str | type = "adamw", inner_kwargs: dict | None = None,
                 weight_decay: float | None = None, communication: str = NEIGHBOR, form: str = "atc",
                 steps_per_communication: int = 1, overlap: bool = True, barrier: bool = False, topology=None,
                 global_avg_every: int | None = None) -> None:
        inner_cls = optimizer_class(inner, "inner")
        if not lr > 0:
            raise ValueError(f"need lr > 0, got lr={lr}")
        inner_kwargs = inner_keywords(inner_kwargs, weight_decay)
        super().__init__(inner_cls(params, lr=lr, **inner_kwargs), communication, form=form, topology=topology,
                         steps_per_communication=steps_per_communication, global_avg_every=global_avg_every,
                         overlap=overlap, barrier=barrier)


__all__ = ["COMMUNICATIONS", "GossipWrapper", "GossipWrapperByName"]
