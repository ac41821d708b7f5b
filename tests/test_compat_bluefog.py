"""``gossip.compat.bluefog`` (BlueFog's API) under real mpirun, and BlueFog's example programs rewritten
against it (mpirun_examples/bluefog/) as smoke tests.

One job runs every closed-form check of tests/mpi_scripts/compat_bluefog.py on 4 ranks pretending
two machines of two ranks (hierarchical averaging and machine ranks included)."""

import sys
from pathlib import Path

import pytest

from tests.mpi_harness import Run, run_job, run_mpi

pytestmark = pytest.mark.mpi

EXAMPLES = Path(__file__).resolve().parent.parent / "mpirun_examples" / "bluefog"


def test_bluefog_api_closed_forms() -> None:
    run_mpi([Run("compat_bluefog.py", 4, {"ranks_per_machine": 2})])


def _example(name: str, *args: str, timeout: float = 240) -> str:
    done = run_job(4, [sys.executable, str(EXAMPLES / name), *args], timeout)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def test_average_consensus_reaches_the_mean() -> None:
    out = _example("average_consensus.py", "--iterations", "60")
    assert "consensus reached" in out, out[-2000:]


def test_digits_training_learns() -> None:
    out = _example("digits_training.py", "--epochs", "4", "--min-accuracy", "0.7")
    assert "test accuracy" in out, out[-2000:]


def test_benchmark_prints_images_per_second() -> None:
    out = _example("benchmark.py", "--num-iters", "3", "--num-batches-per-iter", "2")
    assert "img/sec per rank" in out and "Total img/sec on 4 ranks" in out, out[-2000:]
