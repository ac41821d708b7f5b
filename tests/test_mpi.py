"""Multi-rank tests: the scripts in tests/mpi_scripts under real mpirun, with timeouts.

One mpirun job runs a script at several sizes (sub-communicators of the job's ranks) and settings
(``gossip.init`` keywords), re-starting the runtime between runs (tests/mpi_runner.py); a failure
names the script, size, settings, test and rank. What only the environment can carry gets a job of
its own: Open MPI's TCP transport (``OMPI_MCA_btl=tcp,self``) and the emulated cluster.
"""

import pytest
import torch

from tests.mpi_harness import Run, emulation_unavailable, run_mpi

pytestmark = pytest.mark.mpi

# The chunked staging pipeline without a GPU: CPU tensors take the staged path in chunks of 64 bytes,
# so every test tensor is several chunks; the same correctness scripts must pass.
STAGED_HOST = {"stage_host": True, "staging_chunk_bytes": 64}


def machines_of(k: int) -> dict:
    """Pretend k ranks per machine (hierarchical code on one host)."""
    return {"ranks_per_machine": k}


def sizes(script: str, *ns: int, **settings) -> list[Run]:
    return [Run(script, n, settings) for n in ns]


# On one machine, over Open MPI's shared-memory transport: every script at the sizes that exercise
# its cases (1 rank, 2, powers of two, odd sizes), and the settings that can differ within one job.
# Scripts are grouped by area for reading, and every group runs in one mpirun job: starting ranks
# (importing torch and MPI) costs seconds on a small machine, running one more script in a started job
# does not. A failure names the script, size, settings, test and rank.
JOBS = {
    "neighbour-ops": [*sizes("neighbor_static.py", 1, 2, 4, 8), Run("neighbor_static.py", 4, STAGED_HOST),
                      *sizes("neighbor_dynamic.py", 1, 2, 4, 8), Run("neighbor_dynamic.py", 4, STAGED_HOST),
                      *sizes("shared_memory.py", 1, 4, 5),
                      *sizes("collectives.py", 1, 3, 4), Run("collectives.py", 3, STAGED_HOST),
                      *sizes("dynamic_families.py", 1, 4, 8),
                      # weights taken as given, correctly rounded uniform means: over shared memory and
                      # MPI messages, messages only, and the staging pipeline
                      Run("neighbor_weights.py", 4), Run("neighbor_weights.py", 3, {"shared_memory": False}),
                      Run("neighbor_weights.py", 3, {"stage_host": True, "staging_chunk_bytes": 1 << 16})],
    "algorithms": [*sizes("algorithms_sync.py", 1, 4, 6), *sizes("algorithms_periodic.py", 1, 4),
                   *sizes("algorithms_async_gossip.py", 4, 5), *sizes("parameter_server.py", 1, 2, 4)],
    "runtime-windows-hierarchical": [
        *sizes("runtime_services.py", 1, 4), *sizes("windows.py", 1, 4, 5),
        Run("hierarchical.py", 4, machines_of(2)), Run("hierarchical.py", 6, machines_of(4)),
        Run("scheduler.py", 4, machines_of(2)), Run("large_messages.py", 4, machines_of(2)),
        *sizes("bad_input.py", 2, 4, 5)],
}


def test_under_mpirun() -> None:
    run_mpi([run for runs in JOBS.values() for run in runs])


# On one machine blocking CPU averaging goes through shared memory by default; these runs force MPI
# messages (neighbourhood collectives, point-to-point), the path used across machines, over Open MPI's
# TCP transport, where a buffer freed or reused while in flight shows at once.
TCP = {"OMPI_MCA_btl": "tcp,self"}
MPI_MESSAGES = {"shared_memory": False}
# With messages of several chunks everywhere and the debug checks on (poisoned released buffers, sent
# tensors checked untouched): the algorithms' test network widened to 120 kB of parameters, sent in
# chunks of 16 KiB (8 per message; the chunking is the same at any size, the NumPy reference is not);
# messages of several MB in 1 MiB chunks (large_messages.py); and with the progress thread polling MPI
# while the ops run (MPI_THREAD_MULTIPLE).
LARGE = {**MPI_MESSAGES, "debug_buffers": True}
TCP_JOBS = {
    "mpi-tcp": [*sizes("neighbor_static.py", 4, 5, **MPI_MESSAGES), Run("neighbor_dynamic.py", 4, MPI_MESSAGES),
                Run("shared_memory.py", 3, MPI_MESSAGES), Run("dynamic_families.py", 6, MPI_MESSAGES),
                Run("algorithms_periodic.py", 5, MPI_MESSAGES), Run("runtime_services.py", 3, MPI_MESSAGES),
                Run("bad_input.py", 4, MPI_MESSAGES)],
    "large-tcp": [Run("algorithms_sync.py", 4, {**LARGE, "message_chunk_bytes": 1 << 14}, {"hidden": 3000}),
                  Run("large_messages.py", 4, LARGE),
                  Run("large_messages.py", 4, {**MPI_MESSAGES, "progress_thread": True})],
}


def test_over_tcp() -> None:
    run_mpi([run for runs in TCP_JOBS.values() for run in runs], env=TCP)


# Every CPU correctness script again with CUDA tensors (several ranks share the GPU), staged through
# pinned host memory and, where the MPI is CUDA-aware, direct. Shared memory is CPU-only by design.
CUDA_JOBS = {
    "neighbour-ops": [("neighbor_static.py", 4, {}), ("neighbor_dynamic.py", 4, {}), ("collectives.py", 3, {}),
                      ("dynamic_families.py", 4, {})],
    "algorithms": [("algorithms_sync.py", 4, {}), ("algorithms_periodic.py", 4, {}),
                   ("algorithms_async_gossip.py", 4, {}), ("parameter_server.py", 4, {})],
    "runtime-windows-hierarchical": [("windows.py", 4, {}), ("hierarchical.py", 4, machines_of(2)),
                                     ("scheduler.py", 4, machines_of(2)), ("bad_input.py", 4, {}),
                                     ("runtime_services.py", 4, {})],
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", CUDA_JOBS, ids=[f"cuda-{name}" for name in CUDA_JOBS])
def test_cuda_under_mpirun(name: str) -> None:
    cuda = {"device": "cuda"}
    run_mpi([run for script, np, settings in CUDA_JOBS[name]
             for run in (Run(script, np, {**settings, "cuda_aware": False}, cuda),  # staged
                         Run(script, np, settings, cuda))])  # CUDA-aware where the MPI library supports it


# Two emulated machines of two ranks (network namespaces, 1 Gbit/s links, TCP between machines and
# shared memory within): neighbour ops static, dynamic and asynchronous, collectives, hierarchical
# averaging and windows with several-MB messages, and every registered synchronous algorithm against
# its equation. Needs root and Linux network namespaces; skipped with the reason otherwise.
EMULATED = ("2x2", "1gbit")
EMULATED_RUNS = [Run("large_messages.py", 4, {"debug_buffers": True}), Run("algorithms_sync.py", 4),
                 Run("windows.py", 4), Run("hierarchical.py", 4)]


@pytest.mark.emulated
@pytest.mark.parametrize("emulated", [EMULATED], ids=["emulated-2x2"])
def test_on_emulated_machines(emulated: tuple[str, str]) -> None:
    reason = emulation_unavailable()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: {reason}")
    run_mpi(EMULATED_RUNS, emulated=emulated, limit=300)
