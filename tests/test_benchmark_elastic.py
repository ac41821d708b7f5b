"""benchmarks/elastic.py end to end in its smallest form: one uninterrupted run and one run in which a
rank kills itself, on real ranks under gossiprun --fault-tolerant; the JSON it writes against the runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import REPO

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]


def test_a_trial_survives_and_is_summarized(tmp_path: Path) -> None:
    out = tmp_path / "elastic.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "elastic.py"), "--families", "global",
                           "--ranks", "3", "--kill", "1", "--trials", "1", "--epochs", "2", "--timeout", "150",
                           "--out", str(out)], capture_output=True, text=True, timeout=400, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    row, = result["summary"]
    trial, = result["runs"]["global"]["trials"]
    assert row["family"] == "global" and row["finished"] == row["trials"] == 1 and row["hung"] == 0, row
    assert trial["outcome"] == "finished" and len(trial["failures"]) == 1, trial
    failure = trial["failures"][0]
    victim, step = (int(v) for v in trial["inject"].split(":"))
    assert failure["failed"] == [victim] and failure["ranks"] == 2 and failure["step"] >= step, failure
    assert 0 < failure["stall_seconds"] < 60 and failure["recover_seconds"] <= failure["stall_seconds"], failure
    assert row["accuracy_median"] == trial["accuracy"] and 0.3 < trial["accuracy"] <= 1, row
    assert result["runs"]["global"]["baseline"]["outcome"] == "finished"
    assert "| global | 1 / 1 | 0 |" in out.with_suffix(".txt").read_text()
