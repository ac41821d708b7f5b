"""DmSGD: decentralized SGD with local heavy-ball momentum, adapt-then-combine.

As stated in Yuan, Chen, Huang, Zhang, Pan, Xu, Yin, "DecentLaM: Decentralized Momentum SGD for
Large-batch Deep Training", ICCV 2021 (the DmSGD baseline there). With m_i^0 = 0:

    m_i^{k+1} = β m_i^k + g_i^k ;  x_i^{k+½} = x_i^k − γ m_i^{k+1} ;  x_i^{k+1} = Gossip(x^{k+½})

β = 0 is DSGD-ATC. Its inconsistency bias is O(γ²b²/((1−β)²(1−ρ)²)): momentum amplifies the
bias of heterogeneous data by 1/(1−β)² (see DecentLaM).
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def dmsgd_update(x: torch.Tensor, m: torch.Tensor, g: torch.Tensor, lr: float, momentum: float) -> None:
    """m ← β m + g ; x ← x − γ m (the caller then gossips x)."""
    m.mul_(momentum).add_(g)
    x.add_(m, alpha=-lr)


class DmSGD(DecentralizedOptimizer):
    """Decentralized momentum SGD (ATC)."""

    buffer_names = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr, momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)

    def _step(self) -> None:
        g = self.gradient()
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            dmsgd_update(self.x[s], m[s], g[s], group["lr"], group["momentum"])
        self.mix_in_place(self.x)
