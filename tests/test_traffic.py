"""The traffic counter under real mpirun: every op kind against its closed form
(tests/mpi_scripts/traffic.py), in one job: through shared memory and through MPI messages, with
messages in chunks (``message_chunk_bytes`` of 4096), on an odd number of ranks (the ring model's
integer division) and with pretended machines (hierarchical averaging between machines)."""

import pytest

from tests.mpi_harness import Run, run_mpi

pytestmark = pytest.mark.mpi


def test_traffic_counts_equal_the_closed_forms():
    run_mpi([Run("traffic.py", 4), Run("traffic.py", 1),
             Run("traffic.py", 3, {"shared_memory": False, "message_chunk_bytes": 4096}),
             Run("traffic.py", 4, {"ranks_per_machine": 2, "shared_memory": False})])
