"""The runtime: communicators, machine layout, the current topology, the settings and the
resources the runtime owns.

``gossip.init()`` creates one :class:`Runtime` per process; every op reads it through
:func:`current`. It holds a private duplicate of the user's communicator, so gossip traffic never
matches a user's own messages. The runtime owns everything with an MPI lifetime: its
communicators, the static topology's graph communicator, node shared memory, the buffer pool,
the watchdog, the record of ops in flight, the progress thread, the trace recorder, the traffic
counter (:func:`traffic`), the open windows and other resources registered with :meth:`Runtime.own`
(parameter servers); :func:`shutdown` frees them in the reverse order of their creation.

In fault-tolerant mode (the ``fault_tolerant`` setting, under ``gossiprun --fault-tolerant``) the
runtime's communicators return errors instead of aborting (``MPI_ERRORS_RETURN``), a
:class:`gossip.transport._failures.FailureDetector` watches them, and every blocking point raises
:class:`gossip.RankFailure` once a rank has failed; :meth:`Runtime.abandon` and
:meth:`Runtime.rebind` are the two halves of :func:`gossip.recover`
(:mod:`gossip.ops.recovery`): let go of everything bound to the broken communicator, then bind
the runtime to the survivors' one.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from mpi4py import MPI

from gossip.errors import GossipError, OpTimeoutError, RankFailure
from gossip.settings import Settings
from gossip.transport import Transport, detect_cuda_aware
from gossip.transport._buffers import BufferPool
from gossip.transport._failures import FailureDetector
from gossip.transport._graph_comm import StaticTopology, build_static_topology
from gossip.transport._in_flight import InFlight
from gossip.transport._progress import ProgressThread
from gossip.transport._shared_memory import NodeMemory
from gossip.transport._trace import Recorder
from gossip.transport._traffic import Traffic, TrafficCounter
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
    machine_sizes: tuple[int, ...] = ()  # the ranks on each machine, by machine index (unequal after a failure)


def _discover_layout(comm: MPI.Comm, local: MPI.Comm, machines: int, machine_rank: int) -> Layout:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    every = comm.allgather((local.size, gpus, machine_rank))
    sizes = [0] * machines
    for k, _, machine in every:
        sizes[machine] = k
    return Layout(comm.size, machines, max(k for k, _, _ in every), local.size, max(g for _, g, _ in every),
                  tuple(sizes))


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
    origin: int = 0  # this rank's rank in the communicator init() started on (kept across recoveries)
    # How the static topology was made: ``n -> graph`` (rebuilt for the survivors by gossip.recover()),
    # or None when set_topology was given a graph.
    topology_builder: Callable[[int], nx.DiGraph] | None = exponential_two
    failures: FailureDetector | None = None  # fault-tolerant mode's failure detector, else None
    recover_hooks: list = field(default_factory=list)  # gossip.on_recover callbacks (or weak methods)
    traffic: TrafficCounter = field(default_factory=TrafficCounter)  # every op's bytes and messages (kept on recover)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def debug_buffers(self) -> bool:
        return self.settings.debug_buffers

    def communicators(self) -> list[MPI.Comm]:
        """The runtime's communicators other than :attr:`comm` (what a failure revokes with it)."""
        found = [self.local_comm, self.leaders_comm, self.topology.dist_comm]
        if self.node_memory.comm is not None:
            found.append(self.node_memory.comm)
        found += [getattr(resource, "comm", MPI.COMM_NULL) for resource in self.owned]
        return [c for c in found if c != MPI.COMM_NULL]

    def abandon(self, reason: str) -> None:
        """Fault-tolerant mode, after a failure: let go of everything bound to the broken
        communicator. Ops in flight are given up (their handles raise :class:`gossip.RankFailure`
        with ``reason``); open windows are freed, their errors ignored (:meth:`gossip.Window.abandon`;
        the only collective call here, made by every survivor in the same order); owned resources
        are closed without their collective free; the progress thread stops. The old communicators,
        and every request that MPI may still complete with its buffers, are kept by the watchdog
        until the process ends."""
        keep = self.watchdog.abandoned
        self.in_flight.abandon(reason)
        if self.progress is not None:
            self.progress.stop(free=False)
            keep.append(self.progress)
            self.progress = None
        for resource in [*self.owned, *self.windows.values()]:
            if hasattr(resource, "abandon"):
                resource.abandon(reason)
            keep.append(resource)
        self.owned, self.windows = [], {}
        keep += [self.comm, *self.communicators(), self.node_memory]

    def rebind(self, comm: MPI.Comm, bound: Bound, builder: Callable[[int], nx.DiGraph] | None) -> None:
        """Make ``comm`` (the survivors' communicator, with ``bound`` from :func:`bind` on it) the
        runtime's communicator, after :meth:`abandon`."""
        self.comm = comm
        self.local_comm, self.leaders_comm = bound.local_comm, bound.leaders_comm
        self.machine_rank, self.machine_size = bound.machine_rank, bound.machine_size
        self.topology, self.node_memory, self.layout = bound.topology, bound.node_memory, bound.layout
        self.topology_builder = builder
        self.transport.node_memory = bound.node_memory
        self.watchdog.rank = comm.rank
        if self.failures is not None:
            self.failures.comm = comm
        if self.settings.progress_thread:
            self.progress = ProgressThread(comm, self.in_flight)

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


