"""Time-varying (dynamic) topologies: per-step peers and weights, identical on every rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepPeers:
    """One rank's exchange at one step, in the form ``neighbor_allreduce`` takes.

    ``dst_weights`` maps each rank this rank sends to to the scale applied to what it sends;
    ``src_weights`` maps each rank it receives from to the weight it gives that value;
    ``self_weight`` is the weight it gives its own value.
    """

    self_weight: float
    src_weights: dict[int, float]
    dst_weights: dict[int, float]


class OnePeerExponentialTwo:
    """One-peer exponential-2 graph (Ying et al., NeurIPS 2021).

    At step k, with ``tau = ceil(log2 n)`` and offset ``2^(k mod tau)``, rank i sends to
    ``(i + offset) mod n`` and receives from ``(i - offset) mod n``; each rank averages its value
    with the one it receives, weight 1/2 each. Every W(k) is doubly stochastic; when n is a power
    of two, the product of any tau consecutive W(k) is exactly the averaging matrix 11^T/n.
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of nodes must be a positive int, got {n!r}")
        self.n = n
        self.period = math.ceil(math.log2(n)) if n > 1 else 1

    def offset(self, step: int) -> int:
        """The step's hop distance ``2^(step mod period)``; 0 when n = 1."""
        return 0 if self.n == 1 else 2 ** (step % self.period)

    def peers(self, step: int, rank: int) -> StepPeers:
        """Return ``rank``'s send/receive ranks and weights at ``step``."""
        if not 0 <= rank < self.n:
            raise ValueError(f"rank {rank} out of range for {self.n} nodes")
        hop = self.offset(step)
        if hop == 0:
            return StepPeers(1.0, {}, {})
        return StepPeers(0.5, {(rank - hop) % self.n: 0.5}, {(rank + hop) % self.n: 1.0})

    def mixing_matrix(self, step: int) -> np.ndarray:
        """W(step): ``W[i, j]`` is the weight rank i gives to rank j at this step."""
        w = np.zeros((self.n, self.n))
        for i in range(self.n):
            p = self.peers(step, i)
            w[i, i] = p.self_weight
            for j, wj in p.src_weights.items():
                w[i, j] += wj
        return w
