"""Asynchronous decentralized SGD (AD-PSGD) on one-sided MPI windows.

Lian, Zhang, Zhang, Liu, "Asynchronous Decentralized Parallel Stochastic Gradient Descent", ICML
2018. Every rank runs at its own pace, never waiting for another; at its local step t rank i

    g   = ∇F(x_i; ξ_i) (+ wd·x_i)                   gradient at the model it read (before mixing)
    A   = the in-neighbours whose model arrived in i's window since its last step
    x_i ← (x_i + Σ_{j∈A} b_j) / (1 + |A|)           b_j: the newest model j pushed to i
    m_i ← β m_i + g ;  x_i ← x_i − γ m_i            (β = 0, the default: the paper's plain step)
    push x_i into the window of out-neighbour(s) D_i(t) of the topology's step t

The paper's atomic pairwise average (i and j both take (x_i + x_j)/2) is replaced by one-sided
pushes: a rank writes into its peers' windows (``MPI_Put`` into ``MPI_Win_allocate`` memory, which
completes without the peer's help) and folds in only what has arrived, so a slow rank delays
nobody. What it folds is as stale as the peer's last push; a peer that pushed twice since is
folded once, with its newest model. The gradient is computed at the model before the fold, as in
the paper (its x̂ is read before the average).

The topology is time-varying by default: one-peer exponential-2 (at local step t, rank i pushes
to i + 2^(t mod ⌈log2 n⌉)), each rank counting its own steps. Any periodic family or static graph
works; the window holds one buffer per in-neighbour of the union of the family's graphs.

``opt.synchronize()`` finishes this rank's push in flight; ``opt.finish(average=True)`` is
collective: it ends the asynchronous phase, optionally replaces every model by the exact average,
and frees the window.
"""

from __future__ import annotations

import itertools

import networkx as nx
import torch

from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.pmsgd import pmsgd_update
from gossip import runtime
from gossip.ops import collectives
from gossip.ops.window import Window
from gossip.plan.schedule import NoCommunication, WindowPushSchedule
from topologies import DynamicTopology, OnePeerExponentialTwo


def _window_name() -> str:
    """The first ``adpsgd-k`` not open in this runtime: the same on every rank, since windows are
    created and freed collectively, in the same order everywhere."""
    taken = runtime.current().windows
    return next(name for k in itertools.count() if (name := f"adpsgd-{k}") not in taken)


def union_graph(family: DynamicTopology) -> nx.DiGraph:
    """Every edge any step of a periodic family uses (unweighted, with self-loops)."""
    if family.period is None:
        raise ValueError(f"{type(family).__name__} is not periodic: an asynchronous window needs a buffer per "
                         "possible sender, so use a periodic family or a static graph")
    graph = nx.DiGraph()
    graph.add_nodes_from(range(family.n))
    graph.add_edges_from((r, r) for r in range(family.n))
    for step in range(family.period):
        for rank in range(family.n):
            graph.add_edges_from((rank, dst) for dst in family.peers(step, rank).dst_weights)
    return graph


class AsynchronousGossipSGD(DecentralizedOptimizer):
    """AD-PSGD: push the model to this step's peer(s), fold in what has arrived, never wait."""

    buffer_names = ("momentum_buffer",)
    usable_as_base = False  # no step boundary is common to all ranks for an outer loop's average

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, topology=None,
                 mutex: bool = False) -> None:
        check_rates(lr, momentum)
        n = runtime.size()
        if topology is None:
            topology = OnePeerExponentialTwo(n)
        if isinstance(topology, DynamicTopology):
            if topology.n != n:
                raise ValueError(f"the topology has {topology.n} nodes for {n} ranks")
            self.family, graph = topology, union_graph(topology)
        elif isinstance(topology, nx.DiGraph | nx.Graph):
            self.family, graph = None, topology
        else:
            raise ValueError(f"adpsgd needs a static graph or a periodic time-varying family, got {topology!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": False},
                         schedule=NoCommunication())
        self.window = Window(self.x, _window_name(), graph=graph, mutex=mutex)
        self.schedule = WindowPushSchedule(self.window, self.family)  # this step's pushes, as plans
        self._push = None  # this rank's push in flight (completes while the next step computes)
        self.arrivals = 0  # how many neighbour models this rank has folded in, in all
        self.last_arrived: list[int] = []  # whose models the last step folded in

    def _step(self) -> None:
        if self.window is None:
            raise RuntimeError("adpsgd has finished (finish() freed its window); it cannot step again")
        g = self.gradient()  # at the model read before the fold (weight decay included)
        self.synchronize()  # the previous push has left before the model changes
        self.last_arrived = self.window.update_arrived()
        self.arrivals += len(self.last_arrived)
        m = self.buffers["momentum_buffer"]
        for group, s in self.groups():
            pmsgd_update(self.x[s], m[s], g[s], group["lr"], group["momentum"], False)
        plan = self.schedule.plan(self.step_count)
        if plan.communicates:
            self._push = plan.start(self.x, self.x)  # a one-sided push: nothing is received

    def synchronize(self) -> None:
        """Complete this rank's push in flight (its data has reached the peer's window)."""
        if self._push is not None:
            self._push.wait()
            self._push = None

    def after_recovery(self, record) -> None:  # noqa: ANN001 - a gossip.Recovery
        """AD-PSGD does not continue after :func:`gossip.recover`: the recovery freed its window with
        the failed job's communicator, and its ranks, each at its own pace, share no step to restart
        from. The next step raises :class:`gossip.GossipError` saying so; :meth:`finish` still
        averages the survivors' models (collective). Nothing here communicates."""
        self._push = None  # its handle would raise RankFailure
        self.unusable = (f"adpsgd cannot continue after gossip.recover() (rank(s) {list(record.failed)} of "
                         f"{record.old_size} failed): its one-sided window was freed with the failed job's "
                         "communicator and its ranks share no step to restart from; call finish(average=True) on "
                         "every survivor for their average model, or resume from a checkpoint")

    def describe(self) -> str:
        peers = f"{type(self.family).__name__} peers" if self.family is not None else "every out-neighbour"
        return (f"the model: one-sided pushes into the windows of {peers} after every step, never waiting; "
                "each step folds in the models that have arrived")

    def close(self) -> None:
        """Collective: finish this rank's push and free the window (:meth:`finish` without the average)."""
        self._stop_listening()
        self.finish(average=False)

    def finish(self, average: bool = True) -> None:
        """Collective: end the asynchronous phase; with ``average`` every rank's model becomes the
        exact average of all models; free the window."""
        self.synchronize()
        if self.window is not None:
            self.window.free()  # collective: every push has completed everywhere
            self.window = None
        if average:
            with torch.no_grad():
                self.x.copy_(collectives.allreduce(self.x, "mean"))
