"""A fault-tolerant job in which ranks die by SIGKILL; the survivors recover and go on (tests/test_fault_tolerance.py).

``python fault_tolerance.py CASE OUTDIR [PHASE]`` under ``mpirun --with-ft ulfm`` on 4 ranks (the flags of
``gossiprun --fault-tolerant``). Every rank runs the CASE's op in a loop; at a given step the
victim writes the time into ``OUTDIR`` and kills itself. The survivors must get
:class:`gossip.RankFailure`, recover, check the :class:`gossip.Recovery` record, and run the op on
the smaller job, each result checked against NumPy from every survivor's input, gathered with
plain mpi4py on a communicator of the test's own (shrunk alongside). Each survivor prints one line
``RESULT {json}`` (its ranks, how long detection and recovery took, what was checked); a failed
check raises, which ends the job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import gossip
import topologies

CASE, OUTDIR = sys.argv[1], Path(sys.argv[2])
PHASE = sys.argv[3] if len(sys.argv) > 3 else ""  # during_recovery: when the second rank dies
KILL_STEP = 4
AFTER = 6  # checked ops on the survivors after each recovery

# The test's own view of the job, independent of gossip's communicators: shrunk after each recovery.
TEST = MPI.COMM_WORLD.Dup()
TEST.Set_errhandler(MPI.ERRORS_RETURN)
ORIGIN = MPI.COMM_WORLD.rank
report: dict = {"case": CASE, "origin": ORIGIN, "recoveries": [], "detect_s": [], "checked": 0}


def die(tag: str = "") -> None:
    """Record when this rank dies, and die (no cleanup, no MPI call)."""
    (OUTDIR / f"killed{ORIGIN}{tag}").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def detected(error: gossip.RankFailure) -> None:
    """Note how long after the newest kill this rank got ``error``."""
    now = time.time()
    kills = [float(p.read_text()) for p in OUTDIR.glob("killed*") if p.read_text()]
    report["detect_s"].append(now - max(kills) if kills else None)
    assert "failed" in str(error) or "revoked" in str(error), str(error)


def recover(**kwargs) -> gossip.Recovery:
    """gossip.recover(), the test's communicator shrunk to the same survivors, and the record checked
    against both (this rank's old and new rank, the survivors' order)."""
    global TEST
    old_rank = gossip.rank()
    record = gossip.recover(**kwargs)
    TEST = TEST.Shrink()
    TEST.Set_errhandler(MPI.ERRORS_RETURN)
    note(record)
    assert record.new_size == gossip.size() == TEST.size, (record, TEST.size)
    assert record.new_rank(old_rank) == gossip.rank() == TEST.rank, (record, old_rank)
    origins = TEST.allgather(ORIGIN)
    assert sorted(origins) == origins and gossip.runtime.current().origin == ORIGIN, origins
    return record


def recover_until_stable() -> gossip.Recovery:
    """Recover, and again while a failure shows up right after (a death may land after the agreement)."""
    global TEST
    while True:
        record = gossip.recover()
        TEST = TEST.Shrink()
        TEST.Set_errhandler(MPI.ERRORS_RETURN)
        note(record)
        try:
            gossip.barrier()
            return record
        except gossip.RankFailure as error:
            detected(error)


def note(record: gossip.Recovery) -> None:
    report["recoveries"].append({"old_size": record.old_size, "new_size": record.new_size, "failed": record.failed,
                                 "ranks": {str(k): v for k, v in record.ranks.items()}, "seconds": record.seconds,
                                 "attempts": record.attempts})


def gathered(x: torch.Tensor) -> np.ndarray:
    """Every survivor's tensor as rows, in rank order, gathered with plain mpi4py."""
    return np.stack(TEST.allgather(x.detach().double().reshape(-1).numpy()))


def close(got: torch.Tensor, want: np.ndarray, what: str) -> None:
    err = float(np.abs(got.double().reshape(-1).numpy() - want.reshape(-1)).max())
    assert err < 1e-10, f"rank {gossip.rank()} (origin {ORIGIN}): {what} off by {err:.3g}"
    report["checked"] += 1


def start(x_size: int = 257) -> torch.Tensor:
    return torch.arange(x_size, dtype=torch.float64) * 0.01 + ORIGIN


# --- the ops, each with its closed form on the current survivors --------------------------------------

def static_step(x: torch.Tensor, step: int) -> torch.Tensor:
    return gossip.neighbor_allreduce(x)


