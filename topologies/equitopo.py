"""EquiTopo graphs: random circulant sums with an O(1) consensus rate (Song et al., NeurIPS 2022).

Song, Li, Jin, Shi, Yan, Yin and Yuan, "Communication-Efficient Topologies for Decentralized
Learning with O(1) Consensus Rate", NeurIPS 2022. The building block for a shift u in {1..n-1} is

    A(u) = I/n + (n-1)/n * P^u,        P^u: node i sends to (i + u) mod n,

whose average over all u is exactly the averaging matrix J = 11^T/n. Summing a few random A(u)
therefore concentrates around J (matrix Bernstein): with M i.i.d. uniform shifts,
``P(||W - J||_2 >= eps) <= 2n exp(-3 M eps^2 / 8)``, so ``M = ceil(8 ln(2n/p) / (3 eps^2))``
shifts give ``||W - J||_2 < eps`` with probability at least 1 - p, whatever n.

* D-EquiStatic: ``W = (1/M) sum_m A(u_m)``; directed circulant, degree <= M, self weight 1/n.
* U-EquiStatic: ``W = (1/2M) sum_m (A(u_m) + A(u_m)^T)``; symmetric, degree <= 2M.
* OD-EquiDyn: each step one random shift u, ``W(k) = (1 - eta) I + eta A(u)``: one peer per rank.
* OU-EquiDyn: each step one random shift u and start s; scanning nodes s, s+1, ... (mod n), node i
  pairs with (i + u) mod n when both are free; pairs mix with weight ``eta (n-1)/n``, unpaired
  nodes keep their value. Symmetric, one peer per rank.

For OD-EquiDyn with u uniform on {1..n-1}, ``E||W(k) x||^2 = (1 - 2 eta (1 - eta + eta/n)) ||x||^2``
for x orthogonal to 1, minimised at ``eta = n / (2(n - 1))`` (about 1/2): the default.
Shifts are drawn from ``numpy.random.default_rng`` seeded by ``seed`` (static) or ``[seed, step]``
(dynamic), so every rank draws the same graph without communicating. ``resized(n)`` of an EquiDyn
family keeps its seed and any ``eta`` or ``shifts`` it was given (ValueError if a given shift is
not in 1..n-1); the defaults are recomputed for n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np

from topologies.dynamic import OnePeerFamily
from topologies.static import ceil_log, check_seed, check_size
from topologies.weights import from_matrix


def shifts_for(n: int, eps: float, p: float) -> int:
    """Number of shifts M for which ``||W - J||_2 < eps`` with probability >= 1 - p (matrix Bernstein)."""
    check_size(n)
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    return max(1, math.ceil(8 * math.log(2 * n / p) / (3 * eps**2)))


def draw_shifts(n: int, count: int | None = None, *, eps: float | None = None, p: float | None = None,
                seed: int = 0) -> list[int]:
    """``count`` shifts drawn i.i.d. uniform on {1..n-1} from ``default_rng(seed)`` (empty for n = 1).

    ``count`` defaults to :func:`shifts_for` (eps, p) when those are given, else ``ceil(log2 n)``
    (the exponential graph's degree; the O(1) guarantee needs M of order ln(n)/eps^2). A draw
    whose shifts share a factor with n (a disconnected circulant, e.g. {2, 4, 6} for n = 8) is
    replaced by the generator's next draw, so the graph is always strongly connected.
    """
    check_size(n)
    if count is None:
        count = shifts_for(n, eps, p) if eps is not None or p is not None else max(1, ceil_log(n, 2))
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of shifts M must be a positive int, got {count!r}")
    if n == 1:
        return []
    rng = np.random.default_rng(seed)
    while True:
        shifts = [int(u) for u in rng.integers(1, n, size=count)]
        if math.gcd(n, *shifts) == 1:
            return shifts


def _check_shifts(n: int, shifts: Sequence[int]) -> list[int]:
    out = [int(u) for u in shifts]
    if n > 1 and not out:
        raise ValueError("give at least one shift")
    bad = [u for u in out if not 1 <= u < n]
    if bad:
        raise ValueError(f"shifts must be in 1..{n - 1} for n = {n}, got {bad[:5]}")
    return out


def _basis(n: int, u: int) -> np.ndarray:
    """A(u) in the mixing-matrix convention: receiver (i + u) mod n gives (n-1)/n to sender i, 1/n to itself."""
    a = np.eye(n) / n
    a[(np.arange(n) + u) % n, np.arange(n)] += (n - 1) / n
    return a


def _shift_average(n: int, M: int | None, eps: float | None, p: float | None, seed: int,
                   shifts: Sequence[int] | None) -> np.ndarray:
    """``(1/M) sum_m A(u_m)`` over the given or drawn shifts (the 1 x 1 identity for n = 1)."""
    check_size(n)
    us = _check_shifts(n, shifts) if shifts is not None else draw_shifts(n, M, eps=eps, p=p, seed=seed)
    if n == 1:
        return np.ones((1, 1))
    return sum(_basis(n, u) for u in us) / len(us)


def d_equi_static(n: int, M: int | None = None, *, eps: float | None = None, p: float | None = None,
                  seed: int = 0, shifts: Sequence[int] | None = None) -> nx.DiGraph:
    """D-EquiStatic: ``W = (1/M) sum_m A(u_m)`` over M random shifts (or the ``shifts`` given).

    Directed, doubly stochastic circulant; every node sends to ``(i + u_m) mod n`` for each distinct
    drawn shift and keeps self weight 1/n. Repeated shifts add their weights.
    """
    return from_matrix(_shift_average(n, M, eps, p, seed, shifts))


def u_equi_static(n: int, M: int | None = None, *, eps: float | None = None, p: float | None = None,
                  seed: int = 0, shifts: Sequence[int] | None = None) -> nx.DiGraph:
    """U-EquiStatic: ``W = (1/2M) sum_m (A(u_m) + A(u_m)^T)``, the symmetric part of D-EquiStatic
    with the same shifts; degree <= 2M."""
    w = _shift_average(n, M, eps, p, seed, shifts)
    return from_matrix((w + w.T) / 2)


class _EquiDyn(OnePeerFamily):
    def __init__(self, n: int, eta: float | None = None, seed: int = 0, shifts: Sequence[int] | None = None) -> None:
        check_size(n)
        check_seed(seed)
        given_eta = eta
        if eta is None:
            eta = n / (2 * (n - 1)) if n > 1 else 0.5
        if not 0 < eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {eta!r}")
        self.n = n
        self.eta = float(eta)
        self.seed = seed
        self.shifts = _check_shifts(n, shifts) if shifts is not None else list(range(1, n))
        self.neighbor_weight = self.eta * (n - 1) / n
        self.period = None if n > 1 else 1
        self._given = (given_eta, shifts)  # what resized() keeps: None means "the default for the size"

    def _resized(self, n: int, local_size: int | None) -> _EquiDyn:
        eta, shifts = self._given
        return type(self)(n, eta=eta, seed=self.seed, shifts=shifts)

    def _draw(self, step: int) -> tuple[int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, step])
        return self.shifts[int(rng.integers(len(self.shifts)))], rng


class OnePeerDirectedEquiDyn(_EquiDyn):
    """OD-EquiDyn: at step k, one shift u drawn uniformly from ``shifts`` (default 1..n-1);
    rank i sends to ``(i + u) mod n`` and ``W(k) = (1 - eta) I + eta A(u)``: the receiver gives
    ``eta (n-1)/n`` to its one sender and keeps the rest. ``eta`` defaults to ``n / (2(n-1))``.
    """

    def targets(self, step: int) -> np.ndarray:
        if self.n == 1:
            return np.full(1, -1)
        u, _ = self._draw(step)
        return (np.arange(self.n) + u) % self.n


class OnePeerUndirectedEquiDyn(_EquiDyn):
    """OU-EquiDyn: at step k, a shift u and a start node s drawn uniformly; scanning i = s, s+1, ...
    (mod n), i pairs with ``(i + u) mod n`` if both are still unpaired. Each pair exchanges both ways
    with weight ``eta (n-1)/n``; unpaired ranks sit the step out. W(k) is symmetric. ``eta``, ``seed``
    and ``shifts`` as for :class:`OnePeerDirectedEquiDyn`.
    """

    def targets(self, step: int) -> list[int | None]:
        if self.n == 1:
            return [None]
        u, rng = self._draw(step)
        start = int(rng.integers(self.n))
        targets: list[int | None] = [None] * self.n
        for offset in range(self.n):
            i = (start + offset) % self.n
            j = (i + u) % self.n
            if targets[i] is None and targets[j] is None and i != j:
                targets[i], targets[j] = j, i
        return targets
