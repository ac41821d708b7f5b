"""Torch tensors as MPI buffers, and a pool of reusable scratch buffers."""

from __future__ import annotations

from collections import defaultdict

import torch
from mpi4py import MPI

#: dtypes whose weighted sums the runtime computes (half types are reduced in float32).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Half types travel as raw 16-bit words: MPI never does arithmetic on them, torch does.
_WIRE_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16}
_MPI_DATATYPE = {
    torch.float32: MPI.FLOAT,
    torch.float64: MPI.DOUBLE,
    torch.int16: MPI.INT16_T,
    torch.int32: MPI.INT32_T,
    torch.int64: MPI.INT64_T,
    torch.uint8: MPI.UINT8_T,
    torch.int8: MPI.INT8_T,
}


#: dtypes a tensor may have to travel through MPI.
SUPPORTED_DTYPES = (*FLOAT_DTYPES, torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8)


def mpi_datatype(dtype: torch.dtype) -> MPI.Datatype:
    """The MPI datatype a tensor of ``dtype`` travels as (half types as 16-bit integers)."""
    wire = _WIRE_DTYPE.get(dtype, dtype)
    try:
        return _MPI_DATATYPE[wire]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the gossip runtime") from None


def mpi_buffer(t: torch.Tensor) -> list:
    """``[buffer, count, datatype]`` for a contiguous tensor, without copying.

    CPU tensors are exposed through a NumPy view; CUDA tensors are handed to mpi4py as they are
    (it reads ``__cuda_array_interface__``/DLPack), for a CUDA-aware MPI only.
    """
    flat = t.detach().reshape(-1)
    wire = _WIRE_DTYPE.get(t.dtype)
    if wire is not None:
        flat = flat.view(wire)
    datatype = mpi_datatype(t.dtype)
    if flat.is_cuda:
        return [flat, flat.numel(), datatype]
    return [flat.numpy(), flat.numel(), datatype]


class BufferPool:
    """Free lists of flat scratch tensors keyed by (numel, dtype, device, pinned).

    Ops take a buffer with :meth:`acquire` and give it back with :meth:`release` once their
    transfer is finished, so that steady-state training allocates nothing for communication and
    several ops in flight never share a buffer.
    """

    def __init__(self, keep_per_key: int = 4, poison: bool = False) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._keep = keep_per_key
        self.poison = poison  # debug: fill every released buffer with NaN (0xFF bytes for integers)

    def acquire(self, numel: int, dtype: torch.dtype, device: torch.device, pinned: bool = False) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements; its contents are undefined."""
        key = (numel, dtype, torch.device(device), pinned)
        free = self._free[key]
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)

    def release(self, buf: torch.Tensor) -> None:
        """Return a buffer obtained from :meth:`acquire`."""
        key = (buf.numel(), buf.dtype, buf.device, buf.is_pinned() if not buf.is_cuda else False)
        free = self._free[key]
        if self.poison:
            if any(b.data_ptr() == buf.data_ptr() for b in free):
                raise RuntimeError(f"a pooled buffer of {buf.numel()} {buf.dtype} was released twice")
            poison_(buf)
        if len(free) < self._keep:
            free.append(buf)

    def clear(self) -> None:
        """Drop every cached buffer."""
        self._free.clear()


def poison_(buf: torch.Tensor) -> None:
    """Fill ``buf`` with NaN (floating point) or 0xFF bytes, so that a read of released memory shows."""
    if buf.dtype.is_floating_point:
        buf.fill_(float("nan"))
    else:
        buf.view(torch.uint8).fill_(0xFF)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the memory spans of ``a`` and ``b`` (start to start + numel) intersect."""
    if a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
