"""Every blocking collective of the runtime honours the op timeout: a rank 12 s late at ``init``,
``set_topology`` or ``shutdown`` makes the others raise OpTimeoutError naming the call within a few
seconds (op timeout 3 s), and the job then ends."""

import re
import sys
import time

import pytest

from tests.mpi_harness import TESTS, run_job

pytestmark = pytest.mark.mpi  # each case ends its job: one mpirun job per case

JOB = TESTS / "failure_jobs" / "late_rank.py"
BOUND = 60.0  # seconds for the whole job: far above what it needs, far below rank 2's lateness plus a hang
NOTICED = 9.0  # seconds after which ranks 0 and 1 must have raised (the timeout is 3 s)


@pytest.mark.parametrize("where", ["init", "set_topology", "shutdown"])
def test_a_late_rank_raises_op_timeout_on_the_others(where):
    started = time.monotonic()
    done = run_job(3, [sys.executable, str(JOB), where], BOUND, env={"GOSSIP_OP_TIMEOUT": "3"},
                   what=f"the job in which rank 2 is late at {where}")
    output = done.stdout
    assert done.returncode != 0, output[-4000:]
    assert "finished" not in output and "woke up" not in output, output[-4000:]  # ended while rank 2 slept
    if where == "init":  # init aborts the job itself, printing the error: the first to abort may end the other
        assert re.search(r"gossip: rank [01]: gossip.init has waited more than 3 s", output), output[-4000:]
        return
    for rank in (0, 1):
        found = re.search(rf"rank {rank}: OpTimeoutError after ([0-9.]+) s: (.*)", output)
        assert found, f"rank {rank} raised no OpTimeoutError:\n{output[-4000:]}"
        seconds, message = float(found.group(1)), found.group(2)
        assert 2.9 <= seconds < NOTICED, f"rank {rank} raised after {seconds} s"
        assert f"rank {rank}: {'gossip.' if where == 'shutdown' else ''}{where} has waited more than 3 s" in message, \
            message
    assert time.monotonic() - started < BOUND
