"""Gathering the neighbours' tensors: ``neighbor_allgather`` and ``neighbor_allgather_async``.

On rank i with sources j_1, ..., j_d the result is the concatenation along the first dimension

    y_i = [x_{j_1}; x_{j_2}; ...; x_{j_d}]        shape (Σ_k n_{j_k}, *tail)

where x_j has shape (n_j, *tail): the first dimensions may differ between ranks, the other
dimensions and the dtype must match. The sources are the static topology's in-neighbours in
ascending rank order (:func:`gossip.in_neighbors`), or the ranks given per call (``src_ranks``, in
the order given, with ``dst_ranks`` the ranks this rank's tensor goes to: a dynamic exchange). The
names and the concatenation follow BlueFog's ``neighbor_allgather`` (Ying, Yuan, Hu, Chen and Yin,
"BlueFog: Make decentralized algorithms practical for optimization and deep learning",
arXiv:2111.04287, 2021); MPI's own ``MPI_Neighbor_allgatherv`` (MPI 4.0 standard, section 8.6)
gathers the same blocks on a static graph.

Every call starts with the shared prologue (:mod:`gossip.ops._prologue`): with the cross-rank check
on, a rank naming a destination that does not name it as a source (or the reverse), a dtype or
trailing shape that differs along an edge, or a static call meeting a dynamic one raises
:class:`gossip.InputMismatchError` on every rank instead of hanging. Each rank then sends its first
dimension n_i (one 8-byte message per destination: ``MPI_Ineighbor_allgather`` on the topology's
dist-graph communicator, or point-to-point for per-call ranks), so that every receiver sizes its
result, and the data follows point-to-point, a message of more than ``message_chunk_bytes`` in
chunks with every receive posted before any send (as :mod:`gossip.ops.neighbor`). Every wait goes
through the runtime's watchdog. The traffic counter counts the data, m per destination and one
message per chunk; the 8-byte sizes are not counted (as the sizes of :func:`gossip.allgather`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from mpi4py import MPI

from gossip.errors import InputMismatchError
from gossip.ops import _prologue as prologue
from gossip.ops.handles import Handle
from gossip.runtime import Runtime, current
from gossip.transport._buffers import SUPPORTED_DTYPES, mpi_buffer

_TAG_SIZE = 0x6711
_TAG_DATA = 0x6712
_OP = "neighbor_allgather"


def _ranks(ranks: object, what: str, rank: int, size: int) -> list[int]:
    """``ranks`` as a list of distinct ranks other than this one, or ValueError naming the problem."""
    if isinstance(ranks, int | np.integer) or not isinstance(ranks, Sequence | np.ndarray):
        raise ValueError(f"{what} must be a sequence of ranks, got {ranks!r}")
    listed = []
    for r in ranks:
        if not isinstance(r, int | np.integer) or isinstance(r, bool):
            raise ValueError(f"{what} names {r!r}, not a rank")
        listed.append(int(r))
    if len(set(listed)) != len(listed):
        raise ValueError(f"{what} lists a rank twice: {listed}")
    for r in listed:
        if not 0 <= r < size:
            raise ValueError(f"{what} names rank {r}, out of range for {size} ranks")
        if r == rank:
            raise ValueError(f"{what} names this rank itself ({r})")
    return listed


def _prepare(rt: Runtime, tensor: torch.Tensor, src_ranks: Sequence[int] | None,
             dst_ranks: Sequence[int] | None) -> tuple[bool, list[int], list[int]]:
    """Validate, agree across ranks; returns (dynamic, sources, destinations)."""
    topo = rt.topology
    dynamic = src_ranks is not None or dst_ranks is not None
    sources: list[int] = []
    destinations: list[int] = []
    problem: prologue.Problem = prologue.tensor_problem(tensor, _OP, SUPPORTED_DTYPES)
    if problem is not None:
        problem = TypeError(problem)
    elif tensor.dim() == 0:
        problem = ValueError(f"{_OP} concatenates along the first dimension: it needs a tensor with at least one "
                             "dimension, got a 0-d tensor (reshape it to (1,))")
    else:
        try:
            if dynamic:
                if src_ranks is None or dst_ranks is None:
                    raise ValueError(f"{_OP} takes src_ranks and dst_ranks together (a dynamic exchange), "
                                     f"got only {'src_ranks' if dst_ranks is None else 'dst_ranks'}")
                sources = _ranks(src_ranks, "src_ranks", rt.rank, rt.size)
                destinations = _ranks(dst_ranks, "dst_ranks", rt.rank, rt.size)
            else:
                sources, destinations = list(topo.sources), list(topo.destinations)
        except ValueError as err:
            problem = err
    tail = (tuple(tensor.shape[1:]), str(tensor.dtype).replace("torch.", "")) if problem is None else (None, None)
    kind = "dynamic" if dynamic else "static"
    prologue.agree(rt, _OP, (kind, *tail), problem,
                   description=f"{_OP} of shape (*, {', '.join(map(str, tail[0] or ()))}) {tail[1]} ({kind} exchange)",
                   sends_to=destinations, receives_from=sources, protocol=int(dynamic))
    return dynamic, sources, destinations


def _exchange_sizes(rt: Runtime, comm: MPI.Comm, dynamic: bool, rows: int, sources: list[int],
                    destinations: list[int]) -> list[int]:
    """Send this rank's first dimension to every destination; the sources' first dimensions, in order."""
    mine = np.array([rows], dtype=np.int64)
    theirs = np.zeros(len(sources), dtype=np.int64)
    if dynamic:
        requests = [comm.Irecv([theirs[k:k + 1], MPI.INT64_T], source=src, tag=_TAG_SIZE)
                    for k, src in enumerate(sources)]
        requests += [comm.Isend([mine, MPI.INT64_T], dest=dst, tag=_TAG_SIZE) for dst in destinations]
    else:
        requests = [comm.Ineighbor_allgather([mine, MPI.INT64_T], [theirs, MPI.INT64_T])]
    rt.watchdog.wait(requests, f"{_OP}: first dimensions", sorted({*sources, *destinations}))
    if (theirs < 0).any():  # cannot happen between ranks of this library; a guard against garbage
        raise InputMismatchError(f"rank {rt.rank}: {_OP} received a negative first dimension {theirs.tolist()}")
    return [int(n) for n in theirs]


def _post(rt: Runtime, comm: MPI.Comm, send: torch.Tensor, recv: torch.Tensor, counts: list[int],
          sources: list[int], destinations: list[int]) -> list[MPI.Request]:
    """Every source's block (``counts[k]`` elements, in order) into ``recv``, then ``send`` to every
    destination; each message in chunks of ``message_chunk_bytes``, every receive posted first."""
    transport, itemsize = rt.transport, send.element_size()
    requests = []
    offset = 0
    for src, count in zip(sources, counts, strict=True):
        block = recv[offset:offset + count]
        requests += [comm.Irecv(mpi_buffer(block[a:b]), source=src, tag=_TAG_DATA)
                     for a, b in transport.chunk_spans(count, itemsize)]
        offset += count
    spans = transport.chunk_spans(send.numel(), itemsize)
    requests += [comm.Isend(mpi_buffer(send[a:b]), dest=dst, tag=_TAG_DATA) for dst in destinations for a, b in spans]
    return requests


def _start(rt: Runtime, tensor: torch.Tensor, dynamic: bool, sources: list[int], destinations: list[int]) -> Handle:
    comm = rt.comm if dynamic else rt.topology.dist_comm
    x = tensor.detach().contiguous()
    tail = tuple(x.shape[1:])
    row = math.prod(tail)
    # the static exchange is a neighbourhood collective: every rank of the communicator calls it
    rows = _exchange_sizes(rt, comm, dynamic, x.shape[0], sources, destinations) \
        if (sources or destinations or not dynamic) else []
    result = torch.empty((sum(rows), *tail), dtype=x.dtype, device=x.device)
    if not (sources or destinations):
        return Handle([], lambda: result)
    transport = rt.transport
    flat = x.view(-1)
    send = transport.outgoing(flat)
    recv = transport.receiving(result.view(-1))
    nbytes = flat.numel() * flat.element_size()
    chunks = len(transport.chunk_spans(flat.numel(), flat.element_size()))
    rt.traffic.count_sends(_OP, nbytes, len(destinations), chunks)
    requests = _post(rt, comm, send, recv, [n * row for n in rows], sources, destinations)

    def finish() -> torch.Tensor:
        transport.received(recv, result.view(-1))
        transport.done_with(send, flat)
        return result

    return Handle(requests, finish, what=_OP, peers=sorted({*sources, *destinations}), nbytes=nbytes,
                  in_flight=rt.in_flight, keep=(flat, send, recv, result))


@prologue.failures_raised("neighbor_allgather_async")
def neighbor_allgather_async(tensor: torch.Tensor, *, src_ranks: Sequence[int] | None = None,
                             dst_ranks: Sequence[int] | None = None) -> Handle:
    """Start :func:`neighbor_allgather`; the handle's ``wait()`` returns its result.

    The cross-rank check (when on) and the exchange of first dimensions (8 bytes per pair) complete
    before this returns; the data then moves in the background of MPI's progress. The handle holds
    the buffers MPI uses, so the caller may drop ``tensor``; do not modify it before ``wait()``.
    """
    return _gather(tensor, src_ranks, dst_ranks)


@prologue.failures_raised("neighbor_allgather")
def neighbor_allgather(tensor: torch.Tensor, *, src_ranks: Sequence[int] | None = None,
                       dst_ranks: Sequence[int] | None = None) -> torch.Tensor:
    """Collective: the sources' tensors concatenated along dim 0, shape ``(Σ_j n_j, *tensor.shape[1:])``.

    ``tensor`` has shape ``(n_i, *tail)``, at least one dimension; n_i may differ between ranks, the
    tail and dtype may not. Any dtype MPI carries (float, integer); CPU or CUDA; ``tensor`` is untouched.

    * No ranks: the static topology's in-neighbours, in ascending rank order (as
      :func:`gossip.in_neighbors`); every rank sends to its out-neighbours.
    * ``src_ranks`` and ``dst_ranks`` (both, per call): a dynamic exchange; the blocks come in the
      order of ``src_ranks``. Every rank's ``dst_ranks`` must name exactly the ranks that list it in
      their ``src_ranks``; with the cross-rank check on (default) anything else raises
      :class:`gossip.InputMismatchError` on every rank, naming the ranks.

    Rows ``offset_k : offset_k + n_{j_k}`` of the result are source j_k's tensor, offset_k the sum
    of the earlier sources' first dimensions.
    """
    return _gather(tensor, src_ranks, dst_ranks).wait()


def _gather(tensor: torch.Tensor, src_ranks: Sequence[int] | None, dst_ranks: Sequence[int] | None) -> Handle:
    rt = current()
    dynamic, sources, destinations = _prepare(rt, tensor, src_ranks, dst_ranks)
    return _start(rt, tensor, dynamic, sources, destinations)


__all__ = ["neighbor_allgather", "neighbor_allgather_async"]
