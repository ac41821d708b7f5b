"""A whole machine dies during ``train.py --elastic`` on an emulated cluster of 3 machines of 2 ranks
(``gossiprun --emulate 3x2 --fault-tolerant``): its link goes down, then its ranks and its Open MPI
daemon are killed together (:func:`gossip.tools.emulate.kill_machine`), so no FIN or RST tells
anyone. The survivors learn of it from ULFM's heartbeat failure detector (:data:`DETECTOR`: not
among ``gossiprun --fault-tolerant``'s flags, see below), recover, log one line naming both dead
ranks and train to the end on 4 ranks.

What this configuration does not do, and why the test ends the job itself once the survivors
have written their logs: Open MPI 5.0's runtime (PRRTE 3.0) does not survive a lost daemon; when
it notices (TCP keepalive, about 8 minutes after the machine died by default) it ends the whole
job, and ``mpirun`` waits for that even after the survivors are done. In its own thread the
detector leaves ``MPI_Finalize`` spinning after a failure (so it cannot be the launcher's
default); in the main thread it sends heartbeats only while a rank is inside MPI, so a live rank
that computes for longer than its timeout while the others wait is declared dead."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from gossip.tools import emulate
from tests.mpi_harness import REPO, emulation_unavailable, start_job

TRAIN = REPO / "mpirun_examples" / "train.py"
BOUND = 300.0  # seconds for the whole job: about 60 s on 2 busy cores; a hang ends the test well before this
DETECTION_BOUND = 30.0  # seconds from the machine's death to the survivors' notice: about 1 s measured
RUN = ["--epochs", "6", "--batch-size", "16", "--no-progress", "--op-timeout", "60"]
#: ULFM's ring heartbeat detector (Bosilca et al., "Failure detection and propagation in HPC systems",
#: SC 2016) in its own thread (a heartbeat every 0.3 s, suspicion after 1 s of silence), failures
#: spread by reliable broadcast.
DETECTOR = ["--mca", "mpi_ft_detector", "1", "--mca", "mpi_ft_detector_thread", "1",
            "--mca", "mpi_ft_propagator_with_rbcast", "1"]


class Output:
    """The job's output, read as it comes (the job may outlive the test's interest in it)."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def has(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in list(self.lines))

    def tail(self) -> str:
        return "\n".join(self.lines[-80:])


#: What a rank that died while starting (inside ``MPI_Init``, before any training) leaves in the output.
STARTUP_CRASH = r"Process received signal|End of error message|MPI_ERR_PROC_FAILED"


def _start_training(logs, command: list[str], deadline: float) -> tuple[subprocess.Popen, Output]:
    """Start the job and wait for its first epoch. Open MPI 5.0.11's threaded failure detector now and
    then kills a rank inside ``MPI_Init`` on a loaded machine (in two full-suite runs, never after
    start-up); the survivors then stop in their first collective and mpirun waits for good. Such
    a start is ended and the job started once more; a second crash, or any other failure to reach the
    first epoch, fails the test with the first attempt's output."""
    first = None
    for attempt in (1, 2):
        proc = start_job(6, command, emulated=("3x2", "1gbit"))
        output = Output(proc.stdout)
        started = _wait(lambda out=output: (logs / "log.json").exists() or out.has(STARTUP_CRASH), deadline, proc)
        if started and (logs / "log.json").exists():
            return proc, output
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        output.thread.join(timeout=10)
        first = first or "\n".join(output.lines[:60] + ["..."] + output.lines[-40:])
        if attempt == 2 or not output.has(STARTUP_CRASH):
            break
        print(f"\na rank died while starting (attempt {attempt}); starting the job again:\n{first}")
    pytest.fail(f"the job did not reach its first epoch:\n{first}")


def _wait(condition, deadline: float, proc) -> bool:
    while not condition():
        if time.monotonic() > deadline or proc.poll() is not None:
            return condition()
        time.sleep(0.05)
    return True


