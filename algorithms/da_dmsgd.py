"""DA-DmSGD: decentralized momentum SGD that averages both the model and the momentum buffer.

Yu, Jin, Yang, "On the Linear Speedup Analysis of Communication Efficient Momentum SGD for
Distributed Non-Convex Optimization", ICML 2019 (decentralized momentum SGD). With m^0 = 0:

    m_i^{k+½} = β m_i^k + g_i^k ;  x_i^{k+½} = x_i^k − γ m_i^{k+½} ;
    m_i^{k+1} = Gossip(m^{k+½})_i ;  x_i^{k+1} = Gossip(x^{k+½})_i

x and m travel in one fused message [x; m] (twice the model's bytes, one call).
We implement the adapt-then-combine reading above; the combine-first reading (m^{k+1} = β W m^k + g,
x^{k+1} = W x^k − γ m^{k+1}) is ``algorithms.create("awc-dmsgd", ..., share_momentum=True)``, which
also overlaps its message with forward and backward.
"""

from __future__ import annotations

from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.dmsgd import dmsgd_update  # the local half-step m ← β m + g ; x ← x − γ m is DmSGD's


class DADmSGD(DecentralizedOptimizer):
    """Model and momentum both averaged every step, in one fused message."""

    buffer_names = ("momentum_buffer",)
    sends = "[x; m], the model and the momentum (twice the model's bytes)"

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
        mixed_x, mixed_m = self.communicate_together(self.x, m)
        self.x.copy_(mixed_x)
        m.copy_(mixed_m)
