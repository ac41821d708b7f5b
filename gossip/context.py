"""The runtime: MPI communicators, machine layout, the current topology and settings.

``gossip.init()`` creates one :class:`Runtime` per process; every op reads it through
:func:`current`. It holds a private duplicate of the user's communicator, so gossip traffic never
matches a user's own messages.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field

import networkx as nx
import torch
from mpi4py import MPI

from gossip import timeline, waiting
from gossip.errors import GossipError
from gossip.graph_comm import StaticTopology, build_static_topology
from gossip.handles import InFlight
from gossip.progress import ProgressThread
from gossip.shared_memory import NodeMemory
from gossip.tensors import BufferPool
from gossip.transport import Transport, detect_cuda_aware
from topologies import exponential_two

_ENV_CHECK = "GOSSIP_CHECK"
_ENV_RANKS_PER_MACHINE = "GOSSIP_RANKS_PER_MACHINE"
_ENV_ABORT = "GOSSIP_ABORT_ON_ERROR"
_ENV_SHARED_MEMORY = "GOSSIP_SHARED_MEMORY"
_ENV_OP_TIMEOUT = "GOSSIP_OP_TIMEOUT"
_ENV_TIMELINE = "GOSSIP_TIMELINE"
_ENV_DEBUG_BUFFERS = "GOSSIP_DEBUG_BUFFERS"
_ENV_PROGRESS_THREAD = "GOSSIP_PROGRESS_THREAD"


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
    """Everything the ops need: communicators, layout, topology and settings."""

    comm: MPI.Comm
    local_comm: MPI.Comm
    leaders_comm: MPI.Comm  # the machines' leaders (local rank 0), rank = machine index; COMM_NULL elsewhere
    machine_rank: int
    machine_size: int
    topology: StaticTopology
    check: bool
    transport: Transport
    node_memory: NodeMemory
    layout: Layout
    pool: BufferPool = field(default_factory=BufferPool)
    in_flight: InFlight = field(default_factory=InFlight)
    debug_buffers: bool = False  # poison released buffers, check sent tensors are untouched until complete
    progress: ProgressThread | None = None  # drives MPI progress while ops are in flight (GOSSIP_PROGRESS_THREAD=1)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size


_runtime: Runtime | None = None


def current() -> Runtime:
    """The runtime of this process; raises :class:`GossipError` before :func:`init`."""
    if _runtime is None:
        raise GossipError("gossip.init() has not been called on this rank")
    return _runtime


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _split_machines(comm: MPI.Comm) -> tuple[MPI.Comm, MPI.Comm, int, int]:
    """Local (same-machine) communicator, the leaders' communicator (COMM_NULL off the leaders),
    machine index and machine count.

    Machines are found with ``MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)``, or, when
    ``GOSSIP_RANKS_PER_MACHINE=k`` is set, pretended as consecutive blocks of k ranks (to test
    hierarchical code on one host).
    """
    pretend = os.environ.get(_ENV_RANKS_PER_MACHINE)
    if pretend:
        per_machine = int(pretend)
        if per_machine < 1:
            raise ValueError(f"{_ENV_RANKS_PER_MACHINE} must be >= 1, got {pretend!r}")
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


def init(comm: MPI.Comm | None = None, *, check: bool | None = None) -> None:
    """Start the runtime on ``comm`` (default ``MPI.COMM_WORLD``); idempotent.

    Collective over ``comm``. Sets the default topology, :func:`topologies.exponential_two`.
    ``check`` turns the cross-rank input check of every op on or off (default on, or
    ``GOSSIP_CHECK=0|1``): with it, mismatched shapes, dtypes or send/receive patterns raise on
    every rank; without it they are undefined behaviour (usually a hang) but each op saves one
    16-byte allreduce. An uncaught exception on any rank aborts the whole job
    (``GOSSIP_ABORT_ON_ERROR=0`` to turn off). ``GOSSIP_OP_TIMEOUT=<seconds>`` turns on the
    watchdog (:func:`gossip.set_op_timeout`); ``GOSSIP_TIMELINE=<file>`` records a trace
    (:mod:`gossip.timeline`). When all ranks share one machine, blocking
    neighbour averaging of CPU tensors goes through shared memory (``GOSSIP_SHARED_MEMORY=0`` to
    use MPI messages instead). ``GOSSIP_DEBUG_BUFFERS=1`` fills every buffer given back to the
    pool with NaN, checks that a tensor being sent is unchanged when its op completes, and reports
    handles dropped before completion.
    """
    global _runtime
    if _runtime is not None:
        return
    if not MPI.Is_initialized():
        MPI.Init_thread()
    comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
    local, leaders, machine_rank, machine_size = _split_machines(comm)
    debug_buffers = _env_flag(_ENV_DEBUG_BUFFERS, False)
    pool = BufferPool(poison=debug_buffers)
    topology = build_static_topology(comm, exponential_two(comm.size))
    _runtime = Runtime(
        comm=comm,
        local_comm=local,
        leaders_comm=leaders,
        machine_rank=machine_rank,
        machine_size=machine_size,
        topology=topology,
        check=_env_flag(_ENV_CHECK, True) if check is None else bool(check),
        transport=Transport(comm.allreduce(detect_cuda_aware(), op=MPI.LAND), pool),  # the same on every rank
        node_memory=NodeMemory(comm, enabled=_env_flag(_ENV_SHARED_MEMORY, True)),
        layout=_discover_layout(comm, local, machine_size),
        pool=pool,
        in_flight=InFlight(warn=debug_buffers),
        debug_buffers=debug_buffers,
    )
    if _env_flag(_ENV_PROGRESS_THREAD, False):
        _runtime.progress = ProgressThread(comm, _runtime.in_flight)
    if _env_flag(_ENV_ABORT, True):
        _abort_on_uncaught(comm)
    if os.environ.get(_ENV_OP_TIMEOUT):
        waiting.set_op_timeout(float(os.environ[_ENV_OP_TIMEOUT]))
    if os.environ.get(_ENV_TIMELINE):
        timeline.start(os.environ[_ENV_TIMELINE], comm.rank)


def shutdown() -> None:
    """Free the runtime's communicators and buffers (collective). ``init`` may be called again."""
    global _runtime
    if _runtime is None:
        return
    from gossip import window

    _runtime.in_flight.complete_all()  # MPI may still use their buffers, and they use our communicators
    if _runtime.progress is not None:
        _runtime.progress.stop()
    for open_window in list(window._open.values()):  # windows live on the runtime's communicator
        open_window.free()
    rt, _runtime = _runtime, None
    timeline.stop()
    rt.topology.free()
    rt.node_memory.free()
    rt.local_comm.Free()
    if rt.leaders_comm != MPI.COMM_NULL:
        rt.leaders_comm.Free()
    rt.pool.clear()
    rt.comm.Free()


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