@pytest.mark.mpi
@pytest.mark.end_to_end
@pytest.mark.emulated
def test_a_whole_machine_dies_and_the_survivors_train_to_the_end(tmp_path):
    reason = emulation_unavailable()
    if reason:
        pytest.skip(reason)
    logs = tmp_path / "log"
    command = ["--fault-tolerant", *DETECTOR, sys.executable, str(TRAIN), *RUN, "--elastic", "--log-dir", str(logs)]
    deadline = time.monotonic() + BOUND
    proc, output = _start_training(logs, command, deadline)
    tag = str(proc.pid)  # the launcher's pid names the emulated cluster
    try:
        killed = emulate.kill_machine(tag, 2)  # launch ranks 4 and 5, and the daemon that started them
        finished = _wait(lambda: output.has(r"^wrote .*log\.json"), deadline, proc)  # rank 0's last words
        assert finished, f"the survivors did not finish within {BOUND:.0f} s:\n{output.tail()}"
        time.sleep(1)  # any last words of the other survivors
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun waits for the lost daemon; the reaper removes the cluster
        proc.wait()
        output.thread.join(timeout=10)
    text = output.tail()
    assert "Traceback" not in "\n".join(output.lines), text
    line = [x for x in output.lines if "failed at step" in x]
    assert len(line) == 1 and re.fullmatch(r"ranks 4, 5 failed at step \d+; continuing on 4 ranks "
                                           r"\(recovered in [\d.]+ s\)", line[0]), text
    log = json.loads((logs / "log.json").read_text())
    records = log["epochs"]
    assert [r["epoch"] for r in records] == list(range(1, 7)), records
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"], records
    assert records[-1]["test_accuracy_averaged"] > 0.8, records[-1]
    (failure,) = log["failures"]
    assert failure["failed"] == [4, 5] and failure["ranks"] == 4, failure
    detection = failure["noticed_at"] - killed
    assert 0 < detection < DETECTION_BOUND, failure
    print(f"\nmachine 2 (ranks 4, 5) killed: noticed after {detection:.2f} s, recovered in "
          f"{failure['recover_seconds']:.2f} s, training resumed {failure['resumed_at'] - killed:.2f} s after the kill")


PORT = 7717
_CONNECT = ("import socket, sys\n"
            "try:\n"
            "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
            "    print('connected')\n"
            "except OSError as error:\n"
            "    print(type(error).__name__)\n")


def _connect(cluster: emulate.EmulatedCluster, source: int, target: int) -> str:
    """'connected', or how a TCP connection from machine ``source`` to ``target``'s :data:`PORT` failed."""
    command = ["ip", "netns", "exec", cluster.namespaces[source], sys.executable, "-c", _CONNECT,
               cluster.addresses[target], str(PORT)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.mark.emulated
def test_a_killed_machine_goes_silent():
    """kill_machine: everything on the machine dies and nothing reaches it any more; the other machines
    go on; the ssh stand-in that started a command there hangs (as an ssh client whose peer went
    silent) until the cluster is removed, instead of telling mpirun that the command ended."""
    reason = emulation_unavailable()
    if reason:
        pytest.skip(reason)
    listen = f"{sys.executable} -m http.server {PORT} --bind 0.0.0.0"
    with emulate.EmulatedCluster(3, 10**9) as cluster:
        remote = [subprocess.Popen([str(cluster.agent_script), host, listen], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for host in cluster.hostnames[1:]]
        deadline = time.monotonic() + 60
        while _connect(cluster, 0, 2) != "connected" or _connect(cluster, 0, 1) != "connected":
            assert time.monotonic() < deadline, "the listeners did not start on machines 1 and 2"
            time.sleep(0.2)
        emulate.kill_machine(cluster.tag, 2)
        assert emulate.machine_pids(cluster.tag, 2) == [] and emulate.machine_pids(cluster.tag, 1)
        assert _connect(cluster, 0, 2) == "TimeoutError"  # no answer at all: no RST, as from a dead machine
        assert _connect(cluster, 0, 1) == "connected"
        assert remote[1].poll() is None  # the stand-in for machine 2 hangs on
        with pytest.raises(emulate.EmulationError, match="no emulated machine 7"):
            emulate.kill_machine(cluster.tag, 7)
        remote[0].kill()
    assert remote[1].wait(timeout=10) == 137  # once the cluster is gone, with the killed command's status
