"""benchmarks/resize.py end to end in its smallest form: 2 epochs, uninterrupted on 2 and on 1 rank, and
2 ranks for the first epoch resumed on 1; the JSON and the table it writes against the runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import REPO

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]


def test_a_resumed_run_is_compared_with_the_uninterrupted_ones(tmp_path: Path) -> None:
    out = tmp_path / "resize.json"
    command = [sys.executable, str(REPO / "benchmarks" / "resize.py"), "--resizes", "2:1", "--epochs", "2",
               "--timeout", "200", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["settings"]["resizes"] == ["2:1"] and result["settings"]["switch"] == 1
    assert set(result["curves"]) == {"2", "1", "2->1"}
    for curve in result["curves"].values():
        assert [p["epoch"] for p in curve] == [1, 2], curve
        assert all(0 < p["train_loss"] < 3 and 0 <= p["accuracy"] <= 1 for p in curve), curve
    resized = result["runs"]["2->1"]
    assert resized["first"]["ranks"] == 2 and resized["resumed"]["ranks"] == 1
    assert resized["resume_line"].startswith("resumed from 2 ranks onto 1: models averaged"), resized
    # the first epoch is the 2-rank run's (same seed, same data, same steps); the second is on 1 rank
    assert result["curves"]["2->1"][0] == result["curves"]["2"][0]
    assert result["curves"]["2->1"][1] != result["curves"]["2"][1]
    verdict = result["verdicts"]["2->1"]
    assert verdict["checkpoint_epoch"] == 1 and verdict["loss_after"] == result["curves"]["2->1"][1]["train_loss"]
    assert isinstance(verdict["continues"], bool) and isinstance(verdict["comparable"], bool)
    assert result["noise"]["accuracy"] >= 0.01 and result["noise"]["loss_relative"] >= 0.05
    text = out.with_suffix(".txt").read_text()
    assert "| epoch | 2 ranks: loss / acc % | 1 rank: loss / acc % | 2->1: loss / acc % |" in text, text
    assert "2->1: epoch 2 on the new ranks" in text, text
