"""CHOCO-SGD: decentralized SGD that gossips compressed differences against public copies.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with
Compressed Communication", ICML 2019 (CHOCO-SGD, whose consensus step is CHOCO-Gossip); local
momentum as in Koloskova, Lin, Stich, Jaggi, "Decentralized Deep Learning with Arbitrary
Communication Compression", ICLR 2020. Rank i keeps its model x_i and a public copy x̂_i that its
neighbours hold as well; with Q the compressor, g_i = ∇F_i(x_i; ξ_i) + wd·x_i and m_i⁰ = 0:

    m_i ← β m_i + g_i ;  x_i^{½} = x_i − η m_i                     (β = 0: m_i = g_i)
    q_i = Q(x_i^{½} − x̂_i)                                          sent to every neighbour
    x̂_j ← x̂_j + q_j                                                 for j = i and every neighbour j
    x_i ← x_i^{½} + γ Σ_j w_ij (x̂_j − x̂_i)

Only q_i crosses the wire; what Q leaves out stays in x_i − x̂_i and goes in a later message (the
error feedback of the public copies), so biased compressors (top-k, sign) converge too. The copies
are kept as the authors' implementation keeps them, two vectors whatever the degree: x̂_i and
s_i = Σ_j w_ij x̂_j (self included), with s_i ← s_i + Σ_j w_ij q_j and x_i ← x_i^{½} + γ (s_i − x̂_i);
x̂ = s = 0 at the start, as in the paper. The steps run in the paper's order (the consensus step
uses the copies just updated; the authors' deep-learning code applies it with the previous
exchange's copies, to overlap the exchange with computation). With Q the identity and γ = 1 a step
is DSGD's (adapt then combine). The paper's γ shrinks with the compression quality ω (the share of
‖v‖² that Q(v) keeps); :func:`default_consensus_step` picks a γ per compressor that way.

**Time-varying families.** When the peers change from step to step, one public copy x̂_j per rank
stays exact on the ranks that weigh it only if every q_j reaches every rank that ever receives
from j, whatever the step's graph. Here instead each directed edge j→i carries its own public copy
x̂_{j→i}, held by both ends and advanced only at the steps that use the edge:
q_{j→i} = Q(x_j^{½} − x̂_{j→i}), x̂_{j→i} ← x̂_{j→i} + q_{j→i}, and, over the step's edges into
and out of i with the entries of the step's mixing matrix W(k) (``DynamicTopology.mixing_matrix``),

    x_i ← x_i^{½} + γ ( Σ_{j→i} w_ij(k) x̂_{j→i} − Σ_{i→d} w_di(k) x̂_{i→d} ).

What one end of an edge adds the other subtracts, so Σ_i x_i is kept exactly, as CHOCO-Gossip
keeps the average; with Q the identity and W(k) doubly stochastic the step is
x_i^{½} + γ Σ_j w_ij(k) (x_j^{½} − x_i^{½}); and every step sends one message per edge of the
family's graph, no more. The price is memory: one model per peer a rank has exchanged with, in
each direction (⌈log₂ n⌉ of each on the one-peer exponential graph, up to n − 1 on random
matchings). This per-edge form is our adaptation: the paper treats a fixed graph, and Koloskova,
Loizou, Boreiri, Jaggi, Stich, "A Unified Theory of Decentralized SGD with Changing Topology and
Local Updates", ICML 2020, analyse changing topologies without compression.

The compressor sees the whole flat model at once (top-k is global over the layers). Its
``bytes_sent`` counts every message handed to MPI (:attr:`ChocoSGD.bytes_sent`).
"""

from __future__ import annotations

from typing import Any

import torch

import gossip
from algorithms.base import DecentralizedOptimizer, check_rates
from gossip.plan.schedule import DynamicSchedule, StaticSchedule
from topologies import DynamicTopology


def local_step(x: torch.Tensor, m: torch.Tensor, g: torch.Tensor, lr: float, momentum: float) -> None:
    """x ← x − η m with m ← β m + g (m unused when β = 0): the half step x^{½}."""
    if momentum:
        m.mul_(momentum).add_(g)
        g = m
    x.add_(g, alpha=-lr)


def consensus_step(x: torch.Tensor, s: torch.Tensor, x_hat: torch.Tensor, gamma: float) -> None:
    """x ← x + γ (s − x̂), where s = Σ_j w_ij x̂_j: the step γ Σ_j w_ij (x̂_j − x̂_i)."""
    x.add_(s - x_hat, alpha=gamma)


def default_consensus_step(compressor: gossip.Compressor) -> float:
    """γ for ``compressor`` when none is given: 1 for 16-, 8- and 4-bit messages (nearly exact), 1/2
    for signs, and 5 × the fraction kept (at most 1) for top-k and random-k, times that fraction
    again for unbiased random-k (its scaled values vary n/k times more). Rules of thumb from
    consensus on a ring and a one-peer exponential graph: tune γ for a workload."""
    if isinstance(compressor, gossip.TopK | gossip.RandomK):
        gamma = min(1.0, 5 * compressor.fraction)
        return gamma * compressor.fraction if getattr(compressor, "unbiased", False) else gamma
    if isinstance(compressor, gossip.SignNorm):
        return 0.5
    return 1.0


