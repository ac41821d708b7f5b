"""The parameter server in fault-tolerant mode under real ``mpirun --with-ft ulfm``: a dead worker is
survived (tests/mpi_scripts/fault_tolerance_server.py, and ``train_server.py --elastic``), a dead
server ends every worker with gossip.RankFailure naming it; and OrMo's groups when K changes."""

import json
import sys

import pytest
import torch

from algorithms.server_rules import OrMo, OrMoDA
from gossip.tools.launch import fault_tolerant_flags
from tests.mpi_harness import REPO, TESTS, run_job

JOB = TESTS / "mpi_scripts" / "fault_tolerance_server.py"
TRAIN_SERVER = REPO / "mpirun_examples" / "train_server.py"
BOUND = 120.0  # seconds per job: 10-20 s on 2 cores; a hang anywhere ends the test well before this


def reports(case: str, tmp_path) -> list[dict]:
    """The survivors' reports of one 4-rank job of the script, started as ``gossiprun --fault-tolerant`` would."""
    command = [*fault_tolerant_flags(), sys.executable, str(JOB), case, str(tmp_path)]
    done = run_job(4, command, BOUND, what=f"the fault-tolerant parameter-server job {case}")
    found = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and found, done.stdout[-6000:]
    return sorted(found, key=lambda r: r["origin"])


def train_server(np: int, args: list[str], tmp_path, flags: bool = True):
    command = [*(fault_tolerant_flags() if flags else []), sys.executable, str(TRAIN_SERVER), "--no-progress",
               "--log-dir", str(tmp_path / "log"), *args]
    return run_job(np, command, BOUND, what=f"train_server.py {args}")


@pytest.mark.mpi
def test_the_server_goes_on_without_a_dead_worker(tmp_path):
    server, worker = reports("worker", tmp_path)
    assert [server["origin"], worker["origin"]] == [0, 1] and server["size"] == worker["size"] == 2, (server, worker)
    small, large = server["rounds"]
    # worker 3 died after a push: its gradients until then were applied, then it was dropped, once
    assert small["applied"] == 60 and [f["worker"] for f in small["failures"]] == [3], small
    assert small["from"] == [1, 2, 3], small
    # the new rank 2 died a moment into a 4 MB gradient: the server, receiving it, dropped it mid-stream
    assert large["applied"] == 30 and [f["worker"] for f in large["failures"]] == [2], large
    assert large["failures"][0]["applied"] < 30 and large["from"] == [1, 2], large
    assert all(f["detect_s"] < 5.0 for f in small["failures"] + large["failures"]), server
    assert all(r["stopped"] and r["steps"] > 0 for r in worker["rounds"]), worker  # the survivor ran to the end
    for report in (server, worker):
        assert [r["failed"] for r in report["recoveries"]] == [[3], [2]], report
        assert all(r["seconds"] < 5.0 for r in report["recoveries"]), report


@pytest.mark.mpi
def test_a_dead_server_ends_every_worker_naming_it(tmp_path):
    survivors = reports("server", tmp_path)
    assert [r["origin"] for r in survivors] == [2, 3], survivors
    for report in survivors:
        single, sharded = report["rounds"]
        assert single["role"] == "worker" and "the parameter server (rank 0 of 4) failed" in single["raised"], single
        assert "the parameter server (rank 0 of 3) failed" in sharded["raised"], sharded
        assert single["detect_s"] < 5.0 and sharded["detect_s"] < 5.0, report
        assert [r["failed"] for r in report["recoveries"]] == [[0], [0]], report
    assert [r["rounds"][1]["role"] for r in survivors] == ["server", "worker"]  # the other server raised too


