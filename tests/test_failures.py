"""Failure behaviour of whole jobs: a rank that raises, dies or hangs ends the job, naming the rank."""

import sys
import time

import pytest

from tests.mpi_harness import TESTS, run_job

pytestmark = pytest.mark.mpi  # each failure must end its own job: one mpirun job per mode

JOB = TESTS / "failure_jobs" / "rank_failure.py"
BOUND = 90.0  # seconds: far above what the job needs to notice (a few seconds), far below a hang


@pytest.mark.parametrize("mode,evidence", [
    ("raise", "gossip: rank 2 of 4 failed with an uncaught RuntimeError"),
    ("kill", "rank 2"),
    ("stuck", "has waited more than 3 s"),
])
def test_a_failed_rank_ends_the_job_within_bounded_time(mode, evidence):
    started = time.monotonic()
    done = run_job(4, [sys.executable, str(JOB), mode], BOUND, env={"GOSSIP_OP_TIMEOUT": "3"},
                   what=f"the job in which rank 2 failed ({mode})")
    output = done.stdout
    elapsed = time.monotonic() - started
    assert done.returncode != 0, output[-4000:]
    assert "finished without noticing" not in output
    assert evidence in output, output[-4000:]
    assert elapsed < BOUND
