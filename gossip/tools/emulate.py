"""An emulated cluster on one Linux host: machines as network namespaces joined by shaped links.

``gossiprun --emulate MxR --link RATE -np N cmd ...`` (root, Linux) makes M machines of R ranks:

* each machine is a network namespace with its own address (``10.213.0.<k+1>/24`` on ``eth0``)
  and, for every process started in it, its own host name (``node<k>``, a UTS namespace) and its
  own ``/etc/hosts`` naming every machine (a private mount namespace: the host's file is never
  edited);
* the machines' ``eth0`` are veth pairs into one Linux bridge, which lives in a namespace of its
  own ("the switch"); nothing is added to the host's network;
* each machine's link is shaped to RATE in both directions with a token bucket (``tc ... tbf``:
  on the machine's ``eth0`` for what it sends, on its switch port for what it receives), with a
  queue of a few milliseconds so that acknowledgements are not stuck behind seconds of data.

The job is started by the ordinary ``mpirun`` (run inside machine 0) with a hostfile and an ssh
stand-in that enters the named machine, so MPI sees separate machines: shared memory within a
machine, TCP between them. Everything made is named ``gossip-<launcher pid>-...``, so two emulated
jobs never collide, and removed when the job ends, on Ctrl-C, on a failed job and when the
launcher is killed: a reaper process in its own session holds a pipe from the launcher and tears
the cluster down when that pipe closes, however the launcher ended. Namespaces left by a launcher
that is no longer alive (say the host lost power mid-job) are removed by the next emulated job.

A machine can be made to die as a real one does (:func:`kill_machine`, for testing fault tolerance):
its link goes down, then everything on it (its ranks and Open MPI's daemon) is killed with
SIGKILL, so its peers get no FIN or RST; the ssh stand-in that started its daemon hangs from then
on, as an ssh client does whose peer went silent, instead of reporting the daemon's end to
``mpirun``.

Bad input is refused before anything is created: not root, not Linux, ``ip``/``tc``/``unshare``
missing, network namespaces or the ``tbf`` qdisc unavailable, an unparsable rate or shape, or
M×R different from ``-np``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "gossip-"
SUBNET = "10.213.0"
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
#: The longest a packet may wait in a shaped link's queue (tbf's ``latency``).
QUEUE_LATENCY_MS = 5
_MAX_MACHINES = 250


class EmulationError(RuntimeError):
    """The emulated cluster cannot be made here, or its description is wrong."""


@dataclass(frozen=True)
class ClusterShape:
    """M machines of R ranks each."""

    machines: int
    ranks_per_machine: int

    @property
    def size(self) -> int:
        """M × R, the number of ranks."""
        return self.machines * self.ranks_per_machine

    def __str__(self) -> str:
        return f"{self.machines}x{self.ranks_per_machine}"


def parse_shape(text: str) -> ClusterShape:
    """``"4x2"`` → 4 machines of 2 ranks."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise EmulationError(f"--emulate takes MACHINESxRANKS (e.g. 4x2), got {text!r}")
    machines, ranks = int(match.group(1)), int(match.group(2))
    if not 1 <= machines <= _MAX_MACHINES or ranks < 1:
        raise EmulationError(f"--emulate {text}: need 1 to {_MAX_MACHINES} machines and at least 1 rank per machine")
    return ClusterShape(machines, ranks)


def parse_rate(text: str) -> int:
    """A link rate in tc's units (``250mbit``, ``1gbit``, ``100Mbit``, ``12.5mbps`` = bytes/s) → bits/s."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in _RATE_UNITS:
        raise EmulationError(f"--link takes a rate such as 100mbit, 250mbit or 1gbit (units: "
                             f"{', '.join(_RATE_UNITS)}), got {text!r}")
    bits = int(float(match.group(1)) * _RATE_UNITS[unit])
    if not 8000 <= bits <= 10**12:
        raise EmulationError(f"--link {text}: the rate must lie between 8kbit and 1tbit")
    return bits


def format_rate(bits: int) -> str:
    """A rate in bits/s in tc's units, e.g. ``250000000`` → ``"250mbit"``."""
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale and bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


