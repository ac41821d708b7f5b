"""Multi-rank tests: each script in tests/mpi_scripts runs under real mpirun, with a timeout."""

import pytest
import torch

from tests.mpi_harness import SCRIPTS, run_mpi

CASES = [
    ("neighbor_static.py", 1), ("neighbor_static.py", 2), ("neighbor_static.py", 4), ("neighbor_static.py", 8),
    ("neighbor_dynamic.py", 1), ("neighbor_dynamic.py", 2), ("neighbor_dynamic.py", 4),
    ("neighbor_dynamic.py", 8),
    ("collectives.py", 1), ("collectives.py", 3), ("collectives.py", 4),
    ("bad_input.py", 2), ("bad_input.py", 4), ("bad_input.py", 5),
]


@pytest.mark.parametrize("script,np", CASES, ids=[f"{s[:-3]}-np{n}" for s, n in CASES])
def test_under_mpirun(script: str, np: int) -> None:
    run_mpi(SCRIPTS / script, np)


CUDA_CASES = [("neighbor_static.py", 2), ("neighbor_dynamic.py", 4), ("collectives.py", 2)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("script,np", CUDA_CASES, ids=[f"cuda-{s[:-3]}-np{n}" for s, n in CUDA_CASES])
@pytest.mark.parametrize("staging", ["staged", "cuda-aware-if-supported"])
def test_cuda_under_mpirun(script: str, np: int, staging: str) -> None:
    env = {"GOSSIP_TEST_DEVICE": "cuda"}
    if staging == "staged":
        env["GOSSIP_CUDA_AWARE"] = "0"
    run_mpi(SCRIPTS / script, np, env=env)
