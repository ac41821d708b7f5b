"""Rank-consistent, atomic checkpoints: every rank's state at the same step, or none of it.

Layout of ``directory``::

    step-00001200/rank-0.pt ... rank-<n-1>.pt     one file per rank (its model, optimizer, RNG, data position)
    latest                                        the name of the newest complete step directory

:func:`save` writes each rank's file to a temporary name and renames it (``os.replace`` is atomic
on POSIX), waits for every rank, and only then points ``latest`` at the new directory, again by
temp-file-and-rename. A job killed at any moment leaves ``latest`` naming a complete checkpoint.
:func:`load` reads the file named by ``latest`` with ``torch.load(weights_only=True)`` (no pickled
code runs) and checks that every rank found the same step.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from gossip import runtime
from gossip.errors import GossipError
from gossip.ops.collectives import allgather, barrier

LATEST = "latest"


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def step_directory(directory: str | os.PathLike, step: int) -> Path:
    """The folder of step ``step``'s checkpoint inside ``directory`` (``step-00001200``)."""
    return Path(directory) / f"step-{step:08d}"


def save(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Collective: write this rank's ``state`` for ``step`` and publish the checkpoint; keep the newest ``keep``.

    ``state`` may hold tensors, numbers, strings, lists and dicts (what ``weights_only`` loading
    accepts): model and optimizer ``state_dict()``, ``torch.get_rng_state()``, a data position.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank = runtime.rank()
    target = step_directory(directory, step)
    target.mkdir(parents=True, exist_ok=True)
    _write_atomically(target / f"rank-{rank}.pt", lambda p: torch.save({"step": step, "state": state}, p))
    barrier()  # every rank's file is in place before anyone points at the directory
    if rank == 0:
        _write_atomically(Path(directory) / LATEST, lambda p: p.write_text(target.name + "\n"))
        older = sorted(p for p in Path(directory).glob("step-*") if p.is_dir() and p.name < target.name)
        for stale in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return target


def latest_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, or None if there is none."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    return int(pointer.read_text().strip().removeprefix("step-"))


def load(directory: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """Collective: ``(step, this rank's state)`` from the newest complete checkpoint, or None if none.

    Raises :class:`GossipError` naming the ranks if they disagree on the step or a rank's file is
    missing (e.g. the job was restarted with a different number of ranks).
    """
    rank, size = runtime.rank(), runtime.size()
    step = latest_step(directory)
    found, problem = -1, ""
    if step is not None:
        path = step_directory(directory, step) / f"rank-{rank}.pt"
        if path.exists():
            payload = torch.load(path, weights_only=True, map_location="cpu")
            found = int(payload["step"])
        else:
            problem = f"missing {path}"
    steps = allgather(torch.tensor([found if not problem else -2], dtype=torch.int64)).tolist()
    if len(set(steps)) != 1:
        missing = [r for r, s in enumerate(steps) if s == -2]
        detail = f"ranks {missing} have no file in {step_directory(directory, step)} (saved with fewer ranks " \
                 f"than {size}?)" if missing else f"steps per rank: {steps}"
        raise GossipError(f"checkpoint in {directory} is not consistent across ranks: {detail}")
    if found < 0:
        return None
    return found, payload["state"]
