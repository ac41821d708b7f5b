"""The runtime: communicators, machine layout, the current topology, the settings and the
resources the runtime owns.

``gossip.init()`` creates one :class:`Runtime` per process; every op reads it through
:func:`current`. It holds a private duplicate of the user's communicator, so gossip traffic never
matches a user's own messages. The runtime owns everything with an MPI lifetime: its
communicators, the static topology's graph communicator, node shared memory, the buffer pool,
the watchdog, the record of ops in flight, the progress thread, the trace recorder, the open
windows and other resources registered with :meth:`Runtime.own` (parameter servers);
:func:`shutdown` frees them in the reverse order of their creation.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from mpi4py import MPI

from gossip.errors import GossipError
from gossip.settings import Settings
from gossip.transport import Transport, detect_cuda_aware
from gossip.transport._buffers import BufferPool
from gossip.transport._graph_comm import StaticTopology, build_static_topology
from gossip.transport._in_flight import InFlight
from gossip.transport._progress import ProgressThread
from gossip.transport._shared_memory import NodeMemory
from gossip.transport._trace import Recorder
from gossip.transport._waiting import Watchdog
from topologies import exponential_two


@dataclass(frozen=True)
class Layout:
    """The job's hardware layout, the same on every rank.

    ``size`` ranks on ``machines`` machines, at most ``ranks_per_machine`` on one (``local_size``
    on this rank's), and ``gpus_per_machine`` CUDA devices visible on each (the most any rank sees;
    0 without CUDA).
    """

    size: int
    machines: int
    ranks_per_machine: int
    local_size: int
    gpus_per_machine: int


def _discover_layout(comm: MPI.Comm, local: MPI.Comm, machines: int) -> Layout:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    every = comm.allgather((local.size, gpus))
    return Layout(comm.size, machines, max(k for k, _ in every), local.size, max(g for _, g in every))


@dataclass
class Runtime:
    """Everything the ops need, and everything with an MPI lifetime, owned in one place."""

    comm: MPI.Comm
    local_comm: MPI.Comm
    leaders_comm: MPI.Comm  # the machines' leaders (local rank 0), rank = machine index; COMM_NULL elsewhere
    machine_rank: int
    machine_size: int
    topology: StaticTopology
    settings: Settings
    check: bool
    transport: Transport
    node_memory: NodeMemory
    layout: Layout
    watchdog: Watchdog
    in_flight: InFlight
    pool: BufferPool = field(default_factory=BufferPool)
    progress: ProgressThread | None = None  # drives MPI progress while ops are in flight (progress_thread)
    windows: dict = field(default_factory=dict)  # name -> gossip.Window, in creation order
    owned: list = field(default_factory=list)  # other resources with a free(), in creation order

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def debug_buffers(self) -> bool:
        return self.settings.debug_buffers

    def own(self, resource) -> None:  # noqa: ANN001 - anything with a collective free()
        """Register a resource (with a collective ``free()``) for :func:`shutdown` to free."""
        self.owned.append(resource)

    def disown(self, resource) -> None:  # noqa: ANN001
        """Forget a resource its owner freed early."""
        self.owned = [r for r in self.owned if r is not resource]

    def start_trace(self, path: Path) -> Recorder:
        """Record a timeline into ``path`` (this rank's file: ``<stem>.rank<r><suffix>``)."""
        self.watchdog.recorder = Recorder(Path(path), self.rank)
        return self.watchdog.recorder

    def stop_trace(self) -> Path | None:
        """Stop recording and write this rank's trace; its path, or None if none was recorded."""
        recorder, self.watchdog.recorder = self.watchdog.recorder, None
        return recorder.write() if recorder is not None else None


_runtime: Runtime | None = None


def current() -> Runtime:
    """The runtime of this process; raises :class:`GossipError` before :func:`init`."""
    if _runtime is None:
        raise GossipError("gossip.init() has not been called on this rank")
    return _runtime


def current_or_none() -> Runtime | None:
    """The runtime of this process, or None outside ``init`` .. ``shutdown``."""
    return _runtime


def recorder() -> Recorder | None:
    """The trace being recorded, or None (one attribute check when tracing is off)."""
    return None if _runtime is None else _runtime.watchdog.recorder


def _split_machines(comm: MPI.Comm, per_machine: int | None) -> tuple[MPI.Comm, MPI.Comm, int, int]:
    """Local (same-machine) communicator, the leaders' communicator (COMM_NULL off the leaders),
    machine index and machine count.

    Machines are found with ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``, or, with
    ``per_machine=k`` (the ``ranks_per_machine`` setting), pretended as consecutive blocks of k
    ranks (to test hierarchical code on one host).
    """
    if per_machine is not None:
        local = comm.Split(comm.rank // per_machine, comm.rank)
    else:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    leaders = comm.Split(0 if local.rank == 0 else MPI.UNDEFINED, comm.rank)
    layout = (leaders.rank, leaders.size) if local.rank == 0 else None
    machine_rank, machine_size = local.bcast(layout, root=0)
    return local, leaders, machine_rank, machine_size


def _abort_on_uncaught(comm: MPI.Comm) -> None:
    """Make an uncaught exception on one rank abort the job instead of leaving peers waiting."""
    previous = sys.excepthook

    def hook(kind, value, tb):  # type: ignore[no-untyped-def]
        if _runtime is not None and comm.size > 1:
            print(f"gossip: rank {comm.rank} of {comm.size} failed with an uncaught {kind.__name__}; aborting the job",
                  file=sys.stderr)
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
            comm.Abort(1)
        previous(kind, value, tb)

    sys.excepthook = hook


def init(comm: MPI.Comm | None = None, *, settings: Settings | None = None, **overrides: object) -> None:
    """Start the runtime on ``comm`` (default ``MPI.COMM_WORLD``); idempotent.

    Collective over ``comm``. The settings are ``settings`` if given, else ``overrides`` (any
    field of :class:`gossip.Settings`, e.g. ``check=False, op_timeout=30``) over the ``GOSSIP_*``
    environment variables over the defaults, parsed once here (:mod:`gossip.settings` lists them
    all). The default topology is :func:`topologies.exponential_two`.

    ``check`` (default on) turns the cross-rank input check of every op on or off: with it,
    mismatched shapes, dtypes or send/receive patterns raise on every rank; without it they are
    undefined behaviour (usually a hang) but each op saves one 16-byte allreduce. An uncaught
    exception on any rank aborts the whole job (``abort_on_error``). ``op_timeout`` turns on the
    watchdog (:func:`set_op_timeout`); ``timeline`` records a trace (:mod:`gossip.tools.timeline`).
    When all ranks share one machine, blocking neighbour averaging of CPU tensors goes through
    shared memory (``shared_memory=False`` to use MPI messages instead). ``debug_buffers`` fills
    every buffer given back to the pool with NaN, checks that a tensor being sent is unchanged when
    its op completes, and reports handles dropped before completion.
    """
    global _runtime
    if _runtime is not None:
        return
    if settings is None:
        settings = Settings.resolve(**overrides)
    elif overrides:
        raise TypeError(f"gossip.init takes settings= or keyword settings, not both (got {sorted(overrides)})")
    if not MPI.Is_initialized():
        MPI.Init_thread()
    comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
    local, leaders, machine_rank, machine_size = _split_machines(comm, settings.ranks_per_machine)
    watchdog = Watchdog(comm.rank, settings.op_timeout)
    pool = BufferPool(poison=settings.debug_buffers)
    cuda_aware = settings.cuda_aware if settings.cuda_aware is not None else detect_cuda_aware()
    node_memory = NodeMemory(comm, watchdog, enabled=settings.shared_memory)
    _runtime = Runtime(
        comm=comm,
        local_comm=local,
        leaders_comm=leaders,
        machine_rank=machine_rank,
        machine_size=machine_size,
        topology=build_static_topology(comm, exponential_two(comm.size)),
        settings=settings,
        check=settings.check,
        transport=Transport(comm.allreduce(cuda_aware, op=MPI.LAND), pool, watchdog,  # the same on every rank
                            chunk_bytes=settings.message_chunk_bytes,
                            staging_chunk_bytes=settings.staging_chunk_bytes, stage_host=settings.stage_host,
                            node_memory=node_memory),
        node_memory=node_memory,
        layout=_discover_layout(comm, local, machine_size),
        watchdog=watchdog,
        in_flight=InFlight(watchdog, warn=settings.debug_buffers),
        pool=pool,
    )
    if settings.progress_thread:
        _runtime.progress = ProgressThread(comm, _runtime.in_flight)
    if settings.abort_on_error:
        _abort_on_uncaught(comm)
    if settings.timeline is not None:
        _runtime.start_trace(Path(settings.timeline))


def shutdown() -> None:
    """Free everything the runtime owns, in the reverse order of creation (collective).

    Ops still in flight are completed first (MPI may still use their buffers, and they use the
    runtime's communicators); this rank's trace, if one is recorded, is written. ``init`` may
    be called again.
    """
    global _runtime
    if _runtime is None:
        return
    rt = _runtime
    rt.in_flight.complete_all()
    if rt.progress is not None:
        rt.progress.stop()
    for resource in reversed(rt.owned):
        resource.free()
    for window in reversed(list(rt.windows.values())):  # windows live on the runtime's communicator
        window.free()
    rt.stop_trace()
    _runtime = None
    rt.topology.free()
    rt.node_memory.free()
    if rt.leaders_comm != MPI.COMM_NULL:
        rt.leaders_comm.Free()
    rt.local_comm.Free()
    rt.pool.clear()
    rt.comm.Free()


def shared_empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Collective: an uninitialised flat CPU tensor that neighbours read in place.

    When all ranks share one machine the tensor lives in an MPI shared-memory window, so a
    blocking ``neighbor_allreduce`` of it (or of a contiguous slice at the same offset on every
    rank) copies nothing: the neighbours' weighted sums read it directly. Otherwise (several
    machines, ``shared_memory=False``) it is an ordinary tensor. Every rank must call this in
    the same order. Valid until ``gossip.shutdown()``.
    """
    node_memory = current().node_memory
    if node_memory.usable:
        return node_memory.empty(numel, dtype)
    return torch.empty(numel, dtype=dtype)


def is_initialized() -> bool:
    """True between :func:`init` and :func:`shutdown`."""
    return _runtime is not None


def rank() -> int:
    """This process's rank in the runtime's communicator."""
    return current().rank


def size() -> int:
    """Number of ranks."""
    return current().size


def local_rank() -> int:
    """Rank among the ranks on this machine."""
    return current().local_comm.rank


def local_size() -> int:
    """Number of ranks on this machine."""
    return current().local_comm.size


def machine_rank() -> int:
    """Index of this machine (0 .. machine_size-1), ordered by each machine's lowest rank."""
    return current().machine_rank


def machine_size() -> int:
    """Number of machines."""
    return current().machine_size


def layout() -> Layout:
    """The job's hardware layout: ranks, machines, ranks and GPUs per machine (:class:`Layout`)."""
    return current().layout


def cuda_aware() -> bool:
    """True if CUDA tensors go to MPI directly, False if they are staged through host memory."""
    return current().transport.cuda_aware


def uses_shared_memory() -> bool:
    """True if blocking neighbour averaging of CPU tensors goes through node shared memory."""
    return current().node_memory.usable


def settings() -> Settings:
    """The settings in force (:class:`gossip.Settings`)."""
    return current().settings


def set_op_timeout(seconds: float | None) -> None:
    """Raise :class:`gossip.OpTimeoutError` when one op waits longer than ``seconds`` (None: wait
    forever); may differ between ranks."""
    current().watchdog.set_timeout(seconds)


def op_timeout() -> float | None:
    """The op timeout in seconds, or None."""
    return current().watchdog.timeout


def waited_seconds() -> float:
    """Seconds this rank has spent blocked in communication since :func:`reset_waited` (or init)."""
    return current().watchdog.waited


def reset_waited() -> None:
    """Start counting :func:`waited_seconds` from zero."""
    current().watchdog.waited = 0.0


def set_check(enabled: bool) -> None:
    """Turn the cross-rank input check on or off (must be called alike on every rank)."""
    current().check = bool(enabled)


def set_topology(graph: nx.DiGraph, *, allow_negative_weights: bool = False) -> None:
    """Collective: make ``graph`` the static topology of every op that is given no weights.

    ``graph`` is a ``networkx.DiGraph`` on nodes ``0..size-1``; edge ``j -> i`` carries
    ``weight`` = the weight rank i gives to j's value, the self-loop ``i -> i`` rank i's self
    weight (0 if absent). A graph without any weights gets uniform weights ``1/(indegree+1)``.
    Raises :class:`InputMismatchError` on every rank if the graph is invalid on any rank or
    differs between ranks; the previous topology then stays in place.
    """
    rt = current()
    new = build_static_topology(rt.comm, graph, allow_negative_weights)
    old, rt.topology = rt.topology, new
    old.free()


def topology() -> nx.DiGraph:
    """The current static topology's graph."""
    return current().topology.graph


def in_neighbors() -> list[int]:
    """Ranks this rank receives from in the static topology (self excluded), in arrival order."""
    return list(current().topology.sources)


def out_neighbors() -> list[int]:
    """Ranks this rank sends to in the static topology (self excluded)."""
    return list(current().topology.destinations)
