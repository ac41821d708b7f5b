"""benchmarks/topology_consensus.py runs end to end: predicted curves, table, plot, and the MPI measurement."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.tools.launch import launch_env, mpirun_command

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "topology_consensus.py"


def _env() -> dict[str, str]:
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.end_to_end
def test_predicted_curves_table_and_plot(tmp_path: Path) -> None:
    steps, message = 12, 4 << 20  # the default --message-mb 4
    done = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "6,8", "--steps", str(steps), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "topologies-consensus.json").read_text())
    assert set(results) == {"6", "8"} and set(results["6"]) == set(results["8"]) >= {
        "ring", "exponential-2", "fully connected", "one-peer exp-2", "Base-2", "OD-EquiDyn"}
    for n, rows in results.items():
        for name, row in rows.items():
            error = row["error"]
            assert len(error) == steps + 1 and abs(error[0] - 1) < 1e-12, (n, name)
            assert all(0 <= e <= 1 + 1e-12 for e in error), (n, name)  # never further from consensus than at start
            sent = row["bytes_per_step"]  # by the busiest rank: whole messages, at most one per neighbour
            assert sent % message == 0 and message <= sent <= row["max_degree"] * message, (n, name)
            if name in ("ring", "exponential-2", "fully connected"):  # static: every neighbour, every step
                assert sent == row["max_degree"] * message, (n, name)
            reached = [k for k, e in enumerate(error) if e <= 1e-6]
            if reached:  # within the curve: the first step at 1e-6
                assert row["steps_to_1e-6"] == reached[0], (n, name, row["steps_to_1e-6"])
            else:
                assert row["steps_to_1e-6"] > steps, (n, name)
        assert rows["fully connected"]["max_degree"] == int(n) - 1 and rows["ring"]["max_degree"] == 2
        assert rows["one-peer exp-2"]["max_degree"] == rows["Base-2"]["max_degree"] == 1
    ring = results["8"]["ring"]["error"]
    rho = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8)
    assert all(abs(e - rho**k) < 1e-12 for k, e in enumerate(ring))
    assert results["8"]["one-peer exp-2"]["error"][3] < 1e-14  # exact after log2(8) steps
    assert results["6"]["Base-2"]["error"][4] < 1e-14  # Base-2 on 6 nodes: exact after 4 steps
    assert results["6"]["one-peer exp-2"]["error"][4] > 1e-3
    assert (tmp_path / "topologies-consensus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
@pytest.mark.end_to_end
def test_measured_under_mpi_matches_prediction(tmp_path: Path) -> None:
    cmd = mpirun_command(4, [sys.executable, str(SCRIPT), "--measure", "--measure-steps", "6", "--numel", "64",
                             "--sizes", "4", "--steps", "4", "--no-plot", "--out", str(tmp_path)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads((tmp_path / "topologies-measured-np4.json").read_text())
    assert set(rows) >= {"ring", "Base-2", "one-peer exp-2", "OD-EquiDyn"}
    for name, row in rows.items():
        assert len(row["measured"]) == 6
        for measured, predicted, bound in zip(row["measured"], row["predicted"], row["worst_case"], strict=True):
            assert abs(measured - predicted) < 1e-12, name
            assert measured <= bound + 1e-12, name
