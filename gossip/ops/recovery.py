"""Continuing after a rank failure: :func:`recover` shrinks the job to its survivors and rebuilds the runtime on them.

Fault-tolerant mode (the ``fault_tolerant`` setting, under ``gossiprun --fault-tolerant``) makes
every blocking point of the runtime raise :class:`gossip.RankFailure` once a rank has died
(:mod:`gossip.transport._failures`). The survivors then call ``gossip.recover()``, each as soon as
it has caught the exception, and continue on the smaller job::

    try:
        x = gossip.neighbor_allreduce(x)
    except gossip.RankFailure:
        record = gossip.recover()          # collective over the survivors
        # record.ranks: {old rank: new rank}; record.failed: the old ranks that died

The recovery follows the ULFM pattern (Bland, Bouteiller, Herault, Bosilca and Dongarra,
"Post-failure recovery of MPI communication capability: design and rationale", IJHPCA 27(3),
2013; MPI 5.0 draft, process fault tolerance): revoke the runtime's communicators, so that every
survivor leaves whatever it was waiting on; ``MPI_Comm_shrink`` them to the survivors; rebuild
the runtime on the new communicator (machines and their leaders, the layout, the static topology
rebuilt for the new size from the builder ``set_topology`` was given, default exponential-2;
node shared memory stays off); and ``MPI_Comm_agree`` that every survivor rebuilt. A rank that
dies during the recovery makes the agreement fail on every survivor alike, and they shrink again,
until one round succeeds or the time runs out (the op timeout; then :class:`gossip.GossipError`,
which ends the job). Whatever was bound to the old communicator is let go of
(:meth:`gossip.runtime.Runtime.abandon`): handles of ops in flight raise
:class:`gossip.RankFailure` when waited on, open windows are freed and parameter servers closed
(create them again), and every request that MPI may still complete is kept, with its buffers,
until the process ends.

The survivors may have completed different numbers of ops before they noticed the failure (an op
whose peers were alive can complete on one rank while another rank's fails); the recovery does
not roll anything back. Upper layers register :func:`on_recover` callbacks to adapt their own
state (schedules, data shards, push-sum weights) to the :class:`Recovery` record.
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import networkx as nx
import numpy as np
from mpi4py import MPI

from gossip import runtime
from gossip.errors import GossipError, RankFailure
from gossip.transport._failures import FailureDetector, is_failure
from gossip.transport._graph_comm import StaticTopology, graph_problems

Topology = nx.DiGraph | Callable[[int], nx.DiGraph]


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: the job went from ``old_size`` to ``new_size`` ranks; ``ranks`` maps
    each surviving rank's old rank to its new one (order kept), ``failed`` lists the old ranks that
    died; ``seconds`` the recovery took on this rank and in how many shrink rounds (``attempts``:
    more than 1 when a rank died during the recovery)."""

    old_size: int
    new_size: int
    ranks: Mapping[int, int]
    failed: tuple[int, ...]
    seconds: float
    attempts: int

    def new_rank(self, old_rank: int) -> int | None:
        """The new rank of the rank that was ``old_rank``, or None if it failed."""
        return self.ranks.get(old_rank)


def recover(topology: Topology | None = None, *, timeout: float | None = None) -> Recovery:
    """Collective over the surviving ranks: continue the job on them after a :class:`gossip.RankFailure`.

    Revokes and shrinks the runtime's communicators to the survivors, rebuilds the runtime on them
    and returns a :class:`Recovery` record (module docstring). The static topology becomes
    ``topology`` if given (a graph on the new number of ranks, or a builder ``n -> graph``), else
    the builder ``set_topology`` was given (default :func:`topologies.exponential_two`) called with
    the new size; a topology set as a plain graph, or a builder with no graph at the new size (a
    hypercube on 3 ranks), raises :class:`gossip.GossipError` naming it, on every survivor, and
    nothing is rebuilt (call ``recover`` again with ``topology=``). Every survivor must call it: the
    shrink waits for all of them (ULFM completes it despite further failures). ``timeout``
    (default: the op timeout, else none) bounds each agreement from the start of the recovery;
    past it, :class:`gossip.GossipError`. The callbacks registered with :func:`on_recover` run last,
    in registration order; a rank dying during their collectives makes the survivors recover again
    (their callbacks run again, on the smaller job) and the record returned covers both. A rank
    that calls it revokes the runtime's communicators: peers still in
    an op then raise :class:`gossip.RankFailure` and recover too.
    """
    rt = runtime.current()
    if rt.failures is None:
        raise GossipError(f"rank {rt.rank}: gossip.recover() needs fault-tolerant mode: gossip.init(fault_tolerant="
                          "True) (or GOSSIP_FAULT_TOLERANT=1) in a job started with gossiprun --fault-tolerant")
    began = time.perf_counter()
    limit = timeout if timeout is not None else rt.watchdog.timeout
    deadline = None if limit is None else began + limit
    old, rank = rt.comm, rt.rank
    builder = topology if callable(topology) and not isinstance(topology, nx.Graph) else \
        None if topology is not None else rt.topology_builder
    rt.failures.revoke()  # every survivor leaves whatever it waits on, and comes here
    rt.abandon("gossip.recover() after a rank failure")

    comm, attempts = old, 0
    while True:
        attempts += 1
        comm = _shrink(comm, rank)
        graph = _graph_for(topology, builder, rt.topology, comm.size, rank)
        built = None
        try:
            with FailureDetector(comm).guard("gossip.recover(): rebuilding the runtime"):
                built = runtime.bind(comm, rt.settings, rt.origin, graph, rt.watchdog,
                                     allow_negative=rt.topology.allow_negative,
                                     any_row_sums=rt.topology.any_row_sums)
        except RankFailure:
            pass  # another rank died: the agreement below fails on every survivor alike
        if _agree(comm, built is not None, rank, deadline, limit):
            break
        _revoke(comm)
        rt.watchdog.abandoned += [comm, built]

    olds = _translate(comm, old)
    rt.rebind(comm, built, builder)
    record = Recovery(old_size=old.size, new_size=comm.size, ranks={o: n for n, o in enumerate(olds)},
                      failed=tuple(r for r in range(old.size) if r not in set(olds)),
                      seconds=time.perf_counter() - began, attempts=attempts)
    try:
        for hook in list(rt.recover_hooks):
            callback = hook()
            if callback is None:  # a bound method of a collected object
                rt.recover_hooks.remove(hook)
            else:
                callback(record)
    except RankFailure:  # another rank died during the callbacks' collectives: recover again, from here
        left = limit if limit is None else max(0.0, limit - (time.perf_counter() - began))
        return _compose(record, recover(topology, timeout=left))
    return record


