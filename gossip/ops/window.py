"""One-sided gossip: an MPI window per tensor that neighbours write into without the owner's help.

``win = gossip.Window(tensor, name)`` is collective over the job. It allocates one MPI window
(``MPI_Win_allocate``: memory the MPI library can expose for direct remote access, shared memory
on one machine) holding, on every rank:

* slot 0: the owner's *published* copy of its tensor (set at creation and by :meth:`Window.update`;
  what neighbours read with :meth:`Window.get`);
* slot k + 1: the buffer of in-neighbour k (in rank order) of the window's graph (what it
  :meth:`Window.put` or :meth:`Window.accumulate` here, or what :meth:`Window.get` fetched from
  it), initialised to the owner's tensor. The graph is the runtime's static topology unless
  ``graph=`` names another, e.g. the union of a time-varying family's graphs;
* one int64 version counter per rank: how many writes arrived from it since the owner last read.

All access is passive-target RMA, so a put completes without the target calling MPI (on one
machine; across machines that depends on the MPI's progress). Each message is sent whole.
Without the mutex (default) every rank holds one shared epoch to all ranks for the window's life
(``MPI_Win_lock_all``): writes are request-based (``Rput``/``Raccumulate``, several may be in
flight) and complete with ``MPI_Win_flush``; a reader may see a buffer mid-write. With
``mutex=True`` every access to a rank's window (remote writes and gets, the owner's reads in
:meth:`update` and :meth:`buffers`) is an exclusive ``MPI_Win_lock`` epoch on it, so a reader never
sees a half-written buffer (tested with concurrent writers); its nonblocking forms complete
before they return.

Weights: ``dst_weights`` (put/accumulate) scale what is sent to each out-neighbour (default 1);
``src_weights`` (get) scale what is fetched; :meth:`update` folds the buffers into the tensor as
``x ← self_weight·x + Σ_j src_weights[j]·buffer_j`` (defaults: the window graph's weights),
writes the result into the tensor in place, publishes it and resets the version counters;
:meth:`Window.update_arrived` folds only the buffers written since the last update, uniformly. The
window's memory is host memory (``MPI_Win_allocate``), so folds combine there and a CUDA tensor is
staged (the transport's host-memory route) through pinned buffers allocated with the window (one
copy each way per call, nothing allocated per call; :meth:`buffers` returns tensors on the
tensor's device). Supported dtypes: float32 and float64.

Fault-tolerant mode: every call first asks whether a rank has failed and then raises
:class:`gossip.RankFailure` (on one machine a put into a dead rank's memory completes like any
other, so the failure would otherwise go unseen), and an MPI error of a failed rank raises it too.
MPI one-sided communication is not fault tolerant in Open MPI's ULFM, so two kinds of window are
refused there: ``mutex=True`` (a rank that dies holding an exclusive lock would block every other
rank's lock on its window forever) and windows whose ranks span several machines (between machines
a put to a rank that had just died blocked forever; on one machine the window is shared memory and
the survivors go on). :func:`gossip.recover` frees every open window (``MPI_Win_free`` on every
survivor, its errors ignored: left to ``MPI_Finalize``, the free waits on the dead rank); create
windows again on the survivors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from gossip import runtime
from gossip.errors import GossipError
from gossip.ops import _prologue as prologue
from gossip.ops.handles import Handle
from gossip.transport import Transport
from topologies.weights import with_weights

_DTYPES = {torch.float32: (np.float32, MPI.FLOAT), torch.float64: (np.float64, MPI.DOUBLE)}


def _sources_of(graph, rank: int) -> list[int]:
    return sorted(j for j in graph.predecessors(rank) if j != rank)


def _check_fault_tolerant(rt, name: str, mutex: bool) -> None:  # noqa: ANN001 - the runtime
    """Collective in fault-tolerant mode: refuse the windows a dead rank could block forever (module docstring)."""
    if mutex:
        raise ValueError(f"rank {rt.rank}: Window({name!r}, mutex=True) is not available in fault-tolerant mode: a "
                         "rank that dies holding the exclusive lock would block its peers' locks forever")
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


class Window:
    """A tensor's one-sided window: neighbours put/accumulate into it; the owner folds them in."""

    def __init__(self, tensor: torch.Tensor, name: str, *, mutex: bool = False,
                 graph: nx.DiGraph | None = None) -> None:
        rt = runtime.current()
        comm, rank = rt.comm, rt.rank
        if not isinstance(name, str) or not name:
            raise ValueError(f"rank {rank}: a window needs a non-empty string name, got {name!r}")
        edges = None
        if rt.failures is not None:
            _check_fault_tolerant(rt, name, mutex)
        if name in rt.windows:
            problem = f"a window named {name!r} is already open (free it first)"
        else:
            problem = prologue.tensor_problem(tensor, "Window", tuple(_DTYPES),
                                              "dtype {dtype} is not supported by windows (float32 or float64)")
        if problem is None and graph is not None:
            try:
                graph = with_weights(graph)
                if graph.number_of_nodes() != rt.size:
                    raise ValueError(f"it has {graph.number_of_nodes()} nodes for {rt.size} ranks")
                edges = sorted((int(j), int(i), float(d["weight"])) for j, i, d in graph.edges(data=True))
            except (TypeError, ValueError) as error:
                problem = f"window {name!r}: invalid graph: {error}"
        shape, dtype = (tuple(tensor.shape), str(tensor.dtype)) if isinstance(tensor, torch.Tensor) else (None, None)
        described = (name, shape, dtype, bool(mutex), edges, problem)
        with rt.watchdog.guard(f"Window({name!r})"):
            everyone = comm.allgather(described)  # collective: every rank learns every rank's request
        for r, (other_name, shape, dtype, other_mutex, other_edges, other_problem) in enumerate(everyone):
            if other_problem is not None:
                raise ValueError(f"rank {r}: {other_problem}")
            if (other_name, shape, dtype, other_mutex) != described[:4]:
                raise ValueError(f"rank {rank}: Window({name!r}) got shape {tuple(tensor.shape)}, {tensor.dtype}, "
                                 f"mutex={mutex}, but rank {r} asked for {other_name!r} with shape {shape}, {dtype}, "
                                 f"mutex={other_mutex}: every rank must create the same windows in the same order")
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
        self.name, self.tensor, self.mutex = name, tensor, mutex
        self.rank = rank
        self.graph = graph
        self.sources = _sources_of(graph, rank)
        self._slot_of = {src: 1 + k for k, src in enumerate(self.sources)}  # each in-neighbour's slot here
        self.destinations = sorted(d for d in graph.successors(rank) if d != rank)
        self._np_dtype, self._mpi_dtype = _DTYPES[tensor.dtype]
        self.numel = tensor.numel()
        self._slot_bytes = self.numel * np.dtype(self._np_dtype).itemsize
        # Layout, the same offsets on every rank whatever its in-degree: one int64 version counter
        # per rank of the job (indexed by the writer's rank), then slot 0 and one slot per in-neighbour.
        self._data_offset = 8 * rt.size
        data_bytes = (1 + len(self.sources)) * self._slot_bytes
        # my slot's index at each destination (every rank's sources are known from the graph)
        self._my_slot_at = {d: 1 + _sources_of(graph, d).index(rank) for d in self.destinations}
        self._abandoned: str | None = None  # why gossip.recover() closed the window, or None
        with rt.watchdog.guard(f"Window({name!r})"):
            self._win = MPI.Win.Allocate(self._data_offset + data_bytes, 1, comm=comm)
        if rt.failures is not None:
            self._win.Set_errhandler(MPI.ERRORS_RETURN)
        memory = np.frombuffer(self._win.tomemory(), dtype=np.uint8)
        self._all_counters = memory[:self._data_offset].view(np.int64)
        self._slots = memory[self._data_offset:].view(self._np_dtype).reshape(1 + len(self.sources), self.numel)
        self._one = np.ones(1, dtype=np.int64)
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
        with self._own_lock():
            self._slots[:] = self._host(tensor)  # published copy and every neighbour buffer start at the tensor
            self._all_counters[:] = 0
        rt.windows[name] = self
        self._runtime = rt
        with rt.watchdog.guard(f"Window({name!r})"):
            comm.Barrier()  # no rank writes into a window another rank has not initialised
            if not mutex:
                self._win.Lock_all(MPI.MODE_NOCHECK)  # one shared access epoch to every rank, for the job

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

    @contextlib.contextmanager
    def _own_lock(self):
        """Guard the owner's own reads and writes of its window memory: the exclusive lock on itself
        with the mutex; otherwise a memory barrier (the job-long shared epoch covers the rest)."""
        if self.mutex:
            self._win.Lock(self.rank, MPI.LOCK_EXCLUSIVE)
        self._win.Sync()
        try:
            yield
        finally:
            self._win.Sync()
            if self.mutex:
                self._win.Unlock(self.rank)

    def _weights(self, weights: Mapping[int, float] | None, allowed: list[int], what: str) -> dict[int, float]:
        if weights is None:
            return dict.fromkeys(allowed, 1.0)
        bad = sorted(set(weights) - set(allowed))
        if bad:
            raise ValueError(f"rank {self.rank}: window {self.name!r}: {what} {bad} are not "
                             f"{'out' if what == 'destinations' else 'in'}-neighbours of rank {self.rank} in the "
                             f"window's graph ({sorted(allowed)})")
        return {int(k): float(v) for k, v in weights.items()}

    # --- writing into neighbours ------------------------------------------------------------------

    def _write(self, tensor, dst_weights, accumulate: bool):
        what = f"window {self.name!r} {'accumulate' if accumulate else 'put'}"
        host = self._host(self.tensor if tensor is None else tensor)
        weights = self._weights(dst_weights, self.destinations, "destinations")
        # the slot and its 8-byte version counter to each destination
        self._runtime.traffic.count_sends(f"window {'accumulate' if accumulate else 'put'}", self._slot_bytes + 8,
                                          len(weights), chunks=2)
        requests = []
        for dst, weight in weights.items():
            data = host if weight == 1.0 else np.multiply(host, weight, out=self._scratch if self.mutex else None)
            target = (self._data_offset + self._my_slot_at[dst] * self._slot_bytes, self.numel, self._mpi_dtype)
            counter = (8 * self.rank, 1, MPI.INT64_T)
            if self.mutex:  # one exclusive epoch per destination: complete (and visible) at unlock
                self._win.Lock(dst, MPI.LOCK_EXCLUSIVE)
                if accumulate:
                    self._win.Accumulate([data, self._mpi_dtype], dst, target, MPI.SUM)
                else:
                    self._win.Put([data, self._mpi_dtype], dst, target)
                self._win.Accumulate([self._one, MPI.INT64_T], dst, counter, MPI.SUM)
                self._win.Unlock(dst)
            else:  # inside the job-long shared epoch: request-based, completed by a flush
                if accumulate:
                    requests.append(self._win.Raccumulate([data, self._mpi_dtype], dst, target, MPI.SUM))
                else:
                    requests.append(self._win.Rput([data, self._mpi_dtype], dst, target))
                requests.append(self._win.Raccumulate([self._one, MPI.INT64_T], dst, counter, MPI.SUM))

        def finish() -> torch.Tensor:
            with self._runtime.watchdog.guard(what):
                for dst in weights if not self.mutex else ():
                    self._win.Flush(dst)  # remote completion
            return self.tensor

        return Handle(requests, finish, what=what, peers=list(weights), nbytes=self._slot_bytes * len(weights),
                      in_flight=runtime.current().in_flight)

    @_failures_checked("put")
    def put(self, tensor: torch.Tensor | None = None, dst_weights: Mapping[int, float] | None = None) -> None:
        """Write ``dst_weights[d]·tensor`` (default: the window's tensor, weight 1, every
        out-neighbour) into this rank's buffer at each destination d, replacing it; bump d's
        version counter for this rank. Complete at the destination when this returns."""
        self._write(tensor, dst_weights, accumulate=False).wait()

    @_failures_checked("accumulate")
    def accumulate(self, tensor: torch.Tensor | None = None, dst_weights: Mapping[int, float] | None = None) -> None:
        """As :meth:`put`, but add to the buffer at each destination (MPI_Accumulate, SUM)."""
        self._write(tensor, dst_weights, accumulate=True).wait()

    @_failures_checked("put")
    def put_async(self, tensor=None, dst_weights=None) -> Handle:
        """Nonblocking :meth:`put`: ``wait()`` completes it (``tensor`` must not change until then).
        With the mutex the transfer completes before this returns (exclusive epochs are blocking)."""
        return self._write(tensor, dst_weights, accumulate=False)

    @_failures_checked("accumulate")
    def accumulate_async(self, tensor=None, dst_weights=None) -> Handle:
        """Nonblocking :meth:`accumulate`."""
        return self._write(tensor, dst_weights, accumulate=True)

    # --- reading from neighbours ------------------------------------------------------------------

    @_failures_checked("get")
    def get(self, src_weights: Mapping[int, float] | None = None) -> None:
        """Fetch each in-neighbour j's published tensor, scaled by ``src_weights[j]`` (default 1,
        every in-neighbour), into this rank's buffer for j; bump j's version counter here."""
        weights = self._weights(src_weights, self.sources, "sources")
        self._runtime.traffic.count_sends("window get", self._slot_bytes, len(weights))  # moved by this call
        fetched = {}
        for src in weights:
            into = self._fetched[self._slot_of[src] - 1]
            if self.mutex:
                self._win.Lock(src, MPI.LOCK_EXCLUSIVE)
            self._win.Get([into, self._mpi_dtype], src, (self._data_offset, self.numel, self._mpi_dtype))
            if self.mutex:
                self._win.Unlock(src)
            else:
                self._win.Flush(src)
            fetched[src] = into
        with self._own_lock():
            for src, values in fetched.items():
                np.multiply(values, weights[src], out=self._slots[self._slot_of[src]])
                self._all_counters[src] += 1

    # --- the owner's side -------------------------------------------------------------------------

    @_failures_checked("versions")
    def versions(self) -> dict[int, int]:
        """For each in-neighbour, how many writes (put, accumulate, get) arrived since the last update."""
        with self._own_lock():
            return {src: int(self._all_counters[src]) for src in self.sources}

    @_failures_checked("buffers")
    def buffers(self) -> dict[int, torch.Tensor]:
        """A consistent copy of every in-neighbour's buffer, shaped like the tensor."""
        with self._own_lock():
            copies = self._slots[1:].copy()
        shape, device = self.tensor.shape, self.tensor.device
        return {src: torch.from_numpy(copies[k]).view(shape).to(device) for k, src in enumerate(self.sources)}

    @_failures_checked("update")
    def update(self, self_weight: float | None = None, src_weights: Mapping[int, float] | None = None,
               reset_versions: bool = True) -> torch.Tensor:
        """``x ← self_weight·x + Σ_j src_weights[j]·buffer_j`` into the tensor (in place), publish
        it for :meth:`get`, reset the version counters; returns the tensor. Defaults: the static
        topology's mixing weights."""
        self_weight = self._self_weight if self_weight is None else float(self_weight)
        weights = self._src_weights if src_weights is None else self._weights(src_weights, self.sources, "sources")
        combined = self._scratch
        with self._own_lock():
            np.multiply(self._host(self.tensor, fold=True), self_weight, out=combined)
            for src, weight in weights.items():
                combined += weight * self._slots[self._slot_of[src]]
            self._slots[0] = combined
            if reset_versions:
                self._all_counters[:] = 0
        return self._set_tensor(combined)

    @_failures_checked("update_arrived")
    def update_arrived(self) -> list[int]:
        """Fold in only what arrived since the last update: with A the in-neighbours whose version
        counter is > 0, ``x ← (x + Σ_{j∈A} buffer_j) / (1 + |A|)`` (nothing changes when A is
        empty); publish x, reset the counters, and return A. With the mutex a write is folded whole,
        now or at the next call; without it a write landing during the fold may be folded in part
        (as any unguarded read), and then counts as folded."""
        combined = self._scratch
        with self._own_lock():
            arrived = [src for src in self.sources if self._all_counters[src] > 0]
            if not arrived:
                return []
            combined[:] = self._host(self.tensor, fold=True)
            for src in arrived:
                combined += self._slots[self._slot_of[src]]
                self._all_counters[src] = 0
            combined *= 1.0 / (1 + len(arrived))
            self._slots[0] = combined
        self._set_tensor(combined)
        return arrived

    def _set_tensor(self, values: np.ndarray) -> torch.Tensor:
        """Write a fold's result (host memory; pinned for a CUDA tensor) into the window's tensor, in
        place; returns the tensor."""
        with torch.no_grad():
            self.tensor.copy_(torch.from_numpy(values).view(self.tensor.shape))
        return self.tensor

    # --- lifetime ---------------------------------------------------------------------------------

    def free(self) -> None:
        """Collective: release the window (its name may then be reused)."""
        if self._win is None:
            return
        with self._runtime.watchdog.guard(f"window {self.name!r} free"):
            if not self.mutex:
                self._win.Unlock_all()
            self._win.Free()
        self._win = None
        self._slots = self._all_counters = None
        self._runtime.windows.pop(self.name, None)

    def abandon(self, reason: str) -> None:
        """Close the window after a rank failure (``reason`` says by what), on every survivor in the
        same order: ``MPI_Win_free`` with its errors ignored, while the MPI library still tolerates
        the failure (left to ``MPI_Finalize``, the free's barrier with the dead rank can hang)."""
        win, self._win = self._win, None
        self._slots = self._all_counters = None
        self._abandoned = reason
        try:
            if not self.mutex:
                win.Unlock_all()
            win.Free()
        except MPI.Exception:
            self._kept = win  # not freed: kept until the process ends

    def __enter__(self) -> Window:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # freeing is collective: after an error on this rank only, leave it to shutdown
            self.free()


def open_windows() -> list[str]:
    """The names of the windows currently open on this rank."""
    return list(runtime.current().windows)
