"""Outer loops over a base optimizer: SlowMo, BMUF and MAVG.

Every ``period`` = τ steps of a base optimizer (any registered one: local SGD, DSGD, DmSGD,
DecentLaM, SGP, PmSGD, ...), the models are averaged exactly and an outer momentum step moves the
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
  w_{t+1} + η Δ_{t+1} (``block_nesterov=True``, Nesterov block momentum). [confirm] The Nesterov form
  follows our reading of Chen & Huo (the block update is measured from the global model w_t, not
  from the look-ahead point); the paper body was not available to check.

* **MAVG** (Cong, Liu, "Accelerate Distributed Stochastic Descent for Nonconvex Optimization with
  Momentum", MLHPC @ SC 2020; seed 000): classic BMUF with ζ = 1 over plain local SGD, momentum μ:
  d = a − w̃ ; v ← μ v + d ; w̃ ← w̃ + v.

Here ζ and α are both ``slow_lr`` and η, β and μ all ``slow_momentum``. With a constant γ the
SlowMo recursion is BMUF's (v = −α γ u), so SlowMo over local SGD with α = 1, β = μ is MAVG, and
α = 1, β = 0 gives back the base algorithm (x_{t+1,0} = x̄).

The exact average is the plan of a :class:`gossip.schedule.PeriodicGlobalAverage` schedule (one
allreduce of the fused model every τ steps, nothing in between); the base runs its own schedule.
Over local SGD the base is built with ``period=None``, so the outer average is the only
communication. Over PmSGD the models are already equal and the average is skipped. Base-optimizer
buffers at the end of a round (``base_buffers``): ``"maintain"`` (keep, fairscale's choice; the
default), ``"reset"`` (restart the base's recursion from x_{t+1,0}) or ``"average"`` (the exact
average of each buffer, in one message).
"""

from __future__ import annotations

from typing import Any

import torch

import gossip
from algorithms.base import DecentralizedOptimizer
from gossip.schedule import AllreduceSchedule, NoCommunication, PeriodicGlobalAverage

BASE_BUFFERS = ("maintain", "reset", "average")


