"""What decentralized training is measured by: consensus distance and the averaged model.

Decentralized ranks hold different models x_1..x_n. Two numbers say how a run is doing: the
consensus distance ``(1/n) sum_i ||x_i - xbar||^2`` (how far the ranks have drifted apart; it
is 0 under exact averaging), and the quality of the averaged model ``xbar = (1/n) sum_i x_i``
(what one would deploy). Both are collectives over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from gossip.ops.collectives import allreduce

T = TypeVar("T")


@torch.no_grad()
def consensus_distance(flat: torch.Tensor, mean: torch.Tensor | None = None) -> float:
    """Collective: ``(1/n) sum_i ||x_i - xbar||^2`` over the ranks' ``flat`` tensors (``mean``,
    when given, is ``xbar``, already computed); the same value on every rank."""
    if mean is None:
        mean = allreduce(flat, "mean")
    local = torch.sub(flat, mean).square().sum().reshape(1).double()
    return float(allreduce(local, "mean").item())


@contextmanager
def averaged(flat: torch.Tensor) -> Iterator[torch.Tensor]:
    """Collective: within the block, ``flat`` (a model's fused parameters, written in place)
    holds the ranks' exact average; afterwards its own values are back, bitwise. Yields the
    rank's own values (a copy)."""
    own = flat.detach().clone()
    with torch.no_grad():
        flat.copy_(allreduce(own, "mean"))
        try:
            yield own
        finally:
            flat.copy_(own)


def mean_over_ranks(value: float) -> float:
    """Collective: the mean over ranks of a per-rank number."""
    return float(allreduce(torch.tensor([float(value)], dtype=torch.float64), "mean").item())


def evaluate_averaged(flat: torch.Tensor, measure: Callable[[], T]) -> tuple[T, T, float]:
    """Collective: ``measure()`` of this rank's own model, of the averaged model, and the consensus
    distance; ``flat`` (the parameters ``measure`` reads) is left as it was."""
    own = measure()
    with averaged(flat) as mine:
        distance = consensus_distance(mine, flat)
        of_average = measure()
    return own, of_average, distance
