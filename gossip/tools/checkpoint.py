"""Rank-consistent, atomic checkpoints: every rank's state at the same step, or none of it; resumable
on the same number of ranks (each rank its own file) or on another (the ranks' states combined).

Layout of ``directory``::

    step-00001200/rank-0.pt ... rank-<n-1>.pt     one file per rank (its model, optimizer, RNG, data position)
    step-00001200/checkpoint.json                 how many ranks wrote it, when it was published, the caller's info
    latest                                        the name of the newest complete step directory

:func:`save` writes each rank's file to a temporary name and renames it (``os.replace`` is atomic
on POSIX), waits for every rank, and only then writes ``checkpoint.json`` and points ``latest`` at
the new directory, again by temp-file-and-rename. A job killed at any moment leaves ``latest``
naming a complete checkpoint. The newest ``keep`` checkpoints in the order they were published are
kept (not by name: after a change of the number of ranks, step numbers need not grow).

Reading is collective and agreed: rank 0 reads ``latest`` and ``checkpoint.json`` and broadcasts
them (:func:`latest`), so every rank loads the same step. :func:`load` gives each rank its own
file and refuses a checkpoint written by another number of ranks; :func:`load_combined` folds the
N files of such a checkpoint into one state (by default the mean of every floating-point tensor,
the first rank's value of everything else), read by rank 0 one file at a time and broadcast.
Files are read with ``torch.load(weights_only=True)`` (no pickled code runs).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gossip import runtime
from gossip.errors import GossipError
from gossip.ops.collectives import allgather, barrier, broadcast

LATEST = "latest"
META = "checkpoint.json"
MEAN, FIRST = "mean", "first"
_NOTHING = object()  # no rank folded in yet

#: ``rule(path, value) -> "mean" | "first"`` for :func:`load_combined`: ``path`` is the tuple of
#: keys and list indices that lead to ``value`` in a rank's state, ``value`` rank 0's leaf there.
Rule = Callable[[tuple, Any], str]


class RankCountError(GossipError):
    """A checkpoint written by ``saved`` ranks, loaded per rank by a job of ``ranks`` ranks."""

    def __init__(self, message: str, saved: int, ranks: int) -> None:
        super().__init__(message)
        self.saved, self.ranks = saved, ranks


@dataclass(frozen=True)
class Saved:
    """The newest complete checkpoint of a directory, as :func:`latest` reports it."""

    step: int
    ranks: int  # how many ranks wrote it (one file each)
    path: Path  # its step directory
    info: dict = field(default_factory=dict)  # what the caller passed to :func:`save` as ``info``


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


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None


def save(directory: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2,
         info: dict[str, Any] | None = None) -> Path:
    """Collective: write this rank's ``state`` for ``step`` and publish the checkpoint; keep the newest ``keep``.

    ``state`` may hold tensors, numbers, strings, lists and dicts (what ``weights_only`` loading
    accepts): model and optimizer ``state_dict()``, ``torch.get_rng_state()``, a data position.
    ``info`` (rank 0's, JSON-serialisable: e.g. the epoch and the settings) is stored beside the
    number of ranks in ``checkpoint.json`` and returned by :func:`latest` without reading any state.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, size = runtime.rank(), runtime.size()
    target = step_directory(directory, step)
    newest, problem = _find_latest(Path(directory)) if rank == 0 else None, None
    if newest is not None and newest.path == target and newest.ranks != size:
        problem = (f"{target} is the latest checkpoint, written by {newest.ranks} ranks: {size} ranks cannot "
                   "replace it in place (a kill would leave no complete checkpoint); save under another step")
    problem = _broadcast_object(problem)
    if problem:
        raise GossipError(problem)
    target.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what an earlier job left in this directory (another number of ranks) is not part of it
        (target / META).unlink(missing_ok=True)
        for stale in target.glob("rank-*.pt"):
            if not stale.stem.removeprefix("rank-").isdigit() or int(stale.stem.removeprefix("rank-")) >= size:
                stale.unlink(missing_ok=True)
    barrier()
    _write_atomically(target / f"rank-{rank}.pt",
                      lambda p: torch.save({"step": step, "ranks": size, "state": state}, p))
    barrier()  # every rank's file is in place before anyone points at the directory
    if rank == 0:
        _publish(Path(directory), target, step, size, keep, info or {})
    barrier()
    return target


def _publish(directory: Path, target: Path, step: int, size: int, keep: int, info: dict) -> None:
    """Rank 0: ``checkpoint.json``, then ``latest``, then remove all but the newest ``keep`` published."""
    pointer = directory / LATEST
    previous = pointer.read_text().strip() if pointer.exists() else None
    published = {p.name: m.get("sequence", 0) for p in directory.glob("step-*")
                 if p.is_dir() and p != target and (m := _read_meta(p)) is not None}
    if previous and previous not in published and (directory / previous).is_dir():
        published[previous] = max(published.values(), default=0)  # written before checkpoint.json existed
    sequence = max(published.values(), default=0) + 1
    meta = {"step": step, "ranks": size, "sequence": sequence, "info": info}
    _write_atomically(target / META, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    _write_atomically(pointer, lambda p: p.write_text(target.name + "\n"))
    newest_first = sorted(published, key=lambda name: published[name], reverse=True)
    kept = {target.name, *newest_first[:keep - 1]}
    for stale in directory.glob("step-*"):  # older ones, and unpublished leftovers of killed jobs
        if stale.is_dir() and stale.name not in kept:
            shutil.rmtree(stale, ignore_errors=True)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, or None if there is none (this rank's read)."""
    pointer = Path(directory) / LATEST
    if not pointer.exists():
        return None
    return int(pointer.read_text().strip().removeprefix("step-"))


def _broadcast_object(value: Any) -> Any:
    """Collective: rank 0's ``value`` (what ``torch.save`` writes and ``weights_only`` loading reads) on every rank."""
    data = None
    if runtime.rank() == 0:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    length = int(broadcast(torch.tensor([0 if data is None else data.numel()], dtype=torch.int64))[0])
    data = broadcast(data if data is not None else torch.empty(length, dtype=torch.uint8))
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def _find_latest(directory: Path) -> Saved | None:
    """Rank 0's read of the newest complete checkpoint."""
    step = latest_step(directory)
    if step is None:
        return None
    path = step_directory(directory, step)
    meta = _read_meta(path)
    if meta is None:  # written before checkpoint.json existed: one file per rank
        ranks = len(list(path.glob("rank-*.pt")))
        return Saved(step, ranks, path, {})
    return Saved(int(meta["step"]), int(meta["ranks"]), path, dict(meta.get("info") or {}))


def latest(directory: str | os.PathLike) -> Saved | None:
    """Collective: the newest complete checkpoint in ``directory`` (rank 0's reading, on every rank), or None."""
    found = _find_latest(Path(directory)) if runtime.rank() == 0 else None
    shared = _broadcast_object(None if found is None else
                               {"step": found.step, "ranks": found.ranks, "path": str(found.path),
                                "info": json.dumps(found.info)})
    if shared is None:
        return None
    return Saved(shared["step"], shared["ranks"], Path(shared["path"]), json.loads(shared["info"]))


def load(directory: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """Collective: ``(step, this rank's state)`` from the newest complete checkpoint, or None if none.

    Raises :class:`RankCountError` if the checkpoint was written by another number of ranks (see
    :func:`load_combined`), and :class:`GossipError` naming the ranks whose file is missing or
    holds another step.
    """
    rank, size = runtime.rank(), runtime.size()
    saved = latest(directory)
    if saved is None:
        return None
    if saved.ranks != size:
        raise RankCountError(f"checkpoint {saved.path} was written by {saved.ranks} ranks and this job has {size}: "
                             f"each rank's own file exists only on {saved.ranks} ranks; load_combined() folds them "
                             "into one state (train.py's --resume does)", saved.ranks, size)
    path, found, payload = saved.path / f"rank-{rank}.pt", -2, None
    if path.exists():
        payload = torch.load(path, weights_only=True, map_location="cpu")
        found = int(payload["step"])
    steps = allgather(torch.tensor([found], dtype=torch.int64)).tolist()
    if any(s != saved.step for s in steps):
        missing = [r for r, s in enumerate(steps) if s == -2]
        detail = f"ranks {missing} have no file in {saved.path}" if missing else f"steps per rank: {steps}"
        raise GossipError(f"checkpoint in {directory} is not consistent across ranks: {detail}")
    return saved.step, payload["state"]


def default_rule(path: tuple, value: Any) -> str:
    """:func:`load_combined`'s default: the mean of floating-point tensors, the first rank's value of the rest."""
    return MEAN if isinstance(value, torch.Tensor) and value.is_floating_point() else FIRST


def load_combined(directory: str | os.PathLike, rule: Rule = default_rule) -> tuple[Saved, dict[str, Any]] | None:
    """Collective: ``(the checkpoint, one state combined from its ranks' files)``, the same on every rank; None if none.

    Rank 0 reads the N files of the newest checkpoint one at a time and folds each leaf of the
    state by ``rule(path, value)``: ``"mean"`` (the average over the N ranks, accumulated in
    float64 and returned in the leaf's dtype; numbers become floats) or ``"first"`` (rank 0's
    value). The result is broadcast. Use it to resume on another number of ranks; what to do with
    rank-specific state (a push-sum weight, a gradient tracker) is the caller's choice.
    """
    saved = latest(directory)
    if saved is None:
        return None
    outcome: Any = None
    if runtime.rank() == 0:
        try:
            outcome = {"state": _combine(saved, rule)}
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
            outcome = {"error": f"cannot combine checkpoint {saved.path} of {saved.ranks} ranks: {error}"}
    outcome = _broadcast_object(outcome)
    if "error" in outcome:
        raise GossipError(outcome["error"])
    return saved, outcome["state"]


def _combine(saved: Saved, rule: Rule) -> dict[str, Any]:
    total, how = _NOTHING, {}  # the running sums (or rank 0's leaves), and each leaf's rule and dtype
    for r in range(saved.ranks):
        path = saved.path / f"rank-{r}.pt"
        if not path.exists():
            raise FileNotFoundError(f"rank {r}'s file {path} is missing")
        payload = torch.load(path, weights_only=True, map_location="cpu")
        if int(payload["step"]) != saved.step:
            raise ValueError(f"rank {r}'s file holds step {payload['step']}, not {saved.step}")
        total = _fold(total, payload["state"], (), rule, how, r)
    return _finish(total, (), how, saved.ranks)


def _fold(total: Any, value: Any, path: tuple, rule: Rule, how: dict, rank: int) -> Any:
    """Add rank ``rank``'s ``value`` into the running ``total`` (:data:`_NOTHING` for rank 0)."""
    where = "/".join(map(str, path)) or "the state"
    if isinstance(value, dict):
        if total is not _NOTHING and set(total) != set(value):
            raise ValueError(f"rank {rank}'s {where} has keys {sorted(map(str, value))}, rank 0's "
                             f"{sorted(map(str, total))}")
        return {k: _fold(_NOTHING if total is _NOTHING else total[k], v, (*path, k), rule, how, rank)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        if total is not _NOTHING and len(total) != len(value):
            raise ValueError(f"rank {rank}'s {where} has {len(value)} entries, rank 0's {len(total)}")
        folded = [_fold(_NOTHING if total is _NOTHING else total[i], v, (*path, i), rule, how, rank)
                  for i, v in enumerate(value)]
        return folded if isinstance(value, list) else tuple(folded)
    if total is _NOTHING:  # rank 0: the rule decides
        kind = rule(path, value)
        if kind not in (MEAN, FIRST):
            raise ValueError(f"the rule for {where} gave {kind!r}; expected {MEAN!r} or {FIRST!r}")
        averageable = (isinstance(value, torch.Tensor) and value.is_floating_point()
                       or isinstance(value, int | float) and not isinstance(value, bool))
        if kind == MEAN and not averageable:
            raise TypeError(f"{where} ({getattr(value, 'dtype', type(value).__name__)}) cannot be averaged")
        how[path] = (kind, getattr(value, "dtype", float))
        if kind == FIRST:
            return value
        return value.to(torch.float64, copy=True) if isinstance(value, torch.Tensor) else float(value)
    if how[path][0] == FIRST:
        return total
    if isinstance(value, torch.Tensor) != isinstance(total, torch.Tensor) or \
            isinstance(value, torch.Tensor) and value.shape != total.shape:
        raise ValueError(f"rank {rank}'s {where} is {_shape(value)}, rank 0's {_shape(total)}")
    return total.add_(value.to(torch.float64)) if isinstance(value, torch.Tensor) else total + float(value)


def _shape(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _finish(total: Any, path: tuple, how: dict, ranks: int) -> Any:
    """The sums divided by the number of ranks, each in its leaf's dtype."""
    if isinstance(total, dict):
        return {k: _finish(v, (*path, k), how, ranks) for k, v in total.items()}
    if isinstance(total, list | tuple):
        done = [_finish(v, (*path, i), how, ranks) for i, v in enumerate(total)]
        return done if isinstance(total, list) else tuple(done)
    kind, dtype = how[path]
    if kind == FIRST:
        return total
    return (total / ranks).to(dtype) if isinstance(total, torch.Tensor) else total / ranks
