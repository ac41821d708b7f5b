"""Weighted neighbour averaging: ``neighbor_allreduce`` and ``neighbor_allgather``.

On the static topology, a message of one chunk (``GOSSIP_MESSAGE_CHUNK_BYTES``, 1 MiB by
default) moves with one MPI neighbourhood collective (``Neighbor_allgather`` on the dist-graph
communicator); per-call ``dst_weights`` select a dynamic (per-step) exchange done with
point-to-point ``Isend``/``Irecv``. A larger message, static or dynamic, moves point-to-point as
chunks, every chunk's receive posted before any send: over TCP a large message goes by
rendezvous, and when two ranks exchange with each other one direction's handshake waits behind
the other direction's data, halving the rate; chunks within the transport's eager limit (which
:mod:`gossip.mpi_settings` raises for Open MPI's TCP transport) stream both ways at line rate.
Either way the received values land in a pooled buffer and are combined by one pass of
:func:`gossip.reduce.weighted_sum`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from gossip import checks, waiting
from gossip.context import Runtime, current
from gossip.errors import GossipError, InputMismatchError
from gossip.graph_comm import WEIGHT_TOLERANCE
from gossip.handles import Handle
from gossip.reduce import weighted_sum
from gossip.tensors import FLOAT_DTYPES, mpi_buffer, overlaps

_TAG_DATA = 0x6701
_TAG_SCALE = 0x6702

Weights = Mapping[int, float] | Sequence[int] | None


@dataclass
class _Exchange:
    """One rank's resolved part of a neighbour exchange."""

    dynamic: bool
    sources: list[int]
    src_weights: list[float]
    destinations: list[int]
    dst_weights: list[float]
    self_weight: float


def _as_weight_map(weights: Mapping[int, float] | Sequence[int], what: str, rank: int, size: int,
                   default: float | None) -> dict[int, float]:
    if isinstance(weights, Mapping):
        mapping = {int(r): float(w) for r, w in weights.items()}
    else:
        ranks = [int(r) for r in weights]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"{what} lists a rank twice: {ranks}")
        if default is None:
            default = 1.0 / (len(ranks) + 1)
        mapping = dict.fromkeys(ranks, default)
    for r, w in mapping.items():
        if not 0 <= r < size:
            raise ValueError(f"{what} names rank {r}, out of range for {size} ranks")
        if r == rank:
            raise ValueError(f"{what} names this rank itself ({r}); give its weight as self_weight")
        if not math.isfinite(w):
            raise ValueError(f"{what} gives rank {r} the non-finite weight {w}")
    return mapping


def _check_sum(total: float, what: str) -> None:
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"{what} sum to {total:.9g}, not 1")


def _resolve(rt: Runtime, self_weight: float | None, src_weights: Weights, dst_weights: Weights) -> _Exchange:
    """Turn the call's arguments into this rank's exchange, or raise ValueError."""
    topo = rt.topology
    if dst_weights is None:
        if src_weights is None:
            if self_weight is not None:
                raise ValueError("self_weight was given without src_weights; give both or neither")
            return _Exchange(False, topo.sources, topo.src_weights, topo.destinations, [], topo.self_weight)
        src = _as_weight_map(src_weights, "src_weights", rt.rank, rt.size, None)
        outside = sorted(set(src) - set(topo.sources))
        if outside:
            raise ValueError(
                f"src_weights names ranks {outside} that are not in-neighbours {topo.sources} in the "
                "static topology; pass dst_weights too for a dynamic exchange"
            )
        sw = 1.0 - sum(src.values()) if self_weight is None else float(self_weight)
        _check_sum(sw + sum(src.values()), "self_weight + src_weights")
        weights = [src.get(j, 0.0) for j in topo.sources]
        return _Exchange(False, topo.sources, weights, topo.destinations, [], sw)

    dst = _as_weight_map(dst_weights, "dst_weights", rt.rank, rt.size, 1.0)
    src = {} if src_weights is None else _as_weight_map(src_weights, "src_weights", rt.rank, rt.size, None)
    scaled = any(w != 1.0 for w in dst.values())
    if self_weight is None:
        sw = 1.0 - sum(dst.values()) if scaled else 1.0 - sum(src.values())
    else:
        sw = float(self_weight)
    if scaled:  # push-sum style: what a rank keeps plus what it sends must be its whole mass
        _check_sum(sw + sum(dst.values()), "self_weight + dst_weights (scaled sends)")
    else:
        _check_sum(sw + sum(src.values()), "self_weight + src_weights")
    sources = sorted(src)
    destinations = sorted(dst)
    return _Exchange(True, sources, [src[j] for j in sources], destinations, [dst[d] for d in destinations], sw)


