"""Runs one test script's ``test_*`` functions on every rank, in lockstep, under mpirun.

Usage (done by ``tests/mpi_harness.py``): ``mpirun -np N python tests/mpi_runner.py SCRIPT OUTDIR``.
Each rank runs the functions in definition order, writes ``OUTDIR/rank<r>.json`` after every
test (so results survive an abort), and waits for all ranks with an ``Ibarrier`` polled against a
deadline: a rank left behind in a collective makes the job abort with a message instead of
hanging. After each test the runtime's topology and check setting are restored.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

from mpi4py import MPI

SYNC_DEADLINE_S = float(os.environ.get("GOSSIP_TEST_SYNC_DEADLINE", "60"))


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sync_or_abort(comm: MPI.Comm, name: str) -> None:
    request = comm.Ibarrier()
    deadline = time.monotonic() + SYNC_DEADLINE_S
    while not request.Test():
        if time.monotonic() > deadline:
            print(f"rank {comm.rank}: other ranks did not finish {name} within {SYNC_DEADLINE_S:.0f} s; aborting",
                  file=sys.stderr, flush=True)
            comm.Abort(3)
        time.sleep(0.001)


def main() -> int:
    script, outdir = sys.argv[1], Path(sys.argv[2])
    import gossip
    import topologies

    sys.path.insert(0, str(Path(script).resolve().parent))
    from _common import Skip

    world = MPI.COMM_WORLD
    gossip.init()
    module = _load(script)
    tests = [(name, fn) for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    results = []
    out_file = outdir / f"rank{world.rank}.json"
    for name, fn in tests:
        start = time.monotonic()
        try:
            fn()
            status, detail = "passed", ""
        except Skip as why:
            status, detail = "skipped", str(why)
        except Exception:  # every failure is recorded; the run goes on with the next test
            status, detail = "failed", traceback.format_exc()
            print(f"rank {world.rank}: {name} FAILED\n{detail}", file=sys.stderr, flush=True)
        results.append({"test": name, "status": status, "detail": detail,
                        "seconds": round(time.monotonic() - start, 3)})
        out_file.write_text(json.dumps(results))
        _sync_or_abort(world, name)
        gossip.set_check(True)
        gossip.set_topology(topologies.exponential_two(world.size))
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
