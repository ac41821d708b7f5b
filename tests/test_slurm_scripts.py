"""The Slurm batch scripts of mpirun_examples/slurm/: valid bash; ``#SBATCH`` lines a cluster user can
submit as they are (requeue, the signal before the time limit, placeholders for partition and account,
node counts that match the comments, the environment set up, no progress bar); the helper that turns
Slurm's warning into a checkpoint and a requeue (with a stand-in job and ``scontrol``); and one script
run end to end under mpirun: SIGUSR1 to the batch shell, a checkpoint at a step the ranks agree on, a
requeue, and the requeued job finishing the run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossip.tools.launch import STDOUT_IS_TERMINAL, launch_env
from tests.mpi_harness import REPO

SLURM = REPO / "mpirun_examples" / "slurm"
HELPER = SLURM / "checkpointed.sh"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))


def _directives(script: Path) -> dict[str, str]:
    """``#SBATCH --name=value`` lines as {"--name": "value"} ("" for a switch)."""
    found = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.split(None, 1)[1].partition("=")
            found[name] = value
    return found


def _commands(script: Path) -> str:
    """The script's shell lines without comments, continuation lines joined."""
    lines = [line.split(" #")[0] for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def _seconds(limit: str) -> int:
    parts = [int(p) for p in limit.replace("-", ":").split(":")]
    return sum(p * f for p, f in zip(reversed(parts), (1, 60, 3600, 86400), strict=False))


def test_there_are_scripts_for_cpu_and_gpu_with_srun_and_mpirun():
    assert [s.name for s in SCRIPTS] == ["cpu_mpirun.sbatch", "cpu_srun.sbatch", "gpu_mpirun.sbatch",
                                         "gpu_srun.sbatch"]


@pytest.mark.parametrize("script", [*SCRIPTS, HELPER], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_lines(script):
    sbatch, text = _directives(script), script.read_text()
    assert "--requeue" in sbatch and sbatch.get("--open-mode") == "append", sbatch  # a requeued job appends
    signal_spec = re.fullmatch(r"B:USR1@(\d+)", sbatch.get("--signal", ""))
    assert signal_spec, f"{script.name}: expected --signal=B:USR1@<seconds> (the batch shell forwards it)"
    assert 60 <= int(signal_spec[1]) < _seconds(sbatch["--time"]) // 2, sbatch
    assert "%j" in sbatch["--output"] and sbatch["--job-name"].startswith("gossip-"), sbatch
    for option in ("partition", "account"):  # placeholders, off until filled in (the site's defaults apply)
        assert f"##SBATCH --{option}=<{option}>" in text, f"{script.name}: no placeholder for --{option}"
    counts = re.search(r"(\d+) nodes x (\d+) (ranks per node|GPUs, one rank per GPU) = (\d+) ranks", text)
    assert counts, f"{script.name}: the first lines should say 'N nodes x R ranks per node = T ranks'"
    nodes, per_node, _, total = counts.groups()
    assert (sbatch["--nodes"], sbatch["--ntasks-per-node"]) == (nodes, per_node), (counts[0], sbatch)
    assert int(nodes) * int(per_node) == int(total), counts[0]
    if "gpu" in script.name:
        assert sbatch["--gpus-per-node"] == per_node, "one rank per GPU"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_job_sets_up_its_environment_and_resumes(script):
    commands = _commands(script)
    assert "set -euo pipefail" in commands
    assert re.search(r"^source \.venv/bin/activate$", commands, re.M), "the environment set-up is commented out"
    assert re.search(r"module load \$MPI_MODULES", commands), "no module load"
    assert "source mpirun_examples/slurm/checkpointed.sh" in commands
    run = next(line for line in commands.splitlines() if line.startswith("run_checkpointed "))
    assert "python mpirun_examples/train.py" in run
    for flag in ("--no-progress", "--resume", '--checkpoint-dir "checkpoints/$SLURM_JOB_NAME"',
                 '--log-dir "results/$SLURM_JOB_ID"'):
        assert flag in run, f"{script.name}: {flag} missing from {run}"
    launcher = "srun --mpi=pmix" if "srun" in script.name else 'mpirun -np "$SLURM_NTASKS"'
    assert f"run_checkpointed {launcher} " in run, run
    assert ("--device cuda" in run) == ("gpu" in script.name)


# --- the helper: SIGUSR1 -> checkpoint -> requeue, with a stand-in job and scontrol ----------------

JOB = """trap 'echo "job: got SIGUSR1"; exit {on_signal}' USR1
touch "$READY"
[ -z "{exit_now}" ] || exit {exit_now}
while :; do sleep 0.05; done
"""


def _helper(tmp_path: Path, on_signal: int = 3, exit_now: str = "", warn: bool = True) -> tuple[int, str, str]:
    """Run a stand-in job under run_checkpointed; send the batch shell SIGUSR1 once the job runs (if
    ``warn``); return the shell's exit status, its output and what scontrol was asked."""
    bin_dir, ready, asked = tmp_path / "bin", tmp_path / "ready", tmp_path / "scontrol.log"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {asked}\n')
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / "job.sh").write_text(JOB.format(on_signal=on_signal, exit_now=exit_now))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "READY": str(ready),
           "SLURM_JOB_ID": "77"}
    shell = subprocess.Popen(["bash", "-c", f'set -euo pipefail; source {HELPER}; run_checkpointed bash job.sh'],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and shell.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if warn and shell.poll() is None:
        time.sleep(0.2)  # the shell is in its wait
        shell.send_signal(signal.SIGUSR1)
    try:
        output, _ = shell.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)  # the shell and the stand-in job
        pytest.fail(f"run_checkpointed did not return:\n{shell.communicate()[0]}")
    return shell.returncode, output, asked.read_text() if asked.exists() else ""


