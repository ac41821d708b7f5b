"""A parameter server in fault-tolerant mode, ranks killed with SIGKILL (tests/test_fault_tolerance_server.py).

``python fault_tolerance_server.py CASE OUTDIR`` on 4 ranks under ``mpirun --with-ft ulfm`` (the flags of
``gossiprun --fault-tolerant``), with :class:`gossip.ops.parameter_server.ParameterServer` itself:

* ``worker``: two rounds. First a model of 257 values, rank 0 serving ranks 1-3: worker 3 dies
  right after one of its pushes, so the server's reply goes to a dead rank and it then finds the
  failure in its ``MPI_ANY_SOURCE`` wait. Then, on the 3 survivors, a model of 4 MB: the new rank 2
  sends its index and dies a moment into the 4 MB gradient, while the server receives it. In both
  rounds the server must serve the other workers to the last update, name the dead worker once
  (``on_failure``), apply only whole gradients (each carries its worker's rank and step, checked),
  and hold w⁰ − η Σ g over exactly the gradients it applied; the surviving workers must end
  stopped. The other workers hold after a few steps until the victim has died, so that it dies
  before the last update however the ranks are scheduled.
* ``server``: rank 0 serves a 4 MB model to ranks 1-3 and dies after 12 updates: every worker
  must raise :class:`gossip.RankFailure` naming rank 0 (in its push or its pull). Then, on the 3
  survivors, a model sharded over servers [0, 1]; server 0 dies after 5 updates: the worker and
  the other server must raise RankFailure naming it.

After each failure the survivors close the server (an agreement: each learns that a rank failed)
and call ``gossip.recover()``; the last 2 ranks run a barrier and shut down.

Each survivor prints ``RESULT {json}``; a failed check raises, which ends the job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import gossip
from gossip.ops import parameter_server
from gossip.ops.parameter_server import ParameterServer

CASE, OUTDIR = sys.argv[1], Path(sys.argv[2])
ORIGIN = MPI.COMM_WORLD.rank
LR = 0.01
report: dict = {"case": CASE, "origin": ORIGIN, "rounds": []}


def die(tag: str) -> None:
    """Record when this rank dies, and die (no cleanup, no MPI call)."""
    (OUTDIR / f"killed{ORIGIN}-{tag}").write_text(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def since_kill(tag: str) -> float:
    """Seconds since a rank died in round ``tag``."""
    kills = [float(p.read_text()) for p in OUTDIR.glob(f"killed*-{tag}") if p.read_text()]
    assert kills, f"no rank has died in round {tag}"
    return time.time() - max(kills)


def gradient(numel: int, worker: int, step: int) -> torch.Tensor:
    """What ``worker`` sends at its ``step``: both in the first two values, the rest a function of them."""
    g = torch.sin(torch.arange(numel, dtype=torch.float64) * 1e-3 + worker) * (step + 1) * 1e-3
    g[0], g[1] = worker, step
    return g


def serve(ps: ParameterServer, numel: int, updates: int, tag: str, die_after: int | None = None) -> dict:
    """Serve ``updates`` gradients with w ← w − η g; check each gradient whole and the final model
    against w⁰ − η Σ g over the applied ones. ``die_after``: this server dies after that many."""
    start = ps.parameters[ps.shard].clone()
    applied, failures = [], []

    def update(w, g, ite, worker):
        if die_after is not None and len(applied) == die_after:
            die(tag)
        whole = gradient(numel, int(g[0]), int(g[1]))[ps.shard] if ps.shard.start == 0 else None
        if whole is not None:
            assert int(g[0]) == worker and torch.equal(g, whole), f"a corrupt gradient from rank {worker}"
        applied.append(g.clone())
        w.sub_(g, alpha=LR)
        return len(applied)

    def failed(worker, count):
        failures.append({"worker": worker, "applied": count, "detect_s": since_kill(tag)})

    count = ps.serve(update, updates, on_failure=failed)
    expected = start.clone()
    for g in applied:
        expected.sub_(g, alpha=LR)
    assert count == updates == len(applied), (count, len(applied))
    assert torch.equal(ps.parameters[ps.shard], expected), "the server's model is not w0 - lr * sum of its updates"
    assert ps.failed == [f["worker"] for f in failures], (ps.failed, failures)
    return {"role": "server", "applied": count, "failures": failures,
            "from": sorted({int(g[0]) for g in applied}) if ps.shard.start == 0 else []}


def work(ps: ParameterServer, numel: int, tag: str, die_at: int | None = None, mid_message: bool = False,
         hold_after: int | None = None) -> dict:
    """Push and pull until stopped. ``die_at``: at that step this worker dies, right after its push,
    or (``mid_message``) a moment into sending its gradient, with the server receiving it.
    ``hold_after``: after that many steps this worker waits until a rank has died in round ``tag``
    (so that the server cannot reach its last update before the victim dies, however the ranks
    are scheduled)."""
    step = 0
    ite = ps.pull()
    while not ps.stopped:
        if step == hold_after:
            waited = time.monotonic()
            while not list(OUTDIR.glob(f"killed*-{tag}")) and time.monotonic() - waited < 60:
                time.sleep(0.005)
        g = gradient(numel, ps.rank, step)
        if step == die_at and mid_message:
            comm = ps.comm  # the index whole, then a moment of the gradient (MBs, still in flight)
            comm.Send([np.array(ite, dtype=np.int64), MPI.INT64_T], dest=ps.server, tag=parameter_server.TAG_INDEX)
            comm.Isend([g.numpy(), MPI.DOUBLE], dest=ps.server, tag=parameter_server.TAG_GRADIENT)
            time.sleep(0.002)
            die(tag)
        ps.push(g, ite)
        if step == die_at:
            die(tag)
        ite = ps.pull()
        step += 1
    return {"role": "worker", "steps": step, "stopped": ps.stopped}


def close_and_recover(ps: ParameterServer, expected: list[int]) -> None:
    """Close the server (an agreement of the survivors: each has left its exchanges, and each learns
    that a rank failed), then gossip.recover(); the survivors' launch ranks must be ``expected``."""
    ps.free()
    assert ps.had_failures and ps.comm == MPI.COMM_NULL, "the survivors did not agree that a rank failed"
    record = gossip.recover()
    report.setdefault("recoveries", []).append({"failed": record.failed, "new_size": record.new_size,
                                                "seconds": record.seconds})
    assert gossip.runtime.current().origin == ORIGIN and gossip.size() == len(expected), (record, expected)
    assert expected[gossip.rank()] == ORIGIN, (record, expected)


