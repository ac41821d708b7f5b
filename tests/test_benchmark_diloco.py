"""benchmarks/diloco.py, diloco_time.py and compression.py end to end on 4 real ranks, in tiny
configurations: the JSON they write has every method, curve and table entry, and the bytes they report
are the closed forms of what each method sends (checked here, not the benchmarks' targets)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.mpi_harness import REPO, emulation_unavailable, run_job

pytestmark = [pytest.mark.mpi, pytest.mark.end_to_end]
N = 4


def _run(script: str, args: list[str], timeout: float = 240, emulated=None) -> str:
    done = run_job(N, [sys.executable, str(REPO / "benchmarks" / script), *args], timeout, what=script,
                   emulated=emulated)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def _parameters(width: int, layers: int, context: int, vocab: int = 256) -> int:
    """CharTransformer's parameter count, written out: embeddings, blocks, final norm, untied head."""
    block = 2 * 2 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (4 * width * width + 4 * width) + (4 * width * width + width)
    return vocab * width + context * width + layers * block + 2 * width + width * vocab


def _ring(nbytes: int) -> int:
    return 2 * (N - 1) * nbytes // N


TINY_LM = ["--steps", "20", "--eval-every", "10", "--periods", "5", "--main-period", "10", "--local-period", "5",
           "--fragments", "2", "--seeds", "0,1", "--adamw-lrs", "0.003", "--sgd-lrs", "0.1", "--width", "32",
           "--context", "32", "--train-chars", "60000", "--val-chars", "8000", "--val-windows", "32"]


def _int8_bytes(k: int) -> int:
    """Int8's wire format for k values: one byte each, a float32 scale per block of 256."""
    return k + 4 * math.ceil(k / 256)


