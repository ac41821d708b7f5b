"""An α–β–γ cost model of one step's communication, per link class (intra-machine, inter-machine).

A message of m bytes over a link costs α + β·m (latency α in seconds, inverse bandwidth β in
seconds per byte); reducing m bytes (a weighted sum) costs γ·m. With n ranks, k per machine,
M = n/k machines and a model of N bytes, the plans cost (the standard derivations: Thakur,
Rabenseifner, Gropp, "Optimization of Collective Communication Operations in MPICH", IJHPCA 2005):

* ring allreduce (reduce-scatter + allgather): 2(n−1)·α + 2·(n−1)/n·N·β + (n−1)/n·N·γ, on the
  slowest link the ring crosses (inter-machine when M > 1);
* tree allreduce (binomial reduce + broadcast): 2⌈log2 n⌉·(α + N·β) + ⌈log2 n⌉·N·γ;
* static-graph gossip of degree d: every rank sends d and receives d messages of N bytes, which
  share its link: d·α + d·N·β + d·N·γ (inter-machine when M > 1: some neighbour is elsewhere);
* one-peer gossip: the same with d = 1;
* hierarchical gossip: a ring allreduce among the k ranks of a machine on the intra link, gossip of
  degree d between the M machines' leaders on the inter link, and a binomial broadcast inside the
  machine: ring(k, intra) + d·(α + N·β + N·γ)_inter + ⌈log2 k⌉·(α + N·β)_intra;
* no communication (a local step): 0.

Every communicating plan also pays ``overhead``: the library's fixed cost per op (its cross-rank
input check, Python, and on an oversubscribed host the scheduler), measured by the probe.

The parameters come from :func:`gossip.probe` on the running job, or from a named cluster
profile; the model predicts seconds per step for each plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkCost:
    """One link class: ``latency`` α (s), ``inverse_bandwidth`` β (s/byte), ``reduce`` γ (s/byte)."""

    latency: float
    inverse_bandwidth: float
    reduce: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency", "inverse_bandwidth", "reduce"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def message(self, nbytes: float) -> float:
        """α + β·m: one message of ``nbytes``."""
        return self.latency + self.inverse_bandwidth * nbytes

    @property
    def bandwidth(self) -> float:
        """Bytes per second (1/β)."""
        return math.inf if self.inverse_bandwidth == 0 else 1.0 / self.inverse_bandwidth


def _log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


@dataclass(frozen=True)
class CostModel:
    """Link costs and the job's layout: ``size`` ranks, ``ranks_per_machine`` on each machine."""

    intra: LinkCost
    inter: LinkCost
    size: int
    ranks_per_machine: int
    overhead: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.ranks_per_machine < 1 or self.ranks_per_machine > self.size:
            raise ValueError(f"need 1 <= ranks_per_machine <= size, got {self.ranks_per_machine} and {self.size}")
        if not (self.overhead >= 0 and math.isfinite(self.overhead)):
            raise ValueError(f"overhead must be a finite number >= 0, got {self.overhead!r}")

    @property
    def machines(self) -> int:
        return math.ceil(self.size / self.ranks_per_machine)

    @property
    def _flat_link(self) -> LinkCost:
        """The link a job-wide pattern is limited by: inter-machine as soon as there are two machines."""
        return self.inter if self.machines > 1 else self.intra

    def ring_allreduce(self, nbytes: float, ranks: int | None = None, link: LinkCost | None = None) -> float:
        n = self.size if ranks is None else ranks
        if n <= 1:
            return 0.0
        link = self._flat_link if link is None else link
        share = (n - 1) / n * nbytes
        return self.overhead + 2 * (n - 1) * link.latency + 2 * share * link.inverse_bandwidth + share * link.reduce

    def tree_allreduce(self, nbytes: float) -> float:
        steps, link = _log2(self.size), self._flat_link
        if steps == 0:
            return 0.0
        return self.overhead + 2 * steps * link.message(nbytes) + steps * nbytes * link.reduce

    def gossip(self, nbytes: float, degree: int) -> float:
        """Static-graph gossip where every rank sends and receives ``degree`` messages."""
        if degree < 0:
            raise ValueError(f"degree must be >= 0, got {degree}")
        link = self._flat_link
        return self.overhead + degree * (link.message(nbytes) + nbytes * link.reduce) if degree else 0.0

    def one_peer(self, nbytes: float) -> float:
        return self.gossip(nbytes, 1) if self.size > 1 else 0.0

    def hierarchical(self, nbytes: float, machine_degree: int = 1) -> float:
        """Machine allreduce (ring, intra), leaders' gossip of ``machine_degree`` (inter), machine broadcast."""
        k = self.ranks_per_machine
        ring = 0.0 if k <= 1 else self.ring_allreduce(nbytes, ranks=k, link=self.intra) - self.overhead
        inside = ring + _log2(k) * self.intra.message(nbytes)
        between = machine_degree * (self.inter.message(nbytes) + nbytes * self.inter.reduce) if self.machines > 1 else 0
        return self.overhead + inside + between

    def predict(self, nbytes: float, degree: int = 1, machine_degree: int = 1) -> dict[str, float]:
        """Seconds per step of every plan for a message of ``nbytes``."""
        return {"ring allreduce": self.ring_allreduce(nbytes), "tree allreduce": self.tree_allreduce(nbytes),
                f"static gossip (degree {degree})": self.gossip(nbytes, degree),
                "one-peer gossip": self.one_peer(nbytes),
                f"hierarchical (machine degree {machine_degree})": self.hierarchical(nbytes, machine_degree),
                "no communication": 0.0}
