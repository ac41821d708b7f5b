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
