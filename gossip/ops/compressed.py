"""The ops that send compressed messages (:mod:`gossip.ops.compression`) and count their bytes.

Each op compresses, moves the fixed-size messages and decompresses what arrives, summing in float32
(float64 for float64 tensors): :func:`compressed_allreduce` (every rank's fixed-size message gathered with one
``MPI_Iallgather``, then decompressed and summed on every rank), :func:`compressed_neighbor_allreduce`
(neighbour averaging of compressed values: a neighbourhood collective on the static topology,
point-to-point for per-call peers) and :func:`compressed_neighbor_exchange` (a different message to
each destination, point-to-point, for schemes that keep one public copy per edge). Each op adds the
bytes it hands to MPI (a message's size, once per rank it goes to) to the compressor's
:attr:`Compressor.bytes_sent` and to the runtime's traffic (:func:`gossip.traffic`), under the op's name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from mpi4py import MPI

from gossip.ops import _prologue as prologue
from gossip.ops.compression import Compressor
from gossip.ops.neighbor import Weights, _resolve
from gossip.runtime import Runtime, current
from gossip.transport._buffers import mpi_buffer

_TAG_MESSAGE = 0x6711


def _handed(buffer: list) -> int:
    """Bytes of a buffer as handed to MPI (``[obj, count, datatype]``): count times the type's size."""
    return buffer[1] * buffer[2].Get_size()


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_compressor(compressor: object) -> str | None:
    return None if isinstance(compressor, Compressor) else \
        f"compressor must be a gossip.Compressor, got {type(compressor).__name__}"


def _signature(tensor: torch.Tensor, compressor: Compressor) -> tuple:
    return (tensor.numel(), str(tensor.dtype).replace("torch.", ""), compressor.describe())


