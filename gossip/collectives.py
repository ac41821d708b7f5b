"""Global collectives: allreduce, broadcast, allgather, barrier, and starting all ranks equal."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from mpi4py import MPI

from gossip import checks, waiting
from gossip.context import Runtime, current
from gossip.flat import group_by_dtype_and_device
from gossip.tensors import LOW_PRECISION, mpi_buffer, overlaps

_REDUCIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def _agree_all(rt: Runtime, what: str, parts: tuple, problem: str | None) -> None:
    """Check that every rank called ``what`` with the same ``parts`` (shape, dtype, ...)."""
    if not rt.check:
        if problem is not None:
            raise ValueError(f"rank {rt.rank}: {problem}")
        return
    sends_to, receives_from = checks.ring_edges(rt.rank, rt.size)
    checks.agree(rt.comm, what=what, sends_to=sends_to, receives_from=receives_from,
                 sig=checks.signature(what, *parts), description=f"{what} of {_describe(parts)}", problem=problem)


def _describe(parts: tuple) -> str:
    return ", ".join(str(p).replace("torch.", "") for p in parts)


def _tensor_problem(tensor: object, what: str, allowed: tuple) -> str | None:
    if not isinstance(tensor, torch.Tensor):
        return f"{what} takes a torch.Tensor, got {type(tensor).__name__}"
    if tensor.dtype not in allowed:
        return f"{what} does not support dtype {tensor.dtype}"
    return None


def allreduce(tensor: torch.Tensor, op: str = "mean", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: the elementwise ``"mean"`` or ``"sum"`` of ``tensor`` over all ranks.

    Returns a new tensor (or writes ``out``); ``tensor`` is untouched. float16/bfloat16 are
    reduced in float32; integer tensors support ``"sum"`` only.
    """
    rt = current()
    problem = _tensor_problem(tensor, "allreduce", _REDUCIBLE)
    if problem is None and op not in ("mean", "sum"):
        problem = f"allreduce op must be 'mean' or 'sum', got {op!r}"
    if problem is None and op == "mean" and not tensor.is_floating_point():
        problem = f"allreduce op 'mean' needs a floating-point tensor, got {tensor.dtype}"
    shape = tuple(tensor.shape) if problem is None else None
    wire = torch.float32 if problem is None and tensor.dtype in LOW_PRECISION else getattr(tensor, "dtype", None)
    chunks = rt.transport.pipeline.chunk_elements(wire) \
        if problem is None and rt.transport.pipelined(tensor) else None  # staged in chunks: all ranks alike
    _agree_all(rt, "allreduce", (shape, getattr(tensor, "dtype", None), op, chunks), problem)

    x = tensor.detach().contiguous()
    wide = x.float() if x.dtype in LOW_PRECISION else x
    if out is not None and out.is_contiguous() and out.dtype == wide.dtype and out.shape == x.shape \
            and out.device == x.device and not overlaps(out, x):
        result = out  # reduce straight into the caller's buffer
    else:
        result = torch.empty_like(wide)
    if chunks is not None:
        _allreduce_pipelined(rt, wide.view(-1), result.view(-1))
    else:
        _allreduce_whole(rt, wide.view(-1), result.view(-1))
    if op == "mean":
        result.div_(rt.size)
    if wide is not x:
        result = result.to(x.dtype)
    if out is not None and result is not out:
        return out.copy_(result)
    return result


def _allreduce_pipelined(rt: Runtime, flat: torch.Tensor, result: torch.Tensor) -> None:
    """Sum of a staged tensor, chunk by chunk through pinned host memory (:mod:`gossip.staging`)."""
    def post(send: torch.Tensor, recv: torch.Tensor | None, m: int) -> list[MPI.Request]:
        return [rt.comm.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)]

    def consume(start: int, stop: int, received: torch.Tensor | None) -> None:
        result[start:stop].copy_(received)

    rt.transport.pipeline.run(flat, 1, post, consume, "allreduce")


def _allreduce_whole(rt: Runtime, wide: torch.Tensor, result: torch.Tensor) -> None:
    """Sum in one MPI call: device memory (CUDA-aware MPI or CPU) or one staged copy."""
    send = rt.transport.outgoing(wide)
    staged = rt.transport.staged(wide)
    recv = rt.transport.incoming(wide.numel(), wide.dtype, wide.device) if staged else result
    waiting.wait([rt.comm.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)], "allreduce",
                 nbytes=send.numel() * send.element_size())
    if recv.data_ptr() != result.data_ptr():
        result.copy_(recv)
        rt.transport.done_with(recv)
    rt.transport.done_with(send, wide)


