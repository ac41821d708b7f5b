"""DiLoCo and streaming DiLoCo under real mpirun: ``tests/mpi_scripts/algorithms_diloco.py`` at 1, 3
and 4 ranks, and once with MPI messages of several MB (a 2.4 MB float64 model; shared memory off, so
neighbour averages go as chunked point-to-point messages, with the debug checks that a buffer in
flight is left untouched); on a GPU too where there is one; and a fault-tolerant job in which a rank
dies and the survivors' optimizers go on."""

import json
import sys

import pytest
import torch

from gossip.tools.launch import fault_tolerant_flags
from tests.mpi_harness import TESTS, Run, run_job, run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = "algorithms_diloco.py"
LARGE = {"shared_memory": False, "debug_buffers": True, "message_chunk_bytes": 1 << 14}


def test_diloco_under_mpirun() -> None:
    run_mpi([Run(SCRIPT, 1), Run(SCRIPT, 3), Run(SCRIPT, 4), Run(SCRIPT, 4, LARGE, {"hidden": 3000})])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_diloco_on_cuda() -> None:
    cuda = {"device": "cuda"}
    run_mpi([Run(SCRIPT, 4, {"cuda_aware": False}, cuda), Run(SCRIPT, 4, {}, cuda)])


def test_diloco_continues_after_a_rank_failure() -> None:
    """4 ranks under ``mpirun --with-ft ulfm`` (gossiprun --fault-tolerant's flags); rank 2 dies by SIGKILL,
    the survivors recover and go on, each step checked against NumPy (the script's recovery_job)."""
    command = [*fault_tolerant_flags(), sys.executable, str(TESTS / "mpi_scripts" / SCRIPT), "recovery"]
    done = run_job(4, command, 120.0, what="the fault-tolerant DiLoCo job")
    reports = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and reports, done.stdout[-6000:]
    assert sorted(r["origin"] for r in reports) == [0, 1, 3], reports
    for report in reports:
        assert report["size"] == 3 and report["checked"] >= 20, report
        assert all("failed" in text or "revoked" in text for text in report["raised"].values()), report
