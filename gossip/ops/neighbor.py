"""Weighted neighbour averaging: ``neighbor_allreduce`` and its non-blocking twin.

``neighbor_allreduce`` is one step of linear averaging, x_i ← W_ii x_i + Σ_j W_ij x_j over the
in-neighbours j (Xiao and Boyd, "Fast linear iterations for distributed averaging", Systems &
Control Letters, 2004); with scaled sends (``dst_weights``) it is the push-sum step (Kempe, Dobra
and Gehrke, "Gossip-based computation of aggregate information", FOCS 2003). The names and
weight arguments follow BlueFog (Ying et al., arXiv:2111.04287, 2021), as does taking the
weights as given: a row of W need not sum to 1 (neighbour sums, push-sum with any scales).

On the static topology, a message of one chunk (``GOSSIP_MESSAGE_CHUNK_BYTES``, 1 MiB by
default) moves with one MPI neighbourhood collective (``Neighbor_allgather`` on the dist-graph
communicator); per-call ``dst_weights`` select a dynamic (per-step) exchange done with
point-to-point ``Isend``/``Irecv``. A larger message, static or dynamic, moves point-to-point as
chunks, every chunk's receive posted before any send: over TCP a large message goes by
rendezvous, and when two ranks exchange with each other one direction's handshake waits behind
the other direction's data, halving the rate; chunks within the transport's eager limit (which
:mod:`gossip.transport.mpi_settings` raises for Open MPI's TCP transport) stream both ways at line rate.
Either way the received values land in a pooled buffer and are combined by one pass of
:func:`gossip.transport._reduce.weighted_sum`.

Which of these paths a call takes, and whether it goes through node shared memory or pinned host
staging instead, is the transport's decision (:meth:`gossip.transport.Transport.route`); every
call starts with the shared prologue (:mod:`gossip.ops._prologue`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from gossip.errors import GossipError, InputMismatchError
from gossip.ops import _prologue as prologue
from gossip.ops.handles import Handle
from gossip.runtime import Runtime, current
from gossip.transport import Route, RouteKind
from gossip.transport._buffers import mpi_buffer
from gossip.transport._reduce import weighted_sum

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


def _self_weight(self_weight: float | None, default: float) -> float:
    """The call's self weight: ``self_weight`` when given (finite), else ``default``."""
    if self_weight is None:
        return default
    try:
        weight = float(self_weight)
    except (TypeError, ValueError):
        raise TypeError(f"self_weight must be a number, got {type(self_weight).__name__}") from None
    if not math.isfinite(weight):
        raise ValueError(f"self_weight is non-finite: {weight}")
    return weight


def _resolve(rt: Runtime, self_weight: float | None, src_weights: Weights, dst_weights: Weights) -> _Exchange:
    """Turn the call's arguments into this rank's exchange, or raise ValueError."""
    topo = rt.topology
    if dst_weights is None:
        if src_weights is None:
            if self_weight is not None:
                raise ValueError("self_weight was given without src_weights; give both or neither")
            return _Exchange(False, topo.sources, topo.src_weights, topo.destinations, [], topo.self_weight)
        src = prologue.weight_map(src_weights, "src_weights", rt.rank, rt.size, None)
        outside = sorted(set(src) - set(topo.sources))
        if outside:
            raise ValueError(
                f"src_weights names ranks {outside} that are not in-neighbours {topo.sources} in the "
                "static topology; pass dst_weights too for a dynamic exchange"
            )
        sw = _self_weight(self_weight, 1.0 - sum(src.values()))
        weights = [src.get(j, 0.0) for j in topo.sources]
        return _Exchange(False, topo.sources, weights, topo.destinations, [], sw)

    dst = prologue.weight_map(dst_weights, "dst_weights", rt.rank, rt.size, 1.0)
    src = {} if src_weights is None else prologue.weight_map(src_weights, "src_weights", rt.rank, rt.size, None)
    scaled = any(w != 1.0 for w in dst.values())
    # default: push-sum keeps what it does not send; plain averaging completes the row to 1
    sw = _self_weight(self_weight, 1.0 - sum(dst.values()) if scaled else 1.0 - sum(src.values()))
    sources = sorted(src)
    destinations = sorted(dst)
    return _Exchange(True, sources, [src[j] for j in sources], destinations, [dst[d] for d in destinations], sw)


