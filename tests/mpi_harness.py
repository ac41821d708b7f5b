"""Run test scripts under ``mpirun -np N``, several sizes and settings in one job, with a timeout, and
collect every rank's results; start other jobs (examples, benchmarks) under mpirun."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gossip.tools.launch import launch_env, mpirun_command

#: How the emulated-cluster tests start: ``(machines x ranks, link rate)``.
Emulated = tuple[str, str]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
RUNNER = TESTS / "mpi_runner.py"
SCRIPTS = TESTS / "mpi_scripts"


def test_names(script: Path) -> list[str]:
    """The ``test_*`` functions a script defines, in order (read without importing it)."""
    tree = ast.parse(script.read_text())
    only = os.environ.get("GOSSIP_TEST_ONLY", "")  # as tests/mpi_runner.py: only the names containing it
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
            and only in n.name]


def emulation_unavailable() -> str | None:
    """Why an emulated cluster cannot be made here (None if it can)."""
    from gossip.tools import emulate

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
        cmd = [sys.executable, "-m", "gossip.tools.launch", "-np", str(np), "--emulate", shape, "--link", rate,
               *(["--tag-output"] if tag_output else []), *command]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env,
                            start_new_session=True)


def job_rank_pids(session: int, script: Path) -> dict[int, int]:
    """The ranks of a job started by :func:`start_job` (its own session: ``proc.pid``) that run
    ``python script ...``: launch rank (the ``OMPI_COMM_WORLD_RANK`` mpirun gave the process) -> pid.
    mpirun, a launcher and processes of other jobs are left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            sid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if sid != session or command[1:2] != [str(script).encode()]:
                continue
            variables = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in variables:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(entry.name)
    return found


def run_job(np: int, command: list[str], timeout: float, env: dict[str, str] | None = None,
            what: str = "the job", emulated: Emulated | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` on ``np`` ranks (:func:`start_job`, on an emulated cluster with ``emulated``) to
    completion; a job still running after ``timeout`` seconds is killed and fails the calling test
    with the tail of its output."""
    proc, output, timed_out = _run_to_end(lambda: start_job(np, command, env, emulated=emulated), timeout)
    if timed_out:
        pytest.fail(f"{what} was still running after {timeout:.0f} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


#: What mpirun prints when it could not start its own PMIx server: no rank was started, and the same
#: command started again runs (seen once in about 100 jobs of a CI run, never reproduced on demand).
LAUNCHER_DID_NOT_START = "The PMIx server's listener thread failed to start"


def _run_to_end(start, timeout: float) -> tuple[subprocess.Popen, str, bool]:
    """Start a job with ``start()`` and wait for it (killed after ``timeout`` seconds): the process,
    its output and whether it timed out. A job whose mpirun could not start its PMIx server
    (:data:`LAUNCHER_DID_NOT_START`; no rank ran) is started once more."""
    for attempt in range(2):
        proc = start()
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return proc, output.replace("\x00", ""), True
        # mpirun's aggregated help message ("N more processes have sent help message ...") ends in a NUL
        # byte, which then leads the next line of the job's output
        output = output.replace("\x00", "")
        if proc.returncode == 0 or LAUNCHER_DID_NOT_START not in output or attempt:
            return proc, output, False
        print(f"mpirun could not start its PMIx server; starting the job again:\n{output[-2000:]}")


@dataclass(frozen=True)
class Run:
    """One run of a script's tests: on ``size`` ranks (the first ``size`` of the job), with the runtime
    started with ``settings`` (``gossip.init`` keywords) and the script given ``params`` (test
    parameters, read with ``_common.param``: ``device``, ``hidden``)."""

    script: str
    size: int
    settings: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How failures name the run: script, size, settings and parameters."""
        extra = [f"{k}={v!r}" for k, v in {**self.settings, **self.params}.items()]
        return f"{self.script} on {self.size} rank{'s' if self.size > 1 else ''}" + (
            f" ({', '.join(extra)})" if extra else "")


def run_mpi(runs: list[Run], env: dict[str, str] | None = None, emulated: Emulated | None = None,
            limit: float = 240.0, np: int | None = None) -> None:
    """Run every run of ``runs`` in one mpirun job of ``np`` ranks (default: the largest size), with
    ``env`` (what only the environment can carry, e.g. ``OMPI_MCA_btl``), on an emulated cluster with
    ``emulated``. Each run may take ``limit`` seconds (a run past it ends the job). Fails the calling
    pytest test with every rank's failures (naming the run's size and settings, the test and the
    rank), a missing rank or test, a non-zero exit, or a timeout (the job is then killed)."""
    runs = [run for run in runs if test_names(SCRIPTS / run.script)]  # GOSSIP_TEST_ONLY may leave a script none
    if not runs:
        pytest.skip(f"no test function matches GOSSIP_TEST_ONLY={os.environ.get('GOSSIP_TEST_ONLY')!r}")
    np = np or max(run.size for run in runs)
    expected = {i: test_names(SCRIPTS / run.script) for i, run in enumerate(runs)}
    spec = [{"script": str(SCRIPTS / run.script), "size": run.size, "settings": run.settings, "params": run.params,
             "limit": limit, "label": run.label} for run in runs]
    timeout = limit * len(runs) + 120  # a backstop: the runner ends a run past its limit itself
    with tempfile.TemporaryDirectory(prefix="gossip-mpi-") as outdir:
        (Path(outdir) / "runs.json").write_text(json.dumps(spec))
        proc, output, timed_out = _run_to_end(
            lambda: start_job(np, [sys.executable, str(RUNNER), outdir], env, tag_output=True, emulated=emulated),
            timeout)
        per_rank = {}
        for r in range(np):
            f = Path(outdir) / f"rank{r}.json"
            per_rank[r] = json.loads(f.read_text()) if f.exists() else []

    problems = []
    if timed_out:
        problems.append(f"timed out after {timeout:.0f} s (job killed)")
    elif proc.returncode != 0:
        problems.append(f"mpirun exited with code {proc.returncode}")
    executed = skipped = 0
    for i, run in enumerate(runs):
        if not any(res["run"] == i for r in range(run.size) for res in per_rank[r]):
            problems.append(f"{run.label}: did not run (the job ended before it)")
            executed += 1
            continue
        for r in range(run.size):
            ran = {res["test"]: res for res in per_rank[r] if res["run"] == i}
            unexpected = [(name, res) for name, res in ran.items() if name not in expected[i]]
            for name, res in unexpected:  # the run could not start: its tests did not run
                problems.append(f"{run.label}, rank {r}: {name} failed\n{res['detail']}")
            for name in [] if unexpected else expected[i]:
                res = ran.get(name)
                executed += 1
                if res is None:
                    problems.append(f"{run.label}, rank {r}: {name} did not run")
                elif res["status"] == "running":
                    problems.append(f"{run.label}, rank {r}: {name} did not finish (the job ended while it ran: "
                                    f"ranks left behind, or the run past its limit of {limit:.0f} s; see the output)")
                elif res["status"] == "failed":
                    problems.append(f"{run.label}, rank {r}: {name} failed\n{res['detail']}")
                elif res["status"] == "skipped":
                    skipped += 1
    if problems:
        tail = output[-8000:]
        pytest.fail(f"mpirun job of {np} ranks:\n" + "\n".join(problems) + f"\n--- job output (tail) ---\n{tail}",
                    pytrace=False)
    if skipped == executed:
        pytest.skip(f"every test skipped on every rank of {', '.join(run.label for run in runs)}")
