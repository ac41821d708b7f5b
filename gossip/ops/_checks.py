"""Cross-rank agreement on an operation's inputs, so bad input raises everywhere instead of hanging.

Each rank describes the edges it will use (ranks it sends to, ranks it receives from) and a
*signature* of what it sends (operation, shape, dtype, ...). Every directed edge ``s -> d`` is
counted twice: ``+h(s, d, sig_s)`` by the sender and ``-h(s, d, sig_d)`` by the receiver, with a
64-bit mixing hash h. One ``Allreduce(SUM)`` of ``[balance, problem_count]`` (two uint64, wrapping
arithmetic) is zero on every rank exactly when all send/receive patterns match and both ends of
every edge agree on the signature (up to a 2^-64 chance of a cancelling collision), and no rank
found a local problem. Cost: one latency-bound allreduce of 16 bytes per operation.

Only when that sum is non-zero do the ranks exchange their full descriptions (an allgather,
error path only) and every rank raises :class:`InputMismatchError` naming each problem's rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import numpy as np
from mpi4py import MPI

from gossip.errors import GossipError, InputMismatchError
from gossip.transport._waiting import Watchdog

_MASK = (1 << 64) - 1
# The check's send and receive buffers, reused by every call (ops are not re-entrant).
_LOCAL = np.zeros(4, dtype=np.uint64)
_TOTAL = np.zeros(4, dtype=np.uint64)


def signature(*parts: object) -> int:
    """A stable 64-bit id of a description (the same on every rank and every run)."""
    try:
        return _cached_signature(parts)
    except TypeError:  # an unhashable part (bad input on its way to being reported)
        return _digest(parts)


def _digest(parts: tuple) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


_cached_signature = lru_cache(maxsize=4096)(_digest)


def _edge_hash(src: int, dst: int, sig: int) -> int:
    # splitmix64 finaliser over the combined fields
    z = (sig ^ (src * 0x9E3779B97F4A7C15) ^ (dst * 0xC2B2AE3D27D4EB4F)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def agree(
    comm: MPI.Comm,
    *,
    watchdog: Watchdog,
    what: str,
    sends_to: Iterable[int],
    receives_from: Iterable[int],
    sig: int,
    description: str | Callable[[], str],
    problem: str | None,
    protocol: int | None = None,
) -> None:
    """Collective: return if every rank's input is consistent, else raise on every rank.

    ``description`` is a human-readable form of ``sig`` used in messages (or a function making
    it, called only on the error path); ``problem`` is a local error message (bad argument on this
    rank) or None. ``protocol`` (a small int, e.g. which transport the op takes) must be the same
    on every rank, edges or not: ranks that take different collective protocols would hang.
    """
    sends_to = tuple(sends_to)
    receives_from = tuple(receives_from)
    balance = _balance(comm.rank, sends_to, receives_from, sig)
    vote = 0 if protocol is None else protocol + 1
    global _LOCAL, _TOTAL
    _LOCAL[:] = (balance, 0 if problem is None else 1, vote, vote * vote)
    try:
        watchdog.wait([comm.Iallreduce(_LOCAL, _TOTAL, op=MPI.SUM)], f"cross-rank check of {what}")
    except GossipError:  # a timeout or a rank failure: the abandoned allreduce may still write them
        _LOCAL, _TOTAL = np.zeros_like(_LOCAL), np.zeros_like(_TOTAL)
        raise
    balance_sum, problem_count, vote_sum, vote_square_sum = _TOTAL.tolist()
    # All votes equal  <=>  (sum v)^2 == n * sum v^2 (Cauchy-Schwarz; exact for small ints).
    if balance_sum == 0 and problem_count == 0 and vote_sum * vote_sum == comm.size * vote_square_sum:
        return
    if callable(description):
        description = description()
    reports = comm.allgather((sorted(set(sends_to)), sorted(set(receives_from)), description, problem, protocol))
    raise InputMismatchError(_diagnose(what, comm.rank, reports))


@lru_cache(maxsize=4096)
def _balance(rank: int, sends_to: tuple[int, ...], receives_from: tuple[int, ...], sig: int) -> int:
    """This rank's share of the edge-hash sum (cached: a training loop repeats the same few)."""
    balance = 0
    for dst in sends_to:
        balance += _edge_hash(rank, dst, sig)
    for src in receives_from:
        balance -= _edge_hash(src, rank, sig)
    return balance & _MASK


def _diagnose(what: str, me: int, reports: Sequence[tuple]) -> str:
    """Explain, for every rank alike, what is inconsistent; lines about ``me`` come first."""
    problems: list[tuple[set[int], str]] = []
    for rank, (_, _, _, problem, _) in enumerate(reports):
        if problem is not None:
            problems.append(({rank}, f"rank {rank}: {problem}"))
    seen_pairs: set[tuple[int, int]] = set()
    local_problem_ranks = {r for r, rep in enumerate(reports) if rep[3] is not None}
    for src, (sends_to, _, src_desc, _, _) in enumerate(reports):
        for dst in sends_to:
            if not 0 <= dst < len(reports):
                continue  # already reported as a local problem
            dst_receives, dst_desc = reports[dst][1], reports[dst][2]
            if src not in dst_receives:
                if dst not in local_problem_ranks:
                    problems.append(
                        ({src, dst}, f"rank {src} sends to rank {dst}, which does not receive from rank {src}"))
            elif src_desc != dst_desc and (dst, src) not in seen_pairs:
                seen_pairs.add((src, dst))
                problems.append(({src, dst}, f"rank {src} has {src_desc} but rank {dst} has {dst_desc}"))
    for dst, (_, receives_from, _, _, _) in enumerate(reports):
        for src in receives_from:
            if 0 <= src < len(reports) and dst not in reports[src][0] and src not in local_problem_ranks:
                problems.append(({src, dst}, f"rank {dst} receives from rank {src}, which does not send to rank {dst}"))
    protocols = {rep[4] for rep in reports}
    if len(protocols) > 1 and not local_problem_ranks:
        by_protocol = {p: [r for r, rep in enumerate(reports) if rep[4] == p] for p in sorted(protocols, key=str)}
        listing = "; ".join(f"ranks {ranks}: {reports[ranks[0]][2]}" for ranks in by_protocol.values())
        problems.append((set(range(len(reports))), f"ranks take different transfer paths ({listing}); sizes, "
                         "devices or blocking/non-blocking calls must match on every rank"))
    if not problems:  # a hash collision in the balance, or a rank whose problem text was lost
        problems.append((set(), "the ranks' inputs disagree (send/receive patterns or signatures)"))
    mine = [text for ranks, text in problems if me in ranks]
    others = [text for ranks, text in problems if me not in ranks]
    lines = mine + others
    head = f"{what} failed its cross-rank check on rank {me}"
    shown = lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    return head + ":\n  " + "\n  ".join(shown)


def ring_edges(rank: int, size: int) -> tuple[list[int], list[int]]:
    """Edges that make :func:`agree` check that *all* ranks share one signature (for collectives)."""
    if size == 1:
        return [], []
    return [(rank + 1) % size], [(rank - 1) % size]
