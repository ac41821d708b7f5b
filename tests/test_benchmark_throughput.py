"""benchmarks/throughput.py end to end on 4 real ranks: Horovod-format lines, JSON with every method, chart."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import REPO, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]
SCRIPT = REPO / "benchmarks" / "throughput.py"


def test_gossip_and_both_allreduce_baselines_in_one_run(tmp_path: Path) -> None:
    args = ["--model", "mlp", "--width", "64", "--batch-size", "8", "--num-warmup-batches", "2",
            "--num-batches-per-iter", "2", "--num-iters", "3", "--topology", "one-peer-exp2,ring",
            "--out", str(tmp_path)]
    done = run_job(4, [sys.executable, str(SCRIPT), *args], 180, what="throughput.py")
    output = done.stdout
    assert done.returncode == 0, output[-4000:]
    saved = json.loads((tmp_path / "throughput-mlp-w64-np4.json").read_text())
    methods = ["dmsgd on one-peer-exp2", "dmsgd on ring", "PmSGD (gossip.allreduce)", "DDP (gloo)"]
    assert [r["method"] for r in saved["results"]] == methods  # every requested configuration, in order
    assert len({r["parameters"] for r in saved["results"]}) == 1  # every method trains the same model
    assert saved["results"][0]["parameters"] == (784 * 64 + 64) + 2 * (64 * 64 + 64) + (64 * 10 + 10)  # --width 64
    assert saved["args"]["topology"] == "one-peer-exp2,ring" and saved["args"]["num_iters"] == 3
    for result in saved["results"]:
        method, per_rank, ci, total = result["method"], result["per_rank_mean"], result["per_rank_ci"], result["total"]
        assert per_rank > 0 and ci >= 0 and total == pytest.approx(4 * per_rank, rel=1e-9), result
        # the Horovod-format line printed for it carries the same numbers
        line = re.search(re.escape(method) + r": samples/sec per rank: ([\d.]+) \+- ([\d.]+); "
                         r"total on 4 ranks: ([\d.]+)", output)
        assert line, f"no Horovod-format line for {method}:\n{output[-4000:]}"
        assert [float(v) for v in line.groups()] == pytest.approx([per_rank, ci, total], abs=0.051), line.group(0)
    assert (tmp_path / "throughput-mlp-w64-np4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
