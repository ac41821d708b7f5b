"""train.py --elastic end to end under real ``mpirun --with-ft ulfm`` (gossiprun --fault-tolerant): ranks
killed with SIGKILL while training, from outside (``kill -9``) and by ``--inject-failure``; the survivors
recover, re-split the data, log one line per failure, train to the end with a falling loss, and write
their checkpoints on the new number of ranks. Without --elastic a dead rank ends the run in one line."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from gossip.tools.launch import fault_tolerant_flags
from tests.mpi_harness import REPO, job_rank_pids, run_job, start_job

TRAIN = REPO / "mpirun_examples" / "train.py"
BOUND = 240.0  # seconds per job: 15 to 30 s on 2 cores; a hang ends the test well before this
RUN = ["--epochs", "6", "--batch-size", "16", "--no-progress", "--op-timeout", "60"]


def mpi(test):
    return pytest.mark.mpi(pytest.mark.end_to_end(test))


def _command(args: list[str]) -> list[str]:
    return [*fault_tolerant_flags(), sys.executable, str(TRAIN), *args]


def _log(directory: Path) -> dict:
    return json.loads((directory / "log.json").read_text())


def _trained_through(log: dict, epochs: int) -> None:
    """Every epoch logged once, the loss falling, the averaged model learning."""
    records = log["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1)), records
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"], records
    assert records[-1]["test_accuracy_averaged"] > 0.8, records[-1]


@mpi
def test_kill_minus_nine_and_the_logging_rank_dies_later(tmp_path):
    """Launch rank 2 killed from outside after the first epoch, launch rank 0 (which prints and writes
    the log) killing itself later: two recoveries, 4 -> 3 -> 2 ranks, one-peer exponential-2 rebuilt
    each time, checkpoints on 2 ranks at the end."""
    logs, checkpoints = tmp_path / "log", tmp_path / "checkpoints"
    proc = start_job(4, _command([*RUN, "--elastic", "--inject-failure", "0:60", "--log-dir", str(logs),
                                  "--checkpoint-dir", str(checkpoints)]))
    try:
        deadline = time.monotonic() + BOUND
        while not (logs / "log.json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = job_rank_pids(proc.pid, TRAIN)
        assert 2 in pids and proc.poll() is None, f"the job did not reach its first epoch: {pids}"
        os.kill(pids[2], signal.SIGKILL)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, output[-6000:]
    first = re.search(r"^rank 2 failed at step (\d+); continuing on 3 ranks \(recovered in [\d.]+ s\)$", output, re.M)
    second = re.search(r"^rank 0 failed at step (6\d); continuing on 2 ranks", output, re.M)
    assert first and second, output[-6000:]
    log = _log(logs)
    _trained_through(log, 6)
    assert [f["failed"] for f in log["failures"]] == [[2], [0]]
    assert [f["ranks"] for f in log["failures"]] == [3, 2]
    meta = json.loads((checkpoints / (checkpoints / "latest").read_text().strip() / "checkpoint.json").read_text())
    assert meta["ranks"] == 2 and meta["info"]["epoch"] == 6, meta


@mpi
def test_a_machine_leader_dies_in_hierarchical_gossip(tmp_path):
    """Two pretended machines of two ranks; rank 2 leads the second. The survivors rebuild the machines
    (one of two ranks, one of one) and train on with hierarchical gossip."""
    logs = tmp_path / "log"
    done = run_job(4, _command([*RUN, "--elastic", "--topology", "hierarchical", "--inject-failure", "2:10",
                                "--log-dir", str(logs)]), BOUND, env={"GOSSIP_RANKS_PER_MACHINE": "2"},
                   what="train.py --elastic --topology hierarchical")
    assert done.returncode == 0, done.stdout[-6000:]
    assert re.search(r"^rank 2 failed at step 1\d; continuing on 3 ranks", done.stdout, re.M), done.stdout[-6000:]
    _trained_through(_log(logs), 6)


@mpi
def test_without_elastic_a_dead_rank_ends_the_run_in_one_line(tmp_path):
    done = run_job(4, _command([*RUN, "--inject-failure", "1:5", "--log-dir", str(tmp_path / "log")]), BOUND,
                   env={"GOSSIP_FAULT_TOLERANT": "1"}, what="train.py in fault-tolerant mode without --elastic")
    lines = [line for line in done.stdout.splitlines() if line.startswith("train.py: rank")]
    assert lines == ["train.py: rank 1 failed at step 5: the run ends (with --elastic the survivors would continue)"], \
        done.stdout[-6000:]
    assert done.returncode != 0 and "Traceback" not in done.stdout, done.stdout[-6000:]


@mpi
def test_push_sum_on_a_static_graph_is_rebuilt_for_the_survivors(tmp_path):
    """--topology exp2 reaches the optimizer as a builder, so SGP's push-sum schedule is rebuilt on 3 ranks."""
    logs = tmp_path / "log"
    done = run_job(4, _command([*RUN, "--elastic", "--algorithm", "sgp", "--topology", "exp2", "--inject-failure",
                                "1:12", "--log-dir", str(logs)]), BOUND, what="train.py --elastic sgp on exp2")
    assert done.returncode == 0, done.stdout[-6000:]
    assert re.search(r"^rank 1 failed at step 1\d; continuing on 3 ranks", done.stdout, re.M), done.stdout[-6000:]
    _trained_through(_log(logs), 6)
