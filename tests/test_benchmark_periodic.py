"""benchmarks/periodic_averaging.py and benchmarks/dynamic_batch.py end to end on 4 real ranks: the
numbers they write (JSON) against what the benchmarks claim."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_harness import REPO, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]
CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 digits


def _run(script: str, args: list[str], timeout: float = 240) -> str:
    done = run_job(4, [sys.executable, str(REPO / "benchmarks" / script), *args], timeout, what=script)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sane(row: dict) -> None:
    assert 0 < row["train_loss"] < CHANCE_LOSS, row
    assert 0.1 < row["averaged_accuracy"] <= 1 and 0 < row["rank_accuracy"] <= 1, row
    assert row["consensus_distance"] >= 0 and row["steps"] > 0, row


def test_mavg_and_slowmo_tables(tmp_path: Path) -> None:
    _run("periodic_averaging.py", ["--seeds", "0", "--epochs", "2", "--periods", "2,4", "--mus", "0,0.5",
                                   "--betas", "0,0.5", "--lrs", "0.1,0.2", "--out", str(tmp_path)])
    mavg = json.loads((tmp_path / "periodic-mavg-np4.json").read_text())["results"]
    assert sorted((r["period"], r["mu"]) for r in mavg) == [(2, 0.0), (2, 0.5), (4, 0.0), (4, 0.5)]
    assert len({r["steps"] for r in mavg}) == 1  # equal samples for every K and μ
    for period in (2, 4):
        runs = {r["mu"]: r for r in mavg if r["period"] == period}
        assert runs[0.0]["lr"] == runs[0.5]["lr"] in (0.1, 0.2)  # tuned for K-AVG, then held for every μ
        for r in runs.values():
            _sane(r)
            # the models are averaged every K steps: exactly equal after a step that averaged
            averaged_last = r["steps"] % period == 0
            assert (r["consensus_distance"] == 0) == averaged_last, r
            assert (r["averaged_accuracy"] == r["rank_accuracy"]) or not averaged_last, r
        assert runs[0.5]["train_loss"] < runs[0.0]["train_loss"], runs  # MAVG's meta momentum helps here
    slowmo = json.loads((tmp_path / "periodic-slowmo-np4.json").read_text())["results"]
    assert sorted((r["base"], -1 if r["beta"] is None else r["beta"]) for r in slowmo) == [
        ("DSGD (ring)", -1), ("DSGD (ring)", 0.0), ("DSGD (ring)", 0.5),
        ("local SGD (momentum 0.9)", 0.0), ("local SGD (momentum 0.9)", 0.5)]
    assert len({r["steps"] for r in slowmo}) == 1  # equal steps
    for base in ("DSGD (ring)", "local SGD (momentum 0.9)"):
        assert len({r["lr"] for r in slowmo if r["base"] == base}) == 1  # tuned for the bare base, then held
    for r in slowmo:
        _sane(r)
    bare = next(r for r in slowmo if r["beta"] is None)
    assert bare["consensus_distance"] > 0  # DSGD on a ring never averages exactly
    assert _is_png(tmp_path / "periodic-mavg-np4.png") and _is_png(tmp_path / "periodic-slowmo-np4.png")


def test_cr_psgd_needs_logarithmically_many_rounds(tmp_path: Path) -> None:
    _run("dynamic_batch.py", ["--seeds", "0", "--budgets", "400,1600", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "dynamic-batch-np4.json").read_text())
    results = saved["results"]
    methods = ("PSGD, batch 4", "PSGD, batch 64", "CR-PSGD (", "CR-PSGD-Catalyst")
    assert sorted((next(m for m in methods if r["method"].startswith(m)), r["budget"]) for r in results) == sorted(
        (m, b) for m in methods for b in (400, 1600))  # every method at every budget, once
    assert math.isfinite(saved["f_star"])
    first_loss = {r["curve"][0][2] for r in results}
    assert len(first_loss) == 1  # every method starts from the same point
    for r in results:
        rounds, samples, suboptimality = np.array(r["curve"]).T
        assert list(rounds) == list(range(r["rounds"] + 1)), r["method"]
        assert samples[-1] == r["samples"] <= r["budget"] and np.all(np.diff(samples) > 0), r["method"]
        assert suboptimality[-1] == r["final"] and np.all(suboptimality > -1e-9), r["method"]  # f(x) - f* >= 0
        assert r["final"] < suboptimality[0], r["method"]  # every method made progress
        if r["method"].startswith("CR-PSGD ("):
            assert np.all(np.diff(np.diff(samples)) >= 0), r["method"]  # batches only grow

    def rounds(method: str, budget: int) -> int:
        return next(r["rounds"] for r in results if r["method"].startswith(method) and r["budget"] == budget)

    assert rounds("PSGD, batch 4", 1600) == 400 and rounds("PSGD, batch 4", 400) == 100
    cr_small, cr_large = rounds("CR-PSGD (", 400), rounds("CR-PSGD (", 1600)
    assert cr_large < 2 * cr_small and cr_large < 400 / 4  # ×4 budget: rounds grow additively, not ×4
    final = {r["method"]: r["final"] for r in results if r["budget"] == 1600}
    assert final[next(m for m in final if m.startswith("CR-PSGD ("))] < final["PSGD, batch 4"]
    assert _is_png(tmp_path / "dynamic-batch-np4.png")