def _prepare(rt: Runtime, tensor: torch.Tensor, op: str, self_weight: float | None, src_weights: Weights,
             dst_weights: Weights, out: torch.Tensor | None, blocking: bool) -> tuple[_Exchange, Route]:
    """The op's prologue: validate the arguments, resolve this rank's exchange and the route of its
    bytes, and (check on) agree with every rank that they fit together."""
    exchange: _Exchange | None = None
    route: Route | None = None
    problem: prologue.Problem = prologue.tensor_problem(
        tensor, op, prologue.FLOATS, "{op} supports float32/float64/float16/bfloat16 tensors, got {dtype}")
    if problem is not None:
        problem = TypeError(problem)
    else:
        try:
            if out is not None:
                prologue.check_out(out, tensor)
            exchange = _resolve(rt, self_weight, src_weights, dst_weights)
            route = rt.transport.route(tensor, blocking=blocking, pipeline=True, shared_memory=True)
        except (TypeError, ValueError) as err:
            problem = err
    kind = "dynamic" if exchange is not None and exchange.dynamic else "static"
    shape, dtype = (None, None) if exchange is None else (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    agreed = route.agreement() if route is not None else ()

    def description() -> str:
        return f"{op} of shape {shape} {dtype} ({kind} exchange, {route.describe() if route else 'invalid'})"

    prologue.agree(
        rt, op, (kind, shape, dtype, agreed), problem,
        description=description,
        sends_to=exchange.destinations if exchange else [],
        receives_from=exchange.sources if exchange else [],
        protocol=route.protocol(exchange.dynamic) if exchange is not None and route is not None else None,
    )
    assert exchange is not None and route is not None
    return exchange, route


def _start(rt: Runtime, tensor: torch.Tensor, ex: _Exchange, route: Route, out: torch.Tensor | None) -> Handle:
    transport = rt.transport
    x = tensor.detach().contiguous()  # copies only a non-contiguous input; the input is never written
    flat = x.view(-1)
    n, d, device = flat.numel(), len(ex.sources), flat.device
    _count(rt, route, ex, n, flat.element_size())

    if route.kind is RouteKind.SHARED_MEMORY:
        # neighbours read a tensor already in shared memory in place: the result must not overwrite it
        result = prologue.pick_output(out, x, avoid=flat if route.location is not None else None)
        rt.node_memory.neighbor_reduce(flat, ex.self_weight, ex.sources, ex.src_weights, ex.destinations,
                                       ex.dst_weights if ex.dynamic else None, result.view(-1),
                                       located=route.location)
        return Handle([], lambda: prologue.deliver(result, out))

    result = prologue.pick_output(out, x)
    if route.kind is RouteKind.PIPELINED:
        _run_pipelined(rt, flat, ex, result.view(-1))
        return Handle([], lambda: prologue.deliver(result, out))

    send = transport.outgoing(flat) if (ex.sources or ex.destinations) else flat
    recv = transport.incoming(d * n, flat.dtype, device) if d else None
    requests: list[MPI.Request] = []
    scales = None
    if ex.dynamic:
        scales = np.empty(d, dtype=np.float64)
        requests += _post_scales(rt.comm, ex, scales)
        requests += _post_chunks(rt, rt.comm, send, recv, n, ex.sources, ex.destinations)
    elif route.message_chunks:
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
        return prologue.deliver(result, out)

    return Handle(requests, finish, what="neighbor_allreduce", peers=sorted({*ex.sources, *ex.destinations}),
                  nbytes=n * flat.element_size(), in_flight=rt.in_flight)


def _count(rt: Runtime, route: Route, ex: _Exchange, n: int, itemsize: int) -> None:
    """Count the exchange in the runtime's traffic (:mod:`gossip.transport._traffic`): the message to
    each destination, in as many messages as it has chunks, and a dynamic exchange's 8-byte scales."""
    traffic, destinations = rt.traffic, len(ex.destinations)
    if route.kind is RouteKind.SHARED_MEMORY:
        traffic.count_sends("neighbor_allreduce (shared memory)", n * itemsize, destinations)
        return
    if route.kind is RouteKind.PIPELINED:
        chunks = -(-n // route.chunk_elements) if n else 1
    elif ex.dynamic or route.message_chunks:
        chunks = len(rt.transport.chunk_spans(n, itemsize))
    else:
        chunks = 1
    traffic.count_sends("neighbor_allreduce", n * itemsize, destinations, chunks)
    if ex.dynamic:
        traffic.count_sends("neighbor_allreduce", 8, destinations)


def _post_scales(comm: MPI.Comm, ex: _Exchange, scales: np.ndarray) -> list[MPI.Request]:
    """A dynamic exchange's scales (a few bytes): what each source scales its send to this rank by
    lands in ``scales``; this rank's ``dst_weights`` go to its destinations."""
    outgoing = np.asarray(ex.dst_weights, dtype=np.float64)
    requests = [comm.Irecv([scales[k:k + 1], MPI.DOUBLE], source=src, tag=_TAG_SCALE)
                for k, src in enumerate(ex.sources)]
    return requests + [comm.Isend([outgoing[k:k + 1], MPI.DOUBLE], dest=dst, tag=_TAG_SCALE)
                       for k, dst in enumerate(ex.destinations)]


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
    """The blocking exchange of a staged tensor, chunk by chunk (:mod:`gossip.transport._staging`): each
    chunk's neighbour values are combined on the tensor's device while the next one moves."""
    peers = sorted({*ex.sources, *ex.destinations})
    weights = ex.src_weights
    if ex.dynamic:  # the senders' scales first (a few bytes), then the data in chunks
        comm, scales = rt.comm, np.empty(len(ex.sources), dtype=np.float64)
        rt.watchdog.wait(_post_scales(comm, ex, scales), "neighbor_allreduce", peers)
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


@prologue.failures_raised("neighbor_allreduce_async")
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
    exchange, route = _prepare(rt, tensor, "neighbor_allreduce", self_weight, src_weights, dst_weights, out,
                               blocking=False)
    return _start(rt, tensor, exchange, route, out)


@prologue.failures_raised("neighbor_allreduce")
def neighbor_allreduce(
    tensor: torch.Tensor,
    *,
    self_weight: float | None = None,
    src_weights: Weights = None,
    dst_weights: Weights = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted combination with in-neighbours: x_i ← w_ii x_i + Σ_j w_ij s_ji x_j.

    ``w_ii`` is ``self_weight``, ``w_ij`` = ``src_weights[j]`` and ``s_ji`` what rank j scales its
    send to rank i by (its ``dst_weights[i]``; 1 without scaled sends). Collective over all ranks.
    Returns a new tensor (or writes ``out``); ``tensor`` is untouched. Any shape, contiguous or
    not; float32/float64/float16/bfloat16 (half types are reduced in float32); CPU or CUDA.

    The weights are taken as given: they need not sum to 1, nor be positive. Self weight 1 and
    neighbour weights 1 give the plain sum over the closed neighbourhood; ``self_weight`` plus the
    send scales need not be 1 either (push-sum with any split of the mass, Kempe, Dobra and
    Gehrke, FOCS 2003). Weights must be finite and name ranks in range other than this one.
    Equal weights (uniform averaging) are summed first and scaled once, so the uniform average
    of float32 or half values is correctly rounded (:mod:`gossip.transport._reduce`).

    * No weights: the static topology's weights (:func:`gossip.set_topology`), one
      ``Neighbor_allgather`` on its dist-graph communicator.
    * ``src_weights`` only (``{rank: weight}`` or a list of ranks for uniform weights
      ``1/(len + 1)``): other weights for some of the static topology's in-neighbours (the rest
      get 0), same transfer. ``self_weight`` defaults to ``1 - sum(src_weights)``.
    * ``dst_weights`` (``{rank: scale}`` or a list of ranks for scale 1): a dynamic exchange,
      point-to-point, with peers chosen per call. What goes to rank d is scaled by ``dst_weights[d]``
      (applied by the receiver, so nothing is copied), as push-sum needs. ``self_weight``
      defaults to ``1 - sum(dst_weights)`` with scaled sends (the mass not sent is kept), else
      to ``1 - sum(src_weights)``.

    With the cross-rank check on (default), a rank sending to one that does not receive from it
    (or receiving from one that does not send), shapes or dtypes that differ between neighbours,
    out-of-range ranks or non-finite weights raise :class:`gossip.InputMismatchError` on every
    rank, naming the rank, instead of hanging.
    """
    rt = current()
    exchange, route = _prepare(rt, tensor, "neighbor_allreduce", self_weight, src_weights, dst_weights, out,
                               blocking=True)
    return _start(rt, tensor, exchange, route, out).wait()


__all__ = ["InputMismatchError", "neighbor_allreduce", "neighbor_allreduce_async"]
