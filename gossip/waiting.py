"""The one place that blocks on MPI: a watchdog for stuck operations, and the time spent waiting.

Every op's wait (nonblocking handles, the blocking collectives and the cross-rank input check)
goes through :func:`wait`. With an op timeout set (:func:`set_op_timeout` or
``GOSSIP_OP_TIMEOUT=<seconds>``, read by ``gossip.init``) the wait polls instead of blocking and,
past the timeout, raises :class:`OpTimeoutError` naming the op and the ranks it waits for; the
runtime's abort-on-error hook then ends the whole job instead of letting it hang. Without a
timeout it is a plain ``MPI_Waitall``.

:func:`waited_seconds` is the total time this rank has spent blocked in communication since
:func:`reset_waited`: the part of communication that computation did not hide.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from mpi4py import MPI

from gossip import timeline
from gossip.errors import GossipError

_op_timeout: float | None = None
_waited = 0.0
# Requests of ops abandoned by a timeout: MPI may still read or write their buffers, which these
# requests keep alive, so they are never dropped (the job normally aborts right after).
_abandoned: list[MPI.Request] = []


class OpTimeoutError(GossipError):
    """A communication op waited longer than the op timeout (a peer failed, or the ranks diverged)."""


def set_op_timeout(seconds: float | None) -> None:
    """Raise :class:`OpTimeoutError` when one op waits longer than ``seconds`` (None: wait forever)."""
    global _op_timeout
    if seconds is not None and not seconds > 0:
        raise ValueError(f"the op timeout must be positive seconds or None, got {seconds!r}")
    _op_timeout = None if seconds is None else float(seconds)


def op_timeout() -> float | None:
    return _op_timeout


def waited_seconds() -> float:
    return _waited


def reset_waited() -> None:
    global _waited
    _waited = 0.0


def _block(block, test, what: str, peers: Sequence[int] | None, nbytes: int | None) -> tuple[float, float]:
    """Run ``block()``; with an op timeout, poll ``test()`` instead and raise past the deadline.
    Counts the time as waiting; returns (begin, end)."""
    global _waited
    begin = time.perf_counter()
    if _op_timeout is None:
        block()
    else:
        deadline = begin + _op_timeout
        while not test():
            if time.perf_counter() > deadline:
                size = f" of {nbytes} bytes" if nbytes is not None else ""
                raise OpTimeoutError(
                    f"rank {MPI.COMM_WORLD.rank}: {what}{size} has waited more than {_op_timeout:g} s for "
                    f"{timeline.describe_peers(peers)} (GOSSIP_OP_TIMEOUT): a peer failed, is far behind, or is "
                    f"in a different operation")
            os.sched_yield()
    end = time.perf_counter()
    _waited += end - begin
    return begin, end


def wait(requests: Sequence[MPI.Request], what: str, peers: Sequence[int] | None = None,
         nbytes: int | None = None) -> None:
    """Complete ``requests`` of the op ``what`` (on ``peers``; None: all ranks)."""
    if not requests:
        return
    try:
        begin, end = _block(lambda: MPI.Request.Waitall(requests), lambda: MPI.Request.Testall(requests), what,
                            peers, nbytes)
    except OpTimeoutError:
        _abandoned.extend(requests)
        raise
    if timeline.active():
        timeline.record(f"wait {what}", "communication", begin, end, args=timeline.op_args(peers, nbytes))


def probe(comm: MPI.Comm, source: int, tag: int, status: MPI.Status, what: str) -> None:
    """``MPI_Probe`` for a message from ``source`` under the same watchdog as :func:`wait` (it polls
    with ``MPI_Iprobe`` when an op timeout is set); the time counts as waiting."""
    _block(lambda: comm.Probe(source=source, tag=tag, status=status),
           lambda: comm.Iprobe(source=source, tag=tag, status=status), what, [source], None)
