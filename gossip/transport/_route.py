"""How one call's bytes move: a :class:`Route`, chosen per call by :meth:`gossip.transport.Transport.route`.

=====================  ======================================================================
kind                   the bytes
=====================  ======================================================================
``SHARED_MEMORY``      are read by the neighbours where they lie, in node shared memory
                       (:mod:`gossip.transport._shared_memory`): blocking CPU neighbour
                       averaging when every rank is on one machine
``MPI``                go to MPI in the tensor's own memory: a CPU tensor, or a CUDA tensor
                       with a CUDA-aware MPI
``STAGED``             go through one pinned host copy each way, whole: a CUDA tensor when
                       MPI cannot read device memory (or when the far side is host memory)
``PIPELINED``          go through pinned host memory in chunks, copies overlapping the
                       transfer (:mod:`gossip.transport._staging`): blocking ops only
=====================  ======================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RouteKind(enum.Enum):
    """Where a call's bytes sit while they move (module docstring)."""

    SHARED_MEMORY = "shared memory"
    MPI = "MPI message"
    STAGED = "staged whole through pinned host memory"
    PIPELINED = "staged in chunks through pinned host memory"


@dataclass(frozen=True)
class Route:
    """One call's way of moving its bytes.

    ``blocking``: the op waits for the transfer before it returns. ``chunk_elements``
    (``PIPELINED``): elements of one staged chunk. ``location`` (``SHARED_MEMORY``):
    ``(window index, byte offset)`` of a tensor that already lies in shared memory, read in place
    (None: published through a copy). ``message_chunks`` (``MPI``, ``STAGED``): a point-to-point
    message goes as several chunks (:meth:`gossip.transport.Transport.chunk_spans`).
    """

    kind: RouteKind
    blocking: bool = True
    chunk_elements: int | None = None
    location: tuple[int, int] | None = None
    message_chunks: bool = False

    @property
    def staged(self) -> bool:
        """True if the bytes go through host memory (whole or in chunks)."""
        return self.kind in (RouteKind.STAGED, RouteKind.PIPELINED)

    def agreement(self) -> tuple:
        """What the two ends of an exchange must share: how the exchange runs, not where each
        end keeps its bytes (a staged and an unstaged tensor exchange alike, whole)."""
        if self.kind is RouteKind.SHARED_MEMORY:
            return ("shared memory", self.location)
        return ("MPI", self.blocking, self.chunk_elements)

    def protocol(self, point_to_point: bool) -> int:
        """What every rank of a neighbour op must do alike, edges or not: 3 shared memory, 1/2
        blocking/non-blocking neighbourhood collective, 0 point-to-point (``point_to_point``: a
        per-call exchange; blocking and non-blocking sends match). Whether a static exchange goes
        as one neighbourhood collective or as point-to-point chunks follows from the message size,
        which both ends of every edge already agree on."""
        if self.kind is RouteKind.SHARED_MEMORY:
            return 3
        return 0 if point_to_point else (1 if self.blocking else 2)

    def describe(self) -> str:
        """The route in words, as error messages show it (from :meth:`agreement` only)."""
        if self.kind is RouteKind.SHARED_MEMORY:
            where = self.location
            return "shared memory" + ("" if where is None else f", in place at window {where[0]} byte {where[1]}")
        chunks = "" if self.chunk_elements is None else f", staged in chunks of {self.chunk_elements} elements"
        return "MPI, " + ("blocking" if self.blocking else "non-blocking") + chunks
