"""Multi-rank tests of the ops BlueFog users call: neighbour allgather with per-call ranks and uneven
first dimensions, hierarchical gossip with per-call machine weights and its non-blocking form, the
allreduce within each machine, and the non-blocking global collectives.

One mpirun job over Open MPI's TCP transport (``OMPI_MCA_btl=tcp,self``), where a buffer freed or
reused while in flight shows at once; several sizes and machine layouts run inside it
(tests/mpi_runner.py).
"""

import pytest

from tests.mpi_harness import Run, run_mpi

pytestmark = pytest.mark.mpi

TCP = {"OMPI_MCA_btl": "tcp,self"}


def machines_of(k: int) -> dict:
    """Pretend k ranks per machine (hierarchical code on one host)."""
    return {"ranks_per_machine": k}


RUNS = [
    Run("neighbor_gather.py", 1), Run("neighbor_gather.py", 4), Run("neighbor_gather.py", 3, {"debug_buffers": True}),
    Run("hierarchical_weights.py", 4, machines_of(1)), Run("hierarchical_weights.py", 4, machines_of(2)),
    Run("hierarchical_weights.py", 3, machines_of(2)),  # machines of unequal sizes
    Run("collectives_async.py", 3, machines_of(3)), Run("collectives_async.py", 4, {"debug_buffers": True}),
]


def test_parity_ops_over_tcp() -> None:
    run_mpi(RUNS, env=TCP)
