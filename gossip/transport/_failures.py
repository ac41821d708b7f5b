"""Fault-tolerant mode: which ranks failed, revoking the runtime's communicators, and failures as exceptions.

With ULFM (User-Level Failure Mitigation: Bland, Bouteiller, Herault, Bosilca and Dongarra,
"Post-failure recovery of MPI communication capability: design and rationale", IJHPCA 27(3),
2013; Open MPI's ``mpirun --with-ft ulfm``), an MPI call that cannot complete because a process
died returns ``MPI_ERR_PROC_FAILED`` instead of blocking, and ``MPI_Comm_revoke`` makes every
pending and future call on a communicator return ``MPI_ERR_REVOKED`` on every rank, so that ranks
blocked on a live peer learn of the failure too. ``MPI_Comm_get_failed`` lists the failures this
rank knows of; that knowledge arrives through MPI's progress engine, so a rank waiting in a poll
loop learns of a failure within milliseconds.

:class:`FailureDetector` watches the runtime's communicator: :meth:`FailureDetector.check` raises
:class:`gossip.RankFailure` once a failure is known or the communicator is revoked, after revoking
the runtime's communicators itself (:meth:`FailureDetector.revoke`); :meth:`FailureDetector.guard`
turns a failure error of a blocking MPI call into the same exception.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn

from mpi4py import MPI

from gossip.errors import RankFailure

#: The error classes that mean a process failed or a peer revoked the communicator.
FAILURE_CLASSES = frozenset({MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED})

# A rank that learns of a failure through a peer's revocation waits this long for the failure
# itself to reach it, to name the failed ranks.
_NAMING_GRACE_S = 1.0


def is_failure(error: BaseException) -> bool:
    """True if ``error`` is an MPI error saying a process failed or a communicator was revoked."""
    return isinstance(error, MPI.Exception) and error.Get_error_class() in FAILURE_CLASSES


def drive_progress() -> None:
    """Run MPI's progress engine once (failure notices arrive through it)."""
    MPI.COMM_SELF.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)


class FailureDetector:
    """Failures among the ranks of ``comm`` (the runtime's communicator), as this rank knows them.

    ``also_revoke`` returns the runtime's other communicators (machine, leaders, graph, ...), which
    :meth:`revoke` revokes with ``comm``.
    """

    def __init__(self, comm: MPI.Comm, also_revoke: Callable[[], Iterable[MPI.Comm]] = tuple) -> None:
        self.comm = comm
        self.also_revoke = also_revoke

    def failed(self) -> list[int]:
        """The ranks of ``comm`` this rank knows to have failed (``MPI_Comm_get_failed``)."""
        group = self.comm.Get_failed()
        try:
            count = group.Get_size()
            if count == 0:
                return []
            everyone = self.comm.Get_group()
            try:
                return sorted(MPI.Group.Translate_ranks(group, list(range(count)), everyone))
            finally:
                everyone.Free()
        finally:
            group.Free()

    def broken(self) -> bool:
        """True once ``comm`` is revoked or a failure among its ranks is known (no progress driven)."""
        if self.comm.Is_revoked():
            return True
        group = self.comm.Get_failed()
        count = group.Get_size()
        group.Free()
        return count > 0

    def check(self, what: str) -> None:
        """Drive MPI's progress once and raise :class:`RankFailure` if a failure is known."""
        drive_progress()
        if self.broken():
            self.fail(what)

    def revoke(self) -> None:
        """Revoke ``comm`` and the runtime's other communicators (``MPI_Comm_revoke``: local, never blocks)."""
        for comm in (self.comm, *self.also_revoke()):
            if comm == MPI.COMM_NULL:
                continue
            with contextlib.suppress(MPI.Exception):
                if not comm.Is_revoked():
                    comm.Revoke()

    def fail(self, what: str, cause: BaseException | None = None) -> NoReturn:
        """Revoke the runtime's communicators and raise :class:`RankFailure` for the op ``what``."""
        self.revoke()
        ranks = self.failed()
        deadline = time.monotonic() + _NAMING_GRACE_S
        while not ranks and time.monotonic() < deadline:  # revoked by a peer: the failure itself follows
            drive_progress()
            time.sleep(0.001)
            ranks = self.failed()
        rank = self.comm.rank
        if ranks:
            named = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {self.comm.size} failed"
        else:
            named = "a peer revoked the runtime's communicator (a failure, or gossip.recover() on another rank)"
        if cause is not None and is_failure(cause):
            named += f" ({cause.Get_error_string()})"
        raise RankFailure(f"rank {rank}: {what}: {named}; the surviving ranks continue after gossip.recover()",
                          tuple(ranks)) from cause

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failure error of the blocking MPI calls inside into :class:`RankFailure` (after revoking)."""
        try:
            yield
        except MPI.Exception as error:
            if is_failure(error) or self.broken():
                self.fail(what, error)
            raise
