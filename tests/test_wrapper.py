"""GossipWrapper (any torch.optim optimizer with gossip) under real mpirun:
``tests/mpi_scripts/algorithms_wrapper.py`` on 2 ranks, on 4 ranks as 2 machines of 2 (hierarchical
gossip), and once with messages of several MB (a 2.1 MB float64 model; shared memory off, so
neighbour averages go as chunked point-to-point messages, with the debug checks that a buffer in
flight is left untouched); and train.py's digits MLP trained briefly with AdamW inside."""

import json
import sys

import pytest

from tests.mpi_harness import REPO, Run, run_job, run_mpi

pytestmark = pytest.mark.mpi

SCRIPT = "algorithms_wrapper.py"


def test_wrapper_under_mpirun() -> None:
    run_mpi([Run(SCRIPT, 2), Run(SCRIPT, 4, {"ranks_per_machine": 2}),
             Run(SCRIPT, 4, {"shared_memory": False, "debug_buffers": True, "message_chunk_bytes": 1 << 14},
                 {"hidden": 3000})])


@pytest.mark.end_to_end
def test_train_py_with_adamw_inside(tmp_path) -> None:
    """4 ranks, 4 epochs of digits, AdamW adapt-while-combine on one-peer exponential-2: the averaged model
    learns (a loose bound; the comparison with gradient allreduce is a measurement, in the README)."""
    command = [sys.executable, str(REPO / "mpirun_examples" / "train.py"), "--algorithm", "gossip-wrapper",
               "--inner", "adamw", "--communication", "neighbor_allreduce", "--form", "awc", "--topology",
               "one-peer-exp2", "--lr", "0.003", "--epochs", "4", "--no-progress", "--log-dir", str(tmp_path)]
    done = run_job(4, command, 180.0, what="train.py --algorithm gossip-wrapper")
    assert done.returncode == 0, done.stdout[-4000:]
    assert "combined before each AdamW step, overlapped" in done.stdout, done.stdout[-4000:]
    epochs = json.loads((tmp_path / "log.json").read_text())["epochs"]
    assert len(epochs) == 4 and epochs[-1]["test_accuracy_averaged"] > 0.8, epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], epochs
