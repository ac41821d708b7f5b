"""Communication plans and schedules: what an optimizer communicates at step k, decided in one place.

A :class:`Plan` names one operation on one flat tensor: neighbour averaging on the static
topology, on a time-varying topology's step-k peers and weights, an exact global average
(allreduce), or nothing. A :class:`Schedule` yields the plan for each step. Optimizers only ever
execute plans; a static graph, a time-varying family, Gossip-PGA's "allreduce every H steps" and
local steps are all schedules, and so are machine-aware (hierarchical) and one-sided (window) ones.
"""

from __future__ import annotations

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


def _check_fits(topology: DynamicTopology) -> None:
    if topology.n != runtime.size():
        raise ValueError(f"time-varying topology is for {topology.n} ranks, the job has {runtime.size()}")


class Schedule:
    """The plan for each step. Subclasses implement :meth:`plan`; ``describe()`` says what they do."""

    def plan(self, step: int) -> Plan:
        """The :class:`Plan` for step ``step`` (0-based, the optimizer's step count)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line a person can read: what this schedule communicates."""
        return type(self).__name__


class StaticSchedule(Schedule):
    """Neighbour averaging on a static graph every step.

    With ``graph`` None the runtime's current topology is used. Otherwise the graph becomes the
    runtime's topology (``gossip.set_topology``: collective, done once here, at construction).
    """

    def __init__(self, graph: nx.DiGraph | None = None) -> None:
        if graph is not None:
            current = runtime.topology()
            if current is None or current.number_of_nodes() != graph.number_of_nodes() or (
                    mixing_matrix(current) != mixing_matrix(graph)).any():
                runtime.set_topology(graph)
        self._plan = Plan(NEIGHBOR)

    def plan(self, step: int) -> Plan:
        return self._plan

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


class AllreduceSchedule(Schedule):
    """Exact global averaging (allreduce mean) every step."""

    _plan = Plan(ALLREDUCE)

    def plan(self, step: int) -> Plan:
        return self._plan

    def describe(self) -> str:
        return "allreduce every step"


class NoCommunication(Schedule):
    """Local steps only."""

    _plan = Plan(NOTHING)

    def plan(self, step: int) -> Plan:
        return self._plan

    def describe(self) -> str:
        return "no communication"


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

    def plan(self, step: int) -> Plan:
        return AllreduceSchedule._plan if self.averages(step) else self.base.plan(step)

    def describe(self) -> str:
        warmup = f", every step for the first {self.warmup_steps}" if self.warmup_steps else ""
        period = f"every {self.every} steps" if self.every is not None else "never after the warm-up"
        return f"{self.base.describe()}, global average {period}{warmup}"


class PushSumSchedule(Schedule):
    """Column-stochastic mixing for push-sum: every rank splits what it holds equally among itself
    and the ranks it sends to (``1 / (out-degree + 1)`` each, applied as ``dst_weights``), and adds
    up what it receives (``src_weights`` 1). Works on directed graphs, static or time-varying; the
    sum over ranks is kept exactly (Kempe, Dobra, Gehrke, FOCS 2003; Assran et al., ICML 2019).

    ``topology`` is a static ``networkx`` graph (edges only; its weights are ignored), a
    :class:`topologies.DynamicTopology` (its step's send and receive ranks), or None for the
    runtime's topology.
    """

    def __init__(self, topology: nx.DiGraph | DynamicTopology | None = None) -> None:
        self._rank = runtime.rank()
        n = runtime.size()
        if isinstance(topology, DynamicTopology):
            _check_fits(topology)
            self.topology = topology
            self._static = None
            return
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


def schedule_for(topology: nx.DiGraph | DynamicTopology | Schedule | str | None = None,
                 global_avg_every: int | None = None) -> Schedule:
    """The schedule for a topology argument as optimizers take it.

    ``None``: the runtime's static topology; a ``networkx`` graph: that static graph; a
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
    elif topology == ALLREDUCE:
        schedule = AllreduceSchedule()
    elif topology == HIERARCHICAL:
        schedule = HierarchicalSchedule()
    elif topology == NOTHING:
        schedule = NoCommunication()
    else:
        raise ValueError(f"topology must be a networkx DiGraph, a topologies.DynamicTopology, a Schedule, "
                         f"'allreduce', 'hierarchical', 'none' or None; got {topology!r}")
    if global_avg_every is not None:
        schedule = PeriodicGlobalAverage(schedule, global_avg_every)
    return schedule
