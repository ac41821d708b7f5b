"""One-sided windows' options under real mpirun (tests/mpi_scripts/windows_options.py): on one machine
(shared memory), over Open MPI's TCP transport with the RDMA one-sided component (what windows use
between machines), with CUDA tensors where a GPU is present; and window creation under the op
timeout when a rank is late."""

import re
import sys
import time

import pytest
import torch

from tests.mpi_harness import TESTS, Run, run_job, run_mpi

pytestmark = pytest.mark.mpi


def test_window_options_on_one_machine() -> None:
    """Shared memory; and CPU tensors staged through host buffers in chunks, the route of CUDA tensors."""
    staged = {"stage_host": True, "staging_chunk_bytes": 64}
    run_mpi([Run("windows_options.py", 4), Run("windows_options.py", 1), Run("windows_options.py", 4, staged)])


# Messages instead of shared memory for the runtime's own averaging, so that no shared-memory window
# is needed and osc/rdma (which cannot allocate one) can serve every window, over TCP.
RDMA_TCP = {"OMPI_MCA_btl": "tcp,self", "OMPI_MCA_osc": "rdma"}


def test_windows_over_tcp_with_the_rdma_component() -> None:
    settings = {"shared_memory": False}
    run_mpi([Run("windows_options.py", 4, settings), Run("windows.py", 4, settings)], env=RDMA_TCP)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_window_options_with_cuda_tensors() -> None:
    cuda = {"device": "cuda"}
    run_mpi([Run("windows_options.py", 4, {"cuda_aware": False}, cuda), Run("windows_options.py", 4, {}, cuda)])


def test_a_late_rank_makes_window_creation_time_out() -> None:
    """Rank 2 of 3 reaches Window creation 12 s late, the op timeout is 3 s: ranks 0 and 1 raise
    OpTimeoutError naming the creation well before rank 2 arrives, and the job ends."""
    started = time.monotonic()
    done = run_job(3, [sys.executable, str(TESTS / "failure_jobs" / "window_late_rank.py")], 90.0,
                   what="the job with a rank late to window creation")
    output = done.stdout
    assert done.returncode != 0, output[-4000:]
    waits = {int(r): float(s) for r, s in re.findall(r"rank (\d): OpTimeoutError after ([\d.]+) s", output)}
    assert set(waits) & {0, 1}, output[-4000:]
    assert all(s < 9.0 for s in waits.values()), waits
    assert "window 'late' creation has waited more than 3 s" in output, output[-4000:]
    assert "created the window" not in output, output[-4000:]
    assert time.monotonic() - started < 90.0