def _path(rt: Runtime, tensor: torch.Tensor, blocking: bool) -> tuple:
    """How the values move: ``("shared-memory", location)``, ``("mpi", blocking)`` or, staged
    through host memory in chunks, ``("mpi", True, chunk elements)``."""
    if blocking and rt.transport.pipelined(tensor):
        return ("mpi", True, rt.transport.pipeline.chunk_elements(tensor.dtype))
    if blocking and tensor.device.type == "cpu" and rt.node_memory.usable:
        location = rt.node_memory.locate(tensor) if tensor.is_contiguous() else None
        return ("shared-memory", location)
    return ("mpi", blocking)


def _checked_exchange(rt: Runtime, tensor: torch.Tensor, op: str, self_weight: float | None,
                      src_weights: Weights, dst_weights: Weights, blocking: bool) -> tuple[_Exchange, tuple]:
    """Resolve the arguments and the path; if checks are on, agree with all ranks that they fit together."""
    problem = None
    exchange = None
    path: tuple = ()
    try:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op} takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op} supports float32/float64/float16/bfloat16 tensors, got {tensor.dtype}")
        exchange = _resolve(rt, self_weight, src_weights, dst_weights)
        path = _path(rt, tensor, blocking)
    except (TypeError, ValueError) as err:
        if not rt.check:
            raise type(err)(f"rank {rt.rank}: {err}") from None
        problem = str(err)
    if rt.check:
        kind = "dynamic" if exchange is not None and exchange.dynamic else "static"
        if exchange is None:
            shape, dtype = None, None
        else:
            shape, dtype = tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
        def description() -> str:
            return f"{op} of shape {shape} {dtype} ({kind} exchange, {_describe(path)})"

        checks.agree(
            rt.comm,
            what=op,
            sends_to=exchange.destinations if exchange else [],
            receives_from=exchange.sources if exchange else [],
            sig=checks.signature(op, kind, shape, dtype, path),
            description=description,
            problem=problem,
            protocol=_protocol(exchange, path),
        )
    assert exchange is not None
    return exchange, path


def _protocol(exchange: _Exchange | None, path: tuple) -> int | None:
    """What every rank must do alike, edges or not: 3 shared memory, 1/2 blocking/non-blocking
    neighbourhood collective, 0 point-to-point (blocking and non-blocking sends match). Whether a
    static exchange goes as one neighbourhood collective or as point-to-point chunks follows from
    the message size, which both ends of every edge already agree on."""
    if exchange is None or not path:
        return None
    if path[0] == "shared-memory":
        return 3
    return 0 if exchange.dynamic else (1 if path[1] else 2)


def _describe(path: tuple) -> str:
    if not path:
        return "invalid"
    if path[0] == "shared-memory":
        return "shared memory" + ("" if path[1] is None else f", in place at window {path[1][0]} byte {path[1][1]}")
    staged = f", staged in chunks of {path[2]} elements" if len(path) > 2 else ""
    return "MPI, " + ("blocking" if path[1] else "non-blocking") + staged


