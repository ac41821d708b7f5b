"""BlueFog's distributed optimizers on :class:`algorithms.GossipWrapper`.

Each takes a ``torch.optim`` optimizer instance and the model (or a list of models) it trains, as
BlueFog's do, and returns a :class:`GossipWrapper` (OPT: the inner optimizer's step; W: the step's
mixing weights):

* ``DistributedAdaptThenCombineOptimizer``: x ← Σ_j w_ij OPT(x_j) (adapt-then-combine; Chen and
  Sayed, "Diffusion Adaptation Strategies for Distributed Optimization and Learning over Networks",
  IEEE Trans. Signal Process., 2012);
* ``DistributedAdaptWithCombineOptimizer``: x ← OPT(Σ_j w_ij x_j), the combination overlapped with
  the forward and backward of the step (BlueFog: Ying et al., arXiv:2111.04287, 2021); the
  deprecated ``DistributedAllreduceOptimizer``, ``DistributedNeighborAllreduceOptimizer`` and
  ``DistributedHierarchicalNeighborAllreduceOptimizer`` are this form with one communication type;
* ``DistributedGradientAllreduceOptimizer``: OPT with the gradient averaged over all ranks (Horovod);
* ``DistributedWinPutOptimizer``: one-sided pushes of the model into the out-neighbours' windows,
  folded before OPT, ranks never waiting for each other.

W is the static topology's weights (:func:`set_topology`), the machine topology's for hierarchical
averaging, or the per-step weights assigned to the optimizer's ``self_weight``, ``src_weights``,
``dst_weights`` (``src_machine_weights``, ``dst_machine_weights`` for hierarchical averaging), as
with BlueFog. ``num_steps_per_communication`` K counts forward passes of the model, as BlueFog's
does: a ``step()`` combines the models once K forward passes ``model(x)`` have run since the last
combination, and is a local step otherwise; so both "K steps of one forward each" (local steps in
between) and "K forward and backward passes, gradients accumulated, then one ``step()``" (a
combination at every ``step()``) behave as with BlueFog. The gradient-allreduce optimizer averages at
every ``step()`` (its K is the number of backward passes the user accumulates before calling it,
which autograd sums).
"""

from __future__ import annotations

import enum
import itertools
import warnings
import weakref
from contextlib import contextmanager

import torch

from algorithms.wrapper import GossipWrapper
from gossip.compat.bluefog import _basics


class CommunicationType(enum.Enum):
    """What a distributed optimizer combines the models with."""

    neighbor_allreduce = "neighbor.allreduce"
    hierarchical_neighbor_allreduce = "hierarchical.neighbor.allreduce"
    allreduce = "allreduce"
    empty = "empty"


_COMMUNICATION = {CommunicationType.neighbor_allreduce: "neighbor_allreduce",
                  CommunicationType.hierarchical_neighbor_allreduce: "hierarchical_neighbor_allreduce",
                  CommunicationType.allreduce: "allreduce", CommunicationType.empty: "empty"}


def _check_model(optimizer: torch.optim.Optimizer, model) -> None:
    """As BlueFog: every parameter the optimizer updates must be a parameter of ``model``."""
    models = model if isinstance(model, list | tuple) else [model]
    if not all(isinstance(m, torch.nn.Module) for m in models):
        raise ValueError(f"model must be a torch.nn.Module or a list of them, got {type(model).__name__}")
    named = list(itertools.chain(*(m.named_parameters() for m in models)))
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {duplicates}")
    known = {id(p) for _, p in named}
    unknown = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} parameter(s) handled by the optimizer are not parameters of the model")