def static_expected(rows: np.ndarray, step: int) -> np.ndarray:
    return topologies.to_matrix(gossip.topology()) @ rows


PENDING: list = []  # a handle whose wait() raised RankFailure (dynamic case): recover() abandons it


def dynamic_step(x: torch.Tensor, step: int) -> torch.Tensor:
    p = topologies.OnePeerExponentialTwo(gossip.size()).peers(step, gossip.rank())
    handle = gossip.neighbor_allreduce_async(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                             dst_weights=p.dst_weights)
    try:
        return handle.wait()
    except gossip.RankFailure:
        PENDING.append(handle)
        raise


def dynamic_expected(rows: np.ndarray, step: int) -> np.ndarray:
    return topologies.OnePeerExponentialTwo(TEST.size).mixing_matrix(step) @ rows


def hierarchical_step(x: torch.Tensor, step: int) -> torch.Tensor:
    return gossip.hierarchical_neighbor_allreduce(x) + 0.01 * (ORIGIN + 1)  # the ranks keep differing


def machine_mixing(machine_of: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The machine-level matrix hierarchical gossip applies to the machines' means: W itself for machines
    of equal size; for sizes s, neighbours' weights times s_min/s_M and 1 − (1 − W_MM) s_min/s_M on the
    diagonal, which keeps Σ_M s_M m_M (the sum over ranks)."""
    sizes = np.bincount(machine_of)
    keep = sizes.min() / sizes
    mixed = keep[:, None] * w
    np.fill_diagonal(mixed, 1 - keep * (1 - np.diag(w)))
    return mixed


def hierarchical_expected(rows: np.ndarray, step: int) -> np.ndarray:
    machine_of = np.array(TEST.allgather(gossip.machine_rank()))
    machines = gossip.machine_size()
    means = np.stack([rows[machine_of == m].mean(axis=0) for m in range(machines)])
    mixed = machine_mixing(machine_of, topologies.to_matrix(topologies.exponential_two(machines))) @ means
    shift = 0.01 * (np.array(TEST.allgather(ORIGIN)) + 1)
    expected = mixed[machine_of] + shift[:, None]
    if gossip.machine_size() > 1 and min(np.bincount(machine_of)) != max(np.bincount(machine_of)):
        sizes = np.bincount(machine_of)  # the sum over ranks is kept (up to the shift each rank adds)
        assert np.allclose((sizes[:, None] * mixed).sum(0), (sizes[:, None] * means).sum(0))
    return expected


def allreduce_step(x: torch.Tensor, step: int) -> torch.Tensor:
    return gossip.allreduce(x) + float(step)  # the sum changes every step (a constant would reach consensus)


def allreduce_expected(rows: np.ndarray, step: int) -> np.ndarray:
    return np.tile(rows.mean(axis=0), (len(rows), 1)) + step


OPS = {"static": (static_step, static_expected), "dynamic": (dynamic_step, dynamic_expected),
       "hierarchical": (hierarchical_step, hierarchical_expected), "allreduce": (allreduce_step, allreduce_expected),
       "two_failures": (static_step, static_expected), "simultaneous": (static_step, static_expected),
       "during_recovery": (static_step, static_expected), "topology_errors": (static_step, static_expected)}


def run_checked(x: torch.Tensor, step_fn, expected_fn, steps: int) -> torch.Tensor:
    """``steps`` ops on the survivors, each against its closed form."""
    for step in range(steps):
        rows = gathered(x)
        x = step_fn(x, step)
        close(x, expected_fn(rows, step)[gossip.rank()], f"{CASE} step {step} on {gossip.size()} ranks")
    return x


def run_until_failure(x: torch.Tensor, step_fn, victims: set[int], steps: int = 40) -> tuple[torch.Tensor, bool]:
    """Run the op until a RankFailure (True) or ``steps`` steps (False); ``victims`` (origins) die at KILL_STEP."""
    for step in range(steps):
        if step == KILL_STEP and ORIGIN in victims:
            die()
        try:
            x = step_fn(x, step)
        except gossip.RankFailure as error:
            detected(error)
            return x, True
        time.sleep(0.002)
    return x, False


# --- the cases --------------------------------------------------------------------------------------

class Listener:
    """An object whose bound method listens for recoveries (held weakly by gossip.on_recover)."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def heard(self, record: gossip.Recovery) -> None:
        self.calls.append((self.name, record.new_size))


def one_failure(victim: int, **settings) -> None:
    step_fn, expected_fn = OPS[CASE]
    gossip.init(fault_tolerant=True, **settings)
    calls: list = []
    listener = Listener(calls, "method")
    gossip.on_recover(listener.heard)
    gossip.on_recover(lambda record: calls.append(("function", record.new_size)))
    gossip.on_recover(Listener(calls, "collected").heard)  # its object is gone: never called
    gossip.on_recover(lambda record: calls.append(("removed", record.new_size)))()  # unregistered at once
    if CASE == "static":  # across machines, the window case's refusal first (a job fewer on emulated machines)
        window_refused_across_machines(start(64))
    x, failed = run_until_failure(start(), step_fn, {victim})
    assert failed, f"rank {ORIGIN}: no RankFailure after rank {victim} died"
    record = recover()
    assert calls == [("method", 3), ("function", 3)], calls
    assert record.failed == (victim,) and record.old_size == 4 and record.new_size == 3, record
    assert record.ranks == {o: n for n, o in enumerate(r for r in range(4) if r != victim)}, record
    if CASE == "static":
        assert topologies.to_matrix(gossip.topology()).tolist() == \
            topologies.to_matrix(topologies.exponential_two(3)).tolist()
    for handle in PENDING:  # an op in flight at the failure: given up, its wait() raises
        try:
            handle.wait()
            raise AssertionError("a handle of the failed job completed")
        except gossip.RankFailure as error:
            assert "gossip.recover()" in str(error), str(error)
            report["abandoned_handles"] = report.get("abandoned_handles", 0) + 1
    if CASE == "hierarchical":
        assert gossip.machine_size() == 2 and gossip.layout().size == 3, gossip.layout()
        report["machines"] = TEST.allgather((gossip.machine_rank(), gossip.local_rank()))
    run_checked(x, step_fn, expected_fn, AFTER)


def window_refused_across_machines(x: torch.Tensor) -> bool:
    """On several machines: a window is refused (Open MPI's one-sided communication between machines is
    not fault tolerant), noted in the report. False on one machine."""
    node = TEST.Split_type(MPI.COMM_TYPE_SHARED)
    machines = TEST.size // node.size
    node.Free()
    if machines == 1:
        return False
    try:
        gossip.Window(x, "w")
        raise AssertionError("a window across machines in fault-tolerant mode")
    except gossip.GossipError as error:
        assert "span several machines" in str(error), str(error)
        report["window_refused"] = True
    return True


def window_epoch() -> None:
    gossip.init(fault_tolerant=True)
    x = start(64)
    if window_refused_across_machines(x):
        return
    win = gossip.Window(x, "w")
    failed = False
    for step in range(200):
        if step == KILL_STEP and ORIGIN == 2:
            die()
        try:
            win.put()
            win.update()
        except gossip.RankFailure as error:
            detected(error)
            failed = True
            break
        time.sleep(0.002)
    assert failed, "no RankFailure in the window epoch"
    recover()
    try:
        win.put()
        raise AssertionError("a window of the failed job is still usable")
    except ValueError as error:
        assert "closed by gossip.recover()" in str(error), str(error)
    assert gossip.open_windows() == []
    x = start(64) + x  # a fresh window on the survivors, checked step by step against W x
    win = gossip.Window(x, "w")
    w = topologies.to_matrix(gossip.topology())
    for _ in range(AFTER):
        rows = gathered(x)
        win.put()
        gossip.barrier()  # every put has landed (a put is complete at its destination when it returns)
        win.update()
        gossip.barrier()  # nobody puts the next value before everyone folded this one
        close(x, (w @ rows)[gossip.rank()], "window put/update on 3 ranks")
    win.free()


def two_failures() -> None:
    gossip.init(fault_tolerant=True)
    x, failed = run_until_failure(start(), static_step, {1})
    assert failed
    first = recover()
    assert first.failed == (1,) and first.ranks == {0: 0, 2: 1, 3: 2}, first
    x = run_checked(x, static_step, static_expected, 2)
    x, failed = run_until_failure(x, static_step, {3})  # old rank 3, rank 2 of the 3 survivors
    assert failed
    second = recover()
    assert second.failed == (2,) and second.ranks == {0: 0, 1: 1} and gossip.size() == 2, second
    run_checked(x, static_step, static_expected, AFTER)


def simultaneous() -> None:
    gossip.init(fault_tolerant=True)
    x, failed = run_until_failure(start(), static_step, {1, 2})
    assert failed
    recover_until_stable()
    assert gossip.size() == 2 and TEST.allgather(ORIGIN) == [0, 3], TEST.allgather(ORIGIN)
    run_checked(x, static_step, static_expected, AFTER)


def during_recovery() -> None:
    """Rank 2 dies at KILL_STEP; rank 3 dies while the others recover from that: ``in-shrink``, while
    they wait for it in the shrink (it never calls gossip.recover()); ``in-recover``, a moment into
    its own gossip.recover() (in the shrink, the rebuild or the agreement, as the timing falls)."""
    gossip.init(fault_tolerant=True)
    x, failed = run_until_failure(start(), static_step, {2})
    assert failed
    if ORIGIN == 3 and PHASE == "in-shrink":
        time.sleep(0.2)
        die("-in-shrink")
    if ORIGIN == 3:
        threading.Thread(target=lambda: (time.sleep(0.001), die("-in-recover")), daemon=True).start()
    record = recover_until_stable()
    assert gossip.size() == 2 and TEST.allgather(ORIGIN) == [0, 1], record
    run_checked(x, static_step, static_expected, AFTER)


def topology_errors() -> None:
    """A topology family with no graph at the new size, then a topology set as a plain graph."""
    gossip.init(fault_tolerant=True)
    gossip.set_topology(topologies.hypercube)
    x, failed = run_until_failure(start(), static_step, {2})
    assert failed
    try:
        gossip.recover()
        raise AssertionError("a hypercube was rebuilt on 3 ranks")
    except gossip.GossipError as error:
        assert "hypercube" in str(error) and "3 ranks" in str(error), str(error)
        report["hypercube_error"] = str(error)
    recover(topology=topologies.ring)
    assert topologies.to_matrix(gossip.topology()).tolist() == topologies.to_matrix(topologies.ring(3)).tolist()
    x = run_checked(x, static_step, static_expected, 2)
    gossip.set_topology(topologies.fully_connected(3))  # a graph: no builder to rebuild it with
    x, failed = run_until_failure(x, static_step, {3})
    assert failed
    try:
        gossip.recover()
        raise AssertionError("a topology given as a graph was rebuilt")
    except gossip.GossipError as error:
        assert "set as a graph on 3 nodes" in str(error), str(error)
        report["graph_error"] = str(error)
    recover(topology=topologies.fully_connected(2))
    run_checked(x, static_step, static_expected, AFTER)


def blocking_points() -> None:
    """Without recovering, every blocking point raises RankFailure naming the dead rank, shutdown too."""
    gossip.init(fault_tolerant=True, op_timeout=60)
    x, failed = run_until_failure(start(), static_step, {2})
    assert failed
    calls = {"set_topology": lambda: gossip.set_topology(topologies.ring),
             "barrier": gossip.barrier, "allreduce": lambda: gossip.allreduce(x),
             "neighbor_allreduce": lambda: gossip.neighbor_allreduce(x),
             "neighbor_allreduce_async": lambda: gossip.neighbor_allreduce_async(x).wait(),
             "hierarchical": lambda: gossip.hierarchical_neighbor_allreduce(x),
             "Window": lambda: gossip.Window(x, "late"), "shutdown": gossip.shutdown}
    raised = {}
    for name, call in calls.items():
        try:
            call()
            raise AssertionError(f"{name} returned after rank 2 died")
        except gossip.RankFailure as error:
            assert error.ranks == (2,) and "rank 2 of 4 failed" in str(error), (name, str(error))
            raised[name] = str(error)
    assert not gossip.is_initialized()  # shutdown let go of everything even so
    report["raised"] = sorted(raised)
    report.update(rank=TEST.rank, size=TEST.size)
    print("RESULT " + json.dumps(report), flush=True)


def main() -> None:
    if CASE == "blocking_points":
        return blocking_points()
    if CASE in ("static", "allreduce"):
        one_failure(victim=2)
    elif CASE == "dynamic":  # no cross-rank check: the failure reaches the handles' waits
        one_failure(victim=2, check=False)
    elif CASE == "hierarchical":  # machines {0, 1} and {2, 3}: rank 2 leads the second
        one_failure(victim=2, ranks_per_machine=2)
    elif CASE == "window":
        window_epoch()
    else:
        {"two_failures": two_failures, "simultaneous": simultaneous, "during_recovery": during_recovery,
         "topology_errors": topology_errors}[CASE]()
    report.update(rank=gossip.rank(), size=gossip.size())
    gossip.shutdown()
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