def test_the_time_limit_warning_reaches_the_job_and_requeues(tmp_path):
    status, output, asked = _helper(tmp_path)
    assert status == 0, output
    assert "time limit near" in output and "job: got SIGUSR1" in output, output
    assert "requeueing job 77" in output and asked == "requeue 77\n", (output, asked)


@pytest.mark.parametrize("on_signal,exit_now,warn,expected", [
    (3, "0", False, 0),  # the run finished: nothing more
    (3, "1", False, 1),  # it failed: its status, no requeue
    (3, "3", False, 3),  # stopped by another signal (scancel, a preemption: Slurm requeues by itself)
    (1, "", True, 1),  # warned, but the job failed instead of writing its checkpoint
])
def test_no_requeue_unless_warned_and_checkpointed(tmp_path, on_signal, exit_now, warn, expected):
    status, output, asked = _helper(tmp_path, on_signal, exit_now, warn)
    assert status == expected and asked == "", (status, output, asked)


# --- one script end to end under mpirun -------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.end_to_end
def test_cpu_mpirun_script_checkpoints_before_the_time_limit_and_the_requeued_job_finishes(tmp_path):
    """cpu_mpirun.sbatch as Slurm runs it (bash in the submission directory, SLURM_* set), on 2 ranks
    here: SIGUSR1 to the batch shell -> every rank stops at one step with a checkpoint -> scontrol
    requeue; the requeued job (the same job id) resumes and trains to the end; the .out file has no
    progress bar."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the script binds 2 ranks to 2 cores")
    submit = tmp_path / "submit"  # the submission directory: the repository's examples, this Python
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / "mpirun_examples").symlink_to(REPO / "mpirun_examples")
    (submit / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    (submit / "bin").mkdir()
    (submit / "bin" / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (submit / "bin" / "scontrol").chmod(0o755)
    env = launch_env()
    env.pop(STDOUT_IS_TERMINAL, None)  # a batch job: nobody says its output is a terminal
    env.update(PATH=f"{submit / 'bin'}{os.pathsep}{env['PATH']}", MPI_MODULES="", SLURM_JOB_ID="4242",
               SLURM_JOB_NAME="gossip-e2e", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    script = str(SLURM / "cpu_mpirun.sbatch")
    latest = submit / "checkpoints" / "gossip-e2e" / "latest"

    out = tmp_path / "gossip-cpu-mpirun-4242.out"
    with open(out, "w") as file:
        shell = subprocess.Popen(["bash", script], cwd=submit, env=env, stdout=file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 180
        while not latest.exists() and shell.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
        try:
            shell.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            pytest.fail(f"the batch script did not end after SIGUSR1:\n{out.read_text()[-4000:]}")
    text = out.read_text()
    assert shell.returncode == 0, text[-4000:]
    assert "stopped by SIGUSR1 after step" in text and "requeueing job 4242" in text, text[-4000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    with open(out, "a") as file:  # --open-mode=append
        requeued = subprocess.run(["bash", script], cwd=submit, env=env, stdout=file, stderr=subprocess.STDOUT,
                                  timeout=300)
    text = out.read_text()
    assert requeued.returncode == 0, text[-4000:]
    assert "resumed from checkpoints/gossip-e2e/step-" in text and "\r" not in text, text[-4000:]
    records = json.loads((submit / "results" / "4242" / "log.json").read_text())["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, 21)) and records[-1]["test_accuracy_averaged"] > 0.9
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # finished: not requeued again