def _two_stage(numel: int, wire_of) -> int:
    """Rank 0's bytes in one compressed_allreduce of ``numel`` values: the other ranks' blocks to their
    owners (blocks differ by at most one value), then its own reduced block to the n - 1 others."""
    sizes = [wire_of(numel // N + (b < numel % N)) for b in range(N)]
    return sum(sizes[1:]) + (N - 1) * sizes[0]


def test_diloco_convergence_writes_every_method_and_its_bytes(tmp_path: Path) -> None:
    output = _run("diloco.py", [*TINY_LM, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "diloco-convergence-np4.json").read_text())
    p = _parameters(32, 2, 32)
    assert report["parameters"] == p
    methods = [r["method"] for r in report["results"]]
    assert methods == ["PmSGD (allreduce, momentum SGD)", "allreduce-AdamW (DDP with AdamW)", "DmSGD (one-peer exp-2)",
                       "local SGD (momentum 0.9, H=5)", "DiLoCo H=5", "DiLoCo H=10",
                       "streaming DiLoCo H=10 (P=2, tau=1, alpha=0.5)", "DiLoCo H=10, int8 outer gradients",
                       "DiLoCo H=10, bf16 outer gradients"]
    by = {r["method"]: r for r in report["results"]}
    steps, model = 20, 4 * p
    expected = {"PmSGD (allreduce, momentum SGD)": steps * _ring(model),
                "allreduce-AdamW (DDP with AdamW)": steps * _ring(model),
                "DmSGD (one-peer exp-2)": steps * (model + 8),  # one destination per step, with its 8-byte scale
                "local SGD (momentum 0.9, H=5)": steps // 5 * _ring(model),
                "DiLoCo H=5": steps // 5 * _ring(model), "DiLoCo H=10": steps // 10 * _ring(model),
                "streaming DiLoCo H=10 (P=2, tau=1, alpha=0.5)": steps // 10 * _ring(model),  # each fragment per round
                "DiLoCo H=10, int8 outer gradients": steps // 10 * _two_stage(p, _int8_bytes),
                "DiLoCo H=10, bf16 outer gradients": steps // 10 * _two_stage(p, lambda k: 2 * k)}
    for method, nbytes in expected.items():
        assert by[method]["bytes"] == nbytes, (method, by[method]["bytes"], nbytes)
    for r in report["results"]:
        curve = r["curve"]
        assert [c["step"] for c in curve] == [0, 10, 20], r["method"]
        assert [c["samples"] for c in curve] == [0, 10 * 16 * N, 20 * 16 * N]
        assert curve[0]["bytes"] == 0 and curve[-1]["bytes"] == r["bytes"]
        assert all(a["bytes"] <= b["bytes"] for a, b in zip(curve, curve[1:], strict=False))
        assert 0 < r["final_val_loss"] < math.log(256) + 0.5, r  # below a uniform guess (plus slack at 20 steps)
        assert r["seed"] == 0 and r["steps"] == steps
    assert report["tuning"]["adamw_lr"] == 0.003 and report["tuning"]["sgd_lr"] == 0.1
    assert [(r["method"], r["seed"]) for r in report["seeds"]] == [
        ("DiLoCo H=10", 0), ("DiLoCo H=10, int8 outer gradients", 0),
        ("DiLoCo H=10", 1), ("DiLoCo H=10, int8 outer gradients", 1)]
    assert report["seeds"][0]["final_val_loss"] == by["DiLoCo H=10"]["final_val_loss"]  # the same run, not re-run
    table = (tmp_path / "diloco-convergence-np4.txt").read_text()
    assert "target (DiLoCo H=10 within 3 % of PmSGD" in table and "over seeds [0, 1]" in table
    assert table.strip() in output
    assert (tmp_path / "diloco-convergence-np4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TINY_TIME = ["--width", "32", "--layers", "2", "--context", "32", "--train-chars", "60000", "--val-chars", "8000",
             "--val-windows", "32", "--max-steps", "20", "--eval-every", "10", "--period", "5", "--fragments", "2",
             "--targets", "5.0,0.1"]


def test_diloco_tuning_chooses_each_methods_lr(tmp_path: Path) -> None:
    _run("diloco_time.py", [*TINY_TIME, "--experiment", "tune", "--lrs", "0.003,0.0001", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "diloco-tune-np4.json").read_text())
    methods = ["allreduce-AdamW (DDP with AdamW)", "DiLoCo H=5", "streaming DiLoCo H=5 (P=2, tau=1, alpha=0.5)"]
    assert [(r["method"], r["lr"]) for r in report["results"]] == [(m, lr) for m in methods for lr in (0.003, 0.0001)]
    for r in report["results"]:
        assert r["reached"]["0.1"] is None and r["steps"] == 20, r  # never reached: ran to --max-steps
    for m in methods:  # no target reached by both: the lower final loss, which lr 1e-4 cannot have in 20 steps
        final = {r["lr"]: r["final_val_loss"] for r in report["results"] if r["method"] == m}
        assert final[0.003] < final[0.0001] and report["chosen"][m] == 0.003, (m, final)
    table = (tmp_path / "diloco-tune-np4.txt").read_text()
    assert table.count("<- chosen") == 3


@pytest.mark.emulated
def test_diloco_time_to_target_on_an_emulated_cluster(tmp_path: Path) -> None:
    why = emulation_unavailable()
    if why:
        pytest.skip(why)
    lrs = ["--ddp-lr", "0.003", "--diloco-lr", "0.003", "--streaming-lr", "0.003"]
    _run("diloco_time.py", [*TINY_TIME, "--experiment", "time", "--all-methods", "--periods", "5,10", *lrs,
                            "--wire-reps", "2", "--wire-steps", "5", "--link", "1gbit", "--out", str(tmp_path)],
         timeout=300, emulated=("4x1", "1gbit"))
    report = json.loads((tmp_path / "diloco-time-np4.json").read_text())
    assert report["cluster"] == "4 machines x 1 ranks, 1gbit"
    assert [r["method"] for r in report["results"]] == [
        "DDP (gloo), AdamW", "DDP (gloo), momentum SGD", "PmSGD (gossip.allreduce), momentum SGD",
        "DmSGD (one-peer exp-2)", "local SGD (momentum 0.9, H=5)", "DiLoCo H=5", "DiLoCo H=10",
        "DiLoCo H=5, int8 outer gradients", "streaming DiLoCo H=5 (P=2, tau=1, alpha=0.5)"]
    for r in report["results"]:
        assert r["reached"]["5.0"] is not None and r["reached"]["5.0"]["step"] == 10, r  # below a uniform guess
        assert r["reached"]["0.1"] is None and r["steps"] == 20, r  # never reached: ran to --max-steps
        assert r["wire_bytes_per_machine"] > 0, r
    p = _parameters(32, 2, 32)
    ddp = report["results"][0]
    assert ddp["bytes"] == 0 and ddp["wire_bytes_per_machine"] > 20 * 4 * p  # gloo: uncounted
    by = {r["method"]: r["bytes"] for r in report["results"]}
    assert by["DiLoCo H=5"] == by["streaming DiLoCo H=5 (P=2, tau=1, alpha=0.5)"] == 20 // 5 * _ring(4 * p)
    assert by["DiLoCo H=10"] == by["local SGD (momentum 0.9, H=5)"] // 2 == 20 // 10 * _ring(4 * p)
    assert by["DiLoCo H=5, int8 outer gradients"] == 20 // 5 * _two_stage(p, _int8_bytes)
    assert by["DmSGD (one-peer exp-2)"] == 20 * (4 * p + 8)  # one destination per step, with its 8-byte scale
    wire = {row["what"].split(" x ")[0].split(",")[0]: row for row in report["wire"]}
    for row in report["wire"]:  # the machines' interfaces carried at least what was counted (headers on top)
        assert row["wire_bytes"] >= row["counted_bytes"] > 0, row
    assert wire["broadcast"]["counted_bytes"] == 2 * (N - 1) * 4 * p
    table = (tmp_path / "diloco-time-np4.txt").read_text()
    assert "to 5: DDP (gloo), AdamW took" in table and "the time of streaming DiLoCo H=5" in table


def test_compression_writes_choco_and_ops(tmp_path: Path) -> None:
    _run("compression.py", ["--seeds", "0,1", "--epochs", "1", "--lrs", "0.1", "--topk-gammas", "0.2",
                            "--sizes", "1000,5000", "--reps", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "compression-np4.json").read_text())
    rows = report["choco"]["results"]
    p = (64 * 64 + 64) * 2 + 64 * 10 + 10  # train.py's MLP on digits, hidden 64
    steps = rows[0]["steps"]
    per_method = {"DSGD": 2 * 4 * p, "DmSGD": 2 * 4 * p,  # a ring: two destinations
                  "no communication": 0, "CHOCO-SGD int8": 2 * (p + 4 * math.ceil(p / 256)),
                  "CHOCO-SGD top-1%": 2 * math.ceil(0.01 * p) * 8}
    for momentum in (0.0, 0.9):
        mine = [r for r in rows if r["momentum"] == momentum]
        assert sorted({r["method"] for r in mine}) == sorted(
            {"DmSGD" if momentum else "DSGD", "no communication", "CHOCO-SGD int8", "CHOCO-SGD top-1%"})
        for r in mine:
            assert r["steps"] == steps and r["seed"] in (0, 1) and r["lr"] == 0.1
            assert r["bytes"] == steps * per_method[r["method"]], r
            assert 0 <= r["averaged_accuracy"] <= 1 and 0 <= r["rank_accuracy"] <= 1
    ops = report["ops"]
    assert {(r["numel"], r["op"]) for r in ops} == {(n, op) for n in (1000, 5000) for op in (
        "allreduce (fp32)", "identity", "bf16", "int8", "int4", "topk-0.01", "randomk-0.01", "sign")}
    for r in ops:
        assert r["seconds"] > 0
        if r["op"] == "allreduce (fp32)":
            assert r["bytes_per_call"] == _ring(4 * r["numel"])
        if r["op"] == "int8":
            assert r["bytes_per_call"] == _two_stage(r["numel"], _int8_bytes)
    text = (tmp_path / "compression-np4.txt").read_text()
    assert "CHOCO-SGD top-1%" in text and "compressed_allreduce against allreduce" in text
