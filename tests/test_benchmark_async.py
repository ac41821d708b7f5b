"""benchmarks/async_gossip.py and benchmarks/async_server.py end to end on real ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.mpi_harness import REPO, run_job


def _run(np: int, script: str, args: list[str], timeout: float = 240) -> str:
    done = run_job(np, [sys.executable, str(REPO / "benchmarks" / script), *args], timeout, what=script)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def test_asynchronous_gossip_outpaces_a_slow_rank(tmp_path: Path) -> None:
    output = _run(4, "async_gossip.py", ["--budget", "1.5", "--seeds", "0", "--slow-ranks", "0", "--slow-delay",
                                         "0.02", "--out", str(tmp_path)])
    assert "time to target" in output and "asynchronous AD-PSGD" in output
    rows = {(r["setting"], r["algorithm"]): r for r in
            json.loads((tmp_path / "async-gossip-np4.json").read_text())["rows"]}
    assert set(rows) == {(s, a) for s in ("homogeneous", "slow ranks") for a in ("dsgd", "adpsgd")}
    sync, asynchronous = rows[("slow ranks", "dsgd")], rows[("slow ranks", "adpsgd")]
    assert sync["steps_min"] == sync["steps_max"]  # synchronous: everyone at the slow rank's pace
    assert asynchronous["steps_max"] > 2 * sync["steps_max"], (sync, asynchronous)  # the others went on
    assert all(0 < r["train_loss"] < 3 for r in rows.values())
    assert (tmp_path / "async-gossip-np4.png").stat().st_size > 5_000


def test_parameter_server_table(tmp_path: Path) -> None:
    output = _run(3, "async_server.py", ["--epochs", "2", "--seeds", "0", "--lrs", "0.03", "--methods",
                                         "asgdm,ormo", "--slow-fraction", "0.5", "--out", str(tmp_path)])
    assert "naive ASGDm" in output and "OrMo" in output and "heterogeneous" in output
    result = json.loads((tmp_path / "async-server-np3.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"asgdm", "ormo"} and result["tuned_lr"] == {"asgdm": 0.03, "ormo": 0.03}
    for name in rows:
        assert 0 < rows[name]["homogeneous"]["train_loss"][0] < 3
        # one of the two workers sleeps 10 ms per gradient: its gradients arrive stale
        assert rows[name]["heterogeneous"]["staleness_max"] >= 2, rows[name]
    assert (tmp_path / "async-server-np3.png").stat().st_size > 5_000
