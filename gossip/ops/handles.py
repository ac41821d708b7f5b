"""Handles of non-blocking operations: ``wait()`` finishes the op and returns its result.

Every handle with MPI requests is registered with the runtime's record of operations in flight
(:mod:`gossip.transport._in_flight`), which keeps its buffers alive should the handle be dropped
before ``wait()``. A handle holds every buffer MPI reads or writes until the requests complete (the
``keep`` argument, and whatever its finishing closure refers to), so the caller may drop its own
references to the input tensor as soon as the op has started. A handle whose operation was
abandoned after a rank failure (fault-tolerant mode) raises :class:`gossip.RankFailure` from ``wait()``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch
from mpi4py import MPI

from gossip.errors import GossipError, RankFailure
from gossip.transport._in_flight import InFlight, Operation
from gossip.transport._trace import COMMUNICATION, op_args


class Handle:
    """An operation in flight. ``wait()`` finishes it and returns its result; ``done()`` polls.

    Several handles may be in flight at once and may be waited on in any order. ``what``,
    ``peers`` (None: all ranks) and ``nbytes`` describe the op for the watchdog and the timeline.
    ``in_flight`` is the runtime's record (:class:`InFlight`), which keeps the op's buffers alive
    should this handle be dropped before ``wait()``. ``keep``: the buffers handed to MPI (send and
    receive), referenced until the operation finishes, whether through this handle or, once it is
    dropped, through the in-flight record.
    """

    def __init__(self, requests: list[MPI.Request], finish: Callable[[], torch.Tensor], *, what: str = "op",
                 peers: Sequence[int] | None = None, nbytes: int | None = None,
                 in_flight: InFlight | None = None, keep: Sequence[object] = ()) -> None:
        if keep:
            finish = _holding(finish, tuple(keep))
        self._operation: Operation | None = Operation(requests, finish, what)
        self._result: torch.Tensor | None = None
        self.what, self.peers, self.nbytes = what, peers, nbytes
        tracing = in_flight is not None and in_flight.watchdog.recorder is not None
        self._launched = time.perf_counter() if tracing else None
        self._finalizer = None
        self._abandoned: str | None = None  # why the operation was given up (a rank failure), or None
        self._in_flight = in_flight
        if requests:
            if in_flight is None:
                raise GossipError(f"{what}: a handle with MPI requests needs the runtime's in-flight record")
            self._finalizer = in_flight.track(self)

    def done(self) -> bool:
        """True if the transfers have completed (``wait()`` will not block on communication)."""
        operation = self._operation
        return operation is None or not operation.requests or operation.done(self._in_flight.watchdog)

    def _abandon(self, reason: str) -> Operation:
        """Give the operation up (after a rank failure): ``wait()`` will raise; returns the operation,
        whose requests and buffers the caller keeps."""
        operation, self._operation = self._operation, None
        self._abandoned = reason
        if self._finalizer is not None:
            self._finalizer.detach()
        return operation

    def wait(self) -> torch.Tensor:
        """Block until the transfers complete, finish the operation and return its result."""
        if self._abandoned is not None:
            raise RankFailure(f"{self.what}: {self._abandoned}")
        operation = self._operation
        if operation is not None:
            if operation.requests:
                self._in_flight.watchdog.wait(operation.requests, self.what, self.peers, self.nbytes)
            self._operation = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._in_flight.completed()
            self._result = operation.finish()
            if self._launched is not None:
                recorder = self._in_flight.watchdog.recorder
                if recorder is not None:
                    recorder.add(self.what, "communication", self._launched, time.perf_counter(), COMMUNICATION,
                                 op_args(self.peers, self.nbytes))
        assert self._result is not None
        return self._result


def _holding(finish: Callable[[], torch.Tensor], keep: tuple) -> Callable[[], torch.Tensor]:
    """``finish`` bound with ``keep`` (the buffers MPI uses), so that whoever holds the operation holds them."""
    return functools.partial(_finish_keeping, finish, keep)


def _finish_keeping(finish: Callable[[], torch.Tensor], keep: tuple) -> torch.Tensor:  # noqa: ARG001 - held
    return finish()
