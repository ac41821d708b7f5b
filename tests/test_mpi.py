"""Multi-rank tests: each script in tests/mpi_scripts runs under real mpirun, with a timeout."""

import pytest
import torch

from tests.mpi_harness import SCRIPTS, emulation_unavailable, run_mpi

# On one machine blocking CPU averaging goes through shared memory by default; the cases marked
# "mpi" force MPI messages (neighbourhood collectives, point-to-point), the path used across machines,
# over Open MPI's TCP transport, where a buffer freed or reused while in flight shows at once.
MPI_MESSAGES = {"GOSSIP_SHARED_MEMORY": "0", "OMPI_MCA_btl": "tcp,self"}
# The same with messages of several chunks everywhere (the algorithms' test network widened to 1.2 MB of
# parameters) and the debug checks on: poisoned released buffers, sent tensors checked untouched.
LARGE_OVER_TCP = {**MPI_MESSAGES, "GOSSIP_TEST_HIDDEN": "30000", "GOSSIP_DEBUG_BUFFERS": "1"}
# And with the progress thread polling MPI while the ops run (MPI_THREAD_MULTIPLE).
PROGRESS_THREAD = {**MPI_MESSAGES, "GOSSIP_PROGRESS_THREAD": "1"}


def machines_of(k: int) -> dict:
    """Pretend k ranks per machine (hierarchical code on one host)."""
    return {"GOSSIP_RANKS_PER_MACHINE": str(k)}


def _label(env: dict | None) -> str:
    if not env:
        return ""
    if env == MPI_MESSAGES:
        return "-mpi-tcp"
    if env == LARGE_OVER_TCP:
        return "-large-tcp"
    if env == PROGRESS_THREAD:
        return "-tcp-progress-thread"
    return f"-{env['GOSSIP_RANKS_PER_MACHINE']}-per-machine"
CASES = [
    ("neighbor_static.py", 1, None), ("neighbor_static.py", 2, None), ("neighbor_static.py", 4, None),
    ("neighbor_static.py", 8, None), ("neighbor_static.py", 4, MPI_MESSAGES), ("neighbor_static.py", 5, MPI_MESSAGES),
    ("neighbor_dynamic.py", 1, None), ("neighbor_dynamic.py", 2, None), ("neighbor_dynamic.py", 4, None),
    ("neighbor_dynamic.py", 8, None), ("neighbor_dynamic.py", 4, MPI_MESSAGES),
    ("shared_memory.py", 1, None), ("shared_memory.py", 4, None), ("shared_memory.py", 5, None),
    ("shared_memory.py", 3, MPI_MESSAGES),
    ("collectives.py", 1, None), ("collectives.py", 3, None), ("collectives.py", 4, None),
    ("dynamic_families.py", 1, None), ("dynamic_families.py", 4, None), ("dynamic_families.py", 6, MPI_MESSAGES),
    ("dynamic_families.py", 8, None),
    ("algorithms_sync.py", 1, None), ("algorithms_sync.py", 4, None), ("algorithms_sync.py", 6, None),
    ("algorithms_sync.py", 4, LARGE_OVER_TCP), ("large_messages.py", 4, LARGE_OVER_TCP),
    ("large_messages.py", 4, PROGRESS_THREAD),
    ("large_messages.py", 4, machines_of(2)),
    ("algorithms_periodic.py", 1, None), ("algorithms_periodic.py", 4, None),
    ("algorithms_periodic.py", 5, MPI_MESSAGES),
    ("runtime_services.py", 1, None), ("runtime_services.py", 4, None), ("runtime_services.py", 3, MPI_MESSAGES),
    ("windows.py", 1, None), ("windows.py", 4, None), ("windows.py", 5, None),
    ("algorithms_async_gossip.py", 4, None), ("algorithms_async_gossip.py", 5, None),
    ("hierarchical.py", 4, machines_of(2)), ("hierarchical.py", 6, machines_of(4)), ("scheduler.py", 4, machines_of(2)),
    ("parameter_server.py", 1, None), ("parameter_server.py", 2, None), ("parameter_server.py", 4, None),
    ("bad_input.py", 2, None), ("bad_input.py", 4, None), ("bad_input.py", 5, None), ("bad_input.py", 4, MPI_MESSAGES),
]


