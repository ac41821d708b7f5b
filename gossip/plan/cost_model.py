"""An α–β–γ cost model of one step's communication, per link class (intra-machine, inter-machine).

A message of m bytes over a link costs α + β·m (latency α in seconds, inverse bandwidth β in
seconds per byte); reducing m bytes (a weighted sum) costs γ·m. The intra-machine β is per rank;
the inter-machine β is per machine (its network interface), shared by every message that leaves
the machine at once. Ranks sit on machines in consecutive blocks of k (n ranks, M = ⌈n/k⌉
machines); a model has N bytes. The plans cost (the collective derivations: Thakur, Rabenseifner,
Gropp, "Optimization of Collective Communication Operations in MPICH", IJHPCA 2005):

* ring allreduce (reduce-scatter + allgather): 2(n−1)·α + 2·(n−1)/n·N·β + (n−1)/n·N·γ; the ring
  leaves each machine on one link, so α and β are the slower class's (inter when M > 1);
* tree allreduce (binomial reduce + broadcast): 2⌈log2 n⌉·(α + N·β) + ⌈log2 n⌉·N·γ, same links;
* circulant gossip, every rank r sending N bytes to r + o for each offset o at once (static
  exponential-2: o = 1, 2, 4, …): Σ_o α_o + max(F·N·β_inter, D·N·β_intra) + |O|·N·γ, where F is
  the number of messages leaving one machine (they share its interface), D the most messages one
  rank sends inside its machine, and α_o the inter latency if offset o leaves some machine;
* gossip on any static graph: the same count over its edges (the busiest machine, the busiest
  rank; a rank's α per message, its in-degree's reductions);
* one-peer exponential-2: the mean over its period of circulant gossip with one offset 2^i; a
  small offset leaves the machine for only o of its k ranks, a large one for all k;
* hierarchical gossip: a ring allreduce among the k ranks of a machine on the intra link, one
  message per machine leader on the inter link per machine-level peer, and a binomial broadcast
  inside the machine: ring(k, intra) + d·(α + N·β + N·γ)_inter + ⌈log2 k⌉·(α + N·β)_intra;
* no communication (a local step): 0.

Every communicating plan also pays ``overhead``: the library's fixed cost per op (its cross-rank
input check, Python, and on an oversubscribed host the scheduler), measured by the probe with a
real one-element op; ``gossip_overhead`` and ``hierarchical_overhead``, when given, are the
neighbour exchanges' and the hierarchical op's own. Real
implementations move bytes slower than the links allow: ``allreduce_per_byte_factor`` scales the
per-byte terms of the job's allreduce (the MPI's algorithm may not be a pipelined ring), and
``copy_per_byte`` is what a gossip or hierarchical op spends per byte on its own copies (into and
out of its buffers), once whatever its degree. The model as derived has 1 and 0; the probe
calibrates both with one large op of each kind.

The parameters come from :func:`gossip.probe` on the running job, or from a cluster profile
(``benchmarks/simulate_scale.py``); the model predicts seconds per step for each plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from topologies.validation import as_matrix


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


def _powers_of_two(n: int) -> list[int]:
    """1, 2, 4, … < n: the exponential-2 offsets."""
    return [1 << i for i in range(max(0, math.ceil(math.log2(n))))] if n > 1 else []


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
    gossip_overhead: float | None = None  # a neighbour exchange's fixed cost, when it differs from ``overhead``
    hierarchical_overhead: float | None = None  # a hierarchical op's (three MPI calls), likewise
    allreduce_per_byte_factor: float = 1.0  # the MPI allreduce's per-byte time over the ring model's
    copy_per_byte: float = 0.0  # s/byte a gossip op spends on its own copies, once whatever its degree

    def __post_init__(self) -> None:
        if self.size < 1 or self.ranks_per_machine < 1 or self.ranks_per_machine > self.size:
            raise ValueError(f"need 1 <= ranks_per_machine <= size, got {self.ranks_per_machine} and {self.size}")
        if not (self.overhead >= 0 and math.isfinite(self.overhead)):
            raise ValueError(f"overhead must be a finite number >= 0, got {self.overhead!r}")
        for name in ("gossip_overhead", "hierarchical_overhead"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        if not (self.allreduce_per_byte_factor > 0 and math.isfinite(self.allreduce_per_byte_factor)):
            raise ValueError(f"allreduce_per_byte_factor must be a finite number > 0, got "
                             f"{self.allreduce_per_byte_factor!r}")
        if not (self.copy_per_byte >= 0 and math.isfinite(self.copy_per_byte)):
            raise ValueError(f"copy_per_byte must be a finite number >= 0, got {self.copy_per_byte!r}")

    @property
    def machines(self) -> int:
        """M = ⌈size / ranks_per_machine⌉, the number of machines."""
        return math.ceil(self.size / self.ranks_per_machine)

    @property
    def _gossip_fixed(self) -> float:
        return self.overhead if self.gossip_overhead is None else self.gossip_overhead

    @property
    def _flat_link(self) -> LinkCost:
        """The link a job-wide pattern is limited by: inter-machine as soon as there are two machines."""
        return self.inter if self.machines > 1 else self.intra

    def ring_allreduce(self, nbytes: float, ranks: int | None = None, link: LinkCost | None = None) -> float:
        """The job's allreduce; with ``ranks`` and ``link``, a ring among some ranks as derived (the
        calibration factor is the job-wide MPI allreduce's)."""
        n = self.size if ranks is None else ranks
        if n <= 1:
            return 0.0
        factor = self.allreduce_per_byte_factor if ranks is None else 1.0
        link = self._flat_link if link is None else link
        share = (n - 1) / n * nbytes
        per_byte = 2 * share * link.inverse_bandwidth + share * link.reduce
        return self.overhead + 2 * (n - 1) * link.latency + factor * per_byte

    def tree_allreduce(self, nbytes: float) -> float:
        """Seconds of a binomial-tree allreduce (reduce + broadcast) of ``nbytes`` over the whole job."""
        steps, link = _log2(self.size), self._flat_link
        if steps == 0:
            return 0.0
        per_byte = 2 * steps * nbytes * link.inverse_bandwidth + steps * nbytes * link.reduce
        return self.overhead + 2 * steps * link.latency + self.allreduce_per_byte_factor * per_byte

    def gossip(self, nbytes: float, offsets: Sequence[int]) -> float:
        """Circulant gossip: every rank sends ``nbytes`` to rank + o (mod n) for each o in ``offsets`` at once."""
        offsets = [o % self.size for o in offsets]
        if any(o == 0 for o in offsets):
            raise ValueError(f"offsets must not be multiples of the job size {self.size} (a rank sending to itself)")
        ranks = np.arange(self.size)
        sends = np.zeros((self.size, self.size), dtype=bool)
        for offset in offsets:
            sends[ranks, (ranks + offset) % self.size] = True
        return self._exchange(nbytes, sends)

    def graph(self, nbytes: float, topology) -> float:
        """Gossip on any static graph (a ``networkx`` graph or a mixing matrix W on the ``size``
        ranks): every rank sends ``nbytes`` to each out-neighbour at once."""
        w = as_matrix(topology)
        if w.shape != (self.size, self.size):
            raise ValueError(f"the graph has {w.shape[0]} nodes, the model {self.size} ranks")
        sends = (w != 0).T  # sends[j, i]: j's message goes to i
        np.fill_diagonal(sends, False)
        return self._exchange(nbytes, sends)

    def _exchange(self, nbytes: float, sends: np.ndarray) -> float:
        """Every rank j sends ``nbytes`` to each i with ``sends[j, i]``, all at once: the messages
        leaving the busiest machine share its interface, the busiest rank's messages inside its
        machine share its link, a rank pays α per message (the inter α if it leaves), and a rank
        reduces what it receives."""
        if not sends.any():
            return 0.0
        machine = np.arange(self.size) // self.ranks_per_machine
        leaves = sends & (machine[:, None] != machine[None, :])
        stays = sends & ~leaves
        leaving = np.bincount(machine, weights=leaves.sum(axis=1), minlength=self.machines).max()
        latency = (leaves.sum(axis=1) * self.inter.latency + stays.sum(axis=1) * self.intra.latency).max()
        bandwidth = max(leaving * self.inter.inverse_bandwidth, stays.sum(axis=1).max() * self.intra.inverse_bandwidth)
        reduce = (self.inter if leaves.any() else self.intra).reduce * sends.sum(axis=0).max()
        return self._gossip_fixed + float(latency) + nbytes * (bandwidth + reduce + self.copy_per_byte)

    def exponential(self, nbytes: float) -> float:
        """Static exponential-2 gossip: offsets 1, 2, 4, … < n, all at once."""
        return self.gossip(nbytes, _powers_of_two(self.size))

    def one_peer(self, nbytes: float) -> float:
        """One-peer exponential-2: the mean step over its period (offset 2^i at step i)."""
        offsets = _powers_of_two(self.size)
        return sum(self.gossip(nbytes, [o]) for o in offsets) / len(offsets) if offsets else 0.0

    def hierarchical(self, nbytes: float, machine_degree: int = 1) -> float:
        """Machine allreduce (ring, intra), leaders' gossip of ``machine_degree`` (inter), machine broadcast."""
        if machine_degree < 0:
            raise ValueError(f"machine_degree must be >= 0, got {machine_degree}")
        k = self.ranks_per_machine
        ring = 0.0 if k <= 1 else self.ring_allreduce(nbytes, ranks=k, link=self.intra) - self.overhead
        inside = ring + _log2(k) * self.intra.message(nbytes)
        between = machine_degree * (self.inter.message(nbytes) + nbytes * self.inter.reduce) if self.machines > 1 else 0
        fixed = self.overhead if self.hierarchical_overhead is None else self.hierarchical_overhead
        return fixed + inside + between + nbytes * self.copy_per_byte

    def predict(self, nbytes: float, machine_degree: int = 1) -> dict[str, float]:
        """Seconds per step of every plan for a message of ``nbytes``."""
        return {"ring allreduce": self.ring_allreduce(nbytes), "tree allreduce": self.tree_allreduce(nbytes),
                "static exponential-2": self.exponential(nbytes), "one-peer exponential-2": self.one_peer(nbytes),
                f"hierarchical (machine degree {machine_degree})": self.hierarchical(nbytes, machine_degree),
                "no communication": 0.0}