@pytest.mark.mpi
@pytest.mark.end_to_end
def test_train_server_elastic_survives_a_dead_worker(tmp_path):
    # 270 updates: worker 2 takes its 30 steps first, however unevenly the two workers are scheduled
    done = train_server(3, ["--elastic", "--inject-failure", "2:30", "--epochs", "3", "--batch-size", "16"], tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    lines = [line for line in done.stdout.splitlines() if "failed at step" in line]
    assert len(lines) == 1 and lines[0].startswith("rank 2 failed at step ") and \
        lines[0].endswith("; continuing with 1 worker"), done.stdout[-4000:]
    log = json.loads((tmp_path / "log" / "log.json").read_text())
    failure = log["failures"][0]
    assert [f["failed"] for f in log["failures"]] == [[2]] and failure["workers"] == 1, log["failures"]
    # its 30th and last gradient arrived after at least 29 updates; noticed then or later
    assert 29 <= failure["step"] <= failure["noticed_at_step"] <= 270, failure
    records = log["epochs"]
    assert [r["epoch"] for r in records] == [1, 2, 3], records
    # it learned (chance: 10 %, loss ln 10 = 2.30), and went on learning after the failure
    assert records[-1]["train_loss"] < 1.5 and max(r["test_accuracy"] for r in records) > 0.6, records


@pytest.mark.mpi
@pytest.mark.end_to_end
def test_train_server_ends_clearly_when_the_server_dies(tmp_path):
    done = train_server(3, ["--elastic", "--inject-failure", "0:20", "--epochs", "2"], tmp_path)
    assert done.returncode == 4, done.stdout[-4000:]
    lines = [line for line in done.stdout.splitlines() if "failed at step" in line]
    assert len(lines) == 1 and lines[0].startswith("train_server.py: the parameter server (rank 0) failed at step "), \
        done.stdout[-4000:]
    assert "MPI_ABORT" not in done.stdout and "Traceback" not in done.stdout, done.stdout[-4000:]


@pytest.mark.mpi
@pytest.mark.end_to_end
def test_train_server_elastic_needs_a_fault_tolerant_job(tmp_path):
    done = train_server(2, ["--elastic"], tmp_path, flags=False)
    assert done.returncode == 2, done.stdout[-4000:]
    assert done.stdout.count("gossiprun --fault-tolerant") == 1 and "Traceback" not in done.stdout, done.stdout[-4000:]


# --- OrMo when the number of workers changes (no MPI) -----------------------------------------------

def test_ormo_groups_keep_their_past_and_follow_the_new_k():
    rule = OrMo(0.1, 0.9, workers=3)
    w = torch.zeros(2, dtype=torch.float64)
    for _ in range(5):  # server iterations 0..4
        rule.apply(w, torch.ones(2, dtype=torch.float64), rule.t)
    before = [rule.group(i) for i in range(7)]
    rule.set_workers(2)  # t = 5 lies in group 2 = {4, 5, 6}: indices up to 6 keep their groups
    assert [rule.group(i) for i in range(7)] == before == [0, 1, 1, 1, 2, 2, 2]
    assert [rule.group(i) for i in range(7, 12)] == [3, 3, 4, 4, 5]  # then groups of 2
    rule.set_workers(1)  # still before index 6 ends: the boundary stays, the width changes
    assert [rule.group(i) for i in range(5, 10)] == [2, 2, 3, 4, 5] and rule.workers == 1
    copy = OrMo(0.1, 0.9, workers=3)
    copy.load_state_dict(rule.state_dict())
    assert copy.pieces == rule.pieces and copy.workers == 1 and [copy.group(i) for i in range(12)] == \
        [rule.group(i) for i in range(12)]


def test_ormo_down_to_one_worker_is_heavy_ball_momentum_from_the_next_group():
    """K' = 1 with fresh gradients: once past the current group, OrMo is u ← βu + ηg; w ← w − u."""
    lr, beta = 0.1, 0.8
    rule = OrMo(lr, beta, workers=2)
    w = torch.zeros(3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        rule.apply(w, torch.randn(3, generator=gen, dtype=torch.float64), rule.t)
    rule.set_workers(1)
    for _ in range(2):  # the rest of the current group (indices up to 4)
        rule.apply(w, torch.randn(3, generator=gen, dtype=torch.float64), rule.t)
    u, x = rule.u.clone(), w.clone()
    for _ in range(6):
        g = torch.randn(3, generator=gen, dtype=torch.float64)
        rule.apply(w, g, rule.t)
        u = beta * u + lr * g
        x = x - u
        assert torch.allclose(w, x, atol=1e-14) and torch.allclose(rule.u, u, atol=1e-14)


def test_ormo_da_steps_with_the_live_workers():
    rule = OrMoDA(1.0, 0.5, workers=4)
    rule.t = 10
    assert rule.step_size(2) == pytest.approx(0.5)  # staleness 8, K = 4
    rule.set_workers(2)
    assert rule.step_size(2) == pytest.approx(0.25)  # K' = 2
    with pytest.raises(ValueError, match="workers"):
        rule.set_workers(0)
