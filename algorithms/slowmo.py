"""Outer loops over a base optimizer: SlowMo, BMUF and MAVG.

Every ``period`` = τ steps of a base optimizer (a built, single-level synchronous one: local SGD,
DSGD, DmSGD, DecentLaM, SGP, PmSGD, ...), the models are averaged exactly and an outer momentum step moves the
common starting point of the next round. With x_{t,0} that starting point (equal on all ranks,
x_{0,0} = x⁰), x̄ = (1/n) Σ_i x_i^{(t,τ)} the exact average after the round and γ_t the base's
(fast) learning rate at the end of the round:

* **SlowMo** (Wang, Tantia, Ballas, Rabbat, "SlowMo: Improving Communication-Efficient
  Distributed SGD with Slow Momentum", ICLR 2020), slow lr α, slow momentum β, u_0 = 0:

      u_{t+1} = β u_t + (x_{t,0} − x̄) / γ_t ;  x_{t+1,0} = x_{t,0} − α γ_t u_{t+1}

* **BMUF** (Chen, Huo, "Scalable training of deep learning machines by incremental block training
  with intra-block parallel optimization and blockwise model-update filtering", ICASSP 2016),
  block lr ζ, block momentum η, Δ_0 = 0, global model w_0 = x⁰:

      Δ_{t+1} = η Δ_t + ζ (x̄ − w_t) ;  w_{t+1} = w_t + Δ_{t+1}

  and the next round starts from x_{t+1,0} = w_{t+1} (classic block momentum) or from
  w_{t+1} + η Δ_{t+1} (``block_nesterov=True``, Nesterov block momentum). In the Nesterov form we
  measure the block update from the global model w_t, not from the look-ahead point: that is our
  reading of Chen & Huo.

* **MAVG** (Cong, Liu, "Accelerate Distributed Stochastic Descent for Nonconvex Optimization with
  Momentum", MLHPC workshop at SC 2020): classic BMUF with ζ = 1 over plain local SGD, momentum μ:
  d = a − w̃ ; v ← μ v + d ; w̃ ← w̃ + v.

Here ζ and α are both ``slow_lr`` and η, β and μ all ``slow_momentum``. With a constant γ the
SlowMo recursion is BMUF's (v = −α γ u), so SlowMo over local SGD with α = 1, β = μ is MAVG, and
α = 1, β = 0 gives back the base algorithm (x_{t+1,0} = x̄).

The exact average is the plan of a :class:`gossip.plan.schedule.PeriodicGlobalAverage` schedule (one
allreduce of the fused model every τ steps, nothing in between); the base runs its own schedule.
SlowMo and BMUF wrap a base *instance*::

    opt = SlowMo(DSGD(model.parameters(), lr=0.1, topology=ring), period=12)
    opt = algorithms.create("slowmo", model.parameters(), base="dsgd", lr=0.1, topology=ring, period=12)  # the same

Local SGD as a base is built with ``period=None`` (``create`` does so), so the outer average is the
only communication. Over PmSGD the models are already equal and the average is skipped. Base-optimizer
buffers at the end of a round (``base_buffers``): ``"maintain"`` (keep, fairscale's choice; the
default), ``"reset"`` (restart the base's recursion from x_{t+1,0}) or ``"average"`` (the exact
average of each buffer, in one message).
"""

from __future__ import annotations

from typing import Any

import torch

import gossip
from algorithms.base import DecentralizedOptimizer, describe_schedule
from algorithms.local_sgd import LocalSGD
from gossip.plan.schedule import AllreduceSchedule, NoCommunication, PeriodicGlobalAverage

BASE_BUFFERS = ("maintain", "reset", "average")


