"""benchmarks/async_gossip.py and benchmarks/async_server.py end to end on real ranks: the numbers
they write (JSON) against what the benchmarks claim."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import REPO, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 digits


def _run(np: int, script: str, args: list[str], timeout: float = 240) -> str:
    done = run_job(np, [sys.executable, str(REPO / "benchmarks" / script), *args], timeout, what=script)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_asynchronous_gossip_outpaces_a_slow_rank(tmp_path: Path) -> None:
    budget = 1.5
    output = _run(4, "async_gossip.py", ["--budget", str(budget), "--seeds", "0", "--slow-ranks", "0",
                                         "--slow-delay", "0.02", "--out", str(tmp_path)])
    rows = {(r["setting"], r["algorithm"]): r for r in
            json.loads((tmp_path / "async-gossip-np4.json").read_text())["rows"]}
    assert set(rows) == {(s, a) for s in ("homogeneous", "slow ranks") for a in ("dsgd", "adpsgd")}
    sync, asynchronous = rows[("slow ranks", "dsgd")], rows[("slow ranks", "adpsgd")]
    assert sync["steps_min"] == sync["steps_max"]  # synchronous: everyone at the slow rank's pace
    assert sync["steps_max"] <= budget / 0.02  # ... which sleeps 20 ms per step
    assert asynchronous["steps_max"] > 2 * sync["steps_max"], (sync, asynchronous)  # the others went on
    assert asynchronous["train_loss"] < sync["train_loss"], (sync, asynchronous)  # and got further
    starts = {r["curve"][0] for r in rows.values()}
    assert len(starts) == 1 and abs(starts.pop() - CHANCE_LOSS) < 0.1  # one initialisation, at chance
    for key, row in rows.items():
        assert len(row["curve"]) == 401 and row["curve"][-1] < row["curve"][0], key  # every run learned
        assert 0 < row["train_loss"] < CHANCE_LOSS and 0.1 < row["accuracy"] <= 1, (key, row)
        assert (row["time_to_target"] is None) == (row["reached"] == "0/1"), (key, row)
        assert row["time_to_target"] is None or 0 < row["time_to_target"] <= budget, (key, row)
        assert f"{row['train_loss']:.4f}" in output  # the printed table shows what was written
    assert _is_png(tmp_path / "async-gossip-np4.png")


def test_parameter_server_table(tmp_path: Path) -> None:
    output = _run(3, "async_server.py", ["--epochs", "2", "--seeds", "0", "--lrs", "0.03", "--methods",
                                         "asgdm,ormo", "--slow-fraction", "0.5", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "async-server-np3.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"asgdm", "ormo"} and result["tuned_lr"] == {"asgdm": 0.03, "ormo": 0.03}
    assert all(0 < loss < CHANCE_LOSS for tried in result["tuning"].values() for loss in tried.values())
    updates = set()
    for name in rows:
        assert set(rows[name]) == {"homogeneous", "heterogeneous"}
        for setting, row in rows[name].items():
            (loss, loss_std), (accuracy, accuracy_std) = row["train_loss"], row["accuracy"]
            assert 0 < loss < CHANCE_LOSS and 10 < accuracy <= 100 and loss_std == accuracy_std == 0, (name, row)
            assert 0 <= row["staleness_mean"] <= row["staleness_max"], (name, row)
            assert f"{loss:.4f}" in output  # the printed table shows what was written
            (curve,) = result["curves"][setting][name]  # one random seed: one curve of (seconds, update, loss)
            times, steps, losses = zip(*curve, strict=True)
            assert list(times) == sorted(times) and list(steps) == sorted(steps), (name, setting)
            assert abs(losses[0] - CHANCE_LOSS) < 0.1 and losses[-1] == loss, (name, setting)
            updates.add(steps[-1])
        # one of the two workers sleeps 10 ms per gradient: its gradients arrive stale
        assert rows[name]["heterogeneous"]["staleness_max"] >= 2, rows[name]
    assert len(updates) == 1  # every method and setting applies the same number of gradients
    assert _is_png(tmp_path / "async-server-np3.png")