def broadcast(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Collective: ``root``'s ``tensor`` on every rank, as a new tensor (input untouched)."""
    rt = current()
    problem = _tensor_problem(tensor, "broadcast", _REDUCIBLE + (torch.uint8, torch.int8, torch.int16, torch.bool))
    if problem is None and not (isinstance(root, int) and 0 <= root < rt.size):
        problem = f"broadcast root {root!r} is out of range for {rt.size} ranks"
    shape = tuple(tensor.shape) if problem is None else None
    _agree_all(rt, "broadcast", (shape, getattr(tensor, "dtype", None), root), problem)
    result = tensor.detach().clone(memory_format=torch.contiguous_format)
    _broadcast_inplace(rt, result, root)
    return result


def _broadcast_inplace(rt: Runtime, flat: torch.Tensor, root: int) -> None:
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    buf = rt.transport.outgoing(flat.reshape(-1)) if rt.rank == root else (
        rt.transport.incoming(flat.numel(), flat.dtype, flat.device))
    waiting.wait([rt.comm.Ibcast(mpi_buffer(buf), root=root)], f"broadcast from rank {root}",
                 nbytes=buf.numel() * buf.element_size())
    if buf.data_ptr() != flat.data_ptr():
        if rt.rank != root:
            flat.view(-1).copy_(buf)
        rt.transport.done_with(buf)


def allgather(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's tensor concatenated along dim 0, in rank order.

    Dimensions after the first must agree across ranks; the first may differ.
    """
    rt = current()
    problem = _tensor_problem(tensor, "allgather", _REDUCIBLE + (torch.uint8, torch.int8, torch.int16))
    if problem is None and tensor.dim() == 0:
        problem = "allgather needs a tensor with at least one dimension"
    tail = tuple(tensor.shape[1:]) if problem is None else None
    _agree_all(rt, "allgather", (tail, getattr(tensor, "dtype", None)), problem)
    x = tensor.detach().contiguous()
    rows = rt.comm.allgather(x.shape[0])
    row_numel = x[0:1].numel() if x.shape[0] else int(torch.tensor(tail).prod().item()) if tail else 1
    counts = [r * row_numel for r in rows]
    displs = [sum(counts[:k]) for k in range(len(counts))]
    result = torch.empty((sum(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
    send = rt.transport.outgoing(x.view(-1))
    staged = rt.transport.staged(x)
    recv = rt.transport.incoming(result.numel(), x.dtype, x.device) if staged else result.view(-1)
    recv_obj, _, datatype = mpi_buffer(recv)
    waiting.wait([rt.comm.Iallgatherv(mpi_buffer(send), [recv_obj, (counts, displs), datatype])], "allgather")
    if staged:
        result.view(-1).copy_(recv)
        rt.transport.done_with(recv)
    rt.transport.done_with(send, x.view(-1))
    return result


def barrier() -> None:
    """Collective: return once every rank has called it."""
    waiting.wait([current().comm.Ibarrier()], "barrier")


def broadcast_parameters(module_or_state: torch.nn.Module | Mapping[str, torch.Tensor], root: int = 0) -> None:
    """Collective: overwrite, in place, every parameter and buffer (or state-dict tensor) with
    ``root``'s values, so that all ranks start equal.

    Tensors are grouped by dtype and device and each group travels as one fused ``Bcast``.
    """
    rt = current()
    if isinstance(module_or_state, torch.nn.Module):
        tensors = [t for t in module_or_state.state_dict(keep_vars=True).values()]
    elif isinstance(module_or_state, Mapping):
        tensors = list(module_or_state.values())
    else:
        raise TypeError(f"rank {rt.rank}: broadcast_parameters takes a Module or a state dict, "
                        f"got {type(module_or_state).__name__}")
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    shapes = [(tuple(t.shape), str(t.dtype)) for t in tensors]
    problem = None if isinstance(root, int) and 0 <= root < rt.size else f"root {root!r} out of range"
    _agree_all(rt, "broadcast_parameters", (tuple(shapes), root), problem)
    with torch.no_grad():
        for group in group_by_dtype_and_device(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in group]) if len(group) > 1 else \
                group[0].detach().reshape(-1).clone()
            _broadcast_inplace(rt, flat, root)
            offset = 0
            for t in group:
                t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
