"""Stochastic gradient push (SGP): push-sum gossip SGD for directed, possibly time-varying graphs.

Assran, Loizou, Ballas, Rabbat, "Stochastic Gradient Push for Distributed Deep Learning", ICML
2019. With a column-stochastic P(k) (each rank splits its numerator and mass among itself and the
ranks it sends to), numerators x_i^0 = z_i^0, masses w_i^0 = 1:

    x_i^{k+½} = x_i^k − γ ∇F_i(z_i^k) ;  x_i^{k+1} = Σ_j p_ij x_j^{k+½} ;  w_i^{k+1} = Σ_j p_ij w_j^k ;
    z_i^{k+1} = x_i^{k+1} / w_i^{k+1}

The model's parameters hold the de-biased z (gradients are taken there); the numerator and the
mass travel in one fused message [x; w]. Senders' shares are applied as ``dst_weights`` by
:class:`gossip.plan.schedule.PushSumSchedule`. ``momentum > 0`` adds local heavy-ball momentum to the
gradient step (m ← β m + g; x ← x − γ m), as the paper's experiments do.
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.base import DecentralizedOptimizer, check_rates
from gossip.plan.schedule import PeriodicGlobalAverage, PushSumSchedule


class SGP(DecentralizedOptimizer):
    """Push-sum SGD. ``topology`` as for every optimizer; its edges (not weights) are used."""

    buffer_names = ("numerator", "momentum_buffer")
    sends = "[x; w], the push-sum numerator and its mass"

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr, momentum)
        schedule = PushSumSchedule(topology)
        if global_avg_every is not None:
            schedule = PeriodicGlobalAverage(schedule, global_avg_every)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}, schedule=schedule)
        self.buffers["numerator"].copy_(self.x)
        self._mass = torch.ones(1, dtype=self.x.dtype, device=self.x.device)  # w_i, sent with the numerator

    @property
    def mass(self) -> float:
        """This rank's push-sum weight w_i."""
        return float(self._mass)

    def _step(self) -> None:
        g = self.gradient()
        numerator, m = self.buffers["numerator"], self.buffers["momentum_buffer"]
        for group, s in self.groups():
            if group["momentum"]:
                m[s].mul_(group["momentum"]).add_(g[s])
                numerator[s].add_(m[s], alpha=-group["lr"])
            else:
                numerator[s].add_(g[s], alpha=-group["lr"])
        mixed_numerator, mixed_mass = self.communicate_together(numerator, self._mass)
        numerator.copy_(mixed_numerator)
        self._mass.copy_(mixed_mass)
        torch.div(numerator, self._mass, out=self.x)  # z = x / w: what the model computes with

    def set_parameters(self, values: torch.Tensor) -> None:
        """z = values on every rank: push-sum restarts from numerator = values, mass = 1 (the masses
        still sum to n, so nothing is lost)."""
        super().set_parameters(values)
        self.buffers["numerator"].copy_(values)
        self._mass.fill_(1.0)

    def _recover_state(self, leader: int) -> None:
        """Push-sum restarts on the survivors from each rank's de-biased estimate: z = numerator / mass
        (with the local gradient step of a step interrupted by the failure), numerator = z, mass 1, so
        the masses sum to the new number of ranks. The momentum is kept."""
        torch.div(self.buffers["numerator"], self._mass, out=self.x)
        self.buffers["numerator"].copy_(self.x)
        self._mass.fill_(1.0)

    def reset_state(self) -> None:
        """Zero the momentum; numerator = z, mass = 1."""
        super().reset_state()
        self.buffers["numerator"].copy_(self.x)
        self._mass.fill_(1.0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["decentralized"]["mass"] = self.mass
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mass = state_dict["decentralized"]["mass"]
        super().load_state_dict(state_dict)
        self._mass.fill_(mass)
