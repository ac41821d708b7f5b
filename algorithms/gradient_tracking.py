"""Gradient tracking (DIGing): each rank tracks the network's average gradient.

Nedić, Olshevsky, Shi, "Achieving Geometric Convergence for Distributed Optimization over
Time-Varying Graphs" (DIGing), SIAM J. Optim. 2017; Qu, Li, "Harnessing Smoothness to Accelerate
Distributed Optimization", IEEE Trans. Control Netw. Syst. 2018:

    x^{k+1} = W x^k − γ y^k ;  y^{k+1} = W y^k + g^{k+1} − g^k ;  y^0 = g^0

x^k and y^k travel in one fused message [x; y] per step. Step k computes y^k from the W y^{k−1}
received at step k−1 and the new gradient g^k, then gossips [x^k; y^k].
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


class GradientTracking(DecentralizedOptimizer):
    """DIGing-style gradient tracking."""

    buffer_names = ("tracker", "mixed_tracker", "previous_gradient")
    sends = "[x; y], the model and the gradient tracker (twice the model's bytes)"

    def __init__(self, params, lr: float, weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)

    def _step(self) -> None:
        g = self.gradient()
        b = self.buffers
        y = b["tracker"]
        if self.fresh:
            y.copy_(g)
        else:
            torch.add(b["mixed_tracker"], g, out=y).sub_(b["previous_gradient"])  # y^k = W y^{k-1} + g^k - g^{k-1}
        b["previous_gradient"].copy_(g)
        mixed_x, mixed_y = self.communicate_together(self.x, y)
        for group, s in self.groups():
            torch.add(mixed_x[s], y[s], alpha=-group["lr"], out=self.x[s])  # x^{k+1} = W x^k - γ y^k
        b["mixed_tracker"].copy_(mixed_y)

    def _recover_state(self, leader: int) -> None:
        """Restart the tracker (:meth:`reset_state`): the failed ranks took their share of Σ_i y_i with
        them, so the survivors' trackers no longer sum to their gradients; the next step sets
        y = g, which restores Σ_i y_i = Σ_i g_i."""
        self.reset_state()