def preflight() -> None:
    """Raise :class:`EmulationError` unless namespaces, veths, bridges and tbf work here.

    Makes nothing that outlives the check: tbf is tried on the loopback device of an anonymous
    network namespace that vanishes with the probing process.
    """
    if not sys.platform.startswith("linux"):
        raise EmulationError(f"--emulate needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise EmulationError("--emulate needs root (it creates network namespaces and shapes links with tc); "
                             "run it with sudo or as root")
    missing = [tool for tool in ("ip", "tc", "unshare", "mount", "hostname") if shutil.which(tool) is None]
    if missing:
        raise EmulationError(f"--emulate needs {', '.join(missing)} on PATH (Debian: apt-get install iproute2 "
                             "util-linux hostname)")
    if not Path("/etc/hosts").exists():
        raise EmulationError("--emulate gives each machine its own /etc/hosts by mounting over /etc/hosts, "
                             "which does not exist here")
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c",
         "ip link set lo up && tc qdisc add dev lo root tbf rate 1mbit burst 32kb latency 5ms"],
        capture_output=True, text=True)
    if probe.returncode != 0:
        raise EmulationError("--emulate cannot shape a link here (network namespace plus the tbf qdisc): "
                             + (probe.stderr.strip() or f"exit code {probe.returncode}"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise EmulationError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _tc(namespace: str, *args: str) -> None:
    _ip("netns", "exec", namespace, "tc", *args)


def tbf_arguments(rate_bits: int) -> list[str]:
    """``tbf`` settings for a link of ``rate_bits``: a bucket of 2 ms of traffic (at least 64 KiB,
    so one segmentation-offloaded packet passes whole) and a queue of :data:`QUEUE_LATENCY_MS`."""
    burst = max(64 * 1024, rate_bits // 8 * 2 // 1000)
    return ["rate", f"{rate_bits}bit", "burst", str(burst), "latency", f"{QUEUE_LATENCY_MS}ms"]


def _namespaces() -> list[str]:
    listing = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def _kill_members(namespace: str) -> None:
    """SIGKILL every process in ``namespace`` (ranks, mpirun, daemons), until none is left."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", namespace, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _dead_machines(tag: str) -> Path:
    """Where :func:`kill_machine` marks the machines of cluster ``tag`` it killed (one empty file each)."""
    return Path(tempfile.gettempdir()) / f"{PREFIX}{tag}" / "dead"


def machine_namespace(tag: str, machine: int) -> str:
    """The network namespace of machine ``machine`` of the emulated cluster ``tag`` (the launcher's pid)."""
    return f"{PREFIX}{tag}-m{machine}"


def switch_namespace(tag: str) -> str:
    """The namespace of the switch (the bridge every machine's link plugs into) of cluster ``tag``."""
    return f"{PREFIX}{tag}-sw"


def machine_pids(tag: str, machine: int) -> list[int]:
    """The processes running on machine ``machine`` of the emulated cluster ``tag`` (none once it is gone)."""
    listing = _ip("netns", "pids", machine_namespace(tag, machine), check=False).stdout
    return [int(p) for p in listing.split() if p.isdigit()]


def kill_machine(tag: str, machine: int) -> float:
    """Make machine ``machine`` of the emulated cluster ``tag`` die as a real one does; returns when
    it died (``time.time()``, taken after the link went down and before the first SIGKILL).

    First its link goes down (its switch port is set down: from then on nothing it sends reaches
    anyone and nothing reaches it, so no FIN or RST tells its peers that its connections are
    gone), then every process on it is killed with SIGKILL: its ranks and Open MPI's daemon
    (``prted``) die together, as in a power loss. Killing machine 0, where ``mpirun`` runs, ends
    the job. Raises :class:`EmulationError` if the machine does not exist."""
    namespace = machine_namespace(tag, machine)
    if namespace not in _namespaces():
        raise EmulationError(f"no emulated machine {machine} in cluster {tag} (no namespace {namespace})")
    (_dead_machines(tag) / namespace).touch()  # its ssh stand-in hangs from now on instead of ending
    _ip("-n", switch_namespace(tag), "link", "set", f"port{machine}", "down")
    died = time.time()
    _kill_members(namespace)
    return died


def remove(tag: str) -> None:
    """Remove every namespace of the emulated cluster ``tag`` (killing what runs in them) and its files."""
    for namespace in _namespaces():
        if namespace.startswith(f"{PREFIX}{tag}-"):
            _kill_members(namespace)
            _ip("netns", "del", namespace, check=False)
    shutil.rmtree(Path(tempfile.gettempdir()) / f"{PREFIX}{tag}", ignore_errors=True)


def remove_stale() -> list[str]:
    """Remove emulated clusters whose launcher is no longer alive; returns their tags."""
    tags = set()
    for namespace in _namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-.+", namespace)
        if match and not _alive(int(match.group(1))):
            tags.add(match.group(1))
    for tag in sorted(tags):
        remove(tag)
    return sorted(tags)


_ENTER = """#!/bin/sh
# enter NAMESPACE HOSTNAME command...: run a command on one emulated machine.
ns=$1; name=$2; shift 2
exec ip netns exec "$ns" unshare --uts --mount --propagation private \\
    sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' enter {hosts} "$name" "$@"
"""

_AGENT = """#!/bin/sh
# An ssh stand-in for mpirun: AGENT HOST remote-command... runs the command on emulated machine HOST.
# Like an ssh client, it stays on the launching machine while the command runs, and ends with its
# status; if HOST died (kill_machine), it hangs as an ssh client does on a link that went silent,
# until the cluster is removed.
host=$1; shift
case "$host" in
{cases}
  *) echo "gossiprun --emulate: no emulated machine named $host" >&2; exit 255 ;;
esac
exec 3<&0
{enter} "$ns" "$host" sh -c "$*" <&3 3<&- &
remote=$!
exec 3<&-
trap 'kill -TERM $remote 2>/dev/null' TERM HUP INT
wait $remote 2>/dev/null
status=$?
while [ -e {dead}/"$ns" ] && [ -d {dead} ]; do sleep 1; done
exit $status
"""


class EmulatedCluster:
    """M machines (network namespaces) on one bridge, each link shaped to ``rate_bits`` both ways.

    Use as a context manager: entering creates it, leaving removes it (:func:`reaped_cluster`
    also runs :func:`preflight` first and removes it should this process be killed). ``tag`` names
    everything made (default: this process's pid).
    """

    def __init__(self, machines: int, rate_bits: int, tag: str | None = None) -> None:
        self.machines = machines
        self.rate_bits = rate_bits
        self.tag = tag or str(os.getpid())
        self.switch = switch_namespace(self.tag)
        self.namespaces = [machine_namespace(self.tag, k) for k in range(machines)]
        self.hostnames = [f"node{k}" for k in range(machines)]
        self.addresses = [f"{SUBNET}.{k + 1}" for k in range(machines)]
        self.directory = Path(tempfile.gettempdir()) / f"{PREFIX}{self.tag}"
        self.enter_script = self.directory / "enter"
        self.agent_script = self.directory / "agent"
        self.hostfile = self.directory / "hostfile"
        self.dead = _dead_machines(self.tag)

    def __enter__(self) -> EmulatedCluster:
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        remove(self.tag)

    def create(self) -> None:
        """Make the namespaces, links, shaping and the launch files; on any failure remove them all."""
        try:
            self._create()
        except BaseException:
            remove(self.tag)
            raise

    def _create(self) -> None:
        self.directory.mkdir(mode=0o755)
        hosts = self.directory / "hosts"
        hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
                         + "".join(f"{a} {h}\n" for a, h in zip(self.addresses, self.hostnames, strict=True)))
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        shaping = tbf_arguments(self.rate_bits)
        for k, namespace in enumerate(self.namespaces):
            port = f"port{k}"
            _ip("netns", "add", namespace)
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[k]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _tc(namespace, "qdisc", "add", "dev", "eth0", "root", "tbf", *shaping)  # what machine k sends
            _tc(self.switch, "qdisc", "add", "dev", port, "root", "tbf", *shaping)  # what machine k receives
        self.enter_script.write_text(_ENTER.format(hosts=shlex.quote(str(hosts))))
        cases = "\n".join(f"  {h}) ns={n} ;;" for h, n in zip(self.hostnames, self.namespaces, strict=True))
        self.dead.mkdir(mode=0o755)
        self.agent_script.write_text(_AGENT.format(cases=cases, enter=shlex.quote(str(self.enter_script)),
                                                   dead=shlex.quote(str(self.dead))))
        for script in (self.enter_script, self.agent_script):
            script.chmod(0o755)

    def write_hostfile(self, ranks_per_machine: int) -> Path:
        """Write the MPI hostfile (every machine with ``ranks_per_machine`` slots) and return its path."""
        self.hostfile.write_text("".join(f"{h} slots={ranks_per_machine}\n" for h in self.hostnames))
        return self.hostfile

    def launch_command(self, mpirun: list[str], ranks_per_machine: int) -> list[str]:
        """``mpirun`` (the executable and its flags up to, not including, the command) run on machine 0
        with this cluster's hostfile and ssh stand-in; ranks fill the machines in blocks."""
        hostfile = self.write_hostfile(ranks_per_machine)
        return [str(self.enter_script), self.namespaces[0], self.hostnames[0], *mpirun,
                "--hostfile", str(hostfile), "--prtemca", "plm_ssh_agent", str(self.agent_script),
                "--map-by", "slot", "--bind-to", "none"]


def _reaper(tag: str) -> None:
    """Block until the launcher's pipe closes (it ended, however), then remove cluster ``tag``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(1):
            pass
    remove(tag)


@contextlib.contextmanager
def reaped_cluster(machines: int, rate_bits: int):
    """An :class:`EmulatedCluster` that is removed when the block ends and, should this process be
    killed, by a reaper process in its own session watching a pipe from this one."""
    preflight()
    remove_stale()
    cluster = EmulatedCluster(machines, rate_bits)
    # Run as a script, not ``-m gossip.tools.emulate``: the package would import torch and initialise MPI.
    reaper = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--reap", cluster.tag],
                              stdin=subprocess.PIPE, start_new_session=True)
    try:
        with cluster:
            yield cluster
    finally:
        reaper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=60)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reap":
        _reaper(sys.argv[2])
    else:
        print("usage: python gossip/tools/emulate.py --reap TAG (used by gossiprun --emulate)", file=sys.stderr)
        sys.exit(2)
