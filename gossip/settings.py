"""The runtime's settings, in one object: ``gossip.init(...)`` keyword arguments over ``GOSSIP_*``
environment variables, parsed once.

Every setting has a keyword of :func:`gossip.init` and an environment variable; a keyword given
to ``init`` wins over the variable, which wins over the default. :meth:`Settings.resolve` does
the parsing and names the variable or keyword of any bad value. Nothing in the library reads a
``GOSSIP_*`` variable after ``init`` (the launcher and :mod:`gossip.transport.mpi_settings`,
which must act before MPI starts, read theirs before it). The settings in force are
``gossip.settings()``.

=====================  ===========================  =========================================
keyword                variable                     meaning (default)
=====================  ===========================  =========================================
``check``              ``GOSSIP_CHECK``             cross-rank input check of every op (on)
``abort_on_error``     ``GOSSIP_ABORT_ON_ERROR``    an uncaught exception aborts the job (on)
``shared_memory``      ``GOSSIP_SHARED_MEMORY``     blocking CPU neighbour ops through node
                                                    shared memory when all ranks share one
                                                    machine (on; off in fault-tolerant mode)
``fault_tolerant``     ``GOSSIP_FAULT_TOLERANT``    a dead rank raises :class:`gossip.RankFailure`
                                                    on the survivors, which may continue with
                                                    :func:`gossip.recover` (off; needs
                                                    ``gossiprun --fault-tolerant``)
``op_timeout``         ``GOSSIP_OP_TIMEOUT``        seconds one op may wait before
                                                    :class:`gossip.OpTimeoutError` (none)
``timeline``           ``GOSSIP_TIMELINE``          trace file (:mod:`gossip.tools.timeline`)
``debug_buffers``      ``GOSSIP_DEBUG_BUFFERS``     poison released buffers, check sent
                                                    tensors are untouched until complete (off)
``progress_thread``    ``GOSSIP_PROGRESS_THREAD``   a thread drives MPI progress while ops are
                                                    in flight (off)
``ranks_per_machine``  ``GOSSIP_RANKS_PER_MACHINE`` pretend machines of k consecutive ranks
                                                    (machines as MPI finds them)
``cuda_aware``         ``GOSSIP_CUDA_AWARE``        hand CUDA tensors to MPI directly (ask the
                                                    MPI library)
``staging_chunk_bytes`` ``GOSSIP_STAGING_CHUNK_BYTES`` chunk of the pinned staging pipeline
                                                    (4 MiB)
``stage_host``         ``GOSSIP_STAGE_HOST``        send CPU tensors through the staging
                                                    pipeline too, to test it without a GPU (off)
``message_chunk_bytes`` ``GOSSIP_MESSAGE_CHUNK_BYTES`` chunk of a large point-to-point message
                                                    (1 MiB; set the variable, not the keyword,
                                                    to keep Open MPI's TCP eager limit in step)
=====================  ===========================  =========================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from gossip.transport.mpi_settings import DEFAULT_CHUNK_BYTES as DEFAULT_MESSAGE_CHUNK_BYTES
from gossip.transport.mpi_settings import message_chunk_bytes

DEFAULT_STAGING_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Settings:
    """What the runtime does, fixed at ``init`` (see the module docstring for each field)."""

    check: bool = True
    abort_on_error: bool = True
    shared_memory: bool = True
    fault_tolerant: bool = False
    op_timeout: float | None = None
    timeline: str | None = None
    debug_buffers: bool = False
    progress_thread: bool = False
    ranks_per_machine: int | None = None
    cuda_aware: bool | None = None
    staging_chunk_bytes: int = DEFAULT_STAGING_CHUNK_BYTES
    stage_host: bool = False
    message_chunk_bytes: int = DEFAULT_MESSAGE_CHUNK_BYTES

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """The settings from ``overrides`` (``init``'s keywords; None means "not given") over
        ``environ`` (default ``os.environ``) over the defaults. Raises ValueError naming the
        variable or keyword of a bad value, TypeError for an unknown keyword."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"gossip.init got unknown setting(s) {unknown}; known: {sorted(known)}")
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, parse in _PARSERS.items():
            variable = "GOSSIP_" + name.upper()
            given = overrides.get(name)
            if given is not None:
                values[name] = parse(given, name)
            elif name == "message_chunk_bytes":
                values[name] = message_chunk_bytes()  # the one mpi_settings applied before MPI started
            elif env.get(variable) not in (None, ""):
                values[name] = parse(env[variable], variable)
        if values.get("fault_tolerant"):
            # Node shared memory synchronises every rank of the machine through one window: a rank
            # that dies inside it would leave the others waiting, so fault-tolerant mode goes without.
            if values.get("shared_memory"):
                raise ValueError("shared_memory and fault_tolerant cannot both be on: node shared memory "
                                 "is not fault tolerant (leave shared_memory unset, or 0)")
            values["shared_memory"] = False
        return replace(cls(), **values)

    def describe(self) -> str:
        """One line of the settings that differ from the defaults."""
        default = Settings()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if getattr(self, f.name) != getattr(default, f.name)]
        return ", ".join(changed) or "defaults"


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{name} must be 0 or 1 (or a bool), got {value!r}")


def _seconds(value: object, name: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{name} must be positive seconds, got {value!r}")
    return seconds


def _count(minimum: int):
    def parse(value: object, name: str) -> int:
        try:
            number = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, float) and value != number:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if number < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        return number
    return parse


def _path(value: object, name: str) -> str:
    path = os.fspath(value)  # type: ignore[arg-type]
    if not path:
        raise ValueError(f"{name} must be a file path, got an empty string")
    return str(path)


_PARSERS = {
    "check": _flag,
    "abort_on_error": _flag,
    "shared_memory": _flag,
    "fault_tolerant": _flag,
    "op_timeout": _seconds,
    "timeline": _path,
    "debug_buffers": _flag,
    "progress_thread": _flag,
    "ranks_per_machine": _count(1),
    "cuda_aware": _flag,
    "staging_chunk_bytes": _count(1),
    "stage_host": _flag,
    "message_chunk_bytes": _count(64),
}

