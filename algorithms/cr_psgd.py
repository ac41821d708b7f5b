"""CR-PSGD and CR-PSGD-Catalyst: parallel SGD with exponentially growing batch sizes.

Yu, Jin, "On the Computation and Communication Complexity of Parallel SGD with Dynamic Batch Sizes
for Stochastic Non-Convex Optimization", ICML 2019. N workers, a per-worker budget of T
stochastic gradients, first batch B₁, growth ρ > 1:

* **CR-PSGD**: while Σ_{τ≤t} B_τ ≤ T: every worker averages B_t gradients at x_t ; one allreduce
  gives ḡ_t ; x_{t+1} = x_t − γ ḡ_t ; B_{t+1} = ⌊ρ^t B₁⌋. Under the PL condition it reaches the
  O(1/(NT)) rate of fixed small-batch parallel SGD with O(log T) communication rounds.
* **CR-PSGD-Catalyst** (general non-convex): for k = 1 … ⌊√(NT)⌋, y^{(k)} = CR-PSGD on
  h(x) = f(x) + (θ/2)‖x − y^{(k−1)}‖² (gradient ḡ + θ(x − y^{(k−1)})) with budget ⌊√(T/N)⌋,
  started at y^{(k−1)}; the batch size restarts at B₁ in every round.

The optimizers know their batch-size sequence (``batch_sizes``, ``batch_size(step)``, the number of
steps ``len(batch_sizes)``): the training loop draws batch t of that size, e.g. with
:class:`gossip.tools.data.ScheduledBatchSampler` under a ``DataLoader`` whose workers stay alive, or with
:class:`gossip.tools.data.BatchStream`. The loss must be the mean over the batch (so each worker's
gradient is its batch average). Communication is one allreduce of the fused gradient per step.
``momentum`` (default 0, the paper's method) adds heavy-ball momentum to CR-PSGD's step.
"""

from __future__ import annotations

import math

import torch

import gossip
from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.pmsgd import PmSGD


def growing_batch_sizes(first: int, growth: float, budget: int) -> list[int]:
    """B_t = ⌊ρ^{t−1} B₁⌋ for t = 1, 2, … while Σ_{τ≤t} B_τ ≤ ``budget`` (per-worker samples)."""
    if not isinstance(first, int) or first < 1:
        raise ValueError(f"the first batch size B1 must be an int >= 1, got {first!r}")
    if not growth > 1:
        raise ValueError(f"the batch growth factor rho must be > 1, got {growth}")
    if budget < first:
        raise ValueError(f"the per-worker sample budget T = {budget} is smaller than the first batch B1 = {first}")
    sizes, total = [], 0
    while True:
        size = math.floor(growth ** len(sizes) * first)
        if total + size > budget:
            return sizes
        sizes.append(size)
        total += size


class GrowingBatches:
    """What CR-PSGD-style optimizers share: a batch-size sequence fixed at construction."""

    batch_sizes: list[int]
    usable_as_base = False  # its batch sizes and budget are its own: no outer loop over it

    def describe(self) -> str:
        sizes = self.batch_sizes
        return (f"{super().describe()}, per-rank batches growing {sizes[0]} -> {max(sizes)} "
                f"({len(sizes)} steps)")

    def batch_size(self, step: int) -> int:
        """The per-worker batch size of step ``step`` (0-based)."""
        if not 0 <= step < len(self.batch_sizes):
            raise IndexError(f"step {step} is past the sample budget ({len(self.batch_sizes)} steps)")
        return self.batch_sizes[step]

    def _check_budget(self, step: int) -> None:
        if step >= len(self.batch_sizes):
            raise RuntimeError(f"the sample budget is used up after {len(self.batch_sizes)} steps; "
                               "train for len(optimizer.batch_sizes) steps")


class CRPSGD(GrowingBatches, PmSGD):
    """CR-PSGD: allreduce SGD whose per-worker batch grows as ⌊ρ^{t−1} B₁⌋ within a budget of T samples."""

    def __init__(self, params, lr: float, budget: int, first_batch: int = 8, growth: float = 1.5,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.batch_sizes = growing_batch_sizes(first_batch, growth, budget)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.budget, self.first_batch, self.growth = budget, first_batch, growth

    def _step(self) -> None:
        self._check_budget(self.step_count)
        super()._step()


class CRPSGDCatalyst(GrowingBatches, DecentralizedOptimizer):
    """CR-PSGD-Catalyst: ⌊√(NT)⌋ rounds of CR-PSGD on f + (θ/2)‖x − y‖², each with budget ⌊√(T/N)⌋."""

    buffer_names = ("anchor",)
    sends = "the gradient"

    def __init__(self, params, lr: float, budget: int, theta: float = 0.1, first_batch: int = 8,
                 growth: float = 1.5, weight_decay: float = 0.0) -> None:
        check_rates(lr)
        if not theta > 0:
            raise ValueError(f"theta must be positive, got {theta}")
        n = gossip.size()
        self.rounds = math.isqrt(n * budget)
        self.inner_budget = math.isqrt(budget // n) if budget >= n else 0
        if self.inner_budget < first_batch:
            raise ValueError(f"each round's budget floor(sqrt(T/N)) = {self.inner_budget} (T = {budget}, N = {n}) "
                             f"is below the first batch B1 = {first_batch}; raise the budget or lower B1")
        inner = growing_batch_sizes(first_batch, growth, self.inner_budget)
        self.inner_steps = len(inner)
        self.batch_sizes = inner * self.rounds
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "theta": theta}, topology="allreduce")
        self.buffers["anchor"].copy_(self.x)  # y^{(0)} = x⁰
        self.budget, self.first_batch, self.growth = budget, first_batch, growth
        self._direction = torch.empty_like(self.x)

    def _step(self) -> None:
        self._check_budget(self.step_count)
        g_mean = self.communicate(self.gradient())
        anchor = self.buffers["anchor"]
        for group, s in self.groups():  # x ← x − γ (ḡ + θ (x − y))
            torch.sub(self.x[s], anchor[s], out=self._direction[s]).mul_(group["theta"]).add_(g_mean[s])
            self.x[s].add_(self._direction[s], alpha=-group["lr"])
        if (self.step_count + 1) % self.inner_steps == 0:  # the round's budget is spent: y^{(k)} = x
            anchor.copy_(self.x)

    def _recover_state(self, leader: int) -> None:
        """Every rank must hold the same model and proximal centre: the most advanced survivor's."""
        self._adopt(leader, self.x, self.buffers["anchor"])
