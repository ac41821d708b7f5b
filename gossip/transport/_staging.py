"""Chunked, double-buffered staging of CUDA tensors through pinned host memory.

When MPI cannot read device memory, a CUDA tensor's bytes go device → pinned host → MPI → pinned
host → device. Done whole, the copies and the transfer run one after another. The pipeline cuts
the message into chunks (``GOSSIP_STAGING_CHUNK_BYTES``, default 4 MiB) and, with two pinned
send and two pinned receive buffers, overlaps them:

    side stream:  D2H(c+1)          H2D(c)   D2H(c+2) ...
    MPI:               transfer(c)        transfer(c+1) ...
    compute:                         reduce(c) ...

Chunk c+1 is copied to the host while chunk c is on the wire; chunk c is copied back to the device
and combined there (the weighted sum runs on the GPU) while chunk c+1 is on the wire. The copies
run on a side stream that first waits for the stream that produced the tensor (no host-side
synchronisation of the whole device). Buffers come from the runtime's pool: nothing is allocated
in steady state.

The ``stage_host`` setting (``GOSSIP_STAGE_HOST=1``) sends CPU tensors through the same pipeline (synchronous copies, no
streams): a way to exercise the chunking with real MPI on a machine without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from mpi4py import MPI

from gossip.transport._buffers import BufferPool
from gossip.transport._waiting import Watchdog

_CPU = torch.device("cpu")

# post(send_chunk, receive_chunk or None, elements) -> requests; consume(start, stop, received on the device)
Post = Callable[[torch.Tensor, torch.Tensor | None, int], list[MPI.Request]]
Consume = Callable[[int, int, torch.Tensor | None], None]


class _Copies:
    """Device ↔ host copies on a side stream, ordered by events (CUDA), or plain copies (CPU)."""

    def __init__(self, device: torch.device, stream) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = stream
            self.compute = torch.cuda.current_stream(device)
            self.stream.wait_stream(self.compute)  # the tensor's producer has finished, on the GPU
            self.staged_out = [torch.cuda.Event(), torch.cuda.Event()]
            self.landed = [torch.cuda.Event(), torch.cuda.Event()]
            self.consumed = [torch.cuda.Event(), torch.cuda.Event()]
            self.used = [False, False]

    def out(self, host: torch.Tensor, device_part: torch.Tensor, slot: int) -> None:
        if not self.cuda:
            host.copy_(device_part)
            return
        with torch.cuda.stream(self.stream):
            host.copy_(device_part, non_blocking=True)
            self.staged_out[slot].record(self.stream)

    def wait_out(self, slot: int) -> None:
        """The host buffer of ``slot`` holds its chunk (MPI may read it)."""
        if self.cuda:
            self.staged_out[slot].synchronize()

    def wait_landed(self, slot: int) -> None:
        """The host receive buffer of ``slot`` has been copied to the device (MPI may overwrite it)."""
        if self.cuda and self.used[slot]:
            self.landed[slot].synchronize()

    def into(self, device_buffer: torch.Tensor, host: torch.Tensor, slot: int) -> None:
        """Copy a received chunk to the device; the compute stream waits for it, not the host."""
        if not self.cuda:
            return
        with torch.cuda.stream(self.stream):
            if self.used[slot]:
                self.stream.wait_event(self.consumed[slot])  # the device buffer's previous chunk is combined
            device_buffer.copy_(host, non_blocking=True)
            self.landed[slot].record(self.stream)
        self.used[slot] = True
        self.compute.wait_event(self.landed[slot])

    def done_consuming(self, slot: int) -> None:
        if self.cuda:
            self.consumed[slot].record(self.compute)

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()


class StagingPipeline:
    """Runs one chunked exchange of a flat tensor through pinned host buffers (module docstring)."""

    def __init__(self, pool: BufferPool, watchdog: Watchdog, chunk_bytes: int = 4 << 20,
                 stage_host: bool = False) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"the staging chunk must be >= 1 byte, got {chunk_bytes}")
        self.pool, self.watchdog = pool, watchdog
        self.chunk_bytes = chunk_bytes
        self.stage_host = stage_host
        self._streams: dict[torch.device, object] = {}

    def chunk_elements(self, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` in one chunk."""
        return max(1, self.chunk_bytes // dtype.itemsize)

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def run(self, flat: torch.Tensor, fan_in: int, post: Post, consume: Consume, what: str,
            peers: list[int] | None = None) -> None:
        """Send ``flat`` chunk by chunk with ``post`` (each chunk's receive holds ``fan_in`` chunks
        from as many ranks, back to back), and hand each received chunk, on ``flat``'s device, to
        ``consume(start, stop, received)`` (``received`` None when ``fan_in`` is 0)."""
        n = flat.numel()
        if n == 0:
            self.watchdog.wait(post(flat, flat[:0] if fan_in else None, 0), what, peers)
            return
        chunk = min(n, self.chunk_elements(flat.dtype))
        chunks = math.ceil(n / chunk)
        slots = min(2, chunks)
        device, cuda = flat.device, flat.is_cuda
        send = [self.pool.acquire(chunk, flat.dtype, _CPU, pinned=cuda) for _ in range(slots)]
        recv = [self.pool.acquire(fan_in * chunk, flat.dtype, _CPU, pinned=cuda) for _ in range(slots)] \
            if fan_in else []
        landing = [self.pool.acquire(fan_in * chunk, flat.dtype, device) for _ in range(slots)] \
            if fan_in and cuda else recv
        copies = _Copies(device, self._stream(device) if cuda else None)

        def span(c: int) -> tuple[int, int]:
            return c * chunk, min(n, (c + 1) * chunk)

        completed = False
        try:
            copies.out(send[0], flat[:chunk], 0)
            for c in range(chunks):
                start, stop = span(c)
                m, slot = stop - start, c % 2
                copies.wait_out(slot)
                copies.wait_landed(slot)
                received = recv[slot][:fan_in * m] if fan_in else None
                requests = post(send[slot][:m], received, m)
                if c + 1 < chunks:  # the next chunk goes to the host while this one is on the wire
                    after, end = span(c + 1)
                    copies.out(send[1 - slot][:end - after], flat[after:end], 1 - slot)
                self.watchdog.wait(requests, what, peers, nbytes=m * flat.element_size())
                on_device = None
                if fan_in:
                    on_device = landing[slot][:fan_in * m]
                    copies.into(on_device, received, slot)
                consume(start, stop, on_device)
                copies.done_consuming(slot)
            completed = True
        finally:
            copies.finish()
            if completed:  # after an error (a timeout) MPI may still use them: never back to the pool
                for buf in (*send, *recv, *(landing if landing is not recv else ())):
                    self.pool.release(buf)
