"""``gossiprun``'s arguments and ``--emulate``: parsing, refusals before anything is made, and an
emulated cluster that is always removed (job done, job failed, Ctrl-C, launcher killed) and never
collides with a second one. The cluster tests need root and Linux network namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gossip.tools import emulate, launch
from gossip.tools.launch import parse_arguments
from tests.mpi_harness import REPO, emulation_unavailable, launch_env

HELLO = ("from mpi4py import MPI; import socket; c = MPI.COMM_WORLD; "
         "print('rank', c.rank, 'of', c.size, 'on', socket.gethostname(), 'sum', c.allreduce(c.rank), flush=True)")


def gossiprun(*args: str, **popen) -> subprocess.Popen:
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "gossip.tools.launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **popen)


def ours() -> set[str]:
    """This host's emulated-cluster namespaces."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.startswith(emulate.PREFIX)}


def wait_until_gone(tag: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while any(ns.startswith(f"{emulate.PREFIX}{tag}-") for ns in ours()):
        assert time.monotonic() < deadline, f"namespaces of {tag} still there: {sorted(ours())}"
        time.sleep(0.2)


_needs_namespaces = pytest.mark.skipif(emulation_unavailable() is not None,
                                       reason=f"no emulated cluster here: {emulation_unavailable()}")


def needs_namespaces(test):
    """A test that makes an emulated cluster and runs mpirun on it (needs root and namespaces)."""
    return _needs_namespaces(pytest.mark.mpi(pytest.mark.emulated(test)))


# --- parsing: no cluster needed -----------------------------------------------------------------

def test_shapes_and_rates():
    assert emulate.parse_shape("4x2") == emulate.ClusterShape(4, 2) and emulate.parse_shape(" 8X1 ").size == 8
    assert emulate.parse_rate("250mbit") == 250_000_000 and emulate.parse_rate("1gbit") == 10**9
    assert emulate.parse_rate("12.5mbps") == 100_000_000 and emulate.format_rate(250_000_000) == "250mbit"
    for bad in ("4", "0x2", "4x0", "ax2", "4x2x1"):
        with pytest.raises(emulate.EmulationError, match="MACHINESxRANKS|machines"):
            emulate.parse_shape(bad)
    for bad in ("fast", "250", "250mb/s", "1bit", "-5mbit"):
        with pytest.raises(emulate.EmulationError, match="rate"):
            emulate.parse_rate(bad)
    args = emulate.tbf_arguments(250_000_000)
    assert args[:2] == ["rate", "250000000bit"] and int(args[3]) >= 64 * 1024 and args[5].endswith("ms")


def test_gossiprun_splits_its_options_mpirun_flags_and_the_command():
    request = parse_arguments(["-np", "4", "--mca", "btl", "tcp,self", "-x", "FOO", "--oversubscribe",
                               "python", "train.py", "--lr", "0.1"])
    assert request.np == 4 and request.emulate is None
    assert request.mpirun_flags == ["--mca", "btl", "tcp,self", "-x", "FOO", "--oversubscribe"]
    assert request.command == ["python", "train.py", "--lr", "0.1"]
    request = parse_arguments(["--emulate", "4x2", "--link=1gbit", "--", "-weird-command"])
    assert (request.np, request.emulate, request.link, request.command) == (None, "4x2", "1gbit", ["-weird-command"])
    for bad, message in ((["python", "x.py"], "-np N is required"), (["-np", "4"], "no command"),
                         (["-np", "four", "x"], "number of ranks"), (["--emulate", "2x2", "x"], "go together"),
                         (["-np", "0", "x"], "at least 1")):
        with pytest.raises(ValueError, match=message):
            parse_arguments(bad)


def test_bad_emulation_input_is_refused_before_anything_is_made(capsys):
    """gossiprun's entry point, in this process: exit status 2 and one message, nothing made."""
    before = ours()
    for args, message in ((["--emulate", "2x2", "--link", "fast", "true"], "--link takes a rate"),
                          (["--emulate", "2x", "--link", "1gbit", "true"], "--emulate takes"),
                          (["-np", "3", "--emulate", "2x2", "--link", "1gbit", "true"], "-np 3 does not match"),
                          (["--emulate", "2x2", "true"], "go together")):
        assert launch.main(args) == 2, args
        output = capsys.readouterr().err
        assert message in output and output.startswith("gossiprun: "), output
    assert ours() == before


def test_preflight_names_what_is_missing(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("preflight's checks are for Linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(emulate.EmulationError, match="needs root"):
        emulate.preflight()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = emulate.shutil.which
    monkeypatch.setattr(emulate.shutil, "which", lambda tool: None if tool == "tc" else real_which(tool))
    with pytest.raises(emulate.EmulationError, match="needs tc on PATH"):
        emulate.preflight()


# --- real emulated clusters -------------------------------------------------------------------

@needs_namespaces
def test_machines_are_separate_hosts_and_everything_is_removed():
    proc = gossiprun("--emulate", "2x2", "--link", "1gbit", sys.executable, "-c", HELLO)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    hosts = {line.split()[5] for line in output.splitlines() if line.startswith("rank")}
    assert hosts == {"node0", "node1"} and output.count("sum 6") == 4, output
    wait_until_gone(str(proc.pid))
    assert not (Path(tempfile.gettempdir()) / f"{emulate.PREFIX}{proc.pid}").exists()


@needs_namespaces
def test_a_failed_job_still_removes_the_cluster():
    proc = gossiprun("--emulate", "2x1", "--link", "100mbit", sys.executable, "-c", "raise SystemExit(3)")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    wait_until_gone(str(proc.pid))


@needs_namespaces
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "launcher-killed"])
def test_interrupted_or_killed_launcher_leaves_nothing(how):
    proc = gossiprun("--emulate", "2x1", "--link", "100mbit", sys.executable, "-c",
                     "import time; from mpi4py import MPI; print('up', flush=True); time.sleep(600)",
                     start_new_session=True)
    tag = str(proc.pid)
    deadline = time.monotonic() + 90
    line = ""
    while "up" not in line:
        assert time.monotonic() < deadline, "the emulated job did not start"
        line = proc.stdout.readline()
    assert any(ns.startswith(f"{emulate.PREFIX}{tag}-") for ns in ours())
    os.killpg(proc.pid, how)  # Ctrl-C reaches the launcher's whole process group
    proc.communicate(timeout=60)
    wait_until_gone(tag, 30)


@needs_namespaces
def test_two_emulated_jobs_at_once_do_not_collide():
    procs = [gossiprun("--emulate", "2x1", "--link", "250mbit", sys.executable, "-c", HELLO) for _ in range(2)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and output.count("sum 1") == 2, output
        wait_until_gone(str(proc.pid))


@_needs_namespaces
@pytest.mark.emulated
def test_stale_clusters_of_dead_launchers_are_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    cluster = emulate.EmulatedCluster(1, 10**8, tag=str(dead.pid))
    cluster.create()
    assert any(ns.startswith(f"{emulate.PREFIX}{dead.pid}-") for ns in ours())
    assert str(dead.pid) in emulate.remove_stale()
    wait_until_gone(str(dead.pid), 5)