def _check_out(out: torch.Tensor, like: torch.Tensor) -> None:
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out has shape {tuple(out.shape)} {out.dtype} on {out.device}, expected "
            f"{tuple(like.shape)} {like.dtype} on {like.device}"
        )


def _start(rt: Runtime, tensor: torch.Tensor, ex: _Exchange, path: tuple, out: torch.Tensor | None) -> Handle:
    transport = rt.transport
    x = tensor.detach().contiguous()  # copies only a non-contiguous input; the input is never written
    flat = x.view(-1)
    n, d, device = flat.numel(), len(ex.sources), flat.device
    if out is not None:
        _check_out(out, tensor)
    result = out if out is not None and out.is_contiguous() else torch.empty_like(x)

    if path[0] == "shared-memory":
        if path[1] is not None and overlaps(result, flat):  # neighbours read flat in place: do not overwrite it
            result = torch.empty_like(x)
        rt.node_memory.neighbor_reduce(flat, ex.self_weight, ex.sources, ex.src_weights, ex.destinations,
                                       ex.dst_weights if ex.dynamic else None, result.view(-1), located=path[1])
        return Handle([], lambda: _deliver(result, out))

    if len(path) > 2:
        _run_pipelined(rt, flat, ex, result.view(-1))
        return Handle([], lambda: _deliver(result, out))

    send = transport.outgoing(flat) if (ex.sources or ex.destinations) else flat
    recv = transport.incoming(d * n, flat.dtype, device) if d else None
    requests: list[MPI.Request] = []
    scales = None
    if ex.dynamic:
        scales = np.empty(d, dtype=np.float64)
        outgoing_scales = np.asarray(ex.dst_weights, dtype=np.float64)
        requests += [rt.comm.Irecv([scales[k:k + 1], MPI.DOUBLE], source=src, tag=_TAG_SCALE)
                     for k, src in enumerate(ex.sources)]
        requests += [rt.comm.Isend([outgoing_scales[k:k + 1], MPI.DOUBLE], dest=dst, tag=_TAG_SCALE)
                     for k, dst in enumerate(ex.destinations)]
        requests += _post_chunks(rt, rt.comm, send, recv, n, ex.sources, ex.destinations)
    elif transport.chunked(n * flat.element_size()):
        requests += _post_chunks(rt, rt.topology.dist_comm, send, recv, n, ex.sources, ex.destinations)
    elif ex.sources or ex.destinations:
        recvbuf = mpi_buffer(recv if recv is not None else send[:0])
        recvbuf[1] = n  # count per neighbour
        requests.append(rt.topology.dist_comm.Ineighbor_allgather(mpi_buffer(send), recvbuf))
    sent_copy = send.clone() if rt.debug_buffers and requests else None

    def finish() -> torch.Tensor:
        if sent_copy is not None:
            _check_unchanged(rt, send, sent_copy)
        weights = ex.src_weights if scales is None else [w * s for w, s in zip(ex.src_weights, scales, strict=True)]
        terms = [(ex.self_weight, flat)]
        if recv is not None:
            received = transport.to_device(recv, device)
            terms += [(w, received[k * n:(k + 1) * n]) for k, w in enumerate(weights)]
            weighted_sum(terms, result.view(-1))
            if received is not recv:
                transport.done_with(received)
            transport.done_with(recv)
        else:
            weighted_sum(terms, result.view(-1))
        transport.done_with(send, flat)
        return _deliver(result, out)

    return Handle(requests, finish, what="neighbor_allreduce", peers=sorted({*ex.sources, *ex.destinations}),
                  nbytes=n * flat.element_size(), in_flight=rt.in_flight)


def _post_chunks(rt: Runtime, comm: MPI.Comm, send: torch.Tensor, recv: torch.Tensor | None, n: int,
                 sources: list[int], destinations: list[int]) -> list[MPI.Request]:
    """The point-to-point exchange of ``send`` (``n`` elements) in chunks; ``sources[k]``'s values
    land at ``recv[k n:(k + 1) n]``."""
    receives = [(src, recv[k * n:(k + 1) * n]) for k, src in enumerate(sources)]
    return rt.transport.exchange(comm, receives, [(dst, send) for dst in destinations], _TAG_DATA)


