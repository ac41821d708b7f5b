"""benchmarks/periodic_averaging.py and benchmarks/dynamic_batch.py end to end on 4 real ranks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.mpi_harness import REPO, run_job


def _run(script: str, args: list[str], timeout: float = 240) -> str:
    done = run_job(4, [sys.executable, str(REPO / "benchmarks" / script), *args], timeout, what=script)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def test_mavg_and_slowmo_tables(tmp_path: Path) -> None:
    output = _run("periodic_averaging.py", ["--seeds", "0", "--epochs", "2", "--periods", "2,4", "--mus", "0,0.5",
                                            "--betas", "0,0.5", "--lrs", "0.1,0.2", "--out", str(tmp_path)])
    assert "K-AVG" in output and "μ = 0.5" in output and "SlowMo β = 0.5" in output and "bare base" in output
    mavg = json.loads((tmp_path / "periodic-mavg-np4.json").read_text())["results"]
    assert {(r["period"], r["mu"]) for r in mavg} == {(2, 0.0), (2, 0.5), (4, 0.0), (4, 0.5)}
    assert all(0 < r["train_loss"] < 3 and r["lr"] in (0.1, 0.2) for r in mavg)
    slowmo = json.loads((tmp_path / "periodic-slowmo-np4.json").read_text())["results"]
    assert {(r["base"], r["beta"]) for r in slowmo} >= {("DSGD (ring)", None), ("DSGD (ring)", 0.5),
                                                         ("local SGD (momentum 0.9)", 0.0)}
    assert (tmp_path / "periodic-mavg-np4.png").stat().st_size > 5_000


def test_cr_psgd_needs_logarithmically_many_rounds(tmp_path: Path) -> None:
    output = _run("dynamic_batch.py", ["--seeds", "0", "--budgets", "400,1600", "--out", str(tmp_path)])
    assert "rounds as T grows" in output
    results = json.loads((tmp_path / "dynamic-batch-np4.json").read_text())["results"]

    def rounds(method: str, budget: int) -> int:
        return next(r["rounds"] for r in results if r["method"].startswith(method) and r["budget"] == budget)

    assert rounds("PSGD, batch 4", 1600) == 400 and rounds("PSGD, batch 4", 400) == 100
    cr_small, cr_large = rounds("CR-PSGD (", 400), rounds("CR-PSGD (", 1600)
    assert cr_large < 2 * cr_small and cr_large < 400 / 4  # ×4 budget: rounds grow additively, not ×4
    final = {r["method"]: r["final"] for r in results if r["budget"] == 1600}
    assert final[next(m for m in final if m.startswith("CR-PSGD ("))] < final["PSGD, batch 4"]
    assert (tmp_path / "dynamic-batch-np4.png").stat().st_size > 5_000
