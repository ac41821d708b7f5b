"""DecentLaM: decentralized large-batch momentum SGD without the momentum-induced bias.

Yuan, Chen, Huang, Zhang, Pan, Xu, Yin, "DecentLaM: Decentralized Momentum SGD for Large-batch
Deep Training", ICCV 2021. The update

    x_i^{k+1} = Gossip(x^k − γ g^k)_i + β (x_i^k − x_i^{k−1}),   x^{−1} = x^0,

is run in its exactly equivalent momentum form (m_i^0 = 0), one vector communicated per step:

    x_i^{k+½} = x_i^k − γ g_i^k  (communicated) ;  g̃_i = (x_i^k − Gossip(x^{k+½})_i) / γ ;
    m_i^{k+1} = β m_i^k + g̃_i ;  x_i^{k+1} = x_i^k − γ m_i^{k+1}.

Its bias is O(γ²b²/(1−ρ)²), like DSGD's, while it keeps momentum's speed. With a learning rate
that changes between steps the two forms differ; this is the momentum form.
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def decentlam_update(x: torch.Tensor, m: torch.Tensor, mixed: torch.Tensor, lr: float, momentum: float) -> None:
    """g̃ = (x − mixed)/γ ; m ← β m + g̃ ; x ← x − γ m."""
    m.mul_(momentum).add_(torch.sub(x, mixed).div_(lr))
    x.add_(m, alpha=-lr)


class DecentLaM(DecentralizedOptimizer):
    """DecentLaM in momentum form."""

    buffer_names = ("momentum_buffer",)
    sends = "the half-step model x − γg"

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr, momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)
        self._half = torch.empty_like(self.x)

    def _step(self) -> None:
        g = self.gradient()
        for group, s in self.groups():
            torch.add(self.x[s], g[s], alpha=-group["lr"], out=self._half[s])
        mixed = self.communicate(self._half)
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            decentlam_update(self.x[s], m[s], mixed[s], group["lr"], group["momentum"])