def _check_unchanged(rt: Runtime, send: torch.Tensor, sent_copy: torch.Tensor) -> None:
    """Debug mode: the tensor handed to MPI must not change before the op completes."""
    if not torch.equal(send.view(-1).view(torch.uint8), sent_copy.view(-1).view(torch.uint8)):
        raise GossipError(f"rank {rt.rank}: the tensor sent by neighbor_allreduce was modified before the op "
                          "completed (GOSSIP_DEBUG_BUFFERS): MPI may have sent a mix of old and new values; wait on "
                          "the handle before writing the tensor")


def _run_pipelined(rt: Runtime, flat: torch.Tensor, ex: _Exchange, result: torch.Tensor) -> None:
    """The blocking exchange of a staged tensor, chunk by chunk (:mod:`gossip.staging`): each
    chunk's neighbour values are combined on the tensor's device while the next one moves."""
    peers = sorted({*ex.sources, *ex.destinations})
    weights = ex.src_weights
    if ex.dynamic:  # the senders' scales first (a few bytes), then the data in chunks
        comm, scales = rt.comm, np.empty(len(ex.sources), dtype=np.float64)
        outgoing_scales = np.asarray(ex.dst_weights, dtype=np.float64)
        requests = [comm.Irecv([scales[k:k + 1], MPI.DOUBLE], source=src, tag=_TAG_SCALE)
                    for k, src in enumerate(ex.sources)]
        requests += [comm.Isend([outgoing_scales[k:k + 1], MPI.DOUBLE], dest=dst, tag=_TAG_SCALE)
                     for k, dst in enumerate(ex.destinations)]
        waiting.wait(requests, "neighbor_allreduce", peers)
        weights = [w * s for w, s in zip(ex.src_weights, scales, strict=True)]

        def post(send: torch.Tensor, recv: torch.Tensor | None, m: int) -> list[MPI.Request]:
            chunk = [comm.Irecv(mpi_buffer(recv[k * m:(k + 1) * m]), source=src, tag=_TAG_DATA)
                     for k, src in enumerate(ex.sources)]
            return chunk + [comm.Isend(mpi_buffer(send), dest=dst, tag=_TAG_DATA) for dst in ex.destinations]
    else:
        def post(send: torch.Tensor, recv: torch.Tensor | None, m: int) -> list[MPI.Request]:
            if not (ex.sources or ex.destinations):
                return []
            recvbuf = mpi_buffer(recv if recv is not None else send[:0])
            recvbuf[1] = m  # count per neighbour
            return [rt.topology.dist_comm.Ineighbor_allgather(mpi_buffer(send), recvbuf)]

    def consume(start: int, stop: int, received: torch.Tensor | None) -> None:
        m = stop - start
        terms = [(ex.self_weight, flat[start:stop])]
        if received is not None:
            terms += [(w, received[k * m:(k + 1) * m]) for k, w in enumerate(weights)]
        weighted_sum(terms, result[start:stop])

    rt.transport.pipeline.run(flat, len(ex.sources), post, consume, "neighbor_allreduce", peers)


def _deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def neighbor_allreduce_async(
    tensor: torch.Tensor,
    *,
    self_weight: float | None = None,
    src_weights: Weights = None,
    dst_weights: Weights = None,
    out: torch.Tensor | None = None,
) -> Handle:
    """Start :func:`neighbor_allreduce`; the handle's ``wait()`` returns its result.

    The cross-rank check (when on) runs before this returns; the transfer then proceeds in the
    background of MPI's progress. Do not modify ``tensor`` until the handle is waited on.
    """
    rt = current()
    exchange, path = _checked_exchange(rt, tensor, "neighbor_allreduce", self_weight, src_weights, dst_weights,
                                       blocking=False)
    return _start(rt, tensor, exchange, path, out)