def dead_server(ps: ParameterServer, numel: int, tag: str, server: int) -> dict:
    """This rank (a worker, or another server of a sharded model) must raise RankFailure naming ``server``."""
    try:
        if ps.is_server:
            serve(ps, numel, 10_000, tag)
        else:
            work(ps, numel, tag)
    except gossip.RankFailure as error:
        assert error.ranks == (server,), (error.ranks, str(error))
        assert f"the parameter server (rank {server} of" in str(error), str(error)
        return {"role": "server" if ps.is_server else "worker", "raised": str(error), "detect_s": since_kill(tag)}
    raise AssertionError(f"rank {ps.rank}: no RankFailure after parameter server {server} died")


def worker_case() -> None:
    gossip.init(fault_tolerant=True, op_timeout=60)
    ps = ParameterServer(torch.zeros(257, dtype=torch.float64))  # ranks 1-3 work; 3 dies after a push
    # the others hold after 10 steps until rank 3 has died: at most 25 of the 60 updates come before
    result = serve(ps, 257, 60, "small") if ps.is_server else \
        work(ps, 257, "small", die_at=4) if ORIGIN == 3 else work(ps, 257, "small", hold_after=10)
    report["rounds"].append(result)
    close_and_recover(ps, [0, 1, 2])
    numel = 500_000  # 4 MB a message
    ps = ParameterServer(torch.linspace(0, 1, numel, dtype=torch.float64))  # ranks 1, 2 work; 2 dies mid-gradient
    result = serve(ps, numel, 30, "large") if ps.is_server else \
        work(ps, numel, "large", die_at=3, mid_message=True) if ORIGIN == 2 else work(ps, numel, "large", hold_after=5)
    report["rounds"].append(result)
    close_and_recover(ps, [0, 1])


def server_case() -> None:
    gossip.init(fault_tolerant=True, op_timeout=60)
    numel = 500_000
    ps = ParameterServer(torch.zeros(numel, dtype=torch.float64))
    if ps.is_server:
        serve(ps, numel, 10_000, "single", die_after=12)
    report["rounds"].append(dead_server(ps, numel, "single", 0))
    close_and_recover(ps, [1, 2, 3])
    ps = ParameterServer(torch.zeros(numel, dtype=torch.float64), server=[0, 1])  # launch ranks 1, 2 serve
    if gossip.rank() == 0:
        serve(ps, numel, 10_000, "sharded", die_after=5)
    report["rounds"].append(dead_server(ps, numel, "sharded", 0))
    close_and_recover(ps, [2, 3])


def main() -> None:
    {"worker": worker_case, "server": server_case}[CASE]()
    gossip.barrier()  # the survivors' collectives work again
    report.update(rank=gossip.rank(), size=gossip.size())
    gossip.shutdown()
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