class OuterMomentum(torch.optim.Optimizer):
    """A base optimizer instance whose rounds of ``period`` steps end with an exact average and an
    outer momentum step; ``lr_scaled`` picks SlowMo's units (u in gradient units, divided by γ_t) over
    BMUF's (Δ in model units). Built by :class:`SlowMo`, :class:`BMUF` and :class:`MAVG`.

    The base is a single-level synchronous optimizer (any :class:`DecentralizedOptimizer` whose
    ``usable_as_base`` is true) over the model's parameters; this optimizer shares its parameter
    groups (LR schedulers drive the base) and steps it. A base that averages by itself (local SGD
    with a ``period``) keeps doing so: build it with ``period=None``.
    """

    lr_scaled = True
    usable_as_base = False  # no outer loop over an outer loop
    batch_sizes = None

    def __init__(self, base: DecentralizedOptimizer, *, period: int, slow_lr: float, slow_momentum: float,
                 block_nesterov: bool = False, base_buffers: str = "maintain") -> None:
        if not isinstance(base, DecentralizedOptimizer) or not base.usable_as_base:
            raise ValueError(f"the base optimizer must be a single-level algorithm (a synchronous "
                             f"DecentralizedOptimizer), not {type(base).__name__}")
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not slow_lr > 0 or not 0 <= slow_momentum < 1:
            raise ValueError(f"need slow_lr > 0 and slow_momentum in [0, 1), got {slow_lr} and {slow_momentum}")
        if base_buffers not in BASE_BUFFERS:
            raise ValueError(f"base_buffers must be one of {', '.join(BASE_BUFFERS)}, got {base_buffers!r}")
        self.base = base
        super().__init__(base.param_groups, {})
        self.param_groups = base.param_groups  # one set of groups: LR schedulers drive the base
        self.period, self.base_buffers = period, base_buffers
        self.slow_lr, self.slow_momentum, self.block_nesterov = slow_lr, slow_momentum, block_nesterov
        self.outer = PeriodicGlobalAverage(NoCommunication(), period)
        self._models_equal = isinstance(base.schedule, AllreduceSchedule)
        x = base.x
        self.slow_start = x.detach().clone()  # x_{t,0} (SlowMo) or the global model w_t (BMUF)
        self.slow_momentum_buffer = torch.zeros_like(x)  # u_t (SlowMo) or Δ_t (BMUF)
        self._average = torch.empty_like(x)
        self.rounds = 0  # rounds ended on this rank (the outer steps taken)
        base._stop_listening()  # this loop adapts the base itself, first, after a recovery
        self._stop_listening = gossip.on_recover(self.after_recovery)

    # --- the base's tensors and services, for training loops ------------------------------------

    @property
    def x(self) -> torch.Tensor:
        return self.base.x

    @property
    def g(self) -> torch.Tensor:
        return self.base.g

    @property
    def step_count(self) -> int:
        return self.base.step_count

    @property
    def schedule(self):
        return self.base.schedule

    @property
    def unusable(self) -> str | None:
        """Why the optimizer cannot step after a recovery (None: it can): the base's reason."""
        return self.base.unusable

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    # --- lifecycle -------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: the outer loop's communication and the base's."""
        name = type(self).__name__
        if self._models_equal:
            outer = f"{name}: every {self.period} steps an outer momentum step (no average: the models are equal)"
        else:
            outer = f"{name}: an exact average of the model every {self.period} steps, then an outer momentum step"
        if describe_schedule(self.base.schedule) == "nothing":
            return f"{outer}; nothing in between (local steps)"
        return f"{outer}; in between, {self.base.describe()}"

    def synchronize(self) -> None:
        """Finish the base's communication in flight."""
        self.base.synchronize()

    def close(self) -> None:
        """Finish the base's communication in flight and free what it owns. Idempotent."""
        self._stop_listening()
        self.base.close()

    @torch.no_grad()
    def after_recovery(self, record: gossip.Recovery) -> None:
        """Continue on the survivors of a rank failure (called by :func:`gossip.recover` on every
        survivor; collective). The base adapts first (:meth:`DecentralizedOptimizer.after_recovery`:
        its step count is then the survivors' largest). The outer state, which must be equal on
        every rank, becomes that of the survivor that ended the most rounds (broadcast); a survivor
        that missed the end of the last round (the failure struck during its exact average) starts
        the next round from the agreed point, as the others did. If no survivor ended the round
        that the agreed step count has finished, it ends now, on the survivors: their exact average
        and the outer momentum step.
        """
        base = self.base
        base.after_recovery(record)
        self._average = torch.empty_like(base.x)  # a request of the failed job may still write into the old one
        everyone = gossip.allgather(torch.tensor([self.rounds], dtype=torch.int64))
        ended = int(everyone.max())
        leader = int((everyone == ended).nonzero()[0, 0])
        message, _ = base.pack(self.slow_start, self.slow_momentum_buffer)
        start, momentum = gossip.broadcast(message, root=leader).split(base.x.numel())
        self.slow_start.copy_(start)
        self.slow_momentum_buffer.copy_(momentum)
        if self.rounds < ended:
            self._start_round()
        self.rounds = ended
        if ended < self.outer.averages_before(base.step_count):
            self._end_round()

    # --- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One base step; at the end of a round, the exact average and the outer momentum step."""
        loss = self.base.step(closure)
        if self.outer.averages(self.base.step_count - 1):
            self._end_round()
        return loss

    def _end_round(self) -> None:
        """The exact average and the outer momentum step. Both averages come first, so that a rank
        failure during them leaves the outer state as it was (the round not ended on this rank)."""
        base = self.base
        base.synchronize()
        plan = self.outer.plan(base.step_count - 1)
        average = base.x if self._models_equal else plan.start(base.x, self._average).wait()
        parts, means = [], []
        if self.base_buffers == "average" and base.buffers:
            parts = [base.buffers[name] for name in sorted(base.buffers)]
            message, received = base.pack(*parts)
            means = plan.start(message, received).wait().split([p.numel() for p in parts])
        start, u = self.slow_start, self.slow_momentum_buffer
        for group, s in base.groups():
            if self.lr_scaled:  # u ← β u + (x0 − x̄)/γ ; x0 ← x0 − α γ u
                u[s].mul_(self.slow_momentum).add_(start[s] - average[s], alpha=1.0 / group["lr"])
                start[s].add_(u[s], alpha=-self.slow_lr * group["lr"])
            else:  # Δ ← η Δ + ζ (x̄ − w) ; w ← w + Δ
                u[s].mul_(self.slow_momentum).add_(average[s] - start[s], alpha=self.slow_lr)
                start[s].add_(u[s])
        for part, mean in zip(parts, means, strict=True):
            part.copy_(mean)
        self._start_round()
        self.rounds += 1

    def _start_round(self) -> None:
        """Every rank restarts from the outer loop's point: x_{t+1,0} (or BMUF's Nesterov look-ahead)."""
        base = self.base
        if self.block_nesterov:
            base.set_parameters(torch.add(self.slow_start, self.slow_momentum_buffer, alpha=self.slow_momentum,
                                          out=self._average))
        else:
            base.set_parameters(self.slow_start)
        if self.base_buffers == "reset":
            base.reset_state()

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(),
                "outer": {"start": self.slow_start.clone(), "momentum": self.slow_momentum_buffer.clone()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "outer" not in state_dict or "base" not in state_dict:
            raise ValueError("not an outer-momentum optimizer's state_dict: 'base' or 'outer' is missing")
        self.base.load_state_dict(state_dict["base"])
        for name, tensor in (("start", self.slow_start), ("momentum", self.slow_momentum_buffer)):
            saved = state_dict["outer"][name]
            if saved.shape != tensor.shape:
                raise ValueError(f"outer {name!r} has {saved.numel()} elements, the parameters {tensor.numel()}")
            tensor.copy_(saved)
        self.rounds = self.outer.averages_before(self.base.step_count)


class SlowMo(OuterMomentum):
    """SlowMo over ``base`` (a built optimizer): slow lr α, slow momentum β, period τ (module docstring)."""

    def __init__(self, base: DecentralizedOptimizer, period: int = 48, slow_lr: float = 1.0,
                 slow_momentum: float = 0.5, base_buffers: str = "maintain") -> None:
        super().__init__(base, period=period, slow_lr=slow_lr, slow_momentum=slow_momentum, base_buffers=base_buffers)


class BMUF(OuterMomentum):
    """BMUF over ``base`` (a built optimizer): block lr ζ (``slow_lr``), block momentum η
    (``slow_momentum``, default 1 − 1/n as Chen & Huo recommend), classic or Nesterov block momentum,
    period τ."""

    lr_scaled = False

    def __init__(self, base: DecentralizedOptimizer, period: int = 16, slow_lr: float = 1.0,
                 slow_momentum: float | None = None, block_nesterov: bool = False,
                 base_buffers: str = "maintain") -> None:
        if slow_momentum is None:
            slow_momentum = 1.0 - 1.0 / gossip.size()
        super().__init__(base, period=period, slow_lr=slow_lr, slow_momentum=slow_momentum,
                         block_nesterov=block_nesterov, base_buffers=base_buffers)


class MAVG(OuterMomentum):
    """MAVG: K steps of plain local SGD (built here over ``params``), then the meta momentum step
    with μ = ``slow_momentum``: BMUF with ζ = 1 over :class:`LocalSGD` without momentum."""

    lr_scaled = False

    def __init__(self, params, lr: float, period: int = 4, slow_momentum: float = 0.5,
                 weight_decay: float = 0.0) -> None:
        super().__init__(LocalSGD(params, lr, weight_decay=weight_decay, period=None), period=period, slow_lr=1.0,
                         slow_momentum=slow_momentum)
