"""Decentralized SGD, adapt-then-combine (ATC) and adapt-while-combine (AWC).

Lian, Zhang, Zhang, Hsieh, Zhang, Liu, "Can Decentralized Algorithms Outperform Centralized
Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017.
With g_i^k = ∇F(x_i^k; ξ_i^k) + wd·x_i^k and Gossip(v)_i = Σ_j w_ij v_j:

* ATC:  x_i^{k+½} = x_i^k − γ g_i^k ;  x_i^{k+1} = Gossip(x^{k+½})
* AWC:  x_i^{k+1} = Gossip(x^k) − γ g_i^k

AWC's communication of x^k does not depend on the gradient: it is started at the end of step k−1
(at the first ``step()`` for k = 0) and runs while the next forward and backward compute; do not
modify the parameters between steps while it is in flight (load checkpoints before the first
step, or call :meth:`DSGD.synchronize` first).
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def dsgd_atc(x: torch.Tensor, g: torch.Tensor, lr: float) -> None:
    """x ← x − γ g (the half step; the caller then gossips x)."""
    x.add_(g, alpha=-lr)


def dsgd_awc(x: torch.Tensor, mixed: torch.Tensor, g: torch.Tensor, lr: float) -> None:
    """x ← Gossip(x) − γ g."""
    torch.add(mixed, g, alpha=-lr, out=x)


class DSGD(DecentralizedOptimizer):
    """Decentralized SGD: ``form="atc"`` (default) or ``"awc"`` (communication overlapped)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, form: str = "atc", overlap: bool = True,
                 topology=None,
                 global_avg_every: int | None = None) -> None:
        if form not in ("atc", "awc"):
            raise ValueError(f"form must be 'atc' or 'awc', got {form!r}")
        check_rates(lr)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)
        self.form = form
        self.overlap = overlap and form == "awc"  # start the next step's gossip at the end of this one

    def _step(self) -> None:
        g = self.gradient()
        if self.form == "atc":
            for group, s in self.groups():
                dsgd_atc(self.x[s], g[s], group["lr"])
            self.mix_in_place(self.x)
            return
        mixed = self.mixed_parameters()
        for group, s in self.groups():
            dsgd_awc(self.x[s], mixed[s], g[s], group["lr"])
        self.start_next_mix()
