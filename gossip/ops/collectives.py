"""Global collectives: allreduce, broadcast, allgather, barrier, and starting all ranks equal.

Every op starts with the shared prologue (:mod:`gossip.ops._prologue`: validate, agree across
ranks, widen half types, pick the output) and moves its bytes as the transport routes them
(:meth:`gossip.transport.Transport.route`): in the tensor's own memory, staged whole through
pinned host memory, or, for a blocking allreduce of a staged tensor, in chunks through the
staging pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from mpi4py import MPI

from gossip.ops import _prologue as prologue
from gossip.ops.flat import group_by_dtype_and_device
from gossip.runtime import Runtime, current
from gossip.transport import RouteKind
from gossip.transport._buffers import mpi_buffer

_REDUCIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
_GATHERABLE = _REDUCIBLE + (torch.uint8, torch.int8, torch.int16)
_BROADCASTABLE = _GATHERABLE + (torch.bool,)


@prologue.failures_raised("allreduce")
def allreduce(tensor: torch.Tensor, op: str = "mean", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: the elementwise ``"mean"`` or ``"sum"`` of ``tensor`` over all ranks.

    Returns a new tensor (or writes ``out``); ``tensor`` is untouched. float16/bfloat16 are
    reduced in float32; integer tensors support ``"sum"`` only.
    """
    rt = current()
    problem = prologue.tensor_problem(tensor, "allreduce", _REDUCIBLE)
    if problem is None and op not in ("mean", "sum"):
        problem = f"allreduce op must be 'mean' or 'sum', got {op!r}"
    if problem is None and op == "mean" and not tensor.is_floating_point():
        problem = f"allreduce op 'mean' needs a floating-point tensor, got {tensor.dtype}"
    route = None if problem is not None else \
        rt.transport.route(tensor, pipeline=True, dtype=prologue.wide_dtype(tensor.dtype))
    shape = tuple(tensor.shape) if problem is None else None
    chunks = route.chunk_elements if route is not None else None  # staged in chunks: all ranks alike
    prologue.agree(rt, "allreduce", (shape, getattr(tensor, "dtype", None), op, chunks), problem)

    x = tensor.detach().contiguous()
    wide = prologue.widen(x)
    result = prologue.pick_output(out, wide, avoid=x)  # reduce straight into the caller's buffer when it fits
    rt.traffic.count_allreduce("allreduce", wide.numel() * wide.element_size(), rt.size)
    if route.kind is RouteKind.PIPELINED:
        _allreduce_pipelined(rt, wide.view(-1), result.view(-1))
    else:
        _allreduce_whole(rt, wide.view(-1), result.view(-1))
    if op == "mean":
        result.div_(rt.size)
    if wide is not x:
        result = result.to(x.dtype)
    return prologue.deliver(result, out)


def _allreduce_pipelined(rt: Runtime, flat: torch.Tensor, result: torch.Tensor) -> None:
    """Sum of a staged tensor, chunk by chunk through pinned host memory (:mod:`gossip.transport._staging`)."""
    def post(send: torch.Tensor, recv: torch.Tensor | None, m: int) -> list[MPI.Request]:
        return [rt.comm.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)]

    def consume(start: int, stop: int, received: torch.Tensor | None) -> None:
        result[start:stop].copy_(received)

    rt.transport.pipeline.run(flat, 1, post, consume, "allreduce")


def _allreduce_whole(rt: Runtime, wide: torch.Tensor, result: torch.Tensor) -> None:
    """Sum in one MPI call: device memory (CUDA-aware MPI or CPU) or one staged copy."""
    transport = rt.transport
    send, recv = transport.outgoing(wide), transport.receiving(result)
    rt.watchdog.wait([rt.comm.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)], "allreduce",
                     nbytes=send.numel() * send.element_size())
    transport.received(recv, result)
    transport.done_with(send, wide)


@prologue.failures_raised("broadcast")
def broadcast(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Collective: ``root``'s ``tensor`` on every rank, as a new tensor (input untouched)."""
    rt = current()
    problem = prologue.tensor_problem(tensor, "broadcast", _BROADCASTABLE)
    if problem is None and not (isinstance(root, int) and 0 <= root < rt.size):
        problem = f"broadcast root {root!r} is out of range for {rt.size} ranks"
    shape = tuple(tensor.shape) if problem is None else None
    prologue.agree(rt, "broadcast", (shape, getattr(tensor, "dtype", None), root), problem)
    result = tensor.detach().clone(memory_format=torch.contiguous_format)
    _broadcast_inplace(rt, result, root)
    return result


def _broadcast_inplace(rt: Runtime, flat: torch.Tensor, root: int, op: str = "broadcast") -> None:
    """``root``'s values of the contiguous ``flat`` into ``flat`` on every rank (counted under ``op``)."""
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    flat = flat.view(-1)
    transport = rt.transport
    rt.traffic.count_broadcast(op, flat.numel() * flat.element_size(), rt.size, rt.rank == root)
    buf = transport.outgoing(flat) if rt.rank == root else transport.receiving(flat)
    rt.watchdog.wait([rt.comm.Ibcast(mpi_buffer(buf), root=root)], f"broadcast from rank {root}",
                     nbytes=buf.numel() * buf.element_size())
    if rt.rank == root:
        transport.done_with(buf, flat)
    else:
        transport.received(buf, flat)


@prologue.failures_raised("allgather")
def allgather(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: every rank's tensor concatenated along dim 0, in rank order.

    Dimensions after the first must agree across ranks; the first may differ.
    """
    rt = current()
    problem = prologue.tensor_problem(tensor, "allgather", _GATHERABLE)
    if problem is None and tensor.dim() == 0:
        problem = "allgather needs a tensor with at least one dimension"
    tail = tuple(tensor.shape[1:]) if problem is None else None
    prologue.agree(rt, "allgather", (tail, getattr(tensor, "dtype", None)), problem)
    x = tensor.detach().contiguous()
    rows = rt.comm.allgather(x.shape[0])
    row_numel = x[0:1].numel() if x.shape[0] else int(torch.tensor(tail).prod().item()) if tail else 1
    counts = [r * row_numel for r in rows]
    displs = [sum(counts[:k]) for k in range(len(counts))]
    result = torch.empty((sum(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
    transport = rt.transport
    send, recv = transport.outgoing(x.view(-1)), transport.receiving(result.view(-1))
    rt.traffic.count_allgather("allgather", x.numel() * x.element_size(), rt.size)
    recv_obj, _, datatype = mpi_buffer(recv)
    rt.watchdog.wait([rt.comm.Iallgatherv(mpi_buffer(send), [recv_obj, (counts, displs), datatype])], "allgather")
    transport.received(recv, result.view(-1))
    transport.done_with(send, x.view(-1))
    return result


@prologue.failures_raised("barrier")
def barrier() -> None:
    """Collective: return once every rank has called it."""
    rt = current()
    rt.watchdog.wait([rt.comm.Ibarrier()], "barrier")


@prologue.failures_raised("broadcast_parameters")
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
    prologue.agree(rt, "broadcast_parameters", (tuple(shapes), root), problem)
    with torch.no_grad():
        for group in group_by_dtype_and_device(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in group]) if len(group) > 1 else \
                group[0].detach().reshape(-1).clone()
            _broadcast_inplace(rt, flat, root, "broadcast_parameters")
            offset = 0
            for t in group:
                t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
