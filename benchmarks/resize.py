"""Resuming on another number of ranks: a checkpoint written by N ranks continued on M (a requeued
job given fewer or more nodes), against uninterrupted runs.

``python benchmarks/resize.py`` runs ``mpirun_examples/train.py`` (digits; ``--algorithm`` dmsgd
on ``--topology`` one-peer-exp2 by default; ``--epochs`` 12) uninterrupted on every number of
ranks that ``--resizes`` names (default ``8:4,4:6``: 8, 4 and 6 ranks) and, for each resize
N:M, the first ``--switch`` epochs (default half) on N ranks with ``--checkpoint-dir``, then
``--resume --epochs E`` on M ranks: train.py averages the N models and the optimizer state as its
checkpoints document (``train_checkpoints.py``), re-splits the data and trains on. Every run uses
train.py's ``--seed`` 0 and is bounded by ``--timeout``.

Per epoch it records each run's training loss and the averaged model's test accuracy, and says
for each resize

* whether it **continues** from its checkpoint: the first epoch on M ranks (k + 1) against the
  checkpoint's epoch k, no worse by more than the noise. The noise is measured on the
  uninterrupted runs, as the largest rise of the loss (relative) and the largest fall of the test
  accuracy (points) from one epoch to the next from epoch k on, at least 5 % and 1 point; no
  step is lost here (the checkpoint is the end of epoch k);
* whether it **ends comparable** to the uninterrupted runs: its final loss and accuracy within
  the noise of the worse of the uninterrupted runs on N and on M ranks.

Output: a table (per epoch, every run's loss and accuracy) and the verdicts on stdout and in
``--out`` (``.txt`` beside the JSON, which holds every run's records, the line train.py printed
on resuming, and the verdicts' numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "mpirun_examples" / "train.py"
MIN_LOSS_NOISE, MIN_ACCURACY_NOISE = 0.05, 0.01  # relative, and a fraction (1 point)


def parse_resizes(text: str) -> list[tuple[int, int]]:
    """``"8:4,4:6"`` -> [(8, 4), (4, 6)]; N and M positive and different."""
    pairs = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", item)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1 or match.group(1) == match.group(2):
            raise argparse.ArgumentTypeError(f"--resizes takes N:M pairs of different rank counts, got {item!r}")
        pairs.append((int(match.group(1)), int(match.group(2))))
    return pairs


def train(ranks: int, options: list[str], log_dir: Path, timeout: float) -> dict:
    """One train.py run on ``ranks`` ranks; its outcome, wall time, records (log.json) and output."""
    command = [sys.executable, "-m", "gossip.tools.launch", "-np", str(ranks), sys.executable, str(TRAIN),
               *options, "--log-dir", str(log_dir), "--no-progress"]
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as expired:
        return {"ranks": ranks, "outcome": "timed out", "seconds": timeout, "records": [],
                "tail": str(expired.stdout or "")[-2000:]}
    output = done.stdout + done.stderr
    log = log_dir / "log.json"
    records = json.loads(log.read_text())["epochs"] if log.exists() else []
    result = {"ranks": ranks, "outcome": "finished" if done.returncode == 0 and records else "failed",
              "seconds": time.perf_counter() - began, "records": records}
    resumed = [line for line in output.splitlines() if line.startswith("resumed from")]
    if resumed:
        result["resume_line"] = resumed[0]
    if result["outcome"] != "finished":
        result["tail"] = output[-3000:]
    return result


def curve(records: list[dict]) -> list[dict]:
    """Per epoch: the training loss and the averaged model's test accuracy."""
    return [{"epoch": r["epoch"], "train_loss": r["train_loss"], "accuracy": r["test_accuracy_averaged"]}
            for r in records]


def noise(curves: list[list[dict]], since: int) -> dict:
    """The largest epoch-to-epoch rise of the loss (relative) and fall of the accuracy (a fraction) of
    ``curves`` from epoch ``since`` on, at least :data:`MIN_LOSS_NOISE` and :data:`MIN_ACCURACY_NOISE`."""
    loss, accuracy = MIN_LOSS_NOISE, MIN_ACCURACY_NOISE
    for points in curves:
        for before, after in zip(points[since - 1:], points[since:], strict=False):
            loss = max(loss, after["train_loss"] / before["train_loss"] - 1)
            accuracy = max(accuracy, before["accuracy"] - after["accuracy"])
    return {"loss_relative": loss, "accuracy": accuracy}


def verdict(resized: list[dict], switch: int, references: list[list[dict]], tolerance: dict) -> dict:
    """Whether the resized run continued from its checkpoint (epoch ``switch`` + 1 against ``switch``)
    and ended comparable to the worse of ``references`` (uninterrupted runs on N and on M ranks)."""
    at, after, last = resized[switch - 1], resized[switch], resized[-1]
    worst_loss = max(points[-1]["train_loss"] for points in references)
    worst_accuracy = min(points[-1]["accuracy"] for points in references)
    continues = (after["train_loss"] <= at["train_loss"] * (1 + tolerance["loss_relative"])
                 and after["accuracy"] >= at["accuracy"] - tolerance["accuracy"])
    comparable = (last["train_loss"] <= worst_loss * (1 + tolerance["loss_relative"])
                  and last["accuracy"] >= worst_accuracy - tolerance["accuracy"])
    return {"checkpoint_epoch": switch, "loss_at_checkpoint": at["train_loss"], "loss_after": after["train_loss"],
            "accuracy_at_checkpoint": at["accuracy"], "accuracy_after": after["accuracy"], "continues": continues,
            "final_loss": last["train_loss"], "final_accuracy": last["accuracy"],
            "uninterrupted_worst_final_loss": worst_loss, "uninterrupted_worst_final_accuracy": worst_accuracy,
            "comparable": comparable}


