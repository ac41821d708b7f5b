"""Communication plans and schedules: what an optimizer communicates at step k, decided in one place.

A :class:`Plan` names one operation on one flat tensor: neighbour averaging on the static
topology, on a time-varying topology's step-k peers and weights, an exact global average
(allreduce), or nothing. A :class:`Schedule` yields the plan for each step. Optimizers only ever
execute plans; a static graph, a time-varying family, Gossip-PGA's "allreduce every H steps" and
local steps are all schedules, and so are machine-aware (hierarchical) and one-sided (window) ones.

After a rank failure and ``gossip.recover()``, :meth:`Schedule.resized` rebuilds a schedule for the
survivors (the one place that knows how): a static schedule follows the runtime's topology, which
the recovery rebuilt; a time-varying family is rebuilt for the new size
(:meth:`topologies.DynamicTopology.resized`), a hierarchical schedule's machine family for the new
number of machines, push-sum's plans from the rebuilt graph or family, Gossip-PGA around its
rebuilt base. What cannot be rebuilt raises ValueError saying why: a family of fixed graphs, a
static graph given to the schedule itself, one-sided pushes into a window the recovery freed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch

from gossip import runtime
from gossip.ops import collectives, neighbor
from gossip.ops.handles import Handle
from gossip.ops.hierarchical import hierarchical_neighbor_allreduce
from topologies import DynamicTopology, OnePeerExponentialTwo, mixing_matrix

NEIGHBOR = "neighbor_allreduce"
ALLREDUCE = "allreduce"
HIERARCHICAL = "hierarchical"
WINDOW_PUT = "window_put"
NOTHING = "none"


@dataclass(frozen=True)
class Plan:
    """One step's communication of one tensor.

    ``op`` is ``"neighbor_allreduce"`` (with ``self_weight``/``src_weights``/``dst_weights``:
    a time-varying step; without them: the runtime's static topology), ``"allreduce"`` (exact
    mean over all ranks), ``"hierarchical"`` (machine average, then ``machine_topology`` between
    machines at ``machine_step``: :func:`gossip.hierarchical_neighbor_allreduce`), ``"window_put"``
    (one-sided: write the tensor into ``window``'s buffers at the ``dst_weights`` ranks, scaled by
    their weights, or at every out-neighbour of the window's graph; nothing is received, ``out`` is
    not used) or ``"none"`` (the tensor is its own result).
    """

    op: str
    self_weight: float | None = None
    src_weights: dict[int, float] | None = field(default=None)
    dst_weights: dict[int, float] | None = field(default=None)
    machine_topology: object = None
    machine_step: int = 0
    window: object = None

    def start(self, tensor: torch.Tensor, out: torch.Tensor) -> Handle:
        """Start the plan on ``tensor`` writing ``out`` (which must not overlap it); ``wait()`` returns ``out``.

        Neighbour averaging is nonblocking (it proceeds while the caller computes); allreduce
        and nothing complete before this returns.
        """
        if self.op == NEIGHBOR:
            if self.dst_weights is None:
                return neighbor.neighbor_allreduce_async(tensor, out=out)
            return neighbor.neighbor_allreduce_async(tensor, self_weight=self.self_weight,
                                                     src_weights=self.src_weights, dst_weights=self.dst_weights,
                                                     out=out)
        if self.op == WINDOW_PUT:
            return self.window.put_async(tensor, self.dst_weights)
        if self.op == ALLREDUCE:
            collectives.allreduce(tensor, "mean", out=out)
        elif self.op == HIERARCHICAL:
            hierarchical_neighbor_allreduce(tensor, self.machine_topology, self.machine_step, out=out)
        elif self.op == NOTHING:
            out.copy_(tensor)
        else:
            raise ValueError(f"unknown plan op {self.op!r}")
        return Handle([], lambda: out)

    @property
    def communicates(self) -> bool:
        """False for ``"none"``, True for every op that moves data."""
        return self.op != NOTHING


def _is_builder(topology: object) -> bool:
    """Whether ``topology`` is a builder ``n -> graph`` (``topologies.ring``), not a graph or a family."""
    return callable(topology) and not isinstance(topology, nx.Graph | DynamicTopology | Schedule)


def _check_fits(topology: DynamicTopology) -> None:
    if topology.n != runtime.size():
        raise ValueError(f"time-varying topology is for {topology.n} ranks, the job has {runtime.size()}")


def _family_for_job(topology: DynamicTopology, n: int | None = None) -> DynamicTopology:
    """``topology`` rebuilt for the job's current size (``n``: the number of machines instead, for a
    family between machines); machine-aware families (those with a ``local_size``) also get the
    new number of ranks per machine, which must be the same on every machine."""
    if n is not None:
        return topology.resized(n)
    layout = runtime.layout()
    if getattr(topology, "local_size", None) is None:
        return topology.resized(layout.size)
    if layout.machines * layout.ranks_per_machine != layout.size:
        raise ValueError(f"{type(topology).__name__} cannot be rebuilt for {layout.size} ranks: it needs the same "
                         f"number of ranks on every machine, and the {layout.machines} machines now hold different "
                         "numbers")
    return topology.resized(layout.size, local_size=layout.ranks_per_machine)


class Schedule:
    """The plan for each step. Subclasses implement :meth:`plan`; ``describe()`` says what they do."""

    def plan(self, step: int) -> Plan:
        """The :class:`Plan` for step ``step`` (0-based, the optimizer's step count)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line a person can read: what this schedule communicates."""
        return type(self).__name__

    def resized(self) -> Schedule:
        """This schedule for the job's current ranks, after ``gossip.recover()`` changed their number
        (module docstring); itself when it does not depend on the number. Not collective. ValueError
        saying why where it cannot be rebuilt."""
        raise ValueError(f"{type(self).__name__} has no rule to follow a change in the number of ranks")


class StaticSchedule(Schedule):
    """Neighbour averaging on a static graph every step.

    With ``graph`` None the runtime's current topology is used. Otherwise the graph becomes the
    runtime's topology (``gossip.set_topology``: collective, done once here, at construction); a
    builder ``n -> graph`` (``topologies.ring``) is given to ``set_topology`` as such, so that
    ``gossip.recover()`` can rebuild it for the survivors. After a recovery the schedule follows the
    runtime's topology, whatever it was rebuilt as.
    """

    def __init__(self, graph: nx.DiGraph | Callable[[int], nx.DiGraph] | None = None) -> None:
        if graph is not None:
            builder = graph if _is_builder(graph) else None
            if builder is not None:
                graph = runtime.topology_for(builder, runtime.size(), runtime.rank())
            current = runtime.topology()
            if current is None or current.number_of_nodes() != graph.number_of_nodes() or (
                    mixing_matrix(current) != mixing_matrix(graph)).any() or (
                    builder is not None and runtime.current().topology_builder is None):
                runtime.set_topology(builder if builder is not None else graph)
        self._plan = Plan(NEIGHBOR)

    def plan(self, step: int) -> Plan:
        return self._plan

    def resized(self) -> StaticSchedule:
        return self

    def describe(self) -> str:
        return f"static graph on {runtime.size()} ranks (neighbour collective)"


class DynamicSchedule(Schedule):
    """Neighbour averaging with a time-varying topology: step k uses ``topology.peers(k, rank)``."""

    def __init__(self, topology: DynamicTopology) -> None:
        _check_fits(topology)
        self.topology = topology
        self._rank = runtime.rank()

    def plan(self, step: int) -> Plan:
        p = self.topology.peers(step, self._rank)
        return Plan(NEIGHBOR, p.self_weight, p.src_weights, p.dst_weights)

    def describe(self) -> str:
        return f"{type(self.topology).__name__} (time-varying, point-to-point)"

    def resized(self) -> DynamicSchedule:
        return DynamicSchedule(_family_for_job(self.topology))


class HierarchicalSchedule(Schedule):
    """Hierarchical gossip every step: exact average within each machine, ``machine_topology``
    between machines (a static graph over the machines, or a time-varying family stepped with the
    optimizer; default one-peer exponential-2 over the machines), shared within each machine."""

    def __init__(self, machine_topology: nx.DiGraph | DynamicTopology | None = None) -> None:
        machines = runtime.machine_size()
        if machine_topology is None:
            machine_topology = OnePeerExponentialTwo(machines)
        n = machine_topology.n if isinstance(machine_topology, DynamicTopology) else machine_topology.number_of_nodes()
        if n != machines:
            raise ValueError(f"the machine topology has {n} nodes, the job has {machines} machines")
        self.machine_topology = machine_topology
        self._static = None if isinstance(machine_topology, DynamicTopology) else Plan(HIERARCHICAL,
                                                                                        machine_topology=machine_topology)

    def plan(self, step: int) -> Plan:
        if self._static is not None:
            return self._static
        return Plan(HIERARCHICAL, machine_topology=self.machine_topology, machine_step=step)

    def resized(self) -> HierarchicalSchedule:
        machines, between = runtime.machine_size(), self.machine_topology
        if isinstance(between, DynamicTopology):
            return HierarchicalSchedule(_family_for_job(between, machines))
        if between.number_of_nodes() != machines:
            raise ValueError(f"hierarchical gossip on a static graph of {between.number_of_nodes()} machines cannot "
                             f"be rebuilt for {machines} machines: give HierarchicalSchedule a time-varying family "
                             "(the default, one-peer exponential-2, follows the number of machines)")
        return HierarchicalSchedule(between)

    def describe(self) -> str:
        between = (type(self.machine_topology).__name__ if isinstance(self.machine_topology, DynamicTopology)
                   else "a static graph")
        machines, here = runtime.machine_size(), runtime.local_size()
        return (f"hierarchical: average within each of {machines} machine{'s' if machines != 1 else ''} "
                f"({here} rank{'s' if here != 1 else ''} here), {between} between machines")


class WindowPushSchedule(Schedule):
    """Asynchronous gossip through a one-sided :class:`gossip.Window`: at step k the tensor is pushed
    into the window buffers of this step's peers (``topology.peers(k, rank)``'s destinations and
    weights, for a time-varying family; with None, every out-neighbour of the window's graph).
    The receivers fold what has arrived whenever they choose (``Window.update_arrived``)."""

    def __init__(self, window, topology: DynamicTopology | None = None) -> None:
        if topology is not None:
            _check_fits(topology)
        self.window = window
        self.topology = topology
        self._rank = runtime.rank()
        self._static = Plan(WINDOW_PUT, window=window)

    def plan(self, step: int) -> Plan:
        if self.topology is None:
            return self._static
        destinations = self.topology.peers(step, self._rank).dst_weights
        return Plan(WINDOW_PUT, dst_weights=destinations, window=self.window) if destinations else NoCommunication._plan

    def describe(self) -> str:
        peers = f"{type(self.topology).__name__} peers" if self.topology is not None else "every out-neighbour"
        return f"one-sided window pushes to {peers}, never waiting (asynchronous)"

    def resized(self) -> Schedule:
        raise ValueError(f"one-sided pushes into the window {self.window.name!r} cannot continue: gossip.recover() "
                         "freed the window with the failed job's communicator")


class AllreduceSchedule(Schedule):
    """Exact global averaging (allreduce mean) every step."""

    _plan = Plan(ALLREDUCE)

    def plan(self, step: int) -> Plan:
        return self._plan

    def describe(self) -> str:
        return "allreduce every step"

    def resized(self) -> AllreduceSchedule:
        return self


class NoCommunication(Schedule):
    """Local steps only."""

    _plan = Plan(NOTHING)

    def plan(self, step: int) -> Plan:
        return self._plan

    def describe(self) -> str:
        return "no communication"

    def resized(self) -> NoCommunication:
        return self


class PeriodicGlobalAverage(Schedule):
    """``base``'s plan, except that some steps are an exact global average (allreduce mean).

    The first ``warmup_steps`` steps all average; after them every ``every``-th step does
    ((k − warm-up + 1) mod H = 0; ``every`` None: never). Over a gossip schedule this is Gossip-PGA
    (Chen, Yuan et al., "Accelerating Gossip SGD with Periodic Global Averaging", ICML 2021); over
    :class:`NoCommunication` it is K-step averaging (local SGD), with the warm-up of post-local SGD.
    """

    def __init__(self, base: Schedule, every: int | None, warmup_steps: int = 0) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"the global averaging period H must be an int >= 1, got {every!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.base = base
        self.every = every
        self.warmup_steps = warmup_steps

    def averages(self, step: int) -> bool:
        """Whether step ``step`` is an exact global average."""
        if step < self.warmup_steps:
            return True
        return self.every is not None and (step - self.warmup_steps + 1) % self.every == 0

    def averages_before(self, step: int) -> int:
        """How many of the steps ``0 .. step − 1`` are exact global averages."""
        later = max(0, step - self.warmup_steps)
        return min(step, self.warmup_steps) + (later // self.every if self.every is not None else 0)

    def plan(self, step: int) -> Plan:
        return AllreduceSchedule._plan if self.averages(step) else self.base.plan(step)

    def describe(self) -> str:
        warmup = f", every step for the first {self.warmup_steps}" if self.warmup_steps else ""
        period = f"every {self.every} steps" if self.every is not None else "never after the warm-up"
        return f"{self.base.describe()}, global average {period}{warmup}"

    def resized(self) -> PeriodicGlobalAverage:
        base = self.base.resized()
        return self if base is self.base else PeriodicGlobalAverage(base, self.every, self.warmup_steps)


class PushSumSchedule(Schedule):
    """Column-stochastic mixing for push-sum: every rank splits what it holds equally among itself
    and the ranks it sends to (``1 / (out-degree + 1)`` each, applied as ``dst_weights``), and adds
    up what it receives (``src_weights`` 1). Works on directed graphs, static or time-varying; the
    sum over ranks is kept exactly (Kempe, Dobra, Gehrke, FOCS 2003; Assran et al., ICML 2019).

    ``topology`` is a static ``networkx`` graph (edges only; its weights are ignored), a builder
    ``n -> graph`` of one, a :class:`topologies.DynamicTopology` (its step's send and receive ranks),
    or None for the runtime's topology.
    """

    def __init__(self, topology: nx.DiGraph | Callable[[int], nx.DiGraph] | DynamicTopology | None = None) -> None:
        self._rank = runtime.rank()
        self._given = topology  # None: the runtime's topology, followed after a recovery
        n = runtime.size()
        if isinstance(topology, DynamicTopology):
            _check_fits(topology)
            self.topology = topology
            self._static = None
            return
        if _is_builder(topology):
            topology = runtime.topology_for(topology, n, self._rank)
        graph = runtime.topology() if topology is None else topology
        if graph.number_of_nodes() != n:
            raise ValueError(f"graph has {graph.number_of_nodes()} nodes, the job has {n} ranks")
        self.topology = graph
        outs = sorted(d for d in graph.successors(self._rank) if d != self._rank)
        ins = sorted(s for s in graph.predecessors(self._rank) if s != self._rank)
        self._static = self._plan_for(outs, ins)

    @staticmethod
    def _plan_for(outs: list[int], ins: list[int]) -> Plan:
        share = 1.0 / (len(outs) + 1)
        return Plan(NEIGHBOR, share, dict.fromkeys(ins, 1.0), dict.fromkeys(outs, share))

    def plan(self, step: int) -> Plan:
        if self._static is not None:
            return self._static
        p = self.topology.peers(step, self._rank)
        return self._plan_for(sorted(p.dst_weights), sorted(p.src_weights))

    def describe(self) -> str:
        return "push-sum (column-stochastic) mixing"

    def resized(self) -> PushSumSchedule:
        if isinstance(self._given, DynamicTopology):
            return PushSumSchedule(_family_for_job(self._given))
        if self._given is not None and not _is_builder(self._given) and self._given.number_of_nodes() != runtime.size():
            raise ValueError(f"push-sum over the static graph on {self._given.number_of_nodes()} nodes given to it "
                             f"cannot be rebuilt for {runtime.size()} ranks: give it no topology (the runtime's, which "
                             "gossip.recover() rebuilds) or a time-varying family")
        return PushSumSchedule(self._given)


def schedule_for(topology: nx.DiGraph | DynamicTopology | Schedule | str | None = None,
                 global_avg_every: int | None = None) -> Schedule:
    """The schedule for a topology argument as optimizers take it.

    ``None``: the runtime's static topology; a ``networkx`` graph: that static graph; a builder
    ``n -> graph`` (``topologies.ring``): its graph on the job's ranks, which ``gossip.recover()``
    rebuilds for the survivors (a graph given as such cannot follow a change of size); a
    :class:`topologies.DynamicTopology`: its per-step peers; ``"allreduce"`` / ``"none"``;
    ``"hierarchical"`` (:class:`HierarchicalSchedule` with one-peer exponential-2 between machines); a
    :class:`Schedule`: itself. ``global_avg_every`` = H wraps it in :class:`PeriodicGlobalAverage`.
    """
    if isinstance(topology, Schedule):
        schedule = topology
    elif topology is None or isinstance(topology, nx.DiGraph):
        schedule = StaticSchedule(topology)
    elif isinstance(topology, DynamicTopology):
        schedule = DynamicSchedule(topology)
    elif _is_builder(topology):
        schedule = StaticSchedule(topology)
    elif topology == ALLREDUCE:
        schedule = AllreduceSchedule()
    elif topology == HIERARCHICAL:
        schedule = HierarchicalSchedule()
    elif topology == NOTHING:
        schedule = NoCommunication()
    else:
        raise ValueError(f"topology must be a networkx DiGraph, a builder n -> DiGraph, a topologies.DynamicTopology, "
                         f"a Schedule, 'allreduce', 'hierarchical', 'none' or None; got {topology!r}")
    if global_avg_every is not None:
        schedule = PeriodicGlobalAverage(schedule, global_avg_every)
    return schedule
