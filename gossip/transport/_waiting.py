"""The one place that blocks on MPI: a watchdog for stuck operations, and the time spent waiting.

The runtime owns one :class:`Watchdog`; every op's wait (non-blocking handles, the blocking
collectives, shared memory, staging and the cross-rank input check) goes through its
:meth:`Watchdog.wait`. With an op timeout (``gossip.init(op_timeout=...)``,
``GOSSIP_OP_TIMEOUT`` or :func:`gossip.set_op_timeout`) the wait polls instead of blocking and,
past the timeout, raises :class:`gossip.OpTimeoutError` naming the op and the ranks it waits for;
the runtime's abort-on-error hook then ends the whole job instead of letting it hang. Without a
timeout it is a plain ``MPI_Waitall``.

:attr:`Watchdog.waited` is the total time this rank has spent blocked in communication since the
last reset: the part of communication that computation did not hide. When a trace is being
recorded (:mod:`gossip.tools.timeline`), every wait is one span on the main track.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from mpi4py import MPI

from gossip.errors import OpTimeoutError
from gossip.transport._trace import MAIN, Recorder, describe_peers, op_args


class Watchdog:
    """Waits on MPI requests for one rank, under an optional timeout; counts and traces the waits.

    ``recorder`` is the trace being recorded (anything with ``add(name, category, start, end,
    track, args)``), or None.
    """

    def __init__(self, rank: int, timeout: float | None = None) -> None:
        self.rank = rank
        self.timeout: float | None = None
        self.set_timeout(timeout)
        self.waited = 0.0
        self.recorder: Recorder | None = None
        # Requests of ops abandoned by a timeout: MPI may still read or write their buffers, which
        # these requests keep alive, so they are never dropped (the job normally aborts right after).
        self.abandoned: list[MPI.Request] = []

    def set_timeout(self, seconds: float | None) -> None:
        """Raise :class:`OpTimeoutError` when one op waits longer than ``seconds`` (None: wait forever)."""
        if seconds is not None and not (isinstance(seconds, int | float) and seconds > 0):
            raise ValueError(f"rank {self.rank}: the op timeout must be positive seconds or None, got {seconds!r}")
        self.timeout = None if seconds is None else float(seconds)

    def _block(self, block, test, what: str, peers: Sequence[int] | None, nbytes: int | None) -> tuple[float, float]:
        """Run ``block()``; with an op timeout, poll ``test()`` instead and raise past the deadline.
        Counts the time as waiting; returns (begin, end)."""
        begin = time.perf_counter()
        if self.timeout is None:
            block()
        else:
            deadline = begin + self.timeout
            while not test():
                if time.perf_counter() > deadline:
                    size = f" of {nbytes} bytes" if nbytes is not None else ""
                    raise OpTimeoutError(
                        f"rank {self.rank}: {what}{size} has waited more than {self.timeout:g} s for "
                        f"{describe_peers(peers)} (GOSSIP_OP_TIMEOUT): a peer failed, is far behind, or is "
                        f"in a different operation")
                os.sched_yield()
        end = time.perf_counter()
        self.waited += end - begin
        return begin, end

    def wait(self, requests: Sequence[MPI.Request], what: str, peers: Sequence[int] | None = None,
             nbytes: int | None = None) -> None:
        """Complete ``requests`` of the op ``what`` (on ``peers``; None: all ranks)."""
        if not requests:
            return
        try:
            begin, end = self._block(lambda: MPI.Request.Waitall(requests), lambda: MPI.Request.Testall(requests),
                                     what, peers, nbytes)
        except OpTimeoutError:
            self.abandoned.extend(requests)
            raise
        if self.recorder is not None:
            self.recorder.add(f"wait {what}", "communication", begin, end, MAIN, op_args(peers, nbytes))

    def probe(self, comm: MPI.Comm, source: int, tag: int, status: MPI.Status, what: str) -> None:
        """``MPI_Probe`` for a message from ``source`` under the same watchdog as :meth:`wait` (it
        polls with ``MPI_Iprobe`` when an op timeout is set); the time counts as waiting."""
        self._block(lambda: comm.Probe(source=source, tag=tag, status=status),
                    lambda: comm.Iprobe(source=source, tag=tag, status=status), what, [source], None)