def table(columns: dict[str, list[dict]], epochs: int) -> str:
    """Per epoch, each run's 'loss / accuracy %'."""
    lines = ["| epoch | " + " | ".join(f"{name}: loss / acc %" for name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for epoch in range(1, epochs + 1):
        cells = []
        for points in columns.values():
            point = next((p for p in points if p["epoch"] == epoch), None)
            cells.append("-" if point is None else f"{point['train_loss']:.4f} / {100 * point['accuracy']:.2f}")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(name: str, v: dict, tolerance: dict) -> str:
    k = v["checkpoint_epoch"]
    return (f"{name}: epoch {k + 1} on the new ranks {v['loss_after']:.4f} / {100 * v['accuracy_after']:.2f}% "
            f"against the checkpoint's epoch {k} {v['loss_at_checkpoint']:.4f} / "
            f"{100 * v['accuracy_at_checkpoint']:.2f}%: {'continues' if v['continues'] else 'does NOT continue'}; "
            f"final {v['final_loss']:.4f} / {100 * v['final_accuracy']:.2f}% against the uninterrupted runs' worse "
            f"{v['uninterrupted_worst_final_loss']:.4f} / {100 * v['uninterrupted_worst_final_accuracy']:.2f}%: "
            f"{'comparable' if v['comparable'] else 'NOT comparable'} (noise: loss +"
            f"{100 * tolerance['loss_relative']:.1f}%, accuracy -{100 * tolerance['accuracy']:.2f} points)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resizes", type=parse_resizes, default=parse_resizes("8:4,4:6"),
                        help="N:M pairs: N ranks for the first --switch epochs, then M (default 8:4,4:6)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--switch", type=int, default=None, help="epochs on N ranks (default: half of --epochs)")
    parser.add_argument("--algorithm", default="dmsgd")
    parser.add_argument("--topology", default="one-peer-exp2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    parser.add_argument("--out", default=str(HERE / "measured" / "resize.json"))
    args = parser.parse_args()
    switch = args.switch if args.switch is not None else args.epochs // 2
    if not 1 <= switch < args.epochs:
        parser.error(f"--switch must lie between 1 and --epochs - 1 = {args.epochs - 1}, got {switch}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = ["--algorithm", args.algorithm, "--topology", args.topology, "--batch-size", str(args.batch_size),
              "--seed", "0"]
    sizes = sorted({n for pair in args.resizes for n in pair}, reverse=True)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="resize-") as scratch:
        for n in sizes:
            runs[str(n)] = train(n, [*common, "--epochs", str(args.epochs)], Path(scratch) / f"log-{n}", args.timeout)
            print(f"# uninterrupted on {n} ranks: {runs[str(n)]['outcome']}, {runs[str(n)]['seconds']:.0f} s",
                  flush=True)
        for n, m in args.resizes:
            name, checkpoints, logs = f"{n}->{m}", Path(scratch) / f"ckpt-{n}-{m}", Path(scratch) / f"log-{n}-{m}"
            first = train(n, [*common, "--epochs", str(switch), "--checkpoint-dir", str(checkpoints)], logs,
                          args.timeout)
            resumed = (train(m, [*common, "--epochs", str(args.epochs), "--checkpoint-dir", str(checkpoints),
                                 "--resume"], logs, args.timeout) if first["outcome"] == "finished" else
                       {"ranks": m, "outcome": "not run", "seconds": 0.0, "records": []})
            runs[name] = {"first": first, "resumed": resumed, "outcome": resumed["outcome"],
                          "records": resumed["records"], "resume_line": resumed.get("resume_line")}
            print(f"# {n} ranks for {switch} epochs, then {m}: {first['outcome']}, {resumed['outcome']} "
                  f"({resumed.get('resume_line', '')})", flush=True)
    curves = {name: curve(run["records"]) for name, run in runs.items()}
    finished = all(run["outcome"] == "finished" and len(curves[name]) == args.epochs for name, run in runs.items())
    tolerance = noise([curves[str(n)] for n in sizes], switch) if finished else None
    verdicts = ({f"{n}->{m}": verdict(curves[f"{n}->{m}"], switch, [curves[str(n)], curves[str(m)]], tolerance)
                 for n, m in args.resizes} if finished else {})
    labels = {name: name if "->" in name else f"{name} rank{'' if name == '1' else 's'}" for name in curves}
    text = table({labels[name]: points for name, points in curves.items()}, args.epochs)
    text += "\n\n" + ("\n".join(describe(name, v, tolerance) for name, v in verdicts.items()) if finished else
                      "not every run finished: " + ", ".join(f"{name} {run['outcome']}" for name, run in runs.items()))
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**{k: v for k, v in vars(args).items() if k != "resizes"},
                "resizes": [f"{n}:{m}" for n, m in args.resizes], "switch": switch}
    out.write_text(json.dumps({"settings": settings, "noise": tolerance, "verdicts": verdicts, "curves": curves,
                               "runs": runs}, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(main())