def _split_machines(comm: MPI.Comm, per_machine: int | None, origin: int) -> tuple[MPI.Comm, MPI.Comm, int, int]:
    """Local (same-machine) communicator, the leaders' communicator (COMM_NULL off the leaders),
    machine index and machine count.

    Machines are found with ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``, or, with
    ``per_machine=k`` (the ``ranks_per_machine`` setting), pretended as consecutive blocks of k
    ranks of the communicator ``init`` started on (``origin``: this rank's rank there), so that
    the survivors of a failure stay on their machines (to test hierarchical code on one host).
    """
    if per_machine is not None:
        local = comm.Split(origin // per_machine, comm.rank)
    else:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    leaders = comm.Split(0 if local.rank == 0 else MPI.UNDEFINED, comm.rank)
    layout = (leaders.rank, leaders.size) if local.rank == 0 else None
    machine_rank, machine_size = local.bcast(layout, root=0)
    return local, leaders, machine_rank, machine_size


def _abort_on_uncaught() -> None:
    """Make an uncaught exception on one rank abort the job instead of leaving peers waiting."""
    previous = sys.excepthook

    def hook(kind, value, tb):  # type: ignore[no-untyped-def]
        rt = _runtime
        if rt is not None and rt.comm.size > 1:
            print(f"gossip: rank {rt.comm.rank} of {rt.comm.size} failed with an uncaught {kind.__name__}; "
                  "aborting the job", file=sys.stderr)
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
            rt.comm.Abort(1)
        previous(kind, value, tb)

    sys.excepthook = hook


@dataclass
class Bound:
    """What the runtime builds on a communicator (:func:`bind`)."""

    local_comm: MPI.Comm
    leaders_comm: MPI.Comm
    machine_rank: int
    machine_size: int
    node_memory: NodeMemory
    topology: StaticTopology
    layout: Layout


def bind(comm: MPI.Comm, settings: Settings, origin: int, graph: nx.DiGraph, watchdog: Watchdog, *,
         allow_negative: bool = False, any_row_sums: bool = False) -> Bound:
    """Collective over ``comm``: the machine layout, node shared memory (off in fault-tolerant mode)
    and the static topology ``graph`` on ``comm`` (accepted as :func:`set_topology` would with
    ``allow_negative_weights=allow_negative, allow_any_row_sums=any_row_sums``)."""
    local, leaders, machine_rank, machine_size = _split_machines(comm, settings.ranks_per_machine, origin)
    node_memory = NodeMemory(comm, watchdog, enabled=settings.shared_memory and not settings.fault_tolerant)
    topology = build_static_topology(comm, graph, allow_negative, any_row_sums)
    return Bound(local, leaders, machine_rank, machine_size, node_memory, topology,
                 _discover_layout(comm, local, machine_size, machine_rank))


def _require_ulfm() -> None:
    """Raise unless the MPI library can survive a failed rank (Open MPI: ``--with-ft ulfm``)."""
    if "Open MPI" in MPI.Get_library_version() and \
            os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "t", "yes", "y", "on"):
        raise GossipError("the fault_tolerant setting needs Open MPI's failure mitigation (ULFM), which this job was "
                          "started without: start it with `gossiprun --fault-tolerant ...` (mpirun --with-ft ulfm)")


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
    watchdog (:func:`set_op_timeout`), from this call on: a rank that reaches ``init`` more than
    ``op_timeout`` seconds after another makes that one raise :class:`gossip.OpTimeoutError`.
    ``timeline`` records a trace (:mod:`gossip.tools.timeline`).
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
    if settings.fault_tolerant:
        _require_ulfm()
    if not MPI.Is_initialized():
        MPI.Init_thread()
    comm = comm if comm is not None else MPI.COMM_WORLD
    try:  # every rank is here before the blocking collectives that build the runtime (Dup, Split, ...)
        Watchdog(comm.rank, settings.op_timeout).fence(comm, "gossip.init")
    except OpTimeoutError as error:
        if settings.abort_on_error and comm.size > 1:  # no runtime yet, whose hook would abort
            print(f"gossip: {error}; aborting the job", file=sys.stderr, flush=True)
            comm.Abort(1)
        raise
    comm = comm.Dup()
    failures = None
    if settings.fault_tolerant:  # errors come back as exceptions; derived communicators inherit it
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        failures = FailureDetector(comm)
    watchdog = Watchdog(comm.rank, settings.op_timeout, failures)
    pool = BufferPool(poison=settings.debug_buffers)
    cuda_aware = settings.cuda_aware if settings.cuda_aware is not None else detect_cuda_aware()
    with watchdog.guard("gossip.init"):
        bound = bind(comm, settings, comm.rank, exponential_two(comm.size), watchdog)
        cuda_aware = comm.allreduce(cuda_aware, op=MPI.LAND)  # the same on every rank
    rt = Runtime(
        comm=comm,
        local_comm=bound.local_comm,
        leaders_comm=bound.leaders_comm,
        machine_rank=bound.machine_rank,
        machine_size=bound.machine_size,
        topology=bound.topology,
        settings=settings,
        check=settings.check,
        transport=Transport(cuda_aware, pool, watchdog, chunk_bytes=settings.message_chunk_bytes,
                            staging_chunk_bytes=settings.staging_chunk_bytes, stage_host=settings.stage_host,
                            node_memory=bound.node_memory),
        node_memory=bound.node_memory,
        layout=bound.layout,
        watchdog=watchdog,
        in_flight=InFlight(watchdog, warn=settings.debug_buffers),
        pool=pool,
        origin=comm.rank,
        failures=failures,
    )
    if failures is not None:
        failures.also_revoke = rt.communicators
    _runtime = rt
    if settings.progress_thread:
        rt.progress = ProgressThread(comm, rt.in_flight)
    if settings.abort_on_error:
        _abort_on_uncaught()
    if settings.timeline is not None:
        rt.start_trace(Path(settings.timeline))


