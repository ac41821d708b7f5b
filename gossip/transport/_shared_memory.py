"""Node shared memory: neighbour averaging that reads the neighbours' values where they lie.

When every rank of the communicator runs on one machine, a blocking ``neighbor_allreduce`` of a CPU
tensor moves no data through MPI. Each rank publishes its tensor in its segment of an MPI-3 shared
window (``MPI_Win_allocate_shared``): a copy into the staging window, or nothing at all when the
tensor already lives in shared memory (:meth:`NodeMemory.empty`, ``FlatBuffer(shared=True)``). The
ranks synchronise, each computes its weighted sum reading its in-neighbours' segments directly, and
they synchronise again before anyone may overwrite a published value. The neighbours' values are
read once, by the reduction itself: the transfer and the weighted sum are a single pass.

Synchronisation follows MPI's unified memory model: ``Win_sync`` (a memory fence) around a
collective that orders the ranks. The first collective is an ``Allreduce(MAX)`` of the staging bytes
each rank needs, so the staging window grows collectively, on the first call that needs more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from gossip.transport._reduce import weighted_sum
from gossip.transport._waiting import Watchdog

_ALIGN = 4096
_OP = "neighbor_allreduce (shared memory)"


def _round_up(nbytes: int) -> int:
    return max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)


@dataclass
class _SharedSegment:
    """One shared window: every local rank's segment, mapped into this process as a byte tensor."""

    win: MPI.Win
    segments: list[torch.Tensor]
    nbytes: int

    @classmethod
    def allocate(cls, comm: MPI.Comm, nbytes: int) -> _SharedSegment:
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each segment page-aligned, on its owner's NUMA node
        win = MPI.Win.Allocate_shared(nbytes, 1, info, comm=comm)
        info.Free()
        win.Lock_all(MPI.MODE_NOCHECK)
        segments = []
        for peer in range(comm.size):
            buffer, _ = win.Shared_query(peer)
            segments.append(torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8)))
        return cls(win, segments, nbytes)

    def free(self) -> None:
        self.segments.clear()
        self.win.Unlock_all()
        self.win.Free()

    def views(self, offset: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's bytes at ``offset`` seen as a flat tensor like ``like`` (dtype and length)."""
        nbytes = like.numel() * like.element_size()
        return [segment[offset:offset + nbytes].view(like.dtype) for segment in self.segments]


class NodeMemory:
    """The shared-memory exchange of one communicator; :attr:`usable` only on a single machine.

    Collective to create and to :meth:`free`. ``enabled=False`` (the ``shared_memory`` setting) sends
    every exchange through MPI point-to-point or neighbourhood collectives instead.
    """

    def __init__(self, comm: MPI.Comm, watchdog: Watchdog, enabled: bool = True) -> None:
        self.rank, self.size = comm.rank, comm.size
        self.watchdog = watchdog
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        # The same answer on every rank, or ranks would take different protocols and hang.
        self.usable = bool(comm.allreduce(enabled and node.size == comm.size and comm.size > 1, op=MPI.LAND))
        self._windows: list[_SharedSegment] = []
        # (window index or -1 for staging, byte offset, dtype, numel) -> every rank's view of those bytes
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._staging: _SharedSegment | None = None
        self._scales: _SharedSegment | None = None
        self._need = np.zeros(1, dtype=np.int64)
        self._max_need = np.zeros(1, dtype=np.int64)
        if not self.usable:
            node.Free()
            self.comm = None
            return
        self.comm = node  # ranks keep their order, so node rank == communicator rank
        self._scales = _SharedSegment.allocate(node, self.size * 8)  # row r: what rank r scales its sends by
        self._scales_rows = [segment.view(torch.float64) for segment in self._scales.segments]

    def free(self) -> None:
        """Collective: release every window (tensors from :meth:`empty` become invalid)."""
        if self.comm is None:
            return
        for window in [*self._windows, self._staging, self._scales]:
            if window is not None:
                window.free()
        self._windows.clear()
        self._views.clear()
        self._scales_rows = []
        self._staging = self._scales = None
        self.comm.Free()
        self.comm = None
        self.usable = False

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Collective: a flat CPU tensor in shared memory, which neighbours can read without a copy.

        Every rank must call this in the same order (sizes may differ). The tensor stays valid
        until ``gossip.shutdown()``.
        """
        if not self.usable:
            raise RuntimeError("shared memory is not usable: the ranks span several machines or it is disabled")
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        window = _SharedSegment.allocate(self.comm, _round_up(nbytes))
        self._windows.append(window)
        return window.segments[self.rank][:nbytes].view(dtype)

    def locate(self, flat: torch.Tensor) -> tuple[int, int] | None:
        """``(window index, byte offset)`` if ``flat`` lies in a window from :meth:`empty`, else None."""
        if flat.device.type != "cpu":
            return None
        start = flat.data_ptr()
        stop = start + flat.numel() * flat.element_size()
        for index, window in enumerate(self._windows):
            base = window.segments[self.rank].data_ptr()
            if base <= start and stop <= base + window.nbytes:
                return index, start - base
        return None

    def neighbor_reduce(
        self,
        flat: torch.Tensor,
        self_weight: float,
        sources: list[int],
        src_weights: list[float],
        destinations: list[int],
        dst_scales: list[float] | None,
        out: torch.Tensor,
        located: tuple[int, int] | None,
    ) -> None:
        """Collective: ``out = self_weight * flat + sum_j w_j * s_j * x_j`` over ``sources``.

        ``s_j`` is what source j scales its sends to this rank by (``dst_scales`` of that rank,
        1 when None). ``flat`` and ``out`` are flat CPU tensors; ``out`` must not alias ``flat``.
        ``located`` is :meth:`locate` of ``flat`` (None: publish a copy through the staging window).
        """
        nbytes = flat.numel() * flat.element_size()
        if dst_scales is not None:
            row = self._scales_rows[self.rank]
            for dst, scale in zip(destinations, dst_scales, strict=True):
                row[dst] = scale
        staged = located is None
        if staged and self._staging is not None and nbytes <= self._staging.nbytes:
            self._published(located, flat)[self.rank].copy_(flat)
        self._need[0] = nbytes if staged else 0
        self._fence(located)  # our stores become visible before the collective orders the ranks
        self.watchdog.wait([self.comm.Iallreduce(self._need, self._max_need, op=MPI.MAX)], _OP, sources)
        if self._staging is None or self._max_need[0] > self._staging.nbytes:  # the same test on every rank
            self._grow_staging(int(self._max_need[0]))
            if staged:
                self._published(located, flat)[self.rank].copy_(flat)
            self._fence(located)
            self.watchdog.wait([self.comm.Ibarrier()], _OP, sources)
        self._fence(located)  # and the neighbours' stores are visible to our loads
        published = self._published(located, flat)
        terms = [(self_weight, flat)]
        for src, weight in zip(sources, src_weights, strict=True):
            if dst_scales is not None:
                weight *= float(self._scales_rows[src][self.rank])
            terms.append((weight, published[src]))
        weighted_sum(terms, out)
        # nobody overwrites a published value while a neighbour may still read it
        self.watchdog.wait([self.comm.Ibarrier()], _OP, sources)

    def _published(self, located: tuple[int, int] | None, flat: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's published copy of a tensor like ``flat`` (staging, or in place)."""
        index, offset = (-1, 0) if located is None else located
        key = (index, offset, flat.dtype, flat.numel())
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 1024:  # many distinct shapes: start the cache afresh
                self._views.clear()
            window = self._staging if located is None else self._windows[index]
            views = self._views[key] = window.views(offset, flat)
        return views

    def _fence(self, located: tuple[int, int] | None) -> None:
        window = self._staging if located is None else self._windows[located[0]]
        if window is not None:
            window.win.Sync()
        self._scales.win.Sync()

    def _grow_staging(self, nbytes: int) -> None:
        if self._staging is not None:
            self._staging.free()
            self._views = {key: views for key, views in self._views.items() if key[0] != -1}
        self._staging = _SharedSegment.allocate(self.comm, _round_up(nbytes))
