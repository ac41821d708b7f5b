"""The ops that send compressed messages (:mod:`gossip.ops.compression`) and count their bytes.

Each op compresses, moves the fixed-size messages and decompresses what arrives, summing in float32
(float64 for float64 tensors): :func:`compressed_allreduce` and :func:`compressed_allreduce_async` (a
compressed reduce-scatter, point-to-point, then an ``MPI_Iallgatherv`` of the compressed reduced
blocks: 2(n − 1)/n compressed copies of the tensor per rank), :func:`compressed_neighbor_allreduce`
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
from gossip.ops.compression import Compressor, RandomK
from gossip.ops.handles import Handle
from gossip.ops.neighbor import Weights, _resolve
from gossip.runtime import Runtime, current
from gossip.transport._buffers import mpi_buffer

_TAG_MESSAGE = 0x6720
_TAG_REDUCE_SCATTER = 0x6721


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


def _blocks(numel: int, n: int) -> list[tuple[int, int]]:
    """The n contiguous blocks of a flat tensor of ``numel`` elements, rank b owning block b: the first
    ``numel mod n`` blocks hold one element more than the others."""
    base, extra = divmod(numel, n)
    starts = [b * base + min(b, extra) for b in range(n + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def _message_bytes(compressor: Compressor, span: tuple[int, int], dtype: torch.dtype) -> int:
    """Bytes of the message for a block (none for an empty block, which is not sent)."""
    a, b = span
    return compressor.wire_bytes(b - a, dtype) if b > a else 0


def _compress_block(compressor: Compressor, values: torch.Tensor, size: int,
                    round_: int | None = None) -> torch.Tensor:
    """``compressor``'s message for one block (``size`` bytes, empty for an empty block). ``round_``:
    random-k's second stage keeps the indices of the first (the round the block was sent in) and does
    not rescale: the sum is already on those indices, and already unbiased."""
    if size == 0:
        return torch.empty(0, dtype=torch.uint8, device=values.device)
    if round_ is None or not isinstance(compressor, RandomK):
        return compressor.compress(values)
    kept_round, unbiased = compressor.round, compressor.unbiased
    compressor.round, compressor.unbiased = round_, False
    try:
        return compressor.compress(values)
    finally:
        compressor.round, compressor.unbiased = kept_round, unbiased


def _post_blocks(rt: Runtime, receives: list[tuple[int, torch.Tensor]], sends: list[tuple[int, torch.Tensor]]
                 ) -> tuple[list[MPI.Request], int]:
    """Post point-to-point messages of any sizes, each in chunks (:meth:`Transport.chunk_spans`), every
    receive before any send; returns the requests and the number of chunks sent."""
    transport, comm = rt.transport, rt.comm
    requests, chunks = [], 0
    for src, into in receives:
        requests += [comm.Irecv(mpi_buffer(into[a:b]), source=src, tag=_TAG_REDUCE_SCATTER)
                     for a, b in transport.chunk_spans(into.numel(), 1)]
    for dst, message in sends:
        spans = transport.chunk_spans(message.numel(), 1)
        requests += [comm.Isend(mpi_buffer(message[a:b]), dest=dst, tag=_TAG_REDUCE_SCATTER) for a, b in spans]
        chunks += len(spans)
    return requests, chunks


def _check_allreduce(rt: Runtime, what: str, tensor: torch.Tensor, compressor: Compressor, op: str,
                     out: torch.Tensor | None, sent: torch.Tensor | None) -> None:
    problem = prologue.tensor_problem(tensor, what, prologue.FLOATS) or _check_compressor(compressor)
    if problem is None and op not in ("mean", "sum"):
        problem = f"{what} op must be 'mean' or 'sum', got {op!r}"
    try:
        for extra in (out, sent):
            if problem is None and extra is not None:
                prologue.check_out(extra, tensor)
    except (TypeError, ValueError) as err:
        problem = str(err)
    parts = _signature(tensor, compressor) + (op,) if problem is None else (None,)
    prologue.agree(rt, "compressed_allreduce", parts, problem)


def _start_allreduce(rt: Runtime, tensor: torch.Tensor, compressor: Compressor, op: str,
                     out: torch.Tensor | None, sent: torch.Tensor | None) -> Handle:
    """Reduce-scatter of compressed blocks (completed here), then the allgather of the compressed
    reduced blocks, posted; the handle decompresses them."""
    x = tensor.detach().contiguous().view(-1)
    n, me, device, dtype = rt.size, rt.rank, x.device, x.dtype
    transport, what = rt.transport, "compressed_allreduce"
    spans = _blocks(x.numel(), n)
    sizes = [_message_bytes(compressor, span, dtype) for span in spans]
    # 1. reduce-scatter: block b, compressed, to rank b; this rank sums the n messages for its block
    first_round = getattr(compressor, "round", None)
    messages = [_compress_block(compressor, x[a:b], size) for (a, b), size in zip(spans, sizes, strict=True)]
    sources = [src for src in range(n) if src != me and sizes[me]]
    recv = transport.incoming(len(sources) * sizes[me], torch.uint8, device)
    receives = [(src, recv[k * sizes[me]:(k + 1) * sizes[me]]) for k, src in enumerate(sources)]
    staged = [(dst, transport.outgoing(messages[dst])) for dst in range(n) if dst != me and sizes[dst]]
    requests, chunks = _post_blocks(rt, receives, staged)
    scattered = sum(message.numel() for _, message in staged)
    rt.traffic.add(what, scattered, chunks)
    rt.watchdog.wait(requests, f"{what} (reduce-scatter)", nbytes=sizes[me])
    if sent is not None:
        into = sent.view(-1)
        for (a, b), message in zip(spans, messages, strict=True):
            if b > a:
                compressor.decompress(message, into[a:b], dtype)
    a, b = spans[me]
    acc = torch.zeros(b - a, dtype=_wide(dtype), device=device)
    arrived = _arrived(rt, recv, device)
    if b > a:
        rows = {src: arrived[k * sizes[me]:(k + 1) * sizes[me]] for k, src in enumerate(sources)}
        for src in range(n):  # in rank order on every rank: the same sum wherever it is computed
            compressor.decompress_add(messages[me] if src == me else rows[src], acc, 1.0, dtype)
    _release(rt, recv, arrived)
    for dst, buffer in staged:
        transport.done_with(buffer, messages[dst])
    if op == "mean":
        acc.div_(n)
    # 2. allgather: this rank's reduced block, compressed again, to every rank
    round_ = None if first_round is None else first_round + me
    reduced = _compress_block(compressor, acc.to(dtype), sizes[me], round_)
    displs = [sum(sizes[:k]) for k in range(n)]
    send = transport.outgoing(reduced)
    gathered = transport.incoming(sum(sizes), torch.uint8, device)
    recv_obj, _, datatype = mpi_buffer(gathered)
    rt.traffic.count_allgather(what, sizes[me], n)
    requests = [rt.comm.Iallgatherv(mpi_buffer(send), [recv_obj, (sizes, displs), datatype])]
    compressor.bytes_sent += scattered + (n - 1) * sizes[me]
    compressor.messages_sent += len(staged) + (n - 1 if sizes[me] else 0)

    def finish() -> torch.Tensor:
        received = transport.to_device(gathered, device)
        values = torch.empty(x.numel(), dtype=_wide(dtype), device=device)
        for (a, b), size, at in zip(spans, sizes, displs, strict=True):
            if b > a:
                compressor.decompress(received[at:at + size], values[a:b], dtype)
        if received is not gathered:
            transport.done_with(received)
        transport.done_with(gathered)
        transport.done_with(send, reduced)
        return prologue.deliver(values.to(dtype).view(tensor.shape), out)

    return Handle(requests, finish, what=f"{what} (allgather)", nbytes=sizes[me], in_flight=rt.in_flight,
                  keep=(reduced, send, gathered, recv_obj))


@prologue.failures_raised("compressed_allreduce")
def compressed_allreduce(tensor: torch.Tensor, compressor: Compressor, op: str = "mean", *,
                         out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: the ``"mean"`` (or ``"sum"``) over ranks of ``tensor``, with every message compressed
    by ``compressor``, as a compressed reduce-scatter followed by a compressed allgather.

    The flat tensor is cut into n contiguous blocks B_0, ..., B_{n−1} (sizes differing by at most one
    element); rank b owns block b. With C = ``compressor.compress`` and D its decompression:

    1. reduce-scatter: every rank r sends C(x_r[B_b]) to rank b (point-to-point, in chunks), and rank
       b sums the n decompressed contributions, its own included, in float32 (float64 for float64
       tensors) in rank order: s_b = Σ_r D(C(x_r[B_b])) (divided by n for the mean, in the tensor's dtype);
    2. allgather: rank b compresses its reduced block again, and ``MPI_Iallgatherv`` hands C(s_b) to
       every rank, which decompresses all n: result[B_b] = D(C(s_b)).

    Every rank decompresses the same bytes, so all ranks hold bitwise the same result. Each rank hands
    MPI about 2(n − 1)/n compressed copies of the tensor, a ring allreduce's bytes times the
    compression ratio (Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
    workstations", JPDC 69(2), 2009); the compressed two-stage form is 1-bit Adam's (Tang, Gan,
    Rajbhandari, Lian, Zhang, Liu and He, "1-bit Adam: Communication Efficient Large-Scale Training
    with Adam's Convergence Speed", ICML 2021), without its second error feedback on the reducer.
    The exact counts (``compressor.bytes_sent`` and :func:`gossip.traffic`): Σ_{b≠r} wire(|B_b|) in
    stage 1 and (n − 1)·wire(|B_r|) in stage 2, wire = :meth:`Compressor.wire_bytes`.

    Blockwise compression: top-k keeps the ⌈f·|B_b|⌉ largest magnitudes of each block, and in stage 2
    the largest of the reduced block (up to n times as many are nonzero); the quantizers scale each
    block on its own; random-k sends block b in the same round on every rank that shares the
    compressor's seed and stage 2 keeps those indices (no second selection, no second n/k
    rescaling), so with a shared seed it loses nothing beyond stage 1. Stochastic rounding needs no
    agreement between ranks: the bytes of stage 2 are shared.

    ``sent``, when given (``tensor``'s shape and dtype), receives what this rank's contribution
    decompresses to in stage 1, D(C(x_r[B_b])) for every block, for error feedback (e_r = x_r − sent).
    It does not see stage 2's error, D(C(s_b)) − s_b, which is the same on every rank and not this
    rank's own. Returns a new tensor of ``tensor``'s shape and dtype (or writes ``out``).
    """
    rt = current()
    _check_allreduce(rt, "compressed_allreduce", tensor, compressor, op, out, sent)
    return _start_allreduce(rt, tensor, compressor, op, out, sent).wait()


@prologue.failures_raised("compressed_allreduce_async")
def compressed_allreduce_async(tensor: torch.Tensor, compressor: Compressor, op: str = "mean", *,
                               out: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> Handle:
    """Start :func:`compressed_allreduce`; the handle's ``wait()`` returns its result.

    The cross-rank check and stage 1 (the reduce-scatter: compress, exchange, sum, compress again)
    complete before this returns, and ``sent`` is written; stage 2, the allgather of the reduced
    blocks, moves in the background (one ``MPI_Iallgatherv``: MPI 4.0 standard, section 6.12), and
    ``wait()`` decompresses it: half the bytes overlap the caller's work. Every collective is posted
    within the call, so handles may be waited on in any order. The handle holds the buffers MPI uses.
    """
    rt = current()
    _check_allreduce(rt, "compressed_allreduce_async", tensor, compressor, op, out, sent)
    return _start_allreduce(rt, tensor, compressor, op, out, sent)


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


__all__ = ["Exchanged", "compressed_allreduce", "compressed_allreduce_async", "compressed_neighbor_allreduce",
           "compressed_neighbor_exchange"]
