"""Run a test script under ``mpirun -np N`` with a timeout and collect every rank's results."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gossip.launch import launch_env, mpirun_command

#: How the emulated-cluster tests start: ``(machines x ranks, link rate)``.
Emulated = tuple[str, str]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RUNNER = TESTS / "mpi_runner.py"
SCRIPTS = TESTS / "mpi_scripts"


def test_names(script: Path) -> list[str]:
    """The ``test_*`` functions a script defines, in order (read without importing it)."""
    tree = ast.parse(script.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def emulation_unavailable() -> str | None:
    """Why an emulated cluster cannot be made here (None if it can)."""
    from gossip import emulate

    try:
        emulate.preflight()
    except emulate.EmulationError as err:
        return str(err)
    return None


def start_job(np: int, command: list[str], env: dict[str, str] | None = None,
              tag_output: bool = False, emulated: Emulated | None = None) -> subprocess.Popen:
    """Start ``command`` on ``np`` ranks under mpirun (on an emulated cluster with ``emulated``),
    with this checkout importable, in its own process group (end it with ``os.killpg``; the
    emulated cluster's reaper then removes it); stdout and stderr together, as text."""
    job_env = launch_env()
    job_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), job_env.get("PYTHONPATH")]))
    job_env.setdefault("OMP_NUM_THREADS", "1")
    job_env.update(env or {})
    if emulated is None:
        cmd = mpirun_command(np, command, tag_output=tag_output)
    else:
        shape, rate = emulated
        cmd = [sys.executable, "-m", "gossip.launch", "-np", str(np), "--emulate", shape, "--link", rate,
               *(["--tag-output"] if tag_output else []), *command]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env,
                            start_new_session=True)


def run_job(np: int, command: list[str], timeout: float, env: dict[str, str] | None = None,
            what: str = "the job") -> subprocess.CompletedProcess:
    """Run ``command`` on ``np`` ranks (:func:`start_job`) to completion; a job still running after
    ``timeout`` seconds is killed and fails the calling test with the tail of its output."""
    proc = start_job(np, command, env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{what} was still running after {timeout:.0f} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def run_mpi(script: Path, np: int, timeout: float = 240.0, env: dict[str, str] | None = None,
            emulated: Emulated | None = None) -> None:
    """Run ``script``'s tests on ``np`` ranks (on an emulated cluster with ``emulated``); fail the
    calling pytest test with every rank's failures, a missing rank or test, a non-zero exit, or a
    timeout (the job is then killed)."""
    expected = test_names(script)
    with tempfile.TemporaryDirectory(prefix="gossip-mpi-") as outdir:
        proc = start_job(np, [sys.executable, str(RUNNER), str(script), outdir], env, tag_output=True,
                         emulated=emulated)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        per_rank = {}
        for r in range(np):
            f = Path(outdir) / f"rank{r}.json"
            per_rank[r] = json.loads(f.read_text()) if f.exists() else []

    problems = []
    if timed_out:
        problems.append(f"timed out after {timeout:.0f} s (job killed)")
    elif proc.returncode != 0:
        problems.append(f"mpirun exited with code {proc.returncode}")
    skipped = 0
    for r, results in per_rank.items():
        ran = {res["test"]: res for res in results}
        for name in expected:
            res = ran.get(name)
            if res is None:
                problems.append(f"rank {r}: {name} did not run")
            elif res["status"] == "failed":
                problems.append(f"rank {r}: {name} failed\n{res['detail']}")
            elif res["status"] == "skipped":
                skipped += 1
    if problems:
        tail = output[-8000:]
        pytest.fail(f"{script.name} on {np} ranks:\n" + "\n".join(problems) + f"\n--- job output (tail) ---\n{tail}",
                    pytrace=False)
    if skipped == np * len(expected):
        pytest.skip(f"{script.name}: every test skipped on every rank")
