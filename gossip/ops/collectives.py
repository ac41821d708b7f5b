"""Global collectives: allreduce, broadcast, allgather, their non-blocking forms, barrier, and
starting all ranks equal.

The non-blocking forms (``allreduce_async``, ``broadcast_async``, ``allgather_async``) post one MPI
non-blocking collective (``MPI_Iallreduce``, ``MPI_Ibcast``, ``MPI_Iallgatherv``: MPI 4.0 standard,
section 6.12) and return a :class:`gossip.Handle` whose ``wait()`` gives the result; the handle
holds the buffers MPI reads and writes, so the caller may drop the input at once. As for every MPI
collective, all ranks must start the same collectives in the same order. A mean is the sum divided
by n once, ``fl(Σ x_i / n)``, correctly rounded when the sum is exact: multiplying the sum by the
rounded ``fl(1/n)`` instead misses the nearest float32 for about a third of sums when n = 3, and
weighting each term by it does worse (⅓·37 + ⅓·35 + ⅓·36 gives 36.0000038).

Every op starts with the shared prologue (:mod:`gossip.ops._prologue`: validate, agree across
ranks, widen half types, pick the output) and moves its bytes as the transport routes them
(:meth:`gossip.transport.Transport.route`): in the tensor's own memory, staged whole through
pinned host memory, or, for a blocking allreduce of a staged tensor, in chunks through the
staging pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from mpi4py import MPI

from gossip.ops import _prologue as prologue
from gossip.ops.flat import group_by_dtype_and_device
from gossip.ops.handles import Handle
from gossip.runtime import Runtime, current
from gossip.transport import RouteKind
from gossip.transport._buffers import mpi_buffer

_REDUCIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
_GATHERABLE = _REDUCIBLE + (torch.uint8, torch.int8, torch.int16)
_BROADCASTABLE = _GATHERABLE + (torch.bool,)


def _allreduce_problem(tensor: torch.Tensor, op: str) -> str | None:
    problem = prologue.tensor_problem(tensor, "allreduce", _REDUCIBLE)
    if problem is None and op not in ("mean", "sum"):
        problem = f"allreduce op must be 'mean' or 'sum', got {op!r}"
    if problem is None and op == "mean" and not tensor.is_floating_point():
        problem = f"allreduce op 'mean' needs a floating-point tensor, got {tensor.dtype}"
    return problem


@prologue.failures_raised("allreduce")
def allreduce(tensor: torch.Tensor, op: str = "mean", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: the elementwise ``"mean"`` or ``"sum"`` of ``tensor`` over all ranks.

    Returns a new tensor (or writes ``out``); ``tensor`` is untouched. float16/bfloat16 are
    reduced in float32; integer tensors support ``"sum"`` only. The mean is the sum divided by the
    number of ranks (one correctly rounded division).
    """
    rt = current()
    problem = _allreduce_problem(tensor, op)
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
    return _finish_allreduce(rt, result, x, op, out)


def _finish_allreduce(rt: Runtime, result: torch.Tensor, x: torch.Tensor, op: str,
                      out: torch.Tensor | None) -> torch.Tensor:
    """The sum in ``result`` as the op's value: divided by n for the mean, in ``x``'s dtype, in ``out``."""
    if op == "mean":
        result.div_(rt.size)  # divide the sum once: correctly rounded, unlike a product with fl(1/n)
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    return prologue.deliver(result, out)


@prologue.failures_raised("allreduce_async")
def allreduce_async(tensor: torch.Tensor, op: str = "mean", *, out: torch.Tensor | None = None) -> Handle:
    """Start :func:`allreduce` (one ``MPI_Iallreduce``); the handle's ``wait()`` returns its result.

    The cross-rank check (when on) runs before this returns. A CUDA tensor without a CUDA-aware
    MPI is staged whole through pinned host memory. The handle holds the buffers MPI uses.
    """
    rt = current()
    problem = _allreduce_problem(tensor, op)
    shape = tuple(tensor.shape) if problem is None else None
    prologue.agree(rt, "allreduce", (shape, getattr(tensor, "dtype", None), op, None), problem)

    x = tensor.detach().contiguous()
    wide = prologue.widen(x)
    result = prologue.pick_output(out, wide, avoid=x)
    flat, into = wide.view(-1), result.view(-1)
    nbytes = flat.numel() * flat.element_size()
    rt.traffic.count_allreduce("allreduce", nbytes, rt.size)
    transport = rt.transport
    send, recv = transport.outgoing(flat), transport.receiving(into)
    requests = [rt.comm.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)]

    def finish() -> torch.Tensor:
        transport.received(recv, into)
        transport.done_with(send, flat)
        return _finish_allreduce(rt, result, x, op, out)

    return Handle(requests, finish, what="allreduce", nbytes=nbytes, in_flight=rt.in_flight,
                  keep=(x, wide, send, recv, result))


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


