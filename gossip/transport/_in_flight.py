"""The runtime's record of the operations still in flight.

A buffer handed to MPI must stay alive and untouched until its request completes. A handle
(:class:`gossip.ops.handles.Handle`) owns its requests (which hold their buffers) and the closure
that finishes the op (which holds the pooled buffers it gives back). If the caller drops a handle
before waiting on it (an optimizer garbage-collected with its overlapped gossip in flight, a
benchmark moving on), MPI would go on reading and writing memory that Python has freed. So every
handle with requests is registered with :class:`InFlight`: when a handle is collected unfinished,
its requests and buffers are adopted, kept until MPI completes them (tested at every new op,
waited at ``shutdown``), and only then dropped; the op's result is discarded and nothing is
written into the caller's tensors.

After a rank failure (fault-tolerant mode), :meth:`InFlight.abandon` gives up every operation in
flight: a live handle's ``wait()`` then raises :class:`gossip.RankFailure`, and the requests and
buffers of every operation are kept by the watchdog for the life of the process, never freed
(:mod:`gossip.transport._waiting` says why).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from mpi4py import MPI

from gossip.errors import RankFailure
from gossip.transport._waiting import Watchdog


class Operation:
    """What must outlive a dropped handle: its requests and the buffers its finish closure holds."""

    __slots__ = ("requests", "finish", "what")

    def __init__(self, requests: list[MPI.Request], finish: Callable[[], torch.Tensor], what: str) -> None:
        self.requests, self.finish, self.what = requests, finish, what

    def done(self, watchdog: Watchdog) -> bool:
        """True (requests freed) once MPI has completed every request; never blocks."""
        return watchdog.completed(self.requests, self.what)


class InFlight:
    """The runtime's operations in flight: live handles (weakly) and the adopted operations of
    handles dropped before completion (strongly, until MPI completes them)."""

    def __init__(self, watchdog: Watchdog, warn: bool = False) -> None:
        self.watchdog = watchdog
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._orphans: list[Operation] = []
        self.warn = warn  # say so on stderr when a handle is dropped unfinished (debug mode)
        self.adopted = 0  # how many operations were ever adopted
        self.active = 0  # operations started and not yet completed (read by the progress thread)
        self.on_start = None  # a threading.Event set when an operation starts (the progress thread's)

    def track(self, handle) -> weakref.finalize:  # noqa: ANN001 - a gossip.ops.handles.Handle
        self._live.add(handle)
        self.reap()
        self.active += 1
        if self.on_start is not None:
            self.on_start.set()
        return weakref.finalize(handle, self._adopt, handle._operation)

    def completed(self) -> None:
        self.active -= 1

    def _adopt(self, operation: Operation) -> None:
        self._orphans.append(operation)
        self.adopted += 1
        if self.warn:
            print(f"gossip: rank {self.watchdog.rank}: a {operation.what} handle was dropped before completion; "
                  "its buffers are kept until MPI completes it and its result is discarded", file=sys.stderr)

    def reap(self) -> None:
        """Drop the adopted operations that MPI has completed (progressing the others); after a
        failure, keep them with the watchdog's abandoned requests instead."""
        if self._orphans:
            try:
                remaining = [op for op in self._orphans if not op.done(self.watchdog)]
            except RankFailure:
                self.watchdog.abandoned.extend(self._orphans)
                remaining = []
            self.active -= len(self._orphans) - len(remaining)
            self._orphans = remaining

    def pending(self) -> int:
        """Operations started and not completed: live handles not yet waited on, plus adopted ones."""
        self.reap()
        return sum(1 for h in self._live if h._operation is not None) + len(self._orphans)

    def complete_all(self) -> None:
        """Complete every operation in flight (collective in effect: the peers must run theirs);
        live handles are finished as if waited on, adopted operations are completed and dropped."""
        for handle in list(self._live):
            if handle._operation is not None:
                handle.wait()
        orphans, self._orphans = self._orphans, []
        for op in orphans:
            self.watchdog.wait(op.requests, f"{op.what} (dropped before completion)")
            self.active -= 1

    def abandon(self, reason: str) -> None:
        """Give up every operation in flight after a failure, waiting for none: live handles raise
        :class:`gossip.RankFailure` with ``reason`` when waited on; every operation's requests and
        buffers go to the watchdog's abandoned list."""
        for handle in list(self._live):
            if handle._operation is not None:
                self.watchdog.abandoned.append(handle._abandon(reason))
        self.watchdog.abandoned.extend(self._orphans)
        self._orphans = []
        self._live = weakref.WeakSet()
        self.active = 0
