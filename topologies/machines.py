"""Time-varying topologies for machines x local ranks: inner/outer ring and inner/outer exponential-2.

Rank ``r = m * local_size + l`` is local rank l of machine m. At step k one local rank per machine,
``o = k mod local_size`` (the "outer" rank), talks across machines, always to the same local rank
o of another machine; the other local ranks gossip among themselves inside the machine. So each
step moves one message per machine over the network and the outer role rotates through the
local ranks. Every rank sends to at most one rank and receives from at most one, weight 1/2:
each W(k) is doubly stochastic. Needs 1 or at least 3 local ranks per machine (with 2, the
inner group is one rank and a machine's two local ranks never exchange). (After the inner/outer
schedules of BlueFog: Ying, Yuan, Hu, Chen and Yin, "BlueFog: Make Decentralized Algorithms Practical
for Optimization and Deep Learning", arXiv 2111.04287, 2021.) ``resized(n, local_size=k)`` rebuilds a family
for n ranks on machines of k local ranks (default: the same k).
"""

from __future__ import annotations

from math import lcm

from topologies.dynamic import OnePeerFamily
from topologies.static import ceil_log, check_size


def _layout(n: int, local_size: int) -> int:
    check_size(n)
    if not isinstance(local_size, int) or isinstance(local_size, bool) or local_size < 1:
        raise ValueError(f"local_size must be a positive int, got {local_size!r}")
    if n % local_size:
        raise ValueError(f"{n} ranks do not split into machines of {local_size} local ranks")
    machines = n // local_size
    if local_size == 2 and machines > 1:
        raise ValueError("inner/outer schedules need 1 or at least 3 local ranks per machine: with 2, the inner "
                         "group is a single rank and the two local ranks of a machine would never mix; "
                         "use a machine-level schedule with intra-machine averaging instead")
    return machines


def _hop(step: int, size: int, ring: bool) -> int:
    """The step's hop among ``size`` members: 1 for a ring, ``2^(step mod ceil(log2 size))`` otherwise."""
    if size < 2:
        return 0
    return 1 if ring else 2 ** (step % ceil_log(size, 2))


class _InnerOuter(OnePeerFamily):
    _ring: bool

    def __init__(self, n: int, local_size: int) -> None:
        self.machines = _layout(n, local_size)
        self.n = n
        self.local_size = local_size
        inner = local_size - 1
        if self._ring:
            self.period = local_size
        else:
            self.period = lcm(local_size, max(1, ceil_log(self.machines, 2)), max(1, ceil_log(inner, 2)))

    def _resized(self, n: int, local_size: int | None) -> _InnerOuter:
        return type(self)(n, self.local_size if local_size is None else local_size)

    def targets(self, step: int) -> list[int | None]:
        size = self.local_size
        outer = step % size
        targets: list[int | None] = [None] * self.n
        outer_hop = _hop(step, self.machines, self._ring)
        inner_ranks = [lr for lr in range(size) if lr != outer]
        inner_hop = _hop(step, len(inner_ranks), self._ring)
        for m in range(self.machines):
            if outer_hop:
                targets[m * size + outer] = ((m + outer_hop) % self.machines) * size + outer
            if inner_hop:
                for position, lr in enumerate(inner_ranks):
                    peer = inner_ranks[(position + inner_hop) % len(inner_ranks)]
                    targets[m * size + lr] = m * size + peer
        return targets


class InnerOuterRing(_InnerOuter):
    """Inner/outer ring: the outer rank o sends to rank o of the next machine, ``m + 1 mod machines``;
    the other local ranks form a directed ring inside their machine (each sends to the next one).
    ``period = local_size``.
    """

    _ring = True


class InnerOuterExponentialTwo(_InnerOuter):
    """Inner/outer exponential-2: one-peer exponential-2 across machines for the outer rank (hop
    ``2^(k mod ceil(log2 machines))`` machines) and among the other local ranks inside a machine
    (hop ``2^(k mod ceil(log2 (local_size - 1)))`` positions in their list).
    """

    _ring = False