def _broadcast_prepare(rt: Runtime, tensor: torch.Tensor, root: int) -> None:
    problem = prologue.tensor_problem(tensor, "broadcast", _BROADCASTABLE)
    if problem is None and not (isinstance(root, int) and 0 <= root < rt.size):
        problem = f"broadcast root {root!r} is out of range for {rt.size} ranks"
    shape = tuple(tensor.shape) if problem is None else None
    prologue.agree(rt, "broadcast", (shape, getattr(tensor, "dtype", None), root), problem)


@prologue.failures_raised("broadcast")
def broadcast(tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
    """Collective: ``root``'s ``tensor`` on every rank, as a new tensor (input untouched)."""
    rt = current()
    _broadcast_prepare(rt, tensor, root)
    result = tensor.detach().clone(memory_format=torch.contiguous_format)
    _broadcast_inplace(rt, result, root)
    return result


@prologue.failures_raised("broadcast_async")
def broadcast_async(tensor: torch.Tensor, root: int = 0) -> Handle:
    """Start :func:`broadcast` (one ``MPI_Ibcast``); the handle's ``wait()`` returns ``root``'s
    tensor as a new tensor on every rank. The handle holds the buffers MPI uses."""
    rt = current()
    _broadcast_prepare(rt, tensor, root)
    result = tensor.detach().clone(memory_format=torch.contiguous_format)
    flat = (result.view(torch.uint8) if result.dtype == torch.bool else result).view(-1)
    transport = rt.transport
    nbytes = flat.numel() * flat.element_size()
    rt.traffic.count_broadcast("broadcast", nbytes, rt.size, rt.rank == root)
    buf = transport.outgoing(flat) if rt.rank == root else transport.receiving(flat)
    requests = [rt.comm.Ibcast(mpi_buffer(buf), root=root)]

    def finish() -> torch.Tensor:
        if rt.rank == root:
            transport.done_with(buf, flat)
        else:
            transport.received(buf, flat)
        return result

    return Handle(requests, finish, what=f"broadcast from rank {root}", nbytes=nbytes, in_flight=rt.in_flight,
                  keep=(result, buf))


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

    ``tensor`` has shape ``(n_i, *tail)``: the first dimension may differ between ranks, the tail and
    the dtype may not. The result has shape ``(Σ_i n_i, *tail)``; rows ``Σ_{j<i} n_j`` onwards are
    rank i's. The first dimensions travel first (one small ``MPI_Iallgather``), then the data (one
    ``MPI_Iallgatherv``).
    """
    return _allgather_start(current(), tensor).wait()


@prologue.failures_raised("allgather_async")
def allgather_async(tensor: torch.Tensor) -> Handle:
    """Start :func:`allgather`; the handle's ``wait()`` returns its result.

    The cross-rank check (when on) and the exchange of first dimensions (8 bytes per rank) complete
    before this returns; the data then moves in one ``MPI_Iallgatherv``. The handle holds the
    buffers MPI uses.
    """
    return _allgather_start(current(), tensor)


def _allgather_start(rt: Runtime, tensor: torch.Tensor) -> Handle:
    problem = prologue.tensor_problem(tensor, "allgather", _GATHERABLE)
    if problem is None and tensor.dim() == 0:
        problem = "allgather needs a tensor with at least one dimension"
    tail = tuple(tensor.shape[1:]) if problem is None else None
    prologue.agree(rt, "allgather", (tail, getattr(tensor, "dtype", None)), problem)
    x = tensor.detach().contiguous()
    mine = np.array([x.shape[0]], dtype=np.int64)
    rows = np.zeros(rt.size, dtype=np.int64)
    rt.watchdog.wait([rt.comm.Iallgather([mine, MPI.INT64_T], [rows, MPI.INT64_T])], "allgather: first dimensions")
    row_numel = math.prod(tail)
    counts = [int(r) * row_numel for r in rows]
    displs = [sum(counts[:k]) for k in range(len(counts))]
    result = torch.empty((int(rows.sum()), *tail), dtype=x.dtype, device=x.device)
    transport = rt.transport
    flat, into = x.view(-1), result.view(-1)
    send, recv = transport.outgoing(flat), transport.receiving(into)
    nbytes = flat.numel() * flat.element_size()
    rt.traffic.count_allgather("allgather", nbytes, rt.size)
    recv_obj, _, datatype = mpi_buffer(recv)
    requests = [rt.comm.Iallgatherv(mpi_buffer(send), [recv_obj, (counts, displs), datatype])]

    def finish() -> torch.Tensor:
        transport.received(recv, into)
        transport.done_with(send, flat)
        return result

    return Handle(requests, finish, what="allgather", nbytes=nbytes, in_flight=rt.in_flight,
                  keep=(x, send, recv, recv_obj, result))


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
