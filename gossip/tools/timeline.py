"""Timeline tracing: a Chrome-trace / Perfetto JSON file per rank of what ran when.

Turn it on with ``gossip.timeline.start("trace.json")`` or ``GOSSIP_TIMELINE=trace.json`` (read by
``gossip.init``); rank r writes ``trace.rank<r>.json`` at :func:`stop` (called by
``gossip.shutdown``). Open the files in https://ui.perfetto.dev or ``chrome://tracing``. The
recorder belongs to the runtime (:class:`gossip.transport._trace.Recorder`).

Recorded: every communication op from launch to completion on the ``communication`` track (name,
bytes, peers), every wait on it on the ``main`` track, and any code wrapped in :func:`span`
(forward, backward, optimizer step...). Off, each hook costs one attribute check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gossip import runtime
from gossip.transport._trace import COMMUNICATION, MAIN, Recorder, describe_peers, op_args

__all__ = ["COMMUNICATION", "MAIN", "Recorder", "active", "describe_peers", "op_args", "record", "span", "start",
           "stop"]


def start(path: str | os.PathLike) -> Path:
    """Start recording on the runtime (after ``gossip.init``); returns the path this rank's file will
    have (``<stem>.rank<r><suffix>``)."""
    return runtime.current().start_trace(Path(path)).path


def stop() -> Path | None:
    """Stop recording and write this rank's file; returns its path (None if it was not recording)."""
    rt = runtime.current_or_none()
    return rt.stop_trace() if rt is not None else None


def active() -> bool:
    rt = runtime.current_or_none()
    return rt is not None and rt.watchdog.recorder is not None


def record(name: str, category: str, start_time: float, end_time: float, *, track: int = MAIN,
           args: dict | None = None) -> None:
    """Add one span (times from ``time.perf_counter()``) if recording."""
    recorder = runtime.recorder()
    if recorder is not None:
        recorder.add(name, category, start_time, end_time, track, args)


@contextmanager
def span(name: str, category: str = "compute", **args) -> Iterator[None]:
    """Record the enclosed code as one span on the main track (nothing when not recording)."""
    recorder = runtime.recorder()
    if recorder is None:
        yield
        return
    begin = time.perf_counter()
    try:
        yield
    finally:
        recorder.add(name, category, begin, time.perf_counter(), MAIN, args or None)