def _compose(first: Recovery, second: Recovery) -> Recovery:
    """One record for two recoveries in a row (the second during the first's callbacks)."""
    back = {new: old for old, new in first.ranks.items()}
    return Recovery(old_size=first.old_size, new_size=second.new_size,
                    ranks={old: second.ranks[new] for old, new in first.ranks.items() if new in second.ranks},
                    failed=tuple(sorted((*first.failed, *(back[r] for r in second.failed)))),
                    seconds=first.seconds + second.seconds, attempts=first.attempts + second.attempts)


def on_recover(callback: Callable[[Recovery], object]) -> Callable[[], None]:
    """Call ``callback(record)`` on every survivor at the end of each :func:`recover`; returns a
    function that unregisters it. A bound method is held weakly (its object may be collected, an
    optimizer for instance); callbacks are dropped at ``shutdown``."""
    rt = runtime.current()
    hook = weakref.WeakMethod(callback) if inspect.ismethod(callback) else (lambda: callback)
    rt.recover_hooks.append(hook)

    def remove() -> None:
        if hook in rt.recover_hooks:
            rt.recover_hooks.remove(hook)

    return remove


def _graph_for(topology: Topology | None, builder: Callable[[int], nx.DiGraph] | None, static: StaticTopology,
               size: int, rank: int) -> nx.DiGraph:
    """The static topology on ``size`` ranks, checked as the failed job's was (``static``: its negative
    weights and row sums allowed or not), or GossipError (the same on every survivor)."""
    previous = static.graph
    if topology is not None and builder is None:
        graph = topology
    elif builder is None:
        raise GossipError(f"rank {rank}: gossip.recover(): the static topology was set as a graph on "
                          f"{previous.number_of_nodes()} nodes, which cannot be rebuilt for {size} ranks: give "
                          "set_topology a builder (n -> graph, e.g. topologies.ring), or gossip.recover(topology=...)")
    else:
        try:
            graph = runtime.topology_for(builder, size, rank)
        except ValueError as error:
            raise GossipError(f"gossip.recover(): {error}; give gossip.recover(topology=...) another") from None
    problems = graph_problems(graph, size, static.allow_negative, static.any_row_sums)
    if problems:
        raise GossipError(f"rank {rank}: gossip.recover(): the topology for {size} ranks is invalid: {problems[0]}")
    return graph


def _wait(request: MPI.Request, what: str, rank: int, deadline: float | None, limit: float | None) -> None:
    """Poll ``request`` of the recovery step ``what`` until it completes or the deadline passes."""
    while not request.Test():
        if deadline is not None and time.perf_counter() > deadline:
            raise GossipError(f"rank {rank}: gossip.recover(): the {what} did not complete within {limit:g} s "
                              "(a surviving rank did not call gossip.recover())")
        time.sleep(0.0002)


def _shrink(comm: MPI.Comm, rank: int) -> MPI.Comm:
    """``MPI_Comm_shrink``: the survivors of ``comm``, in their order, returning errors. Blocking (Open
    MPI 5.0's ``MPI_Comm_ishrink`` ends in an internal error here); ULFM completes it despite
    failures once every survivor has called it."""
    try:
        survivors = comm.Shrink()
    except MPI.Exception as error:
        raise GossipError(f"rank {rank}: gossip.recover(): MPI_Comm_shrink failed: {error.Get_error_string()}") \
            from error
    survivors.Set_errhandler(MPI.ERRORS_RETURN)
    return survivors


def _agree(comm: MPI.Comm, ok: bool, rank: int, deadline: float | None, limit: float | None) -> bool:
    """``MPI_Comm_iagree`` on ``ok`` (a bitwise AND): True if every survivor of ``comm`` is ok and none
    failed since the shrink; the answer and the failure are the same on every survivor."""
    flag = np.array([1 if ok else 0], dtype=np.intc)
    try:
        _wait(comm.Iagree(flag), "agreement", rank, deadline, limit)
    except MPI.Exception as error:
        if is_failure(error):
            return False
        raise
    return bool(flag[0])


def _revoke(comm: MPI.Comm) -> None:
    try:
        if not comm.Is_revoked():
            comm.Revoke()
    except MPI.Exception:
        pass


def _translate(comm: MPI.Comm, old: MPI.Comm) -> list[int]:
    """For each rank of ``comm``, its rank in ``old``."""
    new_group, old_group = comm.Get_group(), old.Get_group()
    try:
        return list(MPI.Group.Translate_ranks(new_group, list(range(comm.size)), old_group))
    finally:
        new_group.Free()
        old_group.Free()


__all__ = ["Recovery", "on_recover", "recover"]
