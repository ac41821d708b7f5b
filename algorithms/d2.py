"""D² (and D²-DmSGD): decentralized SGD that removes the data-heterogeneity bias.

Tang, Lian, Yan, Zhang, Liu, "D²: Decentralized Training over Decentralized Data", ICML 2018:

    X^1 = W (X^0 − γ G^0) ;  X^{k+1} = W (2 X^k − X^{k−1} − γ G^k + γ G^{k−1})

D²-DmSGD (``momentum > 0``) replaces G by the momentum buffer m^{k+1} = β m^k + g^k (the
paper analyses plain G only). The analysis assumes a static symmetric W with
λ_min(W) > −1/3; the optimizer checks this at construction and raises otherwise
(``topologies.lazy(G)`` fixes any symmetric graph). Time-varying topologies are refused. With
Gossip-PGA the global-average steps use W = 11ᵀ/n, which satisfies the condition.
"""

from __future__ import annotations

import networkx as nx
import torch

import gossip
import topologies
from algorithms.base import DecentralizedOptimizer, check_rates
from gossip.plan.schedule import PeriodicGlobalAverage, Schedule, StaticSchedule

LAMBDA_MIN_BOUND = -1.0 / 3.0


def d2_combination(x: torch.Tensor, x_prev: torch.Tensor, d: torch.Tensor, d_prev: torch.Tensor, lr: float,
                   first: bool, out: torch.Tensor) -> None:
    """``out = x − γ d`` at the first step, else ``2x − x_prev − γ d + γ d_prev`` (the caller gossips out)."""
    if first:
        torch.add(x, d, alpha=-lr, out=out)
        return
    torch.sub(x, x_prev, out=out).add_(x).add_(torch.sub(d, d_prev), alpha=-lr)


def check_mixing(graph: nx.DiGraph) -> None:
    """Raise ValueError unless W is symmetric with λ_min(W) > −1/3."""
    if not topologies.is_symmetric(graph):
        raise ValueError("D² needs a symmetric mixing matrix W; this topology's W is not symmetric")
    smallest = topologies.lambda_min(graph)
    if smallest <= LAMBDA_MIN_BOUND + 1e-9:  # strict, with room for round-off (the even ring sits at -1/3)
        raise ValueError(f"D² needs lambda_min(W) > -1/3, this topology has {smallest:.4g}; "
                         "use topologies.lazy(graph) ((I + W)/2) instead")


class D2(DecentralizedOptimizer):
    """D²; ``momentum > 0`` gives D²-DmSGD."""

    buffer_names = ("previous_x", "previous_direction", "momentum_buffer")
    sends = "the combination 2x − x⁻ − γ(d − d⁻) (the model's size)"

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, topology=None,
                 global_avg_every: int | None = None) -> None:
        check_rates(lr, momentum)
        if isinstance(topology, topologies.DynamicTopology):
            raise ValueError("D² needs a static topology (its analysis assumes one fixed W); got a time-varying one")
        if topology is None or isinstance(topology, nx.DiGraph):
            check_mixing(topology if topology is not None else gossip.topology())
        elif callable(topology) and not isinstance(topology, Schedule):  # a builder n -> graph
            check_mixing(topology(gossip.size()))
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         topology=topology, global_avg_every=global_avg_every)
        self._combined = torch.empty_like(self.x)

    def _step(self) -> None:
        g = self.gradient()
        b = self.buffers
        for group, s in self.groups():
            if group["momentum"]:
                b["momentum_buffer"][s].mul_(group["momentum"]).add_(g[s])
                d = b["momentum_buffer"][s]
            else:
                d = g[s]
            d2_combination(self.x[s], b["previous_x"][s], d, b["previous_direction"][s], group["lr"],
                           self.fresh, self._combined[s])
            b["previous_direction"][s].copy_(d)
        b["previous_x"].copy_(self.x)
        self.x.copy_(self.communicate(self._combined))

    def _recover_state(self, leader: int) -> None:
        """Restart from the current parameters (:meth:`reset_state`): the previous iterate and
        direction belong to the old W, so the next step takes the first-step form. The rebuilt
        static topology must meet D²'s condition too."""
        self.reset_state()
        base = self.schedule.base if isinstance(self.schedule, PeriodicGlobalAverage) else self.schedule
        if isinstance(base, StaticSchedule) and self.unusable is None:
            try:
                check_mixing(gossip.topology())
            except ValueError as error:
                self.unusable = (f"D2 cannot continue on the topology gossip.recover() rebuilt for {gossip.size()} "
                                 f"ranks: {error}")