class BlueFogOptimizer(GossipWrapper):
    """:class:`GossipWrapper` with BlueFog's per-step weight attributes and its ``synchronize`` /
    ``skip_synchronize`` pattern. Assigning a weight attribute takes effect at the next
    communication; on an adapt-with-combine optimizer the first assignment also turns the overlap off
    (the combination then starts in ``step()``, once the step's weights are known), so assign them
    on every rank at the same step, as BlueFog's dynamic topologies do."""

    _WEIGHTS = ("self_weight", "src_weights", "dst_weights")
    _MACHINE = ("src_machine_weights", "dst_machine_weights")

    def __init__(self, optimizer, model, communication: str, form: str, k: int, **keywords) -> None:
        _check_model(optimizer, model)
        super().__init__(optimizer, communication, form=form, steps_per_communication=k, **keywords)
        self._bluefog = {name: None for name in (*self._WEIGHTS, *self._MACHINE)}
        self.enable_topo_check = False
        self._skip = False
        models = model if isinstance(model, list | tuple) else [model]
        self._forwards = [0] * len(models)  # forward passes of each model since the last combination
        me = weakref.ref(self)  # the hooks must not keep the optimizer alive

        def counter(index: int):
            def count(module, inputs) -> None:
                found = me()
                if found is not None and module.training:  # as BlueFog: evaluation passes do not count
                    found._forwards[index] += 1
            return count

        self._hooks = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(models)]

    def communicates(self, step: int) -> bool:
        """Whether step ``step`` combines the models. K = 1 (or the gradient allreduce): every step.
        K > 1: this step once every model has run K forward passes since the last combination (or a
        combination already started); a later step is never predicted to (no overlap)."""
        if self.period == 1 or self.communication == "gradient_allreduce":
            return super().communicates(step)
        if step != self.step_count:
            return False
        return self._pending is not None or min(self._forwards) >= self.period

    def _step(self) -> None:
        talked = self.communicates(self.step_count)
        super()._step()
        if talked:
            self._forwards = [0] * len(self._forwards)

    def unregister_window(self) -> None:
        """BlueFog's name for freeing the window-put optimizer's window: :meth:`close` (collective)."""
        self.close()

    def close(self) -> None:
        """Finish the communication in flight, free the window (collective for the window optimizer)
        and remove the forward-pass counters from the model. Idempotent."""
        for hook in self.__dict__.get("_hooks", []):
            hook.remove()
        self._hooks = []
        super().close()

    def __getattr__(self, name: str):
        if name in BlueFogOptimizer._WEIGHTS + BlueFogOptimizer._MACHINE and "_bluefog" in self.__dict__:
            return self.__dict__["_bluefog"][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in BlueFogOptimizer._WEIGHTS + BlueFogOptimizer._MACHINE and "_bluefog" in self.__dict__:
            self._assign(name, value)
        else:
            super().__setattr__(name, value)

    def _assign(self, name: str, value) -> None:
        chosen = self.__dict__["_bluefog"]
        chosen[name] = value
        if self.overlap:  # a combination started at the end of the last step used the old weights
            self.overlap = False
            self.synchronize()
        if self.communication == "hierarchical_neighbor_allreduce":
            self._machine_weights()
            return
        if self.communication in ("allreduce", "empty", "gradient_allreduce") or value is None and \
                all(chosen[w] is None for w in self._WEIGHTS):
            self.weights = None
            return
        self.set_weights(chosen["self_weight"], chosen["src_weights"], chosen["dst_weights"])

    def _machine_weights(self) -> None:
        """Hierarchical averaging with per-step machine weights: a plan of those weights."""
        chosen = self.__dict__["_bluefog"]
        given = [chosen["self_weight"], chosen["src_machine_weights"], chosen["dst_machine_weights"]]
        if any(w is None for w in given):
            self.machine_weights = None
            return
        self.machine_weights = {"self_weight": float(given[0]), "src_machine_weights": dict(given[1]),
                                "dst_machine_weights": given[2]}

    def _start(self, round_: int):
        machine = self.__dict__.get("machine_weights")
        if self.communication == "hierarchical_neighbor_allreduce" and machine:
            import gossip

            return gossip.hierarchical_neighbor_allreduce_async(self.x, **machine, out=self._received)
        return super()._start(round_)

    def synchronize(self) -> None:
        """Finish the communication in flight; for the gradient allreduce, average the gradients now
        (so that they can be clipped before ``with optimizer.skip_synchronize(): optimizer.step()``)."""
        if self.communication == "gradient_allreduce":
            import gossip

            self._collect_gradients()
            self.g.copy_(gossip.allreduce(self.g))
            return
        super().synchronize()

    @contextmanager
    def skip_synchronize(self):
        """Within it, ``step()`` of the gradient-allreduce optimizer does not average the gradients
        again (after an explicit :meth:`synchronize`); for the others it changes nothing."""
        kept = self.communication
        if kept == "gradient_allreduce":
            self.__dict__["communication"] = "empty"
        try:
            yield
        finally:
            self.__dict__["communication"] = kept

    @property
    def communication_type(self) -> CommunicationType | None:
        """The :class:`CommunicationType` (None for the gradient allreduce and window optimizers)."""
        inverse = {v: k for k, v in _COMMUNICATION.items()}
        return inverse.get(self.communication)

    @property
    def force_barrier(self) -> bool:
        """Window optimizer: fold exactly this step's models (barriers around the fold)."""
        return self.barrier

    @force_barrier.setter
    def force_barrier(self, value: bool) -> None:
        self.barrier = bool(value)


def _topology(communication: str):
    if communication == "hierarchical_neighbor_allreduce":
        return {"topology": _basics.applied_machine_topology()}
    return {}


def DistributedAdaptThenCombineOptimizer(optimizer: torch.optim.Optimizer, model,  # noqa: N802 - BlueFog's name
                                         communication_type: CommunicationType = CommunicationType.neighbor_allreduce,
                                         num_steps_per_communication: int = 1) -> BlueFogOptimizer:
    """x ← combine(OPT(x)) at every K-th step: the inner step, then the combination of the models
    (``communication_type``)."""
    communication = _COMMUNICATION[CommunicationType(communication_type)]
    return BlueFogOptimizer(optimizer, model, communication, "atc", num_steps_per_communication,
                            **_topology(communication))


def DistributedAdaptWithCombineOptimizer(optimizer: torch.optim.Optimizer, model,  # noqa: N802
                                         communication_type: CommunicationType = CommunicationType.neighbor_allreduce,
                                         num_steps_per_communication: int = 1) -> BlueFogOptimizer:
    """x ← OPT(combine(x)) at every K-th step, the combination overlapped with forward and backward."""
    communication = _COMMUNICATION[CommunicationType(communication_type)]
    form = "atc" if communication == "empty" else "awc"
    return BlueFogOptimizer(optimizer, model, communication, form, num_steps_per_communication,
                            **_topology(communication))


def DistributedGradientAllreduceOptimizer(optimizer: torch.optim.Optimizer, model,  # noqa: N802
                                          num_steps_per_communication: int = 1) -> BlueFogOptimizer:
    """OPT with the gradient averaged over all ranks at every ``step()`` (Horovod's optimizer). Call
    ``step()`` after the ``num_steps_per_communication`` backward passes whose gradients autograd
    accumulated."""
    return BlueFogOptimizer(optimizer, model, "gradient_allreduce", "atc", 1)


def DistributedWinPutOptimizer(optimizer: torch.optim.Optimizer, model,  # noqa: N802
                               num_steps_per_communication: int = 1, window_prefix: str | None = None
                               ) -> BlueFogOptimizer:
    """At every K-th step: push the model into the out-neighbours' windows (scaled by
    ``dst_weights`` when assigned), fold the buffers with the topology's weights, then OPT.
    ``window_prefix`` is accepted (the window is named by the wrapper)."""
    return BlueFogOptimizer(optimizer, model, "window", "awc", num_steps_per_communication)


def _deprecated(name: str, communication: CommunicationType):
    def build(optimizer: torch.optim.Optimizer, model, num_steps_per_communication: int = 1) -> BlueFogOptimizer:
        warnings.warn(f"{name} is deprecated: use DistributedAdaptWithCombineOptimizer(opt, model, "
                      f"CommunicationType.{communication.name})", PendingDeprecationWarning, stacklevel=2)
        return DistributedAdaptWithCombineOptimizer(optimizer, model, communication, num_steps_per_communication)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"``DistributedAdaptWithCombineOptimizer(optimizer, model, CommunicationType.{communication.name},"
                     " num_steps_per_communication)``, with BlueFog's pending-deprecation warning.")
    return build


DistributedAllreduceOptimizer = _deprecated("DistributedAllreduceOptimizer", CommunicationType.allreduce)
DistributedNeighborAllreduceOptimizer = _deprecated("DistributedNeighborAllreduceOptimizer",
                                                    CommunicationType.neighbor_allreduce)
DistributedHierarchicalNeighborAllreduceOptimizer = _deprecated("DistributedHierarchicalNeighborAllreduceOptimizer",
                                                                CommunicationType.hierarchical_neighbor_allreduce)