@pytest.mark.parametrize("script,np,env", CASES, ids=[f"{s[:-3]}-np{n}{_label(e)}" for s, n, e in CASES])
def test_under_mpirun(script: str, np: int, env: dict | None) -> None:
    run_mpi(SCRIPTS / script, np, env=env)


# Every CPU correctness script again with CUDA tensors (several ranks share the GPU), staged through
# pinned host memory and, where the MPI is CUDA-aware, direct. Shared memory is CPU-only by design.
CUDA_CASES = [
    ("neighbor_static.py", 4, None), ("neighbor_dynamic.py", 4, None), ("collectives.py", 3, None),
    ("dynamic_families.py", 4, None), ("windows.py", 4, None), ("hierarchical.py", 4, machines_of(2)),
    ("algorithms_sync.py", 4, None), ("algorithms_periodic.py", 4, None), ("algorithms_async_gossip.py", 4, None),
    ("parameter_server.py", 4, None), ("scheduler.py", 4, machines_of(2)), ("bad_input.py", 4, None),
    ("runtime_services.py", 4, None),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("script,np,extra", CUDA_CASES,
                         ids=[f"cuda-{s[:-3]}-np{n}{_label(e)}" for s, n, e in CUDA_CASES])
@pytest.mark.parametrize("staging", ["staged", "cuda-aware-if-supported"])
def test_cuda_under_mpirun(script: str, np: int, extra: dict | None, staging: str) -> None:
    env = {"GOSSIP_TEST_DEVICE": "cuda", **(extra or {})}
    if staging == "staged":
        env["GOSSIP_CUDA_AWARE"] = "0"
    run_mpi(SCRIPTS / script, np, env=env)


# The chunked staging pipeline without a GPU: CPU tensors take the staged path (GOSSIP_STAGE_HOST=1)
# in chunks of 64 bytes, so every test tensor is several chunks; the same correctness scripts must pass.
STAGED_HOST = {"GOSSIP_STAGE_HOST": "1", "GOSSIP_STAGING_CHUNK_BYTES": "64"}
STAGED_CASES = [("neighbor_static.py", 4), ("neighbor_dynamic.py", 4), ("collectives.py", 3)]


@pytest.mark.parametrize("script,np", STAGED_CASES, ids=[f"staged-pipeline-{s[:-3]}-np{n}" for s, n in STAGED_CASES])
def test_staging_pipeline_under_mpirun(script: str, np: int) -> None:
    run_mpi(SCRIPTS / script, np, env=STAGED_HOST)


# Two emulated machines of two ranks (network namespaces, 1 Gbit/s links, TCP between machines and
# shared memory within): neighbour ops static, dynamic and asynchronous, collectives, hierarchical
# averaging and windows with several-MB messages, and every registered synchronous algorithm against
# its equation. Needs root and Linux network namespaces; skipped with the reason otherwise.
EMULATED = ("2x2", "1gbit")
EMULATED_CASES = [("large_messages.py", {"GOSSIP_DEBUG_BUFFERS": "1"}),
                  ("algorithms_sync.py", None),
                  ("windows.py", None), ("hierarchical.py", None)]


@pytest.mark.parametrize("script,env", EMULATED_CASES, ids=[f"emulated-2x2-{s[:-3]}" for s, _ in EMULATED_CASES])
def test_on_emulated_machines(script: str, env: dict | None) -> None:
    reason = emulation_unavailable()
    if reason is not None:
        pytest.skip(f"no emulated cluster here: {reason}")
    run_mpi(SCRIPTS / script, 4, env=env, emulated=EMULATED, timeout=300)
