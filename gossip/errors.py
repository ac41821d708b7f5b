"""Exceptions raised by the gossip runtime."""


class GossipError(RuntimeError):
    """Misuse of the runtime (e.g. an op before :func:`gossip.init`)."""


class InputMismatchError(GossipError, ValueError):
    """Bad or inconsistent input found by the cross-rank check of a collective operation.

    Raised on *every* rank taking part, after the ranks agreed that something is wrong, so that
    no rank is left waiting in a transfer. The message lists each problem with the rank it was
    found on.
    """


class OpTimeoutError(GossipError):
    """A communication op waited longer than the op timeout (a peer failed, or the ranks diverged)."""


class RankFailure(GossipError):
    """A rank of the job failed (fault-tolerant mode, :mod:`gossip.ops.recovery`).

    Raised by every blocking point of the runtime once a failure is known, on every surviving
    rank: the failed process itself (``MPI_ERR_PROC_FAILED``), or a peer that saw it and revoked
    the runtime's communicators (``MPI_ERR_REVOKED``, ULFM: Bland et al., "Post-failure recovery
    of MPI communication capability: design and rationale", IJHPCA 27(3), 2013). ``ranks`` are the
    failed ranks in the numbering of the communicator the runtime used when the failure was found
    (empty when a peer revoked it and no failure has reached this rank yet). The survivors continue
    with :func:`gossip.recover`.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
