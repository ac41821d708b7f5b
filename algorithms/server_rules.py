"""Parameter-server update rules for asynchronous SGD: ASGD, naive ASGDm and ordered momentum (OrMo).

The server holds w; K workers each repeatedly receive (w, t') and return (g, t'), g = ∇f(w; ξ) at
the parameters of server iteration t'. The server applies every gradient the moment it arrives
(no barrier) and replies to that worker with (w, t + 1). These classes are that update, on flat
tensors, one call per arriving gradient: ``rule.apply(w, g, ite)`` with ``ite`` the iteration
index the gradient was computed at; they record the staleness ``t − ite`` of every update.

* **ASGD**: w ← w − η g.
* **Naive ASGDm**: u ← β u + η g ; w ← w − u, in arrival order (stale gradients get momentum as if
  fresh; known to slow down or diverge).
* **OrMo** (Shi, Yang, Li, "Ordered Momentum for Asynchronous SGD", NeurIPS 2024):
  gradients are grouped by iteration index, group(ite) = ⌈ite/K⌉ (group 0: the K gradients at
  w⁰). I is the latest group, u⁰ = 0, I⁰ = 0. At server iteration t = 0, 1, 2, …: if ⌈t/K⌉ > I,
  then w ← w − β u ; u ← β u ; I ← I + 1. Then for the arriving (g, ite), δ = I − group(ite) ≥ 0:
  u ← u + β^δ η g ; w ← w − ((1 − β^{δ+1})/(1 − β)) η g. A gradient that arrives late is weighted
  as if it had been in momentum since its group: β^δ in u, and the δ + 1 decayed steps it missed
  applied to w at once. Server iterations are counted from 0 (t ∈ {0, …, T − 1}): with that count
  the rule is SGD with heavy-ball momentum (u ← β u + η g ; w ← w − u) for K = 1, as the paper
  states, and counted from 1 it would not be (the tests check both).
* **OrMo-DA**: OrMo with a delay-adaptive learning rate: the arriving gradient's η is replaced by
  η_τ = η · min(1, K/τ), τ = t − ite its staleness, in both the u and the w update. This step size
  is the delay-adaptive one of Koloskova, Stich, Jaggi (NeurIPS 2022) and Mishchenko, Bach, Even,
  Woodworth (NeurIPS 2022) for ASGD (full step while the staleness is at most the number of
  workers, as it is on average, shrinking as 1/τ beyond); the OrMo paper's own OrMo-DA schedule
  may differ from it.

When a worker dies (fault-tolerant mode, :mod:`gossip.ops.parameter_server`), the server calls
``rule.set_workers(K')`` with the number of live workers. OrMo then groups the iteration indices
after the end of the current group by the new K' (the earlier ones keep their groups), so that a
group still holds about one gradient per live worker; OrMo-DA's step uses K' too.
"""

from __future__ import annotations

import math

import torch


class ServerRule:
    """One asynchronous server's update: ``apply(w, g, ite)`` per arriving gradient (in place on w)."""

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        if not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(f"need lr > 0 and momentum in [0, 1), got {lr} and {momentum}")
        self.lr, self.momentum = lr, momentum
        self.t = 0  # server iterations so far: the index of the next update
        self.staleness: list[int] = []  # t − ite of every update, in order

    def apply(self, w: torch.Tensor, g: torch.Tensor, ite: int) -> int:
        """Fold the gradient ``g`` computed at iteration ``ite`` into ``w``; returns the iteration
        index of the new parameters (t + 1), what the server sends back with them."""
        if not 0 <= ite <= self.t:
            raise ValueError(f"gradient of iteration {ite} arrived at server iteration {self.t}: "
                             "an iteration index from the future or negative")
        self.staleness.append(self.t - ite)
        self._update(w, g, ite)
        self.t += 1
        return self.t

    def _update(self, w: torch.Tensor, g: torch.Tensor, ite: int) -> None:
        raise NotImplementedError

    def set_workers(self, workers: int) -> None:
        """The number of live workers changed (a worker died); ASGD and naive ASGDm do not use it."""

    def state_dict(self) -> dict:
        return {"t": self.t, "staleness": list(self.staleness)}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.staleness = int(state["t"]), list(state["staleness"])


