"""Training through rank failures: ``train.py --elastic`` with ranks killed at random steps, against an
uninterrupted run on the number of ranks that survive.

``python benchmarks/elastic.py`` runs, for each ``--families`` (an algorithm with its topology), one
uninterrupted run on ``--ranks`` − ``--kill`` ranks and ``--trials`` runs on ``--ranks`` ranks under
``gossiprun --fault-tolerant``, in each of which ``--kill`` distinct launch ranks, drawn at random,
kill themselves with SIGKILL at steps drawn at random from the first 80 % of the run
(``--inject-failure``); trial t kills the same ranks at the same steps in every family, and the
JSON is rewritten after each round of families, so a run cut short still has as many of each.
Every run is bounded by ``--timeout``: a run that does not end in time is a
hang. Per family it reports

* runs that finished, that hung, that failed otherwise;
* the stall of each failure: from the moment the rank died to the moment the survivors trained on
  (detection by ULFM, :func:`gossip.recover`, the re-split), median and maximum; and the part
  :func:`gossip.recover` took;
* the final test accuracy of the averaged model: median, min and max over the trials, against the
  uninterrupted run's.

Output: a table on stdout and ``--out`` (JSON, every run's numbers). Every trial's seed for the
kills is ``--seed`` + trial; the data, model and batches use train.py's ``--seed`` 0 in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "mpirun_examples" / "train.py"
FAMILIES = {  # name -> train.py options
    "gossip": ["--algorithm", "dmsgd", "--topology", "one-peer-exp2"],
    "push-sum": ["--algorithm", "sgp", "--topology", "exp2"],
    "tracking": ["--algorithm", "gradient-tracking", "--topology", "exp2"],
    "global": ["--algorithm", "pmsgd"],
    "outer": ["--algorithm", "slowmo", "--base", "dsgd", "--topology", "one-peer-exp2", "--period", "6"],
}
KILLED = re.compile(r"--inject-failure: launch rank (\d+) kills itself after step (\d+) \(at ([\d.]+) s\)")


def steps_of(ranks: int, epochs: int, batch_size: int, samples: int = 1438) -> int:
    """train.py's number of steps on ``ranks`` ranks (digits: 1438 training samples)."""
    return -(-samples // (ranks * batch_size)) * epochs


def run(ranks: int, options: list[str], fault_tolerant: bool, timeout: float) -> dict:
    """One train.py run; its outcome, wall time, log and the kill times it printed."""
    with tempfile.TemporaryDirectory() as logs:
        launcher = [sys.executable, "-m", "gossip.tools.launch", "-np", str(ranks),
                    *(["--fault-tolerant"] if fault_tolerant else [])]
        began = time.perf_counter()
        job = subprocess.Popen([*launcher, sys.executable, str(TRAIN), *options, "--log-dir", logs, "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)  # mpirun and every rank it started
            output, _ = job.communicate()
            return {"outcome": "hung", "seconds": timeout, "tail": output[-4000:]}
        seconds = time.perf_counter() - began
        done = subprocess.CompletedProcess(job.args, job.returncode, output)
        log_path = Path(logs) / "log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
    kills = {int(r): float(t) for r, _, t in KILLED.findall(output)}
    result = {"outcome": "finished" if done.returncode == 0 and log.get("epochs") else "failed",
              "returncode": done.returncode, "seconds": seconds, "kills": kills,
              "failures": log.get("failures", []),
              "accuracy": log["epochs"][-1]["test_accuracy_averaged"] if log.get("epochs") else None}
    if result["outcome"] == "failed":
        result["tail"] = output[-3000:]
    for failure in result["failures"]:  # from the death (the earliest of those named) to training again
        died = [kills[r] for r in failure["failed"] if r in kills]
        failure["stall_seconds"] = failure["resumed_at"] - min(died) if died else None
    return result


def summarize(name: str, baseline: dict, trials: list[dict]) -> dict:
    finished = [t for t in trials if t["outcome"] == "finished"]
    stalls = [f["stall_seconds"] for t in finished for f in t["failures"] if f.get("stall_seconds") is not None]
    recovers = [f["recover_seconds"] for t in finished for f in t["failures"]]
    accuracies = [t["accuracy"] for t in finished]
    row = {"family": name, "trials": len(trials), "finished": len(finished),
           "hung": sum(t["outcome"] == "hung" for t in trials),
           "failed": sum(t["outcome"] == "failed" for t in trials),
           "failures_survived": len(recovers),
           "stall_median": statistics.median(stalls) if stalls else None, "stall_max": max(stalls, default=None),
           "recover_median": statistics.median(recovers) if recovers else None,
           "recover_max": max(recovers, default=None),
           "accuracy_baseline": baseline.get("accuracy"),
           "accuracy_median": statistics.median(accuracies) if accuracies else None,
           "accuracy_min": min(accuracies, default=None), "accuracy_max": max(accuracies, default=None)}
    if row["accuracy_median"] is not None and row["accuracy_baseline"] is not None:
        row["accuracy_gap_points"] = 100 * (row["accuracy_baseline"] - row["accuracy_median"])
    return row


def table(rows: list[dict], ranks: int, kill: int) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    def sec(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"| family | finished / trials | hung | stall median / max (s) | recover() median / max (s) | "
             f"accuracy {ranks - kill} ranks uninterrupted | accuracy {ranks} -> {ranks - kill} median (min-max) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['finished']} / {r['trials']} | {r['hung']} | "
                     f"{sec(r['stall_median'])} / {sec(r['stall_max'])} | {sec(r['recover_median'])} / "
                     f"{sec(r['recover_max'])} | {pct(r['accuracy_baseline'])} | {pct(r['accuracy_median'])} "
                     f"({pct(r['accuracy_min'])}-{pct(r['accuracy_max'])}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--kill", type=int, default=2, help="ranks killed per trial")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated: {', '.join(FAMILIES)}")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds after which a run counts as hung")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kills (trial t uses seed + t)")
    parser.add_argument("--out", default=str(HERE / "measured" / "elastic.json"))
    args = parser.parse_args()
    if not 0 < args.kill < args.ranks:
        parser.error("--kill must be between 1 and --ranks - 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    common = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--op-timeout", "120"]
    steps = steps_of(args.ranks, args.epochs, args.batch_size)
    names = args.families.split(",")
    results = {name: {"options": [*FAMILIES[name], *common], "trials": []} for name in names}
    for name in names:
        baseline = run(args.ranks - args.kill, results[name]["options"], False, args.timeout)
        results[name]["baseline"] = baseline
        print(f"# {name}: uninterrupted on {args.ranks - args.kill} ranks: {baseline['outcome']}, "
              f"accuracy {baseline.get('accuracy')}, {baseline['seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for trial in range(args.trials):  # a round of every family per trial: a run cut short has as many of each
        draw = random.Random(args.seed + trial)
        victims = draw.sample(range(args.ranks), args.kill)
        at = sorted(draw.sample(range(1, int(0.8 * steps)), args.kill))
        kills = ",".join(f"{r}:{s}" for r, s in zip(victims, at, strict=True))
        for name in names:
            outcome = run(args.ranks, [*results[name]["options"], "--elastic", "--inject-failure", kills], True,
                          args.timeout)
            outcome["inject"] = kills
            results[name]["trials"].append(outcome)
            stalls = ", ".join(f"{f['stall_seconds']:.2f}" for f in outcome.get("failures", [])
                               if f.get("stall_seconds") is not None)
            print(f"#   {name} trial {trial}: kill {kills}: {outcome['outcome']}, accuracy {outcome.get('accuracy')}, "
                  f"stalls [{stalls}] s, {outcome['seconds']:.0f} s", flush=True)
        rows = [summarize(name, results[name]["baseline"], results[name]["trials"]) for name in names]
        out.write_text(json.dumps({"settings": vars(args), "summary": rows, "runs": results}, indent=1))
    text = table(rows, args.ranks, args.kill)
    print(text)
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0 if all(r["hung"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
