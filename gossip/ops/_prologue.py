"""The start every op shares: validate the argument, agree across ranks, widen half types, pick the output.

An op first finds its local problems (:func:`tensor_problem`, :func:`check_out`, its own checks)
without raising, so that one rank's bad argument cannot leave the others waiting in a transfer;
:func:`agree` then either raises that problem with the rank (cross-rank check off) or lets every
rank agree, in one small allreduce (:mod:`gossip.ops._checks`), that the inputs fit together,
raising :class:`gossip.InputMismatchError` on every rank when they do not. Half types are reduced
in float32 (:func:`widen`), and the result goes into the caller's ``out=`` when it fits and does
not overlap what neighbours still read (:func:`pick_output`), else into a new tensor. In
fault-tolerant mode every op is wrapped by :func:`failures_raised`, so that an MPI error of a
failed rank or a revoked communicator (posting an op on it fails at once) raises
:class:`gossip.RankFailure`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from gossip.ops import _checks as checks
from gossip.runtime import Runtime, current_or_none
from gossip.transport._buffers import FLOAT_DTYPES, LOW_PRECISION, overlaps

#: dtypes of the weighted (neighbour, hierarchical) ops: float32/float64, and float16/bfloat16 reduced in float32.
FLOATS = FLOAT_DTYPES

Problem = str | TypeError | ValueError | None


def failures_raised(what: str) -> Callable:
    """Decorate an op: in fault-tolerant mode an MPI error of a failed rank inside it raises
    :class:`gossip.RankFailure` naming the op ``what`` (after revoking the runtime's communicators), and
    so does a failure already known when the op is called: nothing is posted on a broken communicator."""
    def decorate(op: Callable) -> Callable:
        @functools.wraps(op)
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            rt = current_or_none()
            if rt is None or rt.failures is None:
                return op(*args, **kwargs)
            if rt.failures.broken():  # posting on a revoked communicator can crash Open MPI's libnbc
                rt.failures.fail(what)
            with rt.failures.guard(what):
                return op(*args, **kwargs)
        return call
    return decorate


def tensor_problem(tensor: object, op: str, allowed: tuple[torch.dtype, ...],
                   bad_dtype: str = "{op} does not support dtype {dtype}") -> str | None:
    """What is wrong with ``tensor`` as ``op``'s argument (not a tensor, or a dtype outside
    ``allowed``; ``bad_dtype`` words the latter), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"{op} takes a torch.Tensor, got {type(tensor).__name__}"
    if tensor.dtype not in allowed:
        return bad_dtype.format(op=op, dtype=tensor.dtype)
    return None


def check_out(out: torch.Tensor, like: torch.Tensor) -> None:
    """Raise ValueError unless ``out`` has ``like``'s shape, dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out has shape {tuple(out.shape)} {out.dtype} on {out.device}, expected "
            f"{tuple(like.shape)} {like.dtype} on {like.device}"
        )


def describe(parts: Iterable[object]) -> str:
    """``parts`` as words: ``(3,), float32, mean``."""
    return ", ".join(str(p).replace("torch.", "") for p in parts)


def agree(rt: Runtime, op: str, parts: tuple, problem: Problem, *,
          description: str | Callable[[], str] | None = None,
          sends_to: Iterable[int] | None = None, receives_from: Iterable[int] | None = None,
          protocol: int | None = None) -> None:
    """Collective when the cross-rank check is on: every rank's ``parts`` (shape, dtype, ...) must
    match along the given edges (default: a ring, so that all ranks share one ``parts``), every
    rank must take the same ``protocol``, and no rank may have a ``problem``; otherwise
    :class:`gossip.InputMismatchError` on every rank. With the check off a local ``problem`` is
    raised at once, naming the rank (a string as ValueError, an exception as its own type).
    ``description`` words ``parts`` for error messages (default: ``"<op> of <parts>"``)."""
    if not rt.check:
        if problem is not None:
            kind = ValueError if isinstance(problem, str) else type(problem)
            raise kind(f"rank {rt.rank}: {problem}") from None
        return
    if sends_to is None or receives_from is None:
        sends_to, receives_from = checks.ring_edges(rt.rank, rt.size)
    checks.agree(rt.comm, watchdog=rt.watchdog, what=op, sends_to=sends_to, receives_from=receives_from,
                 sig=checks.signature(op, *parts),
                 description=f"{op} of {describe(parts)}" if description is None else description,
                 problem=None if problem is None else str(problem), protocol=protocol)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ``dtype`` is reduced in: float32 for float16/bfloat16, else itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype it is reduced in (a float32 copy of a half tensor, else ``x`` itself)."""
    return x.float() if x.dtype in LOW_PRECISION else x


def pick_output(out: torch.Tensor | None, like: torch.Tensor, *, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """Where the op writes its result: ``out`` when it is contiguous, has ``like``'s shape, dtype
    and device and does not overlap ``avoid`` (memory still being read); else a new tensor like
    ``like``. Finish with :func:`deliver`."""
    if out is not None and out.is_contiguous() and out.shape == like.shape and out.dtype == like.dtype \
            and out.device == like.device and (avoid is None or not overlaps(out, avoid)):
        return out
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def deliver(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The op's return value: ``out`` (holding ``result``, converted as needed) when given, else ``result``."""
    if out is not None and result is not out:
        return out.copy_(result)
    return result


def weight_map(weights: Mapping[int, float] | Sequence[int], what: str, own: int, count: int,
               default: float | None, unit: str = "rank") -> dict[int, float]:
    """``{index: weight}`` of per-call weights over ranks (``unit="rank"``) or machines: from a mapping,
    or from a list of indices (each weight ``default``, or 1/(k + 1) for None). ValueError naming the
    problem: an index that is not an integer, listed twice, out of ``range(count)`` or ``own`` (its
    weight is the self weight), a weight that is not a finite number."""
    def index(i: object) -> int:
        if not isinstance(i, int | np.integer) or isinstance(i, bool):
            raise ValueError(f"{what} names {i!r}, not a {unit} index")
        return int(i)

    if isinstance(weights, Mapping):
        mapping = {}
        for i, w in weights.items():
            if not isinstance(w, int | float | np.number) or isinstance(w, bool):
                raise ValueError(f"{what} gives {unit} {i} the weight {w!r}, not a number")
            mapping[index(i)] = float(w)
    elif isinstance(weights, Sequence | np.ndarray) and not isinstance(weights, str):
        listed = [index(i) for i in weights]
        if len(set(listed)) != len(listed):
            raise ValueError(f"{what} lists a {unit} twice: {listed}")
        mapping = dict.fromkeys(listed, 1.0 / (len(listed) + 1) if default is None else default)
    else:
        raise ValueError(f"{what} must be a {{{unit}: weight}} mapping or a list of {unit}s, got {weights!r}")
    own_name = "this rank itself" if unit == "rank" else f"this rank's own {unit}"
    for i, w in mapping.items():
        if not 0 <= i < count:
            raise ValueError(f"{what} names {unit} {i}, out of range for {count} {unit}s")
        if i == own:
            raise ValueError(f"{what} names {own_name} ({i}); give its weight as self_weight")
        if not math.isfinite(w):
            raise ValueError(f"{what} gives {unit} {i} the non-finite weight {w}")
    return mapping