def neighbor_allreduce(
    tensor: torch.Tensor,
    *,
    self_weight: float | None = None,
    src_weights: Weights = None,
    dst_weights: Weights = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted average with in-neighbours: ``self_weight * x_i + sum_j src_weights[j] * x_j``.

    Collective over all ranks. Returns a new tensor (or writes ``out``); ``tensor`` is untouched.
    Any shape, contiguous or not; float32/float64/float16/bfloat16 (half types are reduced in
    float32); CPU or CUDA.

    * No weights: the static topology's weights (:func:`gossip.set_topology`), one
      ``Neighbor_allgather`` on its dist-graph communicator.
    * ``src_weights`` only (``{rank: weight}`` or a list of ranks for uniform weights): other
      weights for some of the static topology's in-neighbours (the rest get 0), same transfer.
      ``self_weight`` defaults to ``1 - sum(src_weights)``; the total must be 1.
    * ``dst_weights`` (``{rank: scale}`` or a list of ranks for scale 1): a dynamic exchange,
      point-to-point, with peers chosen per call. What goes to rank d is scaled by ``dst_weights[d]``
      (applied by the receiver, so nothing is copied), as push-sum needs. With unit scales the
      receive weights must sum to 1 with ``self_weight``; with scaled sends, ``self_weight`` plus
      the scales must sum to 1 (default self_weight: whichever makes that so).

    With the cross-rank check on (default), a rank sending to one that does not receive from it,
    shapes or dtypes that differ between neighbours, out-of-range ranks or bad weights raise
    :class:`gossip.InputMismatchError` on every rank instead of hanging.
    """
    rt = current()
    exchange, path = _checked_exchange(rt, tensor, "neighbor_allreduce", self_weight, src_weights, dst_weights,
                                       blocking=True)
    return _start(rt, tensor, exchange, path, out).wait()


def neighbor_allgather(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: the static in-neighbours' tensors stacked, shape ``(indegree, *tensor.shape)``.

    Row k is the value of ``gossip.in_neighbors()[k]``.
    """
    rt = current()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"rank {rt.rank}: neighbor_allgather takes a torch.Tensor, got {type(tensor).__name__}")
    topo = rt.topology
    if rt.check:
        shape, dtype = tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
        checks.agree(rt.comm, what="neighbor_allgather", sends_to=topo.destinations, receives_from=topo.sources,
                     sig=checks.signature("neighbor_allgather", shape, dtype),
                     description=f"neighbor_allgather of shape {shape} {dtype}", problem=None)
    x = tensor.detach().contiguous().view(-1)
    d, n = len(topo.sources), x.numel()
    result = torch.empty((d, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    if not (topo.sources or topo.destinations):
        return result
    transport = rt.transport
    send = transport.outgoing(x)
    recv = transport.incoming(d * n, x.dtype, x.device) if transport.staged(x) else result.view(-1)
    if transport.chunked(n * x.element_size()):  # as neighbor_allreduce: chunks stream both ways
        requests = _post_chunks(rt, topo.dist_comm, send, recv, n, topo.sources, topo.destinations)
    else:
        recvbuf = mpi_buffer(recv if d else send[:0])
        recvbuf[1] = n
        requests = [topo.dist_comm.Ineighbor_allgather(mpi_buffer(send), recvbuf)]
    waiting.wait(requests, "neighbor_allgather", sorted({*topo.sources, *topo.destinations}))
    if recv.data_ptr() != result.data_ptr():
        result.view(-1).copy_(recv)
        transport.done_with(recv)
    transport.done_with(send, x)
    return result


__all__ = ["InputMismatchError", "neighbor_allgather", "neighbor_allreduce", "neighbor_allreduce_async"]
