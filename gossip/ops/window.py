"""One-sided gossip: an MPI window per tensor that neighbours write into without the owner's help.

``win = gossip.Window(tensor, name)`` is collective over the job. It allocates one MPI window
(``MPI_Win_allocate``: memory the MPI library can expose for direct remote access, shared memory
on one machine) holding, on every rank:

* slot 0: the owner's *published* copy of its tensor (set at creation and by :meth:`Window.update`;
  what neighbours read with :meth:`Window.get`);
* slot k + 1: the buffer of in-neighbour k (in rank order) of the window's graph (what it
  :meth:`Window.put` or :meth:`Window.accumulate` here, or what :meth:`Window.get` fetched from
  it), initialised to the owner's tensor, or to zero with ``zero_init=True``. The graph is the
  runtime's static topology unless ``graph=`` names another, e.g. the union of a time-varying
  family's graphs;
* one int64 version counter per rank: how many writes arrived from it since the owner last read;
* with ``push_sum=True``, one float64 weight p per slot and the owner's own p (below);
* one int64 mutex word.

Push-sum weights (``push_sum=True``). Each tensor carries a scalar weight p, 1 at creation (a
buffer's p is 1 as well, or 0 with ``zero_init``). Every operation on a tensor applies to its p
too: a put or accumulate of ``s·x`` sends ``s·p`` into the buffer's p; a get scaled by s fetches
``s·p``; :meth:`update` computes ``p ← a·p + Σ_j w_j·p_j`` with the weights of ``x ← a·x + Σ_j
w_j·b_j``. With column-stochastic sends the ratio x/p then converges to the average of the
initial tensors on any strongly connected graph, where x alone converges to a weighted
average: push-sum (Kempe, Dobra, Gehrke, "Gossip-based computation of aggregate information",
FOCS 2003), the weight SGP de-biases its model with (Assran, Loizou, Ballas, Rabbat, "Stochastic
Gradient Push for distributed deep learning", ICML 2019). :meth:`Window.associated_p` reads p.
Mass is conserved only if no write is lost: accumulate into buffers that the owner folds with
``update(..., reset=True)`` (each arrival counted once), with the mutex on both sides.

The mutex is chosen per call (``mutex=``; None takes the window's default, ``Window(mutex=...)``).
Every rank holds one shared passive-target epoch to all ranks for the window's life
(``MPI_Win_lock_all`` with ``MPI_MODE_NOCHECK``, MPI-3.1 §11.5.3: no rank ever asks for an exclusive
lock, so the assertion holds); writes and gets are request-based and complete with
``MPI_Win_flush``. The mutex is a word in each rank's window, taken with ``MPI_Compare_and_swap``
(0 → holder's rank + 1, retried until it succeeds) and given back with an atomic replace, both
accumulate-class operations and so atomic with respect to each other (MPI-3.1 §11.7.1). A call with
the mutex holds the mutex of the rank whose memory it touches for the whole access: a remote put,
accumulate or get holds the target's, the owner's :meth:`update`, :meth:`update_arrived`,
:meth:`buffers` hold its own; a call holds one mutex at a time, so calls never deadlock. What is
guaranteed: two accesses to one rank's window that both take the mutex never overlap, so a reader
with the mutex never sees half of a write made with the mutex (tested with concurrent writers). An
access without the mutex takes nothing and may overlap any other, as with any advisory lock: ranks
may mix choices, and the guarantee holds between the calls that chose the mutex. Waiting for a
mutex honours the op timeout (:class:`gossip.OpTimeoutError`). Nonblocking forms with the mutex
complete before they return. :meth:`Window.hold_mutex` holds chosen ranks' mutexes across several
calls (taken in ascending rank order; calls inside use the hold).

Weights: ``dst_weights`` (put/accumulate) scale what is sent to each out-neighbour (default 1);
``self_weight`` (put/accumulate) then scales the sent tensor in place (and p), default 1;
``src_weights`` (get) scale what is fetched; :meth:`update` folds the buffers into the tensor as
``x ← self_weight·x + Σ_j src_weights[j]·buffer_j`` (defaults: the window graph's weights),
writes the result into the tensor in place, publishes it and resets the version counters; with
``reset=True`` it then sets the buffers it read (and their p) to zero. :meth:`Window.update_arrived`
folds only the buffers written since the last update, uniformly. The window's memory is host
memory (``MPI_Win_allocate``), so folds combine there and a CUDA tensor is staged (the
transport's host-memory route) through pinned buffers allocated with the window (one copy each
way per call, nothing allocated per call; :meth:`buffers` returns tensors on the tensor's device).
Supported dtypes: float32 and float64.

What a get reads. By default a neighbour's *published* copy: its tensor as of its last
:meth:`update` (or creation); changes it made since (an optimizer step, a put's ``self_weight``)
are not seen until it updates again. With ``expose_tensor=True`` (CPU tensors, contiguous) the
tensor's own memory is exposed too, through a second window (``MPI_Win_create`` on its storage),
and ``get(current=True)`` reads the neighbour's *current* tensor and p, as they are at the moment
of the read. The owner changes its tensor with ordinary stores that take no mutex (only
:meth:`update` and a put's ``self_weight`` take it when they ask for it), so a current read
concurrent with such a change may return some elements from before it and some from after; the
tensor must keep its storage for the window's life (in-place changes only).

Creation and :meth:`free` are collective and begin with a barrier under the op watchdog
(:meth:`Watchdog.fence`): a rank arriving late makes the others raise
:class:`gossip.OpTimeoutError` after the op timeout instead of blocking in MPI.

Fault-tolerant mode: every call first asks whether a rank has failed and then raises
:class:`gossip.RankFailure` (on one machine a put into a dead rank's memory completes like any
other, so the failure would otherwise go unseen), and an MPI error of a failed rank raises it too.
MPI one-sided communication is not fault tolerant in Open MPI's ULFM, so the mutex is refused
there (a rank that dies holding a mutex would leave its peers waiting for it forever), and so
are exposed tensors and windows whose ranks span several machines (between machines a put to a
rank that had just died blocked forever; on one machine the window is shared memory and the
survivors go on). :func:`gossip.recover` frees every open window (``MPI_Win_free`` on every
survivor, its errors ignored: left to ``MPI_Finalize``, the free waits on the dead rank); create
windows again on the survivors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterable, Mapping

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from gossip import runtime
from gossip.errors import GossipError, OpTimeoutError
from gossip.ops import _prologue as prologue
from gossip.ops.handles import Handle
from gossip.transport import Transport
from topologies.weights import with_weights

_DTYPES = {torch.float32: (np.float32, MPI.FLOAT), torch.float64: (np.float64, MPI.DOUBLE)}
_LIVE_P, _PUBLISHED_P = 0, 1  # indices of the owner's p and its published p; slot s ≥ 1 has p index 1 + s


def _sources_of(graph, rank: int) -> list[int]:
    return sorted(j for j in graph.predecessors(rank) if j != rank)


def _check_fault_tolerant(rt, name: str, mutex: bool, expose_tensor: bool) -> None:  # noqa: ANN001 - the runtime
    """Collective in fault-tolerant mode: refuse the windows a dead rank could block forever (module docstring)."""
    if mutex:
        raise ValueError(f"rank {rt.rank}: Window({name!r}, mutex=True) is not available in fault-tolerant mode: a "
                         "rank that dies holding a window's mutex would leave its peers waiting for it forever")
    if expose_tensor:
        raise ValueError(f"rank {rt.rank}: Window({name!r}, expose_tensor=True) is not available in fault-tolerant "
                         "mode: reads from a dead rank's exposed tensor are not fault tolerant")
    with rt.failures.guard(f"Window({name!r})"):
        node = rt.comm.Split_type(MPI.COMM_TYPE_SHARED, key=rt.rank)
        one_host = node.size == rt.size  # the same answer on every rank
        node.Free()
    if not one_host:
        raise GossipError(f"rank {rt.rank}: Window({name!r}) is not available in fault-tolerant mode when the ranks "
                          "span several machines: Open MPI's one-sided communication between machines is not fault "
                          "tolerant (a put to a rank that died there blocks forever)")


def _failures_checked(what: str):
    """Decorate a window call: the window must be open; in fault-tolerant mode a known rank failure
    raises :class:`gossip.RankFailure` first, and so does an MPI error of a failed rank inside."""
    def decorate(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            self._check_open()
            failures = self._runtime.failures
            if failures is None:
                return method(self, *args, **kwargs)
            failures.check(f"window {self.name!r} {what}")
            with failures.guard(f"window {self.name!r} {what}"):
                return method(self, *args, **kwargs)
        return call
    return decorate


def _exposed_problem(tensor) -> str | None:  # noqa: ANN001 - anything the caller passed
    if not isinstance(tensor, torch.Tensor):
        return None  # reported by the tensor check
    if tensor.device.type != "cpu":
        return f"expose_tensor=True needs a CPU tensor (its memory is exposed), got one on {tensor.device}"
    if not tensor.is_contiguous():
        return "expose_tensor=True needs a contiguous tensor (its memory is exposed as one block)"
    return None


class Window:
    """A tensor's one-sided window: neighbours put/accumulate into it; the owner folds them in.

    Keywords: ``mutex`` the default of every call's ``mutex=``; ``graph`` the window's graph
    (default: the static topology); ``push_sum`` carry a push-sum weight p with the tensor;
    ``zero_init`` start the neighbour buffers (and their p) at zero instead of a copy of the
    tensor; ``zero_init_p`` start only the buffers' p at zero (BlueFog's convention: a buffer holds
    no mass until a neighbour writes into it); ``expose_tensor`` expose the tensor's own memory for
    ``get(current=True)`` (CPU). Collective: every rank passes the same name, shape, dtype, graph,
    ``push_sum`` and ``expose_tensor``; ``mutex``, ``zero_init`` and ``zero_init_p`` are each rank's own.
    """

    def __init__(self, tensor: torch.Tensor, name: str, *, mutex: bool = False,
                 graph: nx.DiGraph | None = None, push_sum: bool = False, zero_init: bool = False,
                 expose_tensor: bool = False, zero_init_p: bool = False) -> None:
        rt = runtime.current()
        comm, rank = rt.comm, rt.rank
        if not isinstance(name, str) or not name:
            raise ValueError(f"rank {rank}: a window needs a non-empty string name, got {name!r}")
        edges = None
        if name in rt.windows:
            problem = f"a window named {name!r} is already open (free it first)"
        else:
            problem = prologue.tensor_problem(tensor, "Window", tuple(_DTYPES),
                                              "dtype {dtype} is not supported by windows (float32 or float64)")
        if problem is None and expose_tensor:
            problem = _exposed_problem(tensor)
        if problem is None and graph is not None:
            try:
                graph = with_weights(graph)
                if graph.number_of_nodes() != rt.size:
                    raise ValueError(f"it has {graph.number_of_nodes()} nodes for {rt.size} ranks")
                edges = sorted((int(j), int(i), float(d["weight"])) for j, i, d in graph.edges(data=True))
            except (TypeError, ValueError) as error:
                problem = f"window {name!r}: invalid graph: {error}"
        shape, dtype = (tuple(tensor.shape), str(tensor.dtype)) if isinstance(tensor, torch.Tensor) else (None, None)
        described = (name, shape, dtype, bool(push_sum), bool(expose_tensor), edges, problem)
        # Every rank is here before any blocking collective call, or the op timeout fires.
        rt.watchdog.fence(comm, f"window '{name}' creation")
        if rt.failures is not None:
            _check_fault_tolerant(rt, name, mutex, expose_tensor)
        with rt.watchdog.guard(f"Window({name!r})"):
            everyone = comm.allgather(described)  # collective: every rank learns every rank's request
        for r, (other_name, shape, dtype, other_push_sum, other_exposed, other_edges, other_problem) in \
                enumerate(everyone):
            if other_problem is not None:
                raise ValueError(f"rank {r}: {other_problem}")
            if (other_name, shape, dtype, other_push_sum, other_exposed) != described[:5]:
                raise ValueError(f"rank {rank}: Window({name!r}) got shape {tuple(tensor.shape)}, {tensor.dtype}, "
                                 f"push_sum={bool(push_sum)}, expose_tensor={bool(expose_tensor)}, but rank {r} asked "
                                 f"for {other_name!r} with shape {shape}, {dtype}, push_sum={other_push_sum}, "
                                 f"expose_tensor={other_exposed}: every rank must create the same windows in the "
                                 "same order")
            if other_edges != edges:
                raise ValueError(f"rank {rank}: Window({name!r}): rank {r} passed a different graph: "
                                 "every rank must give the same one")
        if graph is None:
            graph = rt.topology.graph
            self._self_weight = rt.topology.self_weight
            self._src_weights = dict(zip(rt.topology.sources, rt.topology.src_weights, strict=True))
        else:
            self._self_weight = float(graph[rank][rank]["weight"]) if graph.has_edge(rank, rank) else 0.0
            self._src_weights = {j: float(graph[j][rank]["weight"]) for j in _sources_of(graph, rank)}
        self.name, self.tensor, self.mutex = name, tensor, bool(mutex)
        self.push_sum, self.zero_init, self.expose_tensor = bool(push_sum), bool(zero_init), bool(expose_tensor)
        self.rank = rank
        self.graph = graph
        self.sources = _sources_of(graph, rank)
        self._slot_of = {src: 1 + k for k, src in enumerate(self.sources)}  # each in-neighbour's slot here
        self.destinations = sorted(d for d in graph.successors(rank) if d != rank)
        self._np_dtype, self._mpi_dtype = _DTYPES[tensor.dtype]
        self.numel = tensor.numel()
        self._slot_bytes = self.numel * np.dtype(self._np_dtype).itemsize
        # Layout, the same offsets on every rank whatever its in-degree: one int64 version counter
        # per rank of the job (indexed by the writer's rank), the int64 mutex word, size + 1 float64
        # push-sum weights (the owner's, the published one, one per neighbour slot), then slot 0 and
        # one slot per in-neighbour.
        self._mutex_offset = 8 * rt.size
        self._p_offset = self._mutex_offset + 8
        self._data_offset = self._p_offset + 8 * (rt.size + 1)
        data_bytes = (1 + len(self.sources)) * self._slot_bytes
        # my slot's index at each destination (every rank's sources are known from the graph)
        self._my_slot_at = {d: 1 + _sources_of(graph, d).index(rank) for d in self.destinations}
        self._abandoned: str | None = None  # why gossip.recover() closed the window, or None
        self._tensor_win: MPI.Win | None = None
        with rt.watchdog.guard(f"Window({name!r})"):
            self._win = MPI.Win.Allocate(self._data_offset + data_bytes, 1, comm=comm)
            if expose_tensor:  # the tensor's own storage, read by get(current=True)
                self._exposed = tensor.detach().view(-1).numpy()
                self._tensor_win = MPI.Win.Create(self._exposed, self._exposed.itemsize, comm=comm)
        if rt.failures is not None:
            self._win.Set_errhandler(MPI.ERRORS_RETURN)
        memory = np.frombuffer(self._win.tomemory(), dtype=np.uint8)
        self._all_counters = memory[:self._mutex_offset].view(np.int64)
        self._ps = memory[self._p_offset:self._data_offset].view(np.float64)
        self._slots = memory[self._data_offset:].view(self._np_dtype).reshape(1 + len(self.sources), self.numel)
        self._one = np.ones(1, dtype=np.int64)
        self._zeros = np.zeros(rt.size, dtype=np.int64)
        self._holder = np.array([rank + 1], dtype=np.int64)  # the mutex word while this rank holds it
        self._previous = np.zeros(1, dtype=np.int64)
        self._held: dict[int, int] = {}  # rank -> how many holds of its mutex this rank has open
        # Host memory allocated once: where folds are combined, where gets land, and for a CUDA
        # tensor the pinned buffers its values are staged through, one for puts in flight and one
        # for the owner's folds (each call copies, none allocates).
        transport = rt.transport
        self._route = transport.route(tensor, host_memory=True)  # window memory is host memory
        self._scratch_tensor = transport.host_buffer(self.numel, tensor.dtype, tensor.device)
        self._scratch = self._scratch_tensor.numpy()
        self._staging = [transport.host_buffer(self.numel, tensor.dtype, tensor.device) for _ in range(2)] \
            if self._route.staged else []
        self._fetched = np.empty((len(self.sources), self.numel), dtype=self._np_dtype)
        self._fetched_p = np.zeros(len(self.sources), dtype=np.float64)
        # Initialised with plain stores before any rank can reach this memory (the fence below).
        self._slots[0] = self._host(tensor)  # the published copy
        self._slots[1:] = 0.0 if zero_init else self._slots[0]
        self._ps[:] = 0.0
        self._ps[:2 + len(self.sources)] = 1.0
        if zero_init or zero_init_p:
            self._ps[2:] = 0.0
        self._all_counters[:] = 0
        memory[self._mutex_offset:self._p_offset] = 0
        rt.windows[name] = self
        self._runtime = rt
        self._win.Lock_all(MPI.MODE_NOCHECK)  # one shared access epoch to every rank, for the window's life
        if self._tensor_win is not None:
            self._tensor_win.Lock_all(MPI.MODE_NOCHECK)
        self._win.Sync()
        rt.watchdog.fence(comm, f"window '{name}' creation")  # no rank writes into a window not yet initialised

    # --- helpers ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._win is None:
            if self._abandoned is not None:
                raise ValueError(f"rank {self.rank}: window {self.name!r} was closed by {self._abandoned}; create it "
                                 "again on the surviving ranks")
            raise ValueError(f"rank {self.rank}: window {self.name!r} has been freed")

    def _host(self, tensor: torch.Tensor, fold: bool = False) -> np.ndarray:
        """A flat host view (CPU) or staged copy (CUDA) of ``tensor``, checked against the window.
        A CUDA tensor's copy for a fold (``fold``) never overwrites one a put may still be sending."""
        if tensor.numel() != self.numel or tensor.dtype != self.tensor.dtype:
            raise ValueError(f"rank {self.rank}: window {self.name!r} holds {self.numel} elements of "
                             f"{self.tensor.dtype}, got {tensor.numel()} of {tensor.dtype}")
        staging = self._staging[1 if fold else 0] if self._staging else None
        return Transport.on_host(tensor.detach().reshape(-1), staging).numpy()

    def _use_mutex(self, mutex: bool | None) -> bool:
        """This call's choice: ``mutex``, or the window's default when None."""
        chosen = self.mutex if mutex is None else bool(mutex)
        if chosen and self._runtime.failures is not None:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: mutex=True is not available in fault-tolerant "
                             "mode (a rank that dies holding a mutex would leave its peers waiting forever)")
        return chosen

    def _acquire(self, target: int, what: str) -> None:
        """Take ``target``'s mutex: compare-and-swap 0 → rank + 1 until it succeeds, under the op timeout
        (re-entrant: a mutex this rank holds already is counted, not taken again)."""
        if target in self._held:
            self._held[target] += 1
            return
        win = self._win

        def taken() -> bool:
            win.Compare_and_swap([self._holder, MPI.INT64_T], [self._zeros[:1], MPI.INT64_T],
                                 [self._previous, MPI.INT64_T], target, self._mutex_offset)
            win.Flush(target)
            return int(self._previous[0]) == 0

        if taken():
            self._held[target] = 1
            return
        watchdog = self._runtime.watchdog
        begin = time.perf_counter()
        while not taken():
            if watchdog.timeout is not None and time.perf_counter() - begin > watchdog.timeout:
                raise OpTimeoutError(
                    f"rank {self.rank}: {what} has waited more than {watchdog.timeout:g} s for the mutex of rank "
                    f"{target}'s window, held by rank {int(self._previous[0]) - 1} (GOSSIP_OP_TIMEOUT)")
            os.sched_yield()
        watchdog.waited += time.perf_counter() - begin
        self._held[target] = 1

    def _release(self, target: int) -> None:
        self._held[target] -= 1
        if self._held[target] > 0:
            return
        del self._held[target]
        self._win.Accumulate([self._zeros[:1], MPI.INT64_T], target, (self._mutex_offset, 1, MPI.INT64_T),
                             MPI.REPLACE)
        self._win.Flush(target)

    @contextlib.contextmanager
    def _own_lock(self, mutex: bool, what: str):
        """Guard the owner's own reads and writes of its window memory: its own mutex when ``mutex``;
        always a memory barrier (``MPI_Win_sync``) on both sides, for the unified memory model."""
        if mutex:
            self._acquire(self.rank, what)
        self._win.Sync()
        try:
            yield
        finally:
            self._win.Sync()
            if mutex:
                self._release(self.rank)

    @contextlib.contextmanager
    def hold_mutex(self, ranks: Iterable[int] | None = None):
        """Hold the mutexes of ``ranks``' windows (default: this rank's out-neighbours) for the body of a
        ``with`` block: taken in ascending rank order, given back in reverse. Calls inside that ask for
        one of these mutexes use the hold (they do not wait for themselves). Two holders of several
        mutexes each never deadlock (the order is global); a call inside that needs a mutex not held
        may wait for another holder."""
        self._check_open()
        targets = sorted({int(r) for r in (self.destinations if ranks is None else ranks)})
        bad = [r for r in targets if not 0 <= r < self._runtime.size]
        if bad:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: hold_mutex got ranks {bad} outside the job "
                             f"of {self._runtime.size} ranks")
        self._use_mutex(True)  # refused in fault-tolerant mode
        taken = []
        try:
            for target in targets:
                self._acquire(target, f"window {self.name!r} hold_mutex")
                taken.append(target)
            yield
        finally:
            for target in reversed(taken):
                self._release(target)

    def _weights(self, weights: Mapping[int, float] | None, allowed: list[int], what: str) -> dict[int, float]:
        if weights is None:
            return dict.fromkeys(allowed, 1.0)
        bad = sorted(set(weights) - set(allowed))
        if bad:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: {what} {bad} are not "
                             f"{'out' if what == 'destinations' else 'in'}-neighbours of rank {self.rank} in the "
                             f"window's graph ({sorted(allowed)})")
        return {int(k): float(v) for k, v in weights.items()}

    def _take_counters(self, sources: list[int]) -> list[int]:
        """Read and zero the version counters of ``sources`` atomically (each one ``MPI_Fetch_and_op``
        REPLACE on this rank's window), so that no write's count is lost to a concurrent one."""
        old = np.zeros(len(sources), dtype=np.int64)
        for k, src in enumerate(sources):
            self._win.Fetch_and_op([self._zeros[:1], MPI.INT64_T], [old[k:k + 1], MPI.INT64_T], self.rank, 8 * src,
                                   MPI.REPLACE)
        if sources:
            self._win.Flush(self.rank)
        return [int(v) for v in old]

    # --- writing into neighbours ------------------------------------------------------------------

    def _write(self, tensor, dst_weights, accumulate: bool, self_weight: float | None, mutex: bool | None):
        kind = "accumulate" if accumulate else "put"
        what = f"window {self.name!r} {kind}"
        mutex = self._use_mutex(mutex)
        sent = self.tensor if tensor is None else tensor
        host = self._host(sent)
        weights = self._weights(dst_weights, self.destinations, "destinations")
        p = float(self._ps[_LIVE_P])  # only this rank writes its own p
        # the slot, its 8-byte version counter and (push-sum) its 8-byte weight, to each destination
        extra = 16 if self.push_sum else 8
        self._runtime.traffic.count_sends(f"window {kind}", self._slot_bytes + extra, len(weights),
                                          chunks=3 if self.push_sum else 2)
        op = MPI.SUM if accumulate else MPI.REPLACE
        requests, kept = [], []  # kept: the p values of requests in flight
        for dst, weight in weights.items():
            data = host if weight == 1.0 else np.multiply(host, weight, out=self._scratch if mutex else None)
            target = (self._data_offset + self._my_slot_at[dst] * self._slot_bytes, self.numel, self._mpi_dtype)
            counter = (8 * self.rank, 1, MPI.INT64_T)
            weighted_p = np.array([weight * p])
            p_target = (self._p_offset + 8 * (1 + self._my_slot_at[dst]), 1, MPI.DOUBLE)
            if mutex:  # the destination's mutex held for the whole write, complete (flushed) before release
                self._acquire(dst, what)
                try:
                    if accumulate:
                        self._win.Accumulate([data, self._mpi_dtype], dst, target, MPI.SUM)
                    else:
                        self._win.Put([data, self._mpi_dtype], dst, target)
                    if self.push_sum:
                        self._win.Accumulate([weighted_p, MPI.DOUBLE], dst, p_target, op)
                    self._win.Accumulate([self._one, MPI.INT64_T], dst, counter, MPI.SUM)
                    self._win.Flush(dst)
                finally:
                    self._release(dst)
            else:  # request-based, completed by a flush
                if accumulate:
                    requests.append(self._win.Raccumulate([data, self._mpi_dtype], dst, target, MPI.SUM))
                else:
                    requests.append(self._win.Rput([data, self._mpi_dtype], dst, target))
                if self.push_sum:
                    requests.append(self._win.Raccumulate([weighted_p, MPI.DOUBLE], dst, p_target, op))
                    kept.append(weighted_p)
                requests.append(self._win.Raccumulate([self._one, MPI.INT64_T], dst, counter, MPI.SUM))

        def finish() -> torch.Tensor:
            with self._runtime.watchdog.guard(what):
                for dst in weights if not mutex else ():
                    self._win.Flush(dst)  # remote completion
            kept.clear()
            if self_weight is not None and float(self_weight) != 1.0:  # what stays here, once it has left
                with torch.no_grad():
                    sent.mul_(float(self_weight))
                if self.push_sum:
                    with self._own_lock(mutex, what):
                        self._ps[_LIVE_P] *= float(self_weight)
            return self.tensor

        return Handle(requests, finish, what=what, peers=list(weights), nbytes=self._slot_bytes * len(weights),
                      in_flight=runtime.current().in_flight)

    @_failures_checked("put")
    def put(self, tensor: torch.Tensor | None = None, dst_weights: Mapping[int, float] | None = None, *,
            self_weight: float | None = None, mutex: bool | None = None) -> None:
        """Write ``dst_weights[d]·tensor`` (default: the window's tensor, weight 1, every
        out-neighbour) into this rank's buffer at each destination d, replacing it (with
        ``push_sum``, the buffer's p becomes ``dst_weights[d]·p``); bump d's version counter for
        this rank. Then ``tensor ← self_weight·tensor`` in place (and ``p ← self_weight·p``) when
        ``self_weight`` is given. ``mutex``: hold each destination's mutex for its write (None: the
        window's default). Complete at the destination when this returns."""
        self._write(tensor, dst_weights, False, self_weight, mutex).wait()

    @_failures_checked("accumulate")
    def accumulate(self, tensor: torch.Tensor | None = None, dst_weights: Mapping[int, float] | None = None, *,
                   self_weight: float | None = None, mutex: bool | None = None) -> None:
        """As :meth:`put`, but add to the buffer (and its p) at each destination (MPI_Accumulate, SUM)."""
        self._write(tensor, dst_weights, True, self_weight, mutex).wait()

    @_failures_checked("put")
    def put_async(self, tensor=None, dst_weights=None, *, self_weight: float | None = None,
                  mutex: bool | None = None) -> Handle:
        """Nonblocking :meth:`put`: ``wait()`` completes it (``tensor`` must not change until then)
        and then applies ``self_weight``. With the mutex the transfer completes before this returns."""
        return self._write(tensor, dst_weights, False, self_weight, mutex)

    @_failures_checked("accumulate")
    def accumulate_async(self, tensor=None, dst_weights=None, *, self_weight: float | None = None,
                         mutex: bool | None = None) -> Handle:
        """Nonblocking :meth:`accumulate`."""
        return self._write(tensor, dst_weights, True, self_weight, mutex)

    # --- reading from neighbours ------------------------------------------------------------------

    @_failures_checked("get")
    def get(self, src_weights: Mapping[int, float] | None = None, *, current: bool = False,
            mutex: bool | None = None) -> None:
        """Fetch each in-neighbour j's tensor, scaled by ``src_weights[j]`` (default 1, every
        in-neighbour), into this rank's buffer for j (with ``push_sum``, its p scaled the same into
        the buffer's p); bump j's version counter here.

        What is read: j's *published* tensor (as of its last :meth:`update`), or with
        ``current=True`` its tensor and p as they are now (the window must have been created with
        ``expose_tensor=True``; module docstring). ``mutex``: hold j's mutex while reading it."""
        what = f"window {self.name!r} get"
        mutex = self._use_mutex(mutex)
        if current and self._tensor_win is None:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: get(current=True) reads the neighbours' "
                             "tensors themselves, which only a window created with expose_tensor=True exposes")
        weights = self._weights(src_weights, self.sources, "sources")
        self._runtime.traffic.count_sends("window get", self._slot_bytes, len(weights))  # moved by this call
        p_at = (self._p_offset + 8 * (_LIVE_P if current else _PUBLISHED_P), 1, MPI.DOUBLE)
        for src in weights:
            k = self._slot_of[src] - 1
            into = self._fetched[k]
            if mutex:
                self._acquire(src, what)
            try:
                if current:
                    self._tensor_win.Get([into, self._mpi_dtype], src, (0, self.numel, self._mpi_dtype))
                else:
                    self._win.Get([into, self._mpi_dtype], src, (self._data_offset, self.numel, self._mpi_dtype))
                if self.push_sum:
                    self._win.Get([self._fetched_p[k:k + 1], MPI.DOUBLE], src, p_at)
                if current:
                    self._tensor_win.Flush(src)
                self._win.Flush(src)
            finally:
                if mutex:
                    self._release(src)
        with self._own_lock(mutex, what):
            for src, weight in weights.items():
                k = self._slot_of[src] - 1
                np.multiply(self._fetched[k], weight, out=self._slots[k + 1])
                if self.push_sum:
                    self._ps[2 + k] = weight * self._fetched_p[k]
                self._win.Accumulate([self._one, MPI.INT64_T], self.rank, (8 * src, 1, MPI.INT64_T), MPI.SUM)
            self._win.Flush(self.rank)

    # --- the owner's side -------------------------------------------------------------------------

    @_failures_checked("versions")
    def versions(self) -> dict[int, int]:
        """For each in-neighbour, how many writes (put, accumulate, get) arrived since the last update."""
        self._win.Sync()
        return {src: int(self._all_counters[src]) for src in self.sources}

    @_failures_checked("buffers")
    def buffers(self, *, mutex: bool | None = None) -> dict[int, torch.Tensor]:
        """A copy of every in-neighbour's buffer, shaped like the tensor (consistent with every write
        made with the mutex when ``mutex``; None: the window's default)."""
        with self._own_lock(self._use_mutex(mutex), f"window {self.name!r} buffers"):
            copies = self._slots[1:].copy()
        shape, device = self.tensor.shape, self.tensor.device
        return {src: torch.from_numpy(copies[k]).view(shape).to(device) for k, src in enumerate(self.sources)}

    @_failures_checked("associated_p")
    def associated_p(self, src: int | None = None) -> float:
        """The push-sum weight p of this rank's tensor, or with ``src`` of in-neighbour ``src``'s buffer
        here (1 at creation; 0 for buffers with ``zero_init``). Needs ``push_sum=True``."""
        if not self.push_sum:
            raise ValueError(f"rank {self.rank}: window {self.name!r} carries no push-sum weight: create it with "
                             "push_sum=True")
        if src is not None and src not in self._slot_of:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: {src} is not an in-neighbour of rank "
                             f"{self.rank} in the window's graph ({self.sources})")
        self._win.Sync()
        return float(self._ps[_LIVE_P if src is None else 1 + self._slot_of[src]])

    @_failures_checked("update")
    def update(self, self_weight: float | None = None, src_weights: Mapping[int, float] | None = None,
               reset_versions: bool = True, *, reset: bool = False, mutex: bool | None = None) -> torch.Tensor:
        """``x ← self_weight·x + Σ_j src_weights[j]·buffer_j`` into the tensor (in place), and with
        ``push_sum`` ``p ← self_weight·p + Σ_j src_weights[j]·p_j``; publish x (and p) for
        :meth:`get`; reset the version counters; returns the tensor. Defaults: the window graph's
        mixing weights. ``reset``: then set the buffers read (those of ``src_weights``; all with the
        defaults) and their p to zero. ``mutex``: hold this rank's mutex throughout."""
        what = f"window {self.name!r} update"
        mutex = self._use_mutex(mutex)
        self_weight = self._self_weight if self_weight is None else float(self_weight)
        weights = self._src_weights if src_weights is None else self._weights(src_weights, self.sources, "sources")
        combined = self._scratch
        with self._own_lock(mutex, what):
            np.multiply(self._host(self.tensor, fold=True), self_weight, out=combined)
            p = self_weight * self._ps[_LIVE_P]
            for src, weight in weights.items():
                slot = self._slot_of[src]
                combined += weight * self._slots[slot]
                p += weight * self._ps[1 + slot]
            self._slots[0] = combined
            if self.push_sum:
                self._ps[_LIVE_P] = self._ps[_PUBLISHED_P] = p
            if reset:
                for src in weights:
                    slot = self._slot_of[src]
                    self._slots[slot] = 0.0
                    self._ps[1 + slot] = 0.0
            if reset_versions:
                self._win.Accumulate([self._zeros, MPI.INT64_T], self.rank, (0, len(self._zeros), MPI.INT64_T),
                                     MPI.REPLACE)
                self._win.Flush(self.rank)
            if self._tensor_win is not None:  # the exposed tensor changes under the mutex too
                self._set_tensor(combined)
        return self._set_tensor(combined) if self._tensor_win is None else self.tensor

    @_failures_checked("update_arrived")
    def update_arrived(self, *, mutex: bool | None = None) -> list[int]:
        """Fold in only what arrived since the last update: with A the in-neighbours whose version
        counter is > 0, ``x ← (x + Σ_{j∈A} buffer_j) / (1 + |A|)`` (and p likewise with ``push_sum``;
        nothing changes when A is empty); publish x, reset those counters, and return A. The counters
        are read and zeroed atomically first, so a write landing during the fold is counted for the
        next call (and may be folded by both, in part by this one, without the mutex)."""
        what = f"window {self.name!r} update_arrived"
        mutex = self._use_mutex(mutex)
        combined = self._scratch
        with self._own_lock(mutex, what):
            counts = self._take_counters(self.sources)
            arrived = [src for src, count in zip(self.sources, counts, strict=True) if count > 0]
            if not arrived:
                return []
            combined[:] = self._host(self.tensor, fold=True)
            p = self._ps[_LIVE_P]
            for src in arrived:
                combined += self._slots[self._slot_of[src]]
                p += self._ps[1 + self._slot_of[src]]
            combined *= 1.0 / (1 + len(arrived))
            self._slots[0] = combined
            if self.push_sum:
                self._ps[_LIVE_P] = self._ps[_PUBLISHED_P] = p / (1 + len(arrived))
            if self._tensor_win is not None:
                self._set_tensor(combined)
        if self._tensor_win is None:
            self._set_tensor(combined)
        return arrived

    def _set_tensor(self, values: np.ndarray) -> torch.Tensor:
        """Write a fold's result (host memory; pinned for a CUDA tensor) into the window's tensor, in
        place; returns the tensor."""
        with torch.no_grad():
            self.tensor.copy_(torch.from_numpy(values).view(self.tensor.shape))
        return self.tensor

    # --- lifetime ---------------------------------------------------------------------------------

    def _windows(self) -> list[MPI.Win]:
        return [w for w in (self._tensor_win, self._win) if w is not None]

    def free(self) -> None:
        """Collective: release the window (its name may then be reused)."""
        if self._win is None:
            return
        self._runtime.watchdog.fence(self._runtime.comm, f"window '{self.name}' free")  # every rank is done with it
        with self._runtime.watchdog.guard(f"window {self.name!r} free"):
            for win in self._windows():
                win.Unlock_all()
                win.Free()
        self._win = self._tensor_win = None
        self._slots = self._all_counters = self._ps = None
        self._runtime.windows.pop(self.name, None)

    def abandon(self, reason: str) -> None:
        """Close the window after a rank failure (``reason`` says by what), on every survivor in the
        same order: ``MPI_Win_free`` with its errors ignored, while the MPI library still tolerates
        the failure (left to ``MPI_Finalize``, the free's barrier with the dead rank can hang)."""
        windows = self._windows()
        self._win = self._tensor_win = None
        self._slots = self._all_counters = self._ps = None
        self._abandoned = reason
        self._kept = []
        for win in windows:
            try:
                win.Unlock_all()
                win.Free()
            except MPI.Exception:
                self._kept.append(win)  # not freed: kept until the process ends

    def __enter__(self) -> Window:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # freeing is collective: after an error on this rank only, leave it to shutdown
            self.free()


def open_windows() -> list[str]:
    """The names of the windows currently open on this rank."""
    return list(runtime.current().windows)
