"""The trace recorder: one rank's events in memory, written as Chrome-trace / Perfetto JSON.

The runtime owns at most one :class:`Recorder` (``gossip.init(timeline=...)``,
``GOSSIP_TIMELINE`` or :func:`gossip.tools.timeline.start`); the watchdog records every wait on
it and handles every op from launch to completion. Users call :mod:`gossip.tools.timeline`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

MAIN, COMMUNICATION = 1, 2  # the trace's tracks: what the rank runs, and ops from launch to completion


def describe_peers(peers: Sequence[int] | None) -> str:
    return "all ranks" if peers is None else f"ranks {list(peers)}"


def op_args(peers: Sequence[int] | None, nbytes: int | None) -> dict:
    """The arguments a communication span carries: its peers and, when known, its bytes."""
    args: dict = {"peers": describe_peers(peers)}
    if nbytes is not None:
        args["bytes"] = nbytes
    return args

_TRACKS = {MAIN: "main", COMMUNICATION: "communication"}


class Recorder:
    """One rank's trace: events in memory, written as Chrome-trace JSON by :meth:`write`."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = path.with_name(f"{path.stem}.rank{rank}{path.suffix or '.json'}")
        self.rank = rank
        self.origin = time.perf_counter()
        self.events: list[dict] = []

    def add(self, name: str, category: str, start: float, end: float, track: int, args: dict | None) -> None:
        event = {"name": name, "cat": category, "ph": "X", "pid": self.rank, "tid": track,
                 "ts": round((start - self.origin) * 1e6, 3), "dur": round((end - start) * 1e6, 3)}
        if args:
            event["args"] = args
        self.events.append(event)

    def write(self) -> Path:
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": name}}
                 for tid, name in _TRACKS.items()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}))
        return self.path
