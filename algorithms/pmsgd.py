"""PmSGD: parallel momentum SGD over an allreduce of gradients (what DDP and Horovod do).

    ḡ = (1/n) Σ_j g_j ;  m ← β m + ḡ ;  x ← x − γ m   (m^0 = 0; Nesterov: x ← x − γ(ḡ + β m))

The baseline every decentralized method is compared with, synchronous data-parallel SGD as in Goyal,
Dollár, Girshick, Noordhuis, Wesolowski, Kyrola, Tulloch, Jia, He, "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour", arXiv 1706.02677, 2017: one allreduce of the fused gradient per
step; all ranks stay identical. Weight decay is added to each rank's gradient before averaging.

With ``lars=True`` (You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
arXiv 1708.03888, 2017) the raw gradients are averaged and each parameter tensor (layer) ℓ gets the
trust ratio ``τ_ℓ = η ‖x_ℓ‖ / (‖ḡ_ℓ‖ + wd ‖x_ℓ‖)`` (1 when either norm is 0):
``d_ℓ = τ_ℓ (ḡ_ℓ + wd x_ℓ)`` replaces ḡ in the momentum step above. η is ``trust_coefficient``.
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def pmsgd_update(x: torch.Tensor, m: torch.Tensor, g_mean: torch.Tensor, lr: float, momentum: float,
                 nesterov: bool) -> None:
    """m ← β m + ḡ ; x ← x − γ m (or x − γ(ḡ + β m) with Nesterov)."""
    m.mul_(momentum).add_(g_mean)
    if nesterov:
        x.add_(torch.add(g_mean, m, alpha=momentum), alpha=-lr)
    else:
        x.add_(m, alpha=-lr)


def lars_direction(params: list[torch.Tensor], grads: list[torch.Tensor], out: list[torch.Tensor],
                   weight_decay: float, trust_coefficient: float) -> None:
    """out_ℓ = τ_ℓ (g_ℓ + wd x_ℓ) with τ_ℓ = η‖x_ℓ‖/(‖g_ℓ‖ + wd‖x_ℓ‖), layer by layer."""
    param_norms = torch._foreach_norm(params)
    grad_norms = torch._foreach_norm(grads)
    for x, g, o, xn, gn in zip(params, grads, out, param_norms, grad_norms, strict=True):
        denominator = gn + weight_decay * xn
        trust = torch.where((xn > 0) & (denominator > 0), trust_coefficient * xn / denominator, torch.ones_like(xn))
        torch.add(g, x, alpha=weight_decay, out=o).mul_(trust)


class PmSGD(DecentralizedOptimizer):
    """Parallel momentum SGD: allreduce of gradients, then momentum SGD (the schedule is allreduce)."""

    buffer_names = ("momentum_buffer",)
    sends = "the gradient"

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False, lars: bool = False, trust_coefficient: float = 0.001) -> None:
        check_rates(lr, momentum)
        if lars and trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be positive, got {trust_coefficient}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "nesterov": nesterov, "lars": lars, "trust_coefficient": trust_coefficient},
                         topology="allreduce")
        offsets = self._buffer.offsets
        layers = list(zip(offsets[:-1], offsets[1:], strict=True))
        self._group_layers = [[(a, b) for a, b in layers if s.start <= a < s.stop] for _, s in self.groups()]
        self._direction = torch.empty_like(self.x) if lars else None

    def _step(self) -> None:
        lars = any(group["lars"] for group in self.param_groups)
        if lars:
            self._collect_gradients()
        g_mean = self.communicate(self.g if lars else self.gradient())  # LARS averages the raw gradients
        if lars:
            if self._direction is None:
                self._direction = torch.empty_like(self.x)
            direction = self._direction
            for (group, s), layers in zip(self.groups(), self._group_layers, strict=True):
                if group["lars"]:
                    lars_direction([self.x[a:b] for a, b in layers], [g_mean[a:b] for a, b in layers],
                                   [direction[a:b] for a, b in layers], group["weight_decay"],
                                   group["trust_coefficient"])
                else:
                    torch.add(g_mean[s], self.x[s], alpha=group["weight_decay"], out=direction[s])
            g_mean = direction
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            pmsgd_update(self.x[s], m[s], g_mean[s], group["lr"], group["momentum"], group["nesterov"])

    def _recover_state(self, leader: int) -> None:
        """Every rank must hold the same model and momentum: the most advanced survivor's (an allreduce
        interrupted by the failure may have completed on some survivors only)."""
        self._adopt(leader, self.x, *self.buffers.values())