def shutdown() -> None:
    """Free everything the runtime owns, in the reverse order of creation (collective).

    Ops still in flight are completed first (MPI may still use their buffers, and they use the
    runtime's communicators); this rank's trace, if one is recorded, is written. ``init`` may
    be called again. The ranks meet under the op timeout before any resource is freed: a rank
    that reaches ``shutdown`` more than ``op_timeout`` seconds after another makes that one raise
    :class:`gossip.OpTimeoutError` (the runtime is then left as it was). In fault-tolerant mode,
    once a rank has failed, the runtime lets go of everything without collective calls
    (:meth:`Runtime.abandon`) and raises :class:`gossip.RankFailure`; it is shut down all the same.
    """
    global _runtime
    if _runtime is None:
        return
    rt = _runtime
    if rt.failures is None:
        _free(rt)
        return
    try:
        with rt.watchdog.guard("gossip.shutdown"):
            if rt.failures.broken():
                rt.failures.fail("gossip.shutdown")
            _free(rt)
    except RankFailure:
        rt.abandon("gossip.shutdown after a rank failure")
        rt.stop_trace()
        rt.pool.clear()
        _runtime = None
        raise


def _free(rt: Runtime) -> None:
    global _runtime
    rt.in_flight.complete_all()
    rt.watchdog.fence(rt.comm, "gossip.shutdown")  # freeing windows and communicators blocks
    if rt.progress is not None:
        rt.progress.stop()
        rt.progress = None
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
    rt = current()
    node_memory = rt.node_memory
    if node_memory.usable:  # the same on every rank
        rt.watchdog.fence(rt.comm, "gossip.shared_empty")  # the window's creation blocks
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


