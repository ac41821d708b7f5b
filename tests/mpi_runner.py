"""Runs test scripts' ``test_*`` functions under mpirun, at several sizes and settings in one job.

Usage (done by ``tests/mpi_harness.py``): ``mpirun -np N python tests/mpi_runner.py OUTDIR``, where
``OUTDIR/runs.json`` lists the runs: ``{"script", "size", "settings", "params", "limit"}``. For each
run, in order, the first ``size`` ranks of the job form a sub-communicator (``COMM_WORLD.Split``);
on it the runtime starts with the run's settings as ``gossip.init`` keywords, the script is loaded
afresh (its ``N``/``R`` and :data:`_common.GROUP` are the group's) and its functions run in
definition order, in lockstep; the runtime is then shut down. Ranks outside the group skip the run
and wait for it at a barrier.

Each rank writes ``OUTDIR/rank<r>.json`` before and after every test (so results survive an abort,
and a killed job shows which test was running). Ranks wait for each other with an ``Ibarrier``
polled against a deadline: a rank left behind in a collective makes the job abort with a message
instead of hanging. A run still going after its ``limit`` seconds ends the job, with every thread's
stack on stderr. After each test the runtime's topology, check and op timeout are restored.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

from mpi4py import MPI

SYNC_DEADLINE_S = float(os.environ.get("GOSSIP_TEST_SYNC_DEADLINE", "60"))


def _load(path: Path):
    """Load ``path`` afresh, and forget the scripts it imported in an earlier run (their module-level
    ``N``/``R`` belong to that run's group)."""
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").parent == path.parent and name != "_common":
            del sys.modules[name]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync_or_abort(comm: MPI.Comm, what: str, deadline_s: float) -> None:
    """Wait for every rank of ``comm`` (polling, with growing sleeps: idle ranks cost no CPU);
    abort the job if some rank has not arrived within ``deadline_s``."""
    request = comm.Ibarrier()
    deadline = time.monotonic() + deadline_s
    pause = 0.0005
    while not request.Test():
        if time.monotonic() > deadline:
            print(f"rank {MPI.COMM_WORLD.rank}: other ranks did not finish {what} within {deadline_s:.0f} s; "
                  "aborting", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(3)
        time.sleep(pause)
        pause = min(2 * pause, 0.02)


def _run_tests(run: dict, index: int, group: MPI.Comm, results: list, save) -> None:
    from _common import Skip, enter_run

    import gossip
    import topologies

    try:
        gossip.init(group, **run["settings"])
        settings = gossip.settings()
        enter_run(group, run["params"])
        module = _load(Path(run["script"]))
    except Exception:  # the same on every rank (a bad setting, a script that does not import): recorded
        detail = traceback.format_exc()
        print(f"rank {group.rank} of {run['label']}: could not start\n{detail}", file=sys.stderr, flush=True)
        results.append({"run": index, "test": "(start of the run)", "status": "failed", "detail": detail,
                        "seconds": 0.0})
        save()
        gossip.shutdown()
        return
    only = os.environ.get("GOSSIP_TEST_ONLY", "")  # run only the tests whose names contain it
    tests = [(name, fn) for name, fn in vars(module).items()
             if name.startswith("test_") and callable(fn) and only in name]
    for name, fn in tests:
        record = {"run": index, "test": name, "status": "running", "detail": "", "seconds": 0.0}
        results.append(record)
        save()
        start = time.monotonic()
        try:
            fn()
            status, detail = "passed", ""
        except Skip as why:
            status, detail = "skipped", str(why)
        except Exception:  # every failure is recorded; the run goes on with the next test
            status, detail = "failed", traceback.format_exc()
            print(f"rank {group.rank} of {run['label']}: {name} FAILED\n{detail}", file=sys.stderr, flush=True)
        record.update(status=status, detail=detail, seconds=round(time.monotonic() - start, 3))
        save()
        _sync_or_abort(group, f"{name} ({run['label']})", SYNC_DEADLINE_S)
        gossip.set_check(settings.check)
        gossip.set_op_timeout(settings.op_timeout)
        gossip.set_topology(topologies.exponential_two(group.size))
    gossip.shutdown()


def main() -> int:
    outdir = Path(sys.argv[1])
    runs = json.loads((outdir / "runs.json").read_text())
    sys.path.insert(0, str(Path(runs[0]["script"]).resolve().parent))
    world = MPI.COMM_WORLD
    results: list[dict] = []
    out_file = outdir / f"rank{world.rank}.json"

    def save() -> None:
        out_file.write_text(json.dumps(results))

    save()
    for index, run in enumerate(runs):
        member = world.rank < run["size"]
        # a hung run ends the job, with every thread's stack (the ranks running it report first)
        faulthandler.dump_traceback_later(run["limit"] + (0 if member else 10), exit=True)
        group = world.Split(0 if member else MPI.UNDEFINED, world.rank)
        if member:
            try:
                _run_tests(run, index, group, results, save)
            finally:
                group.Free()
        _sync_or_abort(world, run["label"], run["limit"] + 20)
        faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main())
