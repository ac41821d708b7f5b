"""The one place that blocks on MPI: a watchdog for stuck operations, and the time spent waiting.

The runtime owns one :class:`Watchdog`; every op's wait (non-blocking handles, the blocking
collectives, shared memory, staging and the cross-rank input check) goes through its
:meth:`Watchdog.wait`, and every collective MPI call that can only block (creating or freeing a
communicator or a window) is preceded by its :meth:`Watchdog.fence`. With an op timeout
(``gossip.init(op_timeout=...)``, ``GOSSIP_OP_TIMEOUT`` or :func:`gossip.set_op_timeout`) the wait
polls instead of blocking and, past the timeout, raises :class:`gossip.OpTimeoutError` naming the
op and the ranks it waits for; the runtime's abort-on-error hook then ends the whole job instead
of letting it hang. Without a timeout it is a plain ``MPI_Waitall``.

In fault-tolerant mode (:mod:`gossip.transport._failures`) every wait polls: each request's state
with ``MPI_Request_get_status``, which drives MPI's progress and frees nothing, and between polls
whether a failure is known or the runtime's communicator was revoked. Then it raises
:class:`gossip.RankFailure` (after revoking the communicators, so that peers waiting on live ranks
return too), and the requests are kept, never freed, for the life of the process: with Open MPI's
ob1 point-to-point layer, freeing a send request that a failure completed in error while its
fragment is still queued ends the process ("Send error after request freed"), and MPI may still
write into a receive buffer the request keeps alive. Requests are freed (``MPI_Waitall``) only once
all have completed and no failure is known.

:attr:`Watchdog.waited` is the total time this rank has spent blocked in communication since the
last reset: the part of communication that computation did not hide. When a trace is being
recorded (:mod:`gossip.tools.timeline`), every wait is one span on the main track.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

from mpi4py import MPI

from gossip.errors import OpTimeoutError, RankFailure
from gossip.transport._failures import FailureDetector, is_failure
from gossip.transport._trace import MAIN, Recorder, describe_peers, op_args


class Watchdog:
    """Waits on MPI requests for one rank, under an optional timeout; counts and traces the waits.

    ``recorder`` is the trace being recorded (anything with ``add(name, category, start, end,
    track, args)``), or None. ``failures``: the runtime's failure detector in fault-tolerant mode,
    else None.
    """

    def __init__(self, rank: int, timeout: float | None = None, failures: FailureDetector | None = None) -> None:
        self.rank = rank
        self.failures = failures
        self.timeout: float | None = None
        self.set_timeout(timeout)
        self.waited = 0.0
        self.recorder: Recorder | None = None
        # Requests (and operations holding them) abandoned by a timeout or a failure: MPI may still read
        # or write their buffers, which they keep alive, so they are never dropped.
        self.abandoned: list = []

    def set_timeout(self, seconds: float | None) -> None:
        """Raise :class:`OpTimeoutError` when one op waits longer than ``seconds`` (None: wait forever)."""
        if seconds is not None and not (isinstance(seconds, int | float) and seconds > 0):
            raise ValueError(f"rank {self.rank}: the op timeout must be positive seconds or None, got {seconds!r}")
        self.timeout = None if seconds is None else float(seconds)

    def _block(self, block, test, what: str, peers: Sequence[int] | None, nbytes: int | None) -> tuple[float, float]:
        """Run ``block()``; with an op timeout (or no ``block``), poll ``test()`` instead and raise past
        the deadline. Counts the time as waiting; returns (begin, end)."""
        begin = time.perf_counter()
        if self.timeout is None and block is not None:
            block()
        else:
            deadline = None if self.timeout is None else begin + self.timeout
            while not test():
                if deadline is not None and time.perf_counter() > deadline:
                    raise self._timed_out(what, peers, nbytes)
                os.sched_yield()
        end = time.perf_counter()
        self.waited += end - begin
        return begin, end

    def _timed_out(self, what: str, peers: Sequence[int] | None, nbytes: int | None) -> OpTimeoutError:
        size = f" of {nbytes} bytes" if nbytes is not None else ""
        return OpTimeoutError(
            f"rank {self.rank}: {what}{size} has waited more than {self.timeout:g} s for "
            f"{describe_peers(peers)} (GOSSIP_OP_TIMEOUT): a peer failed, is far behind, or is "
            f"in a different operation")

    def wait(self, requests: Sequence[MPI.Request], what: str, peers: Sequence[int] | None = None,
             nbytes: int | None = None) -> None:
        """Complete ``requests`` of the op ``what`` (on ``peers``; None: all ranks)."""
        if not requests:
            return
        try:
            if self.failures is not None:
                begin, end = self._poll_until_complete(requests, what, peers, nbytes)
            else:
                begin, end = self._block(lambda: MPI.Request.Waitall(requests),
                                         lambda: MPI.Request.Testall(requests), what, peers, nbytes)
        except (OpTimeoutError, RankFailure):
            self.abandoned.append(list(requests))
            raise
        if self.recorder is not None:
            self.recorder.add(f"wait {what}", "communication", begin, end, MAIN, op_args(peers, nbytes))

    def _poll_until_complete(self, requests: Sequence[MPI.Request], what: str, peers: Sequence[int] | None,
                             nbytes: int | None) -> tuple[float, float]:
        """Fault-tolerant mode's wait (module docstring): poll without freeing, raise on a known failure."""
        failures = self.failures
        begin = time.perf_counter()
        deadline = None if self.timeout is None else begin + self.timeout
        pending = list(requests)
        while pending:
            pending = [r for r in pending if not r.Get_status()]  # drives progress, frees nothing
            if failures.broken():
                failures.fail(what)
            if pending:
                if deadline is not None and time.perf_counter() > deadline:
                    raise self._timed_out(what, peers, nbytes)
                os.sched_yield()
        try:
            MPI.Request.Waitall(requests)  # all complete: frees them (a collective may have completed in error)
        except MPI.Exception as error:
            if is_failure(error) or failures.broken():
                failures.fail(what, error)
            raise
        end = time.perf_counter()
        self.waited += end - begin
        return begin, end

    def fence(self, comm: MPI.Comm, what: str, peers: Sequence[int] | None = None) -> None:
        """Collective over ``comm``: return once every rank of ``comm`` has called it, under the
        same watchdog as :meth:`wait` (``MPI_Ibarrier``, MPI-3.1 §5.12.1).

        Called right before a blocking collective (communicator or window creation, ``MPI_Comm_free``,
        ``MPI_Win_free``) so that a rank far behind, or dead, raises :class:`gossip.OpTimeoutError`
        or :class:`gossip.RankFailure` naming the op ``what`` instead of leaving the others blocked
        inside MPI; once the fence has passed, every rank is in the collective. Every rank must
        call it, whatever its own timeout: it costs one barrier's latency.
        """
        self.wait([comm.Ibarrier()], what, peers)

    def completed(self, requests: Sequence[MPI.Request], what: str) -> bool:
        """True (and the requests freed) if every request has completed; never blocks. In
        fault-tolerant mode a known failure raises :class:`gossip.RankFailure` instead."""
        if self.failures is None:
            return bool(MPI.Request.Testall(requests))
        complete = all(r.Get_status() for r in requests)  # drives progress, frees nothing
        if self.failures.broken():
            self.abandoned.append(list(requests))
            self.failures.fail(what)
        if complete:
            with self.failures.guard(what):
                MPI.Request.Waitall(requests)
        return complete

    def guard(self, what: str):  # noqa: ANN201 - a context manager
        """A context in which a failure error of a blocking MPI call raises :class:`gossip.RankFailure`
        (fault-tolerant mode; elsewhere it does nothing)."""
        return contextlib.nullcontext() if self.failures is None else self.failures.guard(what)

    def probe(self, comm: MPI.Comm, source: int, tag: int, status: MPI.Status, what: str) -> None:
        """``MPI_Probe`` for a message from ``source`` under the same watchdog as :meth:`wait` (it
        polls with ``MPI_Iprobe`` when an op timeout is set, or in fault-tolerant mode, where a known
        failure raises :class:`gossip.RankFailure`); the time counts as waiting."""
        if self.failures is None:
            self._block(lambda: comm.Probe(source=source, tag=tag, status=status),
                        lambda: comm.Iprobe(source=source, tag=tag, status=status), what, [source], None)
            return
        failures = self.failures

        def test() -> bool:
            with failures.guard(what):
                if comm.Iprobe(source=source, tag=tag, status=status):
                    return True
            if failures.broken():
                failures.fail(what)
            return False

        self._block(None, test, what, [source], None)