def traffic() -> Traffic:
    """This rank's bytes and messages put on the wire by gossip's ops since :func:`init` (or
    :func:`reset_traffic`), in total and per op (:class:`gossip.transport.Traffic`).

    Point-to-point and neighbour messages are counted exactly, as handed to MPI (message bytes times
    destinations); collectives by the bandwidth-optimal algorithm's count per rank (allreduce: a
    ring's 2(n − 1)/n times the bytes), since MPI picks its own algorithm; control messages (the
    cross-rank check) are not counted. :mod:`gossip.transport._traffic` lists every op's closed form.
    """
    return current().traffic.snapshot()


def reset_traffic() -> None:
    """Start counting :func:`traffic` from zero on this rank."""
    current().traffic.reset()


def set_check(enabled: bool) -> None:
    """Turn the cross-rank input check on or off (must be called alike on every rank)."""
    current().check = bool(enabled)


def set_topology(graph: nx.DiGraph | Callable[[int], nx.DiGraph], *, allow_negative_weights: bool = False,
                 allow_any_row_sums: bool = False) -> None:
    """Collective: make ``graph`` the static topology of every op that is given no weights.

    ``graph`` is a ``networkx.DiGraph`` on nodes ``0..size-1``, or a builder ``n -> graph`` (a
    ``topologies`` function such as ``topologies.ring``, or a ``functools.partial`` of one) called
    with the number of ranks; :func:`gossip.recover` rebuilds a builder's graph for the survivors,
    while a graph given as such cannot follow a change of size. Edge ``j -> i`` carries ``weight``
    = the weight rank i gives to j's value, the self-loop ``i -> i`` rank i's self weight (0 if
    absent). A graph without any weights gets uniform weights ``1/(indegree+1)``.

    The weights a rank receives with (self-loop included) must sum to 1 (a row-stochastic
    mixing matrix, for averaging), unless ``allow_any_row_sums``: then any finite weights are
    taken as given, e.g. 1 on every edge and self-loop for sums over each neighbourhood (what
    BlueFog's ``set_topology(..., is_weighted=True)`` does). Weights must be non-negative unless
    ``allow_negative_weights``.

    Raises :class:`InputMismatchError` on every rank if the graph is invalid on any rank or differs
    between ranks; the previous topology then stays in place. A rank more than ``op_timeout``
    seconds behind the others makes them raise :class:`gossip.OpTimeoutError` (:func:`set_op_timeout`).
    """
    rt = current()
    builder = None
    if callable(graph) and not isinstance(graph, nx.Graph):
        builder, graph = graph, topology_for(graph, rt.size, rt.rank)
    with rt.watchdog.guard("set_topology"):
        new = build_static_topology(rt.comm, graph, allow_negative_weights, allow_any_row_sums,
                                    watchdog=rt.watchdog, what="set_topology")
    old, rt.topology = rt.topology, new
    rt.topology_builder = builder
    old.free()


def topology_for(builder: Callable[[int], nx.DiGraph], size: int, rank: int) -> nx.DiGraph:
    """``builder(size)``, or ValueError naming the builder when it has no graph on ``size`` ranks."""
    try:
        return builder(size)
    except (TypeError, ValueError) as error:
        name = getattr(builder, "__qualname__", None) or getattr(getattr(builder, "func", None), "__qualname__", None)
        raise ValueError(f"rank {rank}: the topology builder {name or repr(builder)} has no graph on {size} ranks: "
                         f"{error}") from None


def topology() -> nx.DiGraph:
    """The current static topology's graph."""
    return current().topology.graph


def in_neighbors() -> list[int]:
    """Ranks this rank receives from in the static topology (self excluded), in arrival order."""
    return list(current().topology.sources)


def out_neighbors() -> list[int]:
    """Ranks this rank sends to in the static topology (self excluded)."""
    return list(current().topology.destinations)