@prologue.failures_raised("compressed_allreduce")
def compressed_allreduce(tensor: torch.Tensor, compressor: Compressor, op: str = "mean", *,
                         out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: the ``"mean"`` (or ``"sum"``) over ranks of what each rank's ``tensor`` decompresses
    to after ``compressor``: Σ_r decompress(compress(x_r)) (/ n).

    Every rank's message (of the same fixed size) reaches every rank with one ``MPI_Iallgather``;
    each rank then decompresses the n messages and sums them in float32 (float64 for float64
    tensors), so all ranks hold the same result. Returns a new tensor of ``tensor``'s shape and
    dtype (or writes ``out``). ``sent``, when given (``tensor``'s shape and dtype), receives what
    this rank's own message decompresses to, for error feedback (e_r = x_r − sent). Counts
    (n − 1) message sizes in ``compressor.bytes_sent``, what each rank delivers to the others.
    """
    rt = current()
    problem = prologue.tensor_problem(tensor, "compressed_allreduce", prologue.FLOATS) or _check_compressor(compressor)
    if problem is None and op not in ("mean", "sum"):
        problem = f"compressed_allreduce op must be 'mean' or 'sum', got {op!r}"
    try:
        for extra in (out, sent):
            if problem is None and extra is not None:
                prologue.check_out(extra, tensor)
    except (TypeError, ValueError) as err:
        problem = str(err)
    parts = _signature(tensor, compressor) + (op,) if problem is None else (None,)
    prologue.agree(rt, "compressed_allreduce", parts, problem)

    x = tensor.detach().contiguous().view(-1)
    message = compressor.compress(x)
    m, n, device = message.numel(), rt.size, x.device
    transport = rt.transport
    send = transport.outgoing(message)
    gathered = transport.incoming(n * m, torch.uint8, device)
    send_buffer, recv_buffer = mpi_buffer(send), mpi_buffer(gathered)
    recv_buffer[1] = m  # count per rank
    rt.traffic.count_allgather("compressed_allreduce", _handed(send_buffer), n)
    rt.watchdog.wait([rt.comm.Iallgather(send_buffer, recv_buffer)], "compressed_allreduce", nbytes=m)
    compressor.bytes_sent += _handed(send_buffer) * (n - 1)
    compressor.messages_sent += n - 1
    received = transport.to_device(gathered, device)
    acc = torch.zeros(x.numel(), dtype=_wide(x.dtype), device=device)
    for r in range(n):
        compressor.decompress_add(received[r * m:(r + 1) * m], acc, 1.0, x.dtype)
    if received is not gathered:
        transport.done_with(received)
    transport.done_with(gathered)
    transport.done_with(send, message)
    if sent is not None:
        compressor.decompress(message, sent.view(-1), x.dtype)
    if op == "mean":
        acc.div_(n)
    result = acc.to(x.dtype).view(tensor.shape)
    return prologue.deliver(result, out)


def _post_messages(rt: Runtime, op: str, comm: MPI.Comm, sends: list[tuple[int, torch.Tensor]], sources: list[int],
                   m: int, device: torch.device, collective: torch.Tensor | None = None) -> tuple[list[MPI.Request],
                                                                                        torch.Tensor | None,
                                                                                        list[torch.Tensor], int]:
    """Post the transfer of fixed-size ``uint8`` messages of ``m`` bytes: ``sends`` (destination,
    message), and one message from each of ``sources`` into the returned buffer (row k from
    ``sources[k]``). ``collective``: the one message every out-neighbour of ``comm``'s dist graph
    gets (``MPI_Ineighbor_allgather``, or point-to-point chunks for a message past the chunk size;
    ``sends`` then lists it once per destination). Returns the requests, the receive buffer, the
    distinct send buffers MPI reads (give them back with ``done_with``) and the bytes handed to MPI,
    which the runtime's traffic counts under ``op``."""
    transport = rt.transport
    recv = transport.incoming(len(sources) * m, torch.uint8, device) if sources else None
    staged: dict[int, torch.Tensor] = {}
    for _, message in sends + ([] if collective is None else [(-1, collective)]):
        if id(message) not in staged:
            staged[id(message)] = transport.outgoing(message)
    outgoing = [(dst, staged[id(message)]) for dst, message in sends]
    handed = sum(_handed(mpi_buffer(buffer)) for _, buffer in outgoing)
    if not (sends or sources):
        requests = []
    elif collective is not None and not transport.chunked(m):
        send = staged[id(collective)]
        recvbuf = mpi_buffer(recv if recv is not None else send[:0])
        recvbuf[1] = m  # count per neighbour
        rt.traffic.add(op, handed, len(outgoing))
        requests = [comm.Ineighbor_allgather(mpi_buffer(send), recvbuf)]
    else:
        rt.traffic.add(op, handed, len(outgoing) * len(transport.chunk_spans(m, 1)))
        receives = [(src, recv[k * m:(k + 1) * m]) for k, src in enumerate(sources)]
        requests = transport.exchange(comm, receives, outgoing, _TAG_MESSAGE)
    return requests, recv, list(staged.values()), handed


def _arrived(rt: Runtime, recv: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The received messages on ``device`` (a pooled copy when they were staged); :func:`_release` after."""
    return None if recv is None else rt.transport.to_device(recv, device)


def _release(rt: Runtime, recv: torch.Tensor | None, arrived: torch.Tensor | None) -> None:
    if recv is not None:
        if arrived is not recv:
            rt.transport.done_with(arrived)
        rt.transport.done_with(recv)


@prologue.failures_raised("compressed_neighbor_allreduce")
def compressed_neighbor_allreduce(tensor: torch.Tensor, compressor: Compressor, *, self_weight: float | None = None,
                                  src_weights: Weights = None, dst_weights: Weights = None,
                                  out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> torch.Tensor:
    """Neighbour averaging of compressed values: ``self_weight * D(C(x_i)) + Σ_j src_weights[j] * D(C(x_j))``
    over the in-neighbours j, with C = ``compressor.compress`` and D its decompression; every term,
    this rank's own included, is what crossed the wire. Summed in float32 (float64 for float64).

    The weights are those of :func:`gossip.neighbor_allreduce`: none for the static topology (one
    ``MPI_Ineighbor_allgather`` of the message on its dist-graph communicator), ``src_weights`` for
    other weights on it, ``dst_weights`` for per-call peers (point-to-point; unit scales only: a
    compressed message is not rescaled by its receiver). Returns a new tensor (or writes ``out``);
    ``sent`` receives D(C(x_i)). Counts the message once per destination in ``compressor.bytes_sent``.
    """
    rt = current()
    exchange, problem = None, prologue.tensor_problem(tensor, "compressed_neighbor_allreduce", prologue.FLOATS)
    problem = problem or _check_compressor(compressor)
    if problem is None:
        try:
            for extra in (out, sent):
                if extra is not None:
                    prologue.check_out(extra, tensor)
            exchange = _resolve(rt, self_weight, src_weights, dst_weights)
            if exchange.dynamic and any(w != 1.0 for w in exchange.dst_weights):
                raise ValueError("compressed_neighbor_allreduce takes unit dst_weights only (no scaled sends)")
        except (TypeError, ValueError) as err:
            problem, exchange = str(err), None
    kind = "dynamic" if exchange is not None and exchange.dynamic else "static"
    parts = (kind,) + (_signature(tensor, compressor) if exchange is not None else (None,))
    prologue.agree(rt, "compressed_neighbor_allreduce", parts, problem,
                   sends_to=exchange.destinations if exchange else [],
                   receives_from=exchange.sources if exchange else [],
                   protocol=None if exchange is None else (0 if exchange.dynamic else 1))
    assert exchange is not None

    x = tensor.detach().contiguous().view(-1)
    message = compressor.compress(x)
    m, device = message.numel(), x.device
    comm = rt.comm if exchange.dynamic else rt.topology.dist_comm
    requests, recv, staged, handed = _post_messages(
        rt, "compressed_neighbor_allreduce", comm, [(d, message) for d in exchange.destinations], exchange.sources, m,
        device,
        collective=None if exchange.dynamic else message)
    peers = sorted({*exchange.sources, *exchange.destinations})
    rt.watchdog.wait(requests, "compressed_neighbor_allreduce", peers, nbytes=m)
    compressor.bytes_sent += handed
    compressor.messages_sent += len(exchange.destinations)

    own = compressor.decompress(message, torch.empty(x.numel(), dtype=_wide(x.dtype), device=device), x.dtype)
    if sent is not None:
        sent.view(-1).copy_(own)
    acc = own.mul_(exchange.self_weight)
    arrived = _arrived(rt, recv, device)
    for k, weight in enumerate(exchange.src_weights):
        compressor.decompress_add(arrived[k * m:(k + 1) * m], acc, weight, x.dtype)
    _release(rt, recv, arrived)
    for buffer in staged:
        rt.transport.done_with(buffer, message)
    return prologue.deliver(acc.to(x.dtype).view(tensor.shape), out)


@dataclass
class Exchanged:
    """What :func:`compressed_neighbor_exchange` moved: ``received[src]``, the decompressed message
    from each source, and ``sent[dst]``, what each destination decompresses this rank's message to."""

    received: dict[int, torch.Tensor]
    sent: dict[int, torch.Tensor]


@prologue.failures_raised("compressed_neighbor_exchange")
def compressed_neighbor_exchange(sends: Mapping[int, torch.Tensor], sources: Sequence[int], compressor: Compressor,
                                 *, like: torch.Tensor | None = None) -> Exchanged:
    """Point-to-point: compress ``sends[d]`` and send it to rank d, for every d; receive one message
    from each rank of ``sources``; return both sides decompressed (:class:`Exchanged`: flat tensors
    of the sent tensors' length, dtype and device, or ``like``'s when this rank sends nothing).

    For schemes that keep one public copy per edge (CHOCO-SGD on a time-varying family): each
    destination gets a message of its own. Collective over the ranks named: every destination must
    list this rank among its sources, and every tensor has the same length and dtype. Counts each
    message in ``compressor.bytes_sent``.
    """
    rt = current()
    sends = {int(d): t for d, t in sends.items()}
    sources = [int(s) for s in sources]
    destinations = sorted(sends)
    like = next(iter(sends.values()), like)
    problem = _check_compressor(compressor)
    if problem is None and like is None and sources:
        problem = "compressed_neighbor_exchange receives but sends nothing: pass like= (a tensor like those received)"
    for d in destinations:
        problem = problem or prologue.tensor_problem(sends[d], "compressed_neighbor_exchange", prologue.FLOATS)
        t = sends[d]
        if problem is None and (t.numel() != like.numel() or t.dtype != like.dtype or t.device != like.device):
            problem = (f"every tensor sent must share length, dtype and device: the one for rank {d} is {t.numel()} "
                       f"{t.dtype} on {t.device}, another {like.numel()} {like.dtype} on {like.device}")
    bad = sorted({r for r in [*destinations, *sources] if not 0 <= r < rt.size or r == rt.rank})
    if problem is None and bad:
        problem = f"peers {bad} are out of range for {rt.size} ranks or this rank itself"
    if problem is None and len(set(sources)) != len(sources):
        problem = f"sources lists a rank twice: {sources}"
    parts = _signature(like, compressor) if problem is None and like is not None else (None,)
    prologue.agree(rt, "compressed_neighbor_exchange", parts, problem, sends_to=destinations, receives_from=sources,
                   protocol=0)
    if like is None:
        return Exchanged({}, {})

    numel, dtype, device = like.numel(), like.dtype, like.device
    messages = {d: compressor.compress(sends[d]) for d in destinations}
    m = compressor.wire_bytes(numel, dtype)
    requests, recv, staged, handed = _post_messages(rt, "compressed_neighbor_exchange", rt.comm,
                                                    [(d, messages[d]) for d in destinations], sources, m, device)
    rt.watchdog.wait(requests, "compressed_neighbor_exchange", sorted({*sources, *destinations}), nbytes=m)
    compressor.bytes_sent += handed
    compressor.messages_sent += len(destinations)

    def decompressed(message: torch.Tensor) -> torch.Tensor:
        return compressor.decompress(message, torch.empty(numel, dtype=dtype, device=device), dtype)

    arrived = _arrived(rt, recv, device)
    received = {src: decompressed(arrived[k * m:(k + 1) * m]) for k, src in enumerate(sources)}
    _release(rt, recv, arrived)
    for buffer, d in zip(staged, destinations, strict=True):
        rt.transport.done_with(buffer, messages[d])
    return Exchanged(received, {d: decompressed(messages[d]) for d in destinations})


__all__ = ["Exchanged", "compressed_allreduce", "compressed_neighbor_allreduce", "compressed_neighbor_exchange"]
