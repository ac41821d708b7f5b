"""Local SGD / K-step averaging (K-AVG), with the optional warm-up of post-local SGD.

Zhou, Cong, "On the convergence properties of a K-step averaging stochastic gradient descent
algorithm for nonconvex optimization", IJCAI 2018 (K-AVG); Stich, "Local SGD Converges
Fast and Communicates Little", ICLR 2019; Lin, Stich, Patel, Jaggi, "Don't Use Large Mini-Batches,
Use Local SGD", ICLR 2020 (post-local SGD). Every rank takes local (momentum) SGD steps

    m_i ← β m_i + g_i ;  x_i ← x_i − γ m_i      (Nesterov: x_i ← x_i − γ (g_i + β m_i); β = 0: plain SGD)

and every K-th step ends with the exact average x_i ← (1/n) Σ_j x_j (one allreduce of the fused
model); every learner restarts from it. Momentum buffers stay local. The communication is a
schedule, :class:`gossip.plan.schedule.PeriodicGlobalAverage` over :class:`NoCommunication`: local steps
cost no communication at all. ``warmup_steps`` = s averages after each of the first s steps, which
is mini-batch SGD: the mean of local heavy-ball buffers follows m̄ ← β m̄ + ḡ, so the averaged
models follow PmSGD exactly. ``period=None`` never averages (the base of SlowMo, BMUF and MAVG,
whose outer loop does).
"""

from __future__ import annotations

from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.pmsgd import pmsgd_update
from gossip.plan.schedule import NoCommunication, PeriodicGlobalAverage


class LocalSGD(DecentralizedOptimizer):
    """K local (momentum) SGD steps between exact averages of the models."""

    buffer_names = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 period: int | None = 8, warmup_steps: int = 0) -> None:
        check_rates(lr, momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov},
                         schedule=PeriodicGlobalAverage(NoCommunication(), period, warmup_steps))
        self.period = period

    def _step(self) -> None:
        g = self.gradient()
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            pmsgd_update(self.x[s], m[s], g[s], group["lr"], group["momentum"], group["nesterov"])
        self.mix_in_place(self.x)
