"""BlueFog's basic calls: start and stop, ranks and machines, the process and machine topologies,
what the build supports, and timeline activities.

BlueFog keeps the topology a user set (``load_topology``) and whether its weights are used
(``is_weighted``): with ``is_weighted=False`` every receiver averages uniformly, ``1/(indegree + 1)``
for itself and each in-neighbour, whatever weights the graph carries. This module hands the
runtime exactly the weights BlueFog would use (:func:`topologies.uniform_weights` of the graph, or
the graph's own), so a call without weights is the runtime's default op on its static topology.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import networkx as nx
from mpi4py import MPI

import gossip
import topologies
from gossip import runtime
from gossip.compat.bluefog import topology_util


@dataclass
class _State:
    """What BlueFog's API remembers between calls (one per process, reset by :func:`init`)."""

    topology: nx.DiGraph | None = None  # the graph the user set, as given (load_topology)
    weighted: bool = False
    applied: nx.DiGraph | None = None  # the runtime's topology graph after our set_topology
    machine_topology: nx.DiGraph | None = None
    machine_weighted: bool = False
    unified_window_model: bool = True
    activities: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # timeline: name -> open spans


state = _State()


def init(topology_fn: Callable[[int], nx.DiGraph] | None = None, is_weighted: bool = False) -> None:
    """Start the runtime (``gossip.init()`` on ``MPI.COMM_WORLD`` unless it is running already) and
    set the topology to ``topology_fn(size())`` (default: ``ExponentialGraph(size())``) and the
    machine topology to ``ExponentialGraph(machine_size())``. Collective.

    ``BLUEFOG_TIMELINE=prefix`` starts a trace (:mod:`gossip.tools.timeline`) when none is running.
    ``BLUEFOG_NODES_PER_MACHINE=k``, read when this call starts the runtime, pretends machines of k
    consecutive ranks (the runtime's ``ranks_per_machine``), as BlueFog's tests of hierarchical ops do
    on one machine.
    """
    import os

    if not gossip.is_initialized():
        per_machine = os.environ.get("BLUEFOG_NODES_PER_MACHINE")
        gossip.init(**({"ranks_per_machine": _positive(per_machine, "BLUEFOG_NODES_PER_MACHINE")}
                       if per_machine else {}))
    global state
    kept, state = state, _State()
    rt = runtime.current()
    rt.watchdog.fence(rt.comm, "bluefog init")  # a rank far behind raises under the op timeout, not hangs
    with rt.watchdog.guard("bluefog init"):  # what BlueFog reports as the MPI window model, asked once
        win = MPI.Win.Allocate(8, 1, comm=rt.comm)
        state.unified_window_model = win.model == MPI.WIN_UNIFIED
        win.Free()
    prefix = os.environ.get("BLUEFOG_TIMELINE")
    if prefix and not gossip.timeline.active():
        gossip.timeline.start(prefix if prefix.endswith(".json") else prefix + ".json")
    graph = topology_fn(size()) if topology_fn is not None else topology_util.ExponentialGraph(size())
    if not set_topology(graph, is_weighted):  # refused while windows are open, as BlueFog: keep the topology
        state.topology, state.weighted, state.applied = kept.topology, kept.weighted, kept.applied
    set_machine_topology(topology_util.ExponentialGraph(machine_size()))


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return value


def shutdown() -> None:
    """Free every window and stop the runtime (collective); the process may ``init`` again."""
    from gossip.compat.bluefog import _windows

    if gossip.is_initialized():
        _windows.win_free()
    gossip.shutdown()
    global state
    state = _State()


def size() -> int:
    """The number of ranks."""
    return gossip.size()


def rank() -> int:
    """This process's rank."""
    return gossip.rank()


def local_size() -> int:
    """The number of ranks on this machine."""
    return gossip.local_size()


def local_rank() -> int:
    """This process's rank within its machine."""
    return gossip.local_rank()


def machine_size() -> int:
    """The number of machines."""
    return gossip.machine_size()


def machine_rank() -> int:
    """This process's machine (0 .. machine_size() - 1)."""
    return gossip.machine_rank()


def is_homogeneous() -> bool:
    """True if every machine runs the same number of ranks."""
    sizes = gossip.layout().machine_sizes
    return len(set(sizes)) <= 1


def _uniform_or_own(graph: nx.DiGraph, weighted: bool) -> nx.DiGraph:
    return graph if weighted else topologies.uniform_weights(graph)


def _check_graph(graph, nodes: int, what: str) -> None:
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"{what} must be a networkx.DiGraph, got {type(graph).__name__}")
    if graph.number_of_nodes() != nodes or set(graph.nodes) != set(range(nodes)):
        raise TypeError(f"{what} must be a networkx.DiGraph on nodes 0..{nodes - 1} ({nodes} nodes), "
                        f"got {graph.number_of_nodes()} nodes")