class ChocoSGD(DecentralizedOptimizer):
    """CHOCO-SGD (module docstring) on a static graph or a time-varying family.

    ``compressor``: a :class:`gossip.Compressor` or a name for :func:`gossip.compressor_by_name`
    (``"int8"``, ``"topk-0.01"``, ...; stochastic rounding and random-k then seeded with the rank).
    ``consensus_step``: γ in (0, 1], or None for :func:`default_consensus_step` of the compressor.
    ``momentum``: β of the local heavy-ball momentum.
    """

    sends = "compressed model differences"

    def __init__(self, params, lr: float, topology=None, compressor: gossip.Compressor | str = "int8",
                 consensus_step: float | None = None, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        check_rates(lr, momentum)
        compressor = gossip.compressor_by_name(compressor, seed=gossip.rank())
        if consensus_step is None:
            consensus_step = default_consensus_step(compressor)
        if not (isinstance(consensus_step, int | float) and 0 < consensus_step <= 1):
            raise ValueError(f"consensus_step (γ) must be in (0, 1], got {consensus_step!r}")
        self.per_edge = isinstance(topology, DynamicTopology | DynamicSchedule)
        # the public copies: x̂_i and s_i on a static graph; one copy per edge on a family (held apart)
        self.buffer_names = ("momentum_buffer",) if self.per_edge else ("x_hat", "s", "momentum_buffer")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "consensus_step": float(consensus_step)}, topology=topology)
        if not isinstance(self.schedule, StaticSchedule | DynamicSchedule):
            raise ValueError(f"CHOCO-SGD gossips on a static graph or a time-varying family, not on "
                             f"{self.schedule.describe()}")
        self.compressor = compressor
        self.sends = f"compressed model differences ({self.compressor.describe()})"
        self.sent_copies: dict[int, torch.Tensor] = {}  # x̂_{i→d}: this rank's copy as rank d holds it
        self.received_copies: dict[int, torch.Tensor] = {}  # x̂_{j→i}: rank j's copy as this rank holds it
        self._half = torch.empty_like(self.x)  # x^{½} − x̂, the compressed difference
        self._decoded = torch.empty_like(self.x)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has handed to MPI for CHOCO's messages (its compressor's count)."""
        return self.compressor.bytes_sent

    def _step(self) -> None:
        g = self.gradient()
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            local_step(self.x[s], m[s], g[s], group["lr"], group["momentum"])
        if self.per_edge:
            self._gossip_edges()
        else:
            self._gossip_static()

    def _gossip_static(self) -> None:
        x_hat, s_sum = self.buffers["x_hat"], self.buffers["s"]
        torch.sub(self.x, x_hat, out=self._half)
        mixed = gossip.compressed_neighbor_allreduce(self._half, self.compressor, out=self._received,
                                                     sent=self._decoded)
        x_hat.add_(self._decoded)  # x̂_i ← x̂_i + q_i
        s_sum.add_(mixed)  # s_i ← s_i + Σ_j w_ij q_j
        for group, s in self.groups():
            consensus_step(self.x[s], s_sum[s], x_hat[s], group["consensus_step"])

    def _copy(self, copies: dict[int, torch.Tensor], rank: int) -> torch.Tensor:
        found = copies.get(rank)
        if found is None:  # both ends of a new edge start from x̂ = 0
            found = copies[rank] = torch.zeros_like(self.x)
        return found

    def _gossip_edges(self) -> None:
        family = self.schedule.topology
        me, step = gossip.rank(), self.step_count
        peers = family.peers(step, me)
        sends = {}
        for d in sorted(peers.dst_weights):
            sends[d] = torch.sub(self.x, self._copy(self.sent_copies, d))
        moved = gossip.compressed_neighbor_exchange(sends, sorted(peers.src_weights), self.compressor, like=self.x)
        # the consensus term Σ_j w_ij x̂_{j→i} − Σ_d w_di x̂_{i→d}, in self._half, with the entries of
        # W(k): w_ij = (i's weight for j) · (j's scale for what it sends i)
        term = self._half.zero_()
        for d, q in moved.sent.items():
            copy = self._copy(self.sent_copies, d)
            copy.add_(q)
            term.add_(copy, alpha=-family.peers(step, d).src_weights[me] * peers.dst_weights[d])
        for j, q in moved.received.items():
            copy = self._copy(self.received_copies, j)
            copy.add_(q)
            term.add_(copy, alpha=peers.src_weights[j] * family.peers(step, j).dst_weights[me])
        for group, s in self.groups():
            self.x[s].add_(term[s], alpha=group["consensus_step"])

    # --- state ---------------------------------------------------------------------------------

    def reset_state(self) -> None:
        """Zero the momentum and every public copy (on every rank alike, so copies stay equal at both ends)."""
        super().reset_state()
        self.sent_copies.clear()
        self.received_copies.clear()

    def _recover_state(self, leader: int) -> None:
        """After a rank failure the neighbours are renumbered and some copies' other ends are gone:
        every survivor restarts its public copies from zero (x̂ = s = 0, no edge copy), as at the
        start, and keeps its model and momentum."""
        for name in ("x_hat", "s"):
            if name in self.buffers:
                self.buffers[name].zero_()
        self.sent_copies.clear()
        self.received_copies.clear()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["choco"] = {"compressor": self.compressor.state_dict(),
                          "sent_copies": {d: t.detach().clone() for d, t in self.sent_copies.items()},
                          "received_copies": {j: t.detach().clone() for j, t in self.received_copies.items()}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("choco", None)
        if ours is None:
            raise ValueError("not a CHOCO-SGD state_dict: the 'choco' entry is missing")
        super().load_state_dict(state_dict)
        self.compressor.load_state_dict(ours["compressor"])
        for mine, saved in ((self.sent_copies, ours["sent_copies"]), (self.received_copies, ours["received_copies"])):
            mine.clear()
            for rank, t in saved.items():
                if t.shape != self.x.shape:
                    raise ValueError(f"a public copy of {t.numel()} elements, the parameters have {self.x.numel()}")
                mine[int(rank)] = t.to(self.x.device, self.x.dtype).clone()
