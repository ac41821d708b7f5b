"""Handles of nonblocking operations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from mpi4py import MPI


class Handle:
    """An operation in flight. ``wait()`` finishes it and returns its result; ``done()`` polls.

    Several handles may be in flight at once and may be waited on in any order.
    """

    def __init__(self, requests: list[MPI.Request], finish: Callable[[], torch.Tensor]) -> None:
        self._requests = requests
        self._finish: Callable[[], torch.Tensor] | None = finish
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        """True if the transfers have completed (``wait()`` will not block on communication)."""
        return self._finish is None or bool(MPI.Request.Testall(self._requests))

    def wait(self) -> torch.Tensor:
        """Block until the transfers complete, finish the operation and return its result."""
        if self._finish is not None:
            MPI.Request.Waitall(self._requests)
            finish, self._finish = self._finish, None
            self._result = finish()
        assert self._result is not None
        return self._result