def set_topology(topology: nx.DiGraph | None = None, is_weighted: bool = False) -> bool:
    """Collective: make ``topology`` (default ``ExponentialGraph(size())``) the static topology;
    with ``is_weighted`` the graph's weights are the default mixing weights (``GetRecvWeights``),
    otherwise every receiver averages uniformly over itself and its in-neighbours. Returns True, or
    False (with a warning, the topology unchanged) while a window is open, as BlueFog: a window's
    buffers belong to the neighbours it was created with. Raises ``TypeError`` for anything but a
    ``DiGraph`` on ``size()`` nodes, and :class:`gossip.InputMismatchError` on every rank if the
    graphs differ between ranks."""
    if topology is None:
        topology = topology_util.ExponentialGraph(size())
    _check_graph(topology, size(), "topology")
    open_windows = sorted(runtime.current().windows)
    if open_windows:
        warnings.warn(f"rank {rank()}: set_topology is refused while windows are open ({open_windows}); "
                      "free them first (win_free)", RuntimeWarning, stacklevel=2)
        return False
    current = state.applied is not None and gossip.topology() is state.applied
    if current and is_weighted == state.weighted and topology_util.IsTopologyEquivalent(topology, state.topology):
        return True  # as BlueFog: setting the same topology again changes nothing
    if is_weighted:  # BlueFog takes a weighted graph's weights as given: any row sums, any signs
        gossip.set_topology(topology, allow_any_row_sums=True, allow_negative_weights=True)
    else:
        gossip.set_topology(topologies.uniform_weights(topology))
    state.topology, state.weighted, state.applied = topology, bool(is_weighted), gossip.topology()
    return True


def load_topology() -> nx.DiGraph:
    """The topology set last (as it was given). If the runtime's topology was changed without this
    module (``gossip.set_topology``), that graph, with its weights."""
    if state.applied is None or gossip.topology() is not state.applied:
        return gossip.topology()
    return state.topology


def is_topo_weighted() -> bool:
    """Whether the topology's own weights are the default mixing weights (``is_weighted``)."""
    if state.applied is None or gossip.topology() is not state.applied:
        return True
    return state.weighted


def in_neighbor_ranks() -> list[int]:
    """The ranks this rank receives from in the static topology, self excluded, sorted."""
    return sorted(gossip.in_neighbors())


def out_neighbor_ranks() -> list[int]:
    """The ranks this rank sends to in the static topology, self excluded, sorted."""
    return sorted(gossip.out_neighbors())


def set_machine_topology(topology: nx.DiGraph | None = None, is_weighted: bool = False) -> bool:
    """Set the graph between machines that :func:`hierarchical_neighbor_allreduce` uses when given no
    weights (default ``ExponentialGraph(machine_size())``); weights as :func:`set_topology`. Local:
    every rank must set the same graph (the op's cross-rank check compares them). Returns True."""
    if topology is None:
        topology = topology_util.ExponentialGraph(machine_size())
    _check_graph(topology, machine_size(), "machine topology")
    state.machine_topology, state.machine_weighted = topology, bool(is_weighted)
    return True


def load_machine_topology() -> nx.DiGraph:
    """The machine topology set last (default ``ExponentialGraph(machine_size())``)."""
    if state.machine_topology is None:
        set_machine_topology()
    return state.machine_topology


def is_machine_topo_weighted() -> bool:
    """Whether the machine topology's own weights are used (``is_weighted``)."""
    return state.machine_weighted


def applied_machine_topology() -> nx.DiGraph:
    """The machine topology with the weights hierarchical averaging uses (uniform unless weighted)."""
    return _uniform_or_own(load_machine_topology(), state.machine_weighted)


def in_neighbor_machine_ranks() -> list[int]:
    """The machines this rank's machine receives from in the machine topology, sorted."""
    me = machine_rank()
    return sorted(int(m) for m in load_machine_topology().predecessors(me) if m != me)


def out_neighbor_machine_ranks() -> list[int]:
    """The machines this rank's machine sends to in the machine topology, sorted."""
    me = machine_rank()
    return sorted(int(m) for m in load_machine_topology().successors(me) if m != me)


def nccl_built() -> bool:
    """False: every op goes through MPI (CUDA tensors too: CUDA-aware MPI or pinned host staging)."""
    return False


def mpi_threads_supported() -> bool:
    """True if MPI runs with ``MPI_THREAD_MULTIPLE``."""
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def unified_mpi_window_model_supported() -> bool:
    """True if MPI's windows use the unified memory model (``MPI_WIN_UNIFIED``, MPI-4.0 §12.4),
    as asked of a window at :func:`init`."""
    return state.unified_window_model


def suspend() -> None:
    """A no-op: BlueFog pauses its background communication thread here (for interactive
    sessions); this runtime has no such thread running between calls."""


def resume() -> None:
    """A no-op (see :func:`suspend`)."""


def set_skip_negotiate_stage(value: bool) -> None:
    """Skip (True) or run (False) the cross-rank check of every op (``gossip.set_check(not value)``);
    call alike on every rank."""
    gossip.set_check(not value)


def get_skip_negotiate_stage() -> bool:
    """True when the cross-rank check is off."""
    return not runtime.current().check


def timeline_start_activity(tensor_name: str, activity_name: str) -> bool:
    """Open a span ``activity_name`` for ``tensor_name`` on the timeline (nothing when not recording)."""
    state.activities.setdefault(tensor_name, []).append((activity_name, time.perf_counter()))
    return True


def timeline_end_activity(tensor_name: str) -> bool:
    """Close the span opened last for ``tensor_name`` and record it (category ``activity``, the
    tensor's name in its args). Returns False if none is open."""
    opened = state.activities.get(tensor_name)
    if not opened:
        return False
    activity, began = opened.pop()
    gossip.timeline.record(activity, "activity", began, time.perf_counter(), args={"tensor": tensor_name})
    return True


@contextmanager
def timeline_context(tensor_name: str, activity_name: str) -> Iterator[None]:
    """The enclosed code as one timeline span (start/end activity)."""
    timeline_start_activity(tensor_name, activity_name)
    try:
        yield
    finally:
        timeline_end_activity(tensor_name)