class ASGD(ServerRule):
    """w ← w − η g."""

    def _update(self, w, g, ite) -> None:
        w.add_(g, alpha=-self.lr)


class NaiveASGDm(ServerRule):
    """u ← β u + η g ; w ← w − u, in arrival order."""

    def __init__(self, lr: float, momentum: float = 0.9) -> None:
        super().__init__(lr, momentum)
        self.u: torch.Tensor | None = None

    def _update(self, w, g, ite) -> None:
        if self.u is None:
            self.u = torch.zeros_like(w)
        self.u.mul_(self.momentum).add_(g, alpha=self.lr)
        w.sub_(self.u)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "u": None if self.u is None else self.u.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.u = None if state["u"] is None else state["u"].clone()


class OrMo(ServerRule):
    """Ordered momentum over ``workers`` = K asynchronous workers (module docstring)."""

    def __init__(self, lr: float, momentum: float = 0.9, workers: int = 1) -> None:
        super().__init__(lr, momentum)
        _check_workers(workers)
        self.workers = workers
        self.latest_group = 0  # I
        self.u: torch.Tensor | None = None
        # (b, g_b, K): for iteration indices ite > b, group(ite) = g_b + ⌈(ite − b)/K⌉; one piece per
        # value K has had (the first covers every index, ite = 0 included)
        self.pieces: list[tuple[int, int, int]] = [(0, 0, workers)]

    def group(self, ite: int) -> int:
        """The gradient group of iteration index ``ite``: ⌈ite/K⌉ (with K changed by :meth:`set_workers`,
        counted on from the boundary where it changed)."""
        for start, first, width in reversed(self.pieces):
            if ite > start or start == 0:
                return first + -(-(ite - start) // width)
        raise AssertionError("unreachable: the first piece covers every index")

    def set_workers(self, workers: int) -> None:
        """K becomes ``workers`` for the groups after the current one (module docstring)."""
        _check_workers(workers)
        start, first, width = self.pieces[-1]
        if self.t <= start:  # still before the boundary set by the previous change: move no boundary
            self.pieces[-1] = (start, first, workers)
        else:  # the current group ends at its last index; new groups of K' indices follow
            current = self.group(self.t)
            self.pieces.append((start + (current - first) * width, current, workers))
        self.workers = workers

    def step_size(self, ite: int) -> float:
        """η for the gradient of iteration ``ite`` (constant for OrMo)."""
        return self.lr

    def _update(self, w, g, ite) -> None:
        beta, lr = self.momentum, self.step_size(ite)
        if self.u is None:
            self.u = torch.zeros_like(w)
        if self.group(self.t) > self.latest_group:  # a new group starts: shift the momentum
            w.sub_(self.u, alpha=beta)
            self.u.mul_(beta)
            self.latest_group += 1
        delay = self.latest_group - self.group(ite)
        if delay < 0:
            raise ValueError(f"gradient of group {self.group(ite)} is newer than the latest group {self.latest_group}")
        self.u.add_(g, alpha=beta**delay * lr)
        caught_up = (1 - beta ** (delay + 1)) / (1 - beta) if beta else 1.0
        w.sub_(g, alpha=caught_up * lr)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "latest_group": self.latest_group, "workers": self.workers,
                "pieces": list(self.pieces), "u": None if self.u is None else self.u.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.latest_group = int(state["latest_group"])
        self.workers = int(state.get("workers", self.workers))
        self.pieces = [tuple(int(v) for v in piece) for piece in state.get("pieces", [(0, 0, self.workers)])]
        self.u = None if state["u"] is None else state["u"].clone()


def _check_workers(workers: int) -> None:
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (K) must be an int >= 1, got {workers!r}")


class OrMoDA(OrMo):
    """OrMo with the delay-adaptive step η · min(1, K/τ) (module docstring)."""

    def step_size(self, ite: int) -> float:
        staleness = self.t - ite
        return self.lr * min(1.0, self.workers / staleness) if staleness > 0 else self.lr


def staleness_summary(rule: ServerRule) -> dict:
    """Mean and max staleness of the updates so far."""
    s = rule.staleness
    return {"updates": len(s), "mean": (sum(s) / len(s)) if s else math.nan, "max": max(s, default=0)}
