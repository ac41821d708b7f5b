"""Checkpoints (rank-consistent, atomic), the timeline trace and the stuck-op watchdog, on real ranks."""

import json
import tempfile
import time
from pathlib import Path

import torch
from _common import GROUP

import gossip
from gossip.tools import checkpoint, timeline

N = GROUP.size
R = GROUP.rank


def _shared_directory() -> Path:
    """A fresh directory every rank sees (all ranks run on this host in tests)."""
    path = tempfile.mkdtemp(prefix="gossip-ckpt-") if R == 0 else None
    return Path(GROUP.bcast(path, root=0))


def test_checkpoint_round_trip_keeps_newest_and_is_rank_consistent():
    directory = _shared_directory()
    assert checkpoint.load(directory) is None  # nothing saved yet: every rank agrees
    for step in (10, 20, 30):
        state = {"x": torch.full((3,), float(R * 100 + step)), "rng": torch.get_rng_state(), "position": [step, R]}
        checkpoint.save(directory, step, state, keep=2)
    step, state = checkpoint.load(directory)
    assert step == 30 and torch.equal(state["x"], torch.full((3,), float(R * 100 + 30)))
    assert state["position"] == [30, R] and torch.equal(state["rng"], torch.get_rng_state())
    gossip.barrier()
    kept = sorted(p.name for p in directory.glob("step-*"))
    assert kept == ["step-00000020", "step-00000030"], kept
    assert not list(directory.rglob(".*tmp*"))  # no temporary files left behind


def test_checkpoint_interrupted_write_leaves_previous_latest():
    directory = _shared_directory()
    checkpoint.save(directory, 5, {"v": torch.tensor([R])})
    gossip.barrier()
    if R == 0:  # a later save that died before publishing: files written, ``latest`` not updated
        partial = checkpoint.step_directory(directory, 6)
        partial.mkdir()
        (partial / "rank-0.pt").write_bytes(b"truncated")
    gossip.barrier()
    step, state = checkpoint.load(directory)
    assert step == 5 and state["v"].item() == R


def test_checkpoint_combined_is_the_mean_on_every_rank():
    """load_combined: rank 0 reads the N files and broadcasts; floating tensors are averaged, the rest rank 0's."""
    directory = _shared_directory()
    checkpoint.save(directory, 3, {"x": torch.full((4,), float(R)), "r": torch.tensor([R])}, info={"k": 1})
    saved, state = checkpoint.load_combined(directory)
    assert saved.ranks == N and saved.info == {"k": 1}, saved
    assert torch.equal(state["x"], torch.full((4,), (N - 1) / 2)) and state["r"].item() == 0, state


def test_checkpoint_from_a_different_rank_count_fails_clearly():
    directory = _shared_directory()
    checkpoint.save(directory, 7, {"v": torch.tensor([R])})
    gossip.barrier()
    if R == 0 and N > 1:
        (checkpoint.step_directory(directory, 7) / f"rank-{N - 1}.pt").unlink()
    gossip.barrier()
    if N > 1:
        try:
            checkpoint.load(directory)
        except gossip.GossipError as error:
            assert f"ranks [{N - 1}] have no file" in str(error), error
        else:
            raise AssertionError("a checkpoint missing a rank's file was accepted")


def test_timeline_records_ops_and_spans():
    directory = _shared_directory()
    timeline.start(directory / "trace.json")
    with timeline.span("forward", batch=4):
        x = torch.ones(1000) * R
    handle = gossip.neighbor_allreduce_async(x)
    handle.wait()
    gossip.allreduce(x)
    path = timeline.stop()
    assert path == directory / f"trace.rank{R}.json"
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {"forward", "neighbor_allreduce", "wait allreduce"} <= names, names
    op = next(e for e in events if e["name"] == "neighbor_allreduce")
    assert op["args"]["bytes"] == 4000 and op["tid"] == timeline.COMMUNICATION and op["dur"] >= 0
    assert not timeline.active()


def test_watchdog_names_the_stuck_op_and_its_peers():
    if N == 1:
        return
    gossip.set_check(False)  # the check's own collective would be what times out
    try:
        x = torch.full((64,), float(R))
        if R == 0:
            gossip.set_op_timeout(0.3)
            handle = gossip.neighbor_allreduce_async(x)
            try:
                handle.wait()
            except gossip.OpTimeoutError as error:
                message = str(error)
                assert "rank 0: neighbor_allreduce of 256 bytes has waited more than 0.3 s" in message, message
                assert str(sorted({*gossip.in_neighbors(), *gossip.out_neighbors()})) in message, message
            else:
                raise AssertionError("the watchdog did not fire while the peers slept")
            gossip.set_op_timeout(None)
            handle.wait()  # the peers arrive: the same op completes normally
        else:
            time.sleep(1.5)
            gossip.neighbor_allreduce_async(x).wait()  # the same (nonblocking, MPI) protocol as rank 0
    finally:
        gossip.set_op_timeout(None)
        gossip.set_check(True)
    gossip.barrier()


def test_waited_seconds_counts_blocked_time():
    gossip.reset_waited()
    if R == 0:
        time.sleep(0.3)
    gossip.barrier()
    if N > 1 and R != 0:
        assert gossip.waited_seconds() > 0.2, gossip.waited_seconds()
