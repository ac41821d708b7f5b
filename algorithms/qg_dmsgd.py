"""QG-DmSGD: decentralized SGD with quasi-global momentum, heavy-ball or Nesterov.

Lin, Karimireddy, Stich, Jaggi, "Quasi-Global Momentum: Accelerating Decentralized Deep Learning
on Heterogeneous Data", ICML 2021. The momentum is built from the model's actual change across a
step (which includes the neighbours' pull), not from the local gradient alone. With m̂^0 = 0:

    d_i = β m̂_i + g_i                 (heavy ball)   or   d_i = g_i + β(β m̂_i + g_i)  (Nesterov)
    x_i^{k+½} = x_i^k − γ d_i ;  x_i^{k+1} = Gossip(x^{k+½})_i
    m̂_i ← μ m̂_i + (1 − μ)(x_i^k − x_i^{k+1}) / γ

Defaults μ = β = 0.9 (the authors' code, epfml/quasi-global-momentum, sets μ = 0.9 independently
of β, adds weight decay to g first, and gossips only x, as here).
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def qg_direction(m_hat: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool) -> torch.Tensor:
    """d = β m̂ + g, or g + β(β m̂ + g) with Nesterov."""
    heavy_ball = torch.add(g, m_hat, alpha=momentum)
    return torch.add(g, heavy_ball, alpha=momentum) if nesterov else heavy_ball


def qg_momentum_update(m_hat: torch.Tensor, x_old: torch.Tensor, x_new: torch.Tensor, lr: float, mu: float) -> None:
    """m̂ ← μ m̂ + (1 − μ)(x_old − x_new)/γ."""
    m_hat.mul_(mu).add_(torch.sub(x_old, x_new), alpha=(1 - mu) / lr)


class QGDmSGD(DecentralizedOptimizer):
    """Quasi-global momentum; ``mu`` defaults to ``momentum``."""

    buffer_names = ("quasi_global_momentum",)
    sends = "the half-step model x − γd"

    def __init__(self, params, lr: float, momentum: float = 0.9, mu: float | None = None, nesterov: bool = False,
                 weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        mu = momentum if mu is None else mu
        check_rates(lr, momentum, mu=mu)
        super().__init__(params, {"lr": lr, "momentum": momentum, "mu": mu, "nesterov": nesterov,
                                  "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)
        self._half = torch.empty_like(self.x)

    def _step(self) -> None:
        g = self.gradient()
        m_hat = self.buffers["quasi_global_momentum"]
        for group, s in self.groups():
            d = qg_direction(m_hat[s], g[s], group["momentum"], group["nesterov"])
            torch.add(self.x[s], d, alpha=-group["lr"], out=self._half[s])
        mixed = self.communicate(self._half)
        for group, s in self.groups():
            qg_momentum_update(m_hat[s], self.x[s], mixed[s], group["lr"], group["mu"])
        self.x.copy_(mixed)
