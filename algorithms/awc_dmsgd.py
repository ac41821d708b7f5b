"""AWC-DmSGD: decentralized momentum SGD, adapt-while-combine (communication overlapped).

The momentum form of DSGD-AWC, as in the comparison of Yuan, Chen, Huang, Zhang, Pan, Xu, Yin,
"DecentLaM: Decentralized Momentum SGD for Large-batch Deep Training", ICCV 2021, with m^0 = 0:

    m_i^{k+1} = β m_i^k + g_i^k ;  x_i^{k+1} = Gossip(x^k)_i − γ m_i^{k+1}

``share_momentum=True`` gossips the momentum as well, as agents do in Balu, Jiang, Tan, Hegde, Lee,
Sarkar, "Decentralized Deep Learning using Momentum-Accelerated Consensus", ICASSP 2021, with
[x^k; m^k] sent as one message:

    m_i^{k+1} = β Gossip(m^k)_i + g_i^k ;  x_i^{k+1} = Gossip(x^k)_i − γ m_i^{k+1}

This is the plain combine-both form, without any further weighting of the two terms Balu et al.
may apply; it is also the combine-first reading of Yu, Jin, Yang (ICML 2019), see
:mod:`algorithms.da_dmsgd`. The default gossips the model only.

Gossip(x^k) (and m^k) do not depend on the gradient: the message starts at the end of step k−1 and
overlaps the forward and backward of step k (see :class:`algorithms.dsgd.DSGD` for the rules while it
is in flight).
"""

from __future__ import annotations

import torch

from algorithms.base import DecentralizedOptimizer, check_rates


def awc_dmsgd_update(x: torch.Tensor, m: torch.Tensor, mixed: torch.Tensor, g: torch.Tensor, lr: float,
                     momentum: float, mixed_m: torch.Tensor | None = None) -> None:
    """m ← β m + g (β Gossip(m) + g when the momentum is shared) ; x ← Gossip(x) − γ m."""
    torch.add(g, m if mixed_m is None else mixed_m, alpha=momentum, out=m)
    torch.add(mixed, m, alpha=-lr, out=x)


class AWCDmSGD(DecentralizedOptimizer):
    """Adapt-while-combine decentralized momentum SGD."""

    buffer_names = ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, overlap: bool = True,
                 share_momentum: bool = False, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr, momentum)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)
        self.overlap = overlap
        self.share_momentum = share_momentum

    @property
    def sends(self) -> str:
        return "[x; m], the model and the momentum (twice the model's bytes)" if self.share_momentum else "the model"

    def _mix_message(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.share_momentum:
            return self.pack(self.x, self.buffers["momentum_buffer"])
        return super()._mix_message()

    def _step(self) -> None:
        g = self.gradient()
        mixed = self.mixed_parameters()
        mixed_m = None
        if self.share_momentum:
            mixed, mixed_m = mixed.split(self.x.numel())
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            awc_dmsgd_update(self.x[s], m[s], mixed[s], g[s], group["lr"], group["momentum"],
                             None if mixed_m is None else mixed_m[s])
        self.start_next_mix()