class OuterMomentum(torch.optim.Optimizer):
    """A base optimizer whose rounds of ``period`` steps end with an exact average and an outer
    momentum step; ``lr_scaled`` picks SlowMo's units (u in gradient units, divided by γ_t) over
    BMUF's (Δ in model units). Built by :class:`SlowMo`, :class:`BMUF` and :class:`MAVG`."""

    lr_scaled = True

    def __init__(self, params, lr: float, *, base: str, period: int, slow_lr: float, slow_momentum: float,
                 block_nesterov: bool = False, base_buffers: str = "maintain", **base_hyper) -> None:
        from algorithms.registry import OUTER, create

        if base in OUTER:
            raise ValueError(f"the base optimizer must be a single-level algorithm, not {base!r}")
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not slow_lr > 0 or not 0 <= slow_momentum < 1:
            raise ValueError(f"need slow_lr > 0 and slow_momentum in [0, 1), got {slow_lr} and {slow_momentum}")
        if base_buffers not in BASE_BUFFERS:
            raise ValueError(f"base_buffers must be one of {', '.join(BASE_BUFFERS)}, got {base_buffers!r}")
        if base == "local-sgd":
            base_hyper.setdefault("period", None)  # the outer loop does the averaging
        self.base: DecentralizedOptimizer = create(base, params, lr=lr, **base_hyper)
        super().__init__(self.base.param_groups, {})
        self.param_groups = self.base.param_groups  # one set of groups: LR schedulers drive the base
        self.base_name, self.period, self.base_buffers = base, period, base_buffers
        self.slow_lr, self.slow_momentum, self.block_nesterov = slow_lr, slow_momentum, block_nesterov
        self.outer = PeriodicGlobalAverage(NoCommunication(), period)
        self._models_equal = isinstance(self.base.schedule, AllreduceSchedule)
        x = self.base.x
        self.slow_start = x.detach().clone()  # x_{t,0} (SlowMo) or the global model w_t (BMUF)
        self.slow_momentum_buffer = torch.zeros_like(x)  # u_t (SlowMo) or Δ_t (BMUF)
        self._average = torch.empty_like(x)

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

    def synchronize(self) -> None:
        self.base.synchronize()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def describe(self) -> str:
        base = f"{self.base_name} ({self.base.schedule.describe()})"
        return f"{type(self).__name__} every {self.period} steps over {base}"

    # --- the step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One base step; at the end of a round, the exact average and the outer momentum step."""
        loss = self.base.step(closure)
        if self.outer.averages(self.base.step_count - 1):
            self._end_round()
        return loss

    def _end_round(self) -> None:
        base = self.base
        base.synchronize()
        if self._models_equal:
            average = base.x
        else:
            average = self.outer.plan(base.step_count - 1).start(base.x, self._average).wait()
        start, u = self.slow_start, self.slow_momentum_buffer
        for group, s in base.groups():
            if self.lr_scaled:  # u ← β u + (x0 − x̄)/γ ; x0 ← x0 − α γ u
                u[s].mul_(self.slow_momentum).add_(start[s] - average[s], alpha=1.0 / group["lr"])
                start[s].add_(u[s], alpha=-self.slow_lr * group["lr"])
            else:  # Δ ← η Δ + ζ (x̄ − w) ; w ← w + Δ
                u[s].mul_(self.slow_momentum).add_(average[s] - start[s], alpha=self.slow_lr)
                start[s].add_(u[s])
        if self.base_buffers == "average" and base.buffers:
            names = sorted(base.buffers)
            parts = [base.buffers[name] for name in names]
            message, received = base.pack(*parts)
            means = self.outer.plan(base.step_count - 1).start(message, received).wait()
            for part, mean in zip(parts, means.split([p.numel() for p in parts]), strict=True):
                part.copy_(mean)
        if self.block_nesterov:
            base.set_parameters(torch.add(start, u, alpha=self.slow_momentum, out=self._average))
        else:
            base.set_parameters(start)
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


class SlowMo(OuterMomentum):
    """SlowMo: slow lr α, slow momentum β, period τ over any base optimizer (module docstring)."""

    def __init__(self, params, lr: float, base: str = "local-sgd", period: int = 48, slow_lr: float = 1.0,
                 slow_momentum: float = 0.5, base_buffers: str = "maintain", **base_hyper) -> None:
        super().__init__(params, lr, base=base, period=period, slow_lr=slow_lr, slow_momentum=slow_momentum,
                         base_buffers=base_buffers, **base_hyper)


class BMUF(OuterMomentum):
    """BMUF: block lr ζ (``slow_lr``), block momentum η (``slow_momentum``, default 1 − 1/n as Chen &
    Huo recommend), classic or Nesterov block momentum, period τ over any base optimizer."""

    lr_scaled = False

    def __init__(self, params, lr: float, base: str = "local-sgd", period: int = 16, slow_lr: float = 1.0,
                 slow_momentum: float | None = None, block_nesterov: bool = False, base_buffers: str = "maintain",
                 **base_hyper) -> None:
        if slow_momentum is None:
            slow_momentum = 1.0 - 1.0 / gossip.size()
        super().__init__(params, lr, base=base, period=period, slow_lr=slow_lr, slow_momentum=slow_momentum,
                         block_nesterov=block_nesterov, base_buffers=base_buffers, **base_hyper)


class MAVG(OuterMomentum):
    """MAVG: K steps of plain local SGD, then the meta momentum step with μ = ``slow_momentum``."""

    lr_scaled = False

    def __init__(self, params, lr: float, period: int = 4, slow_momentum: float = 0.5, weight_decay: float = 0.0,
                 topology=None) -> None:
        if topology not in (None, "none"):
            raise ValueError("mavg runs plain local SGD between averages and does not gossip; drop `topology`")
        super().__init__(params, lr, base="local-sgd", period=period, slow_lr=1.0, slow_momentum=slow_momentum,
                         weight_decay=weight_decay)
