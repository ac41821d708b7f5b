"""Gossip against allreduce on emulated clusters: primitives and training throughput per cluster shape and link rate.

``python benchmarks/cluster.py`` (root, Linux: :mod:`gossip.tools.emulate`) runs, for every
``--shapes`` (machines x ranks) and ``--rates`` (each machine's link, both ways), on an emulated
cluster started by ``gossiprun --emulate``:

* ``benchmarks/primitives.py --distances``: one-peer exponential-2 (over its period and at each
  distance), static exponential-2, hierarchical averaging and allreduce against the raw MPI calls,
  with the share of the link rate each reaches;
* ``benchmarks/throughput.py``: each ``--algorithms`` on each of ``--topologies`` (``hierarchical``
  only where machines hold several ranks) against PmSGD over ``gossip.allreduce`` and PyTorch DDP on
  gloo, in the same run, on the 2.9 M-parameter MLP (11.7 MB per message).

Each run's JSON goes to ``--out``; the summary table (best gossip method and its ratio to DDP and
PmSGD, one-peer link share at each distance, allreduce raw blocking vs non-blocking) goes to stdout
and ``--out/cluster-summary.{txt,json}``. Rates and shapes run in the order given; ``--only``
picks primitives or throughput.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(shape: str, rate: str, script: str, args: list[str], timeout: float) -> str:
    """Run ``script`` under ``gossiprun --emulate shape --link rate`` (at most ``timeout`` s); its output."""
    cmd = [sys.executable, "-m", "gossip.tools.launch", "--emulate", shape, "--link", rate, sys.executable,
           str(HERE / script), *args]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"{script} on {shape} at {rate} failed ({done.returncode}):\n{output[-3000:]}")
    print(f"# {script} on {shape} at {rate}: {time.perf_counter() - began:.0f} s", flush=True)
    return output


def summarize_primitives(path: Path) -> dict:
    """From a primitives JSON: link shares and ratios to raw MPI at the largest size, allreduce times (µs)."""
    rows = json.loads(path.read_text())["rows"]
    big = max(r["bytes"] for r in rows)
    out = {"bytes": big}
    for r in rows:
        if r["bytes"] != big or r["variant"] not in ("check", "staged"):
            continue
        if "link_share" in r:
            out[r["op"]] = {"ours_link": r["link_share"], "raw_link": r["raw_link_share"], "ratio_to_raw": r["ratio"]}
        if "raw_blocking_us" in r:
            out["allreduce raw blocking us"] = r["raw_blocking_us"]
            out["allreduce raw nonblocking us"] = r["raw_nonblocking_us"]
            out["gossip.allreduce us"] = r["ours_us"]
    return out


def summarize_throughput(path: Path) -> dict:
    """From a throughput JSON: samples/s per rank per method, the best gossip method and its ratios."""
    results = json.loads(path.read_text())["results"]
    by = {r["method"]: r["per_rank_mean"] for r in results}
    ddp = by.get("DDP (gloo)")
    pmsgd = by.get("PmSGD (gossip.allreduce)")
    gossip_methods = {m: v for m, v in by.items() if not m.startswith(("DDP", "PmSGD"))}
    best = max(gossip_methods, key=gossip_methods.get)
    return {"samples_per_rank": by, "best": best, "best_vs_ddp": gossip_methods[best] / ddp,
            "best_vs_pmsgd": gossip_methods[best] / pmsgd,
            "vs_ddp": {m: v / ddp for m, v in gossip_methods.items()}}


def main() -> int:
    """Run every shape and rate; print and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x2,4x1,4x2,8x1")
    parser.add_argument("--rates", default="100mbit,250mbit,1gbit")
    parser.add_argument("--algorithms", default="dmsgd,awc-dmsgd,decentlam")
    parser.add_argument("--topologies", default="one-peer-exp2,hierarchical,auto")
    parser.add_argument("--sizes", default="1M,16M", help="primitives' message sizes")
    parser.add_argument("--iters", type=int, default=4, help="throughput: timed iterations of 3 batches")
    parser.add_argument("--only", choices=["primitives", "throughput"])
    parser.add_argument("--out", default="results/cluster")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "cluster-summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for rate in args.rates.split(","):
        for shape in args.shapes.split(","):
            machines, per_machine = (int(v) for v in shape.split("x"))
            key = f"{shape}@{rate}"
            entry = summary.setdefault(key, {})
            if args.only in (None, "primitives"):
                path = out / f"primitives-{shape}-{rate}.json"
                text = run(shape, rate, "primitives.py", ["--distances", "--sizes", args.sizes, "--rounds", "1",
                                                          "--budget", "32M", "--json", str(path)], 1800)
                (out / f"primitives-{shape}-{rate}.txt").write_text(text)
                entry["primitives"] = summarize_primitives(path)
            if args.only in (None, "throughput"):
                topologies = [t for t in args.topologies.split(",") if t != "hierarchical" or per_machine > 1]
                text = run(shape, rate, "throughput.py", [
                    "--algorithm", args.algorithms, "--topology", ",".join(topologies), "--num-warmup-batches", "3",
                    "--num-batches-per-iter", "3", "--num-iters", str(args.iters), "--out", str(out / key)], 3600)
                (out / f"throughput-{shape}-{rate}.txt").write_text(text)
                n = machines * per_machine
                entry["throughput"] = summarize_throughput(out / key / f"throughput-mlp-w1024-np{n}.json")
            summary_path.write_text(json.dumps(summary, indent=1))
    lines = [f"{'cluster':<16}{'best gossip method':<34}{'÷ DDP':>7}{'÷ PmSGD':>9}"
             f"{'one-peer d=1':>14}{'d=2':>7}{'d=4':>7}{'allreduce raw blocking/nonblocking ms':>40}"]
    for key, entry in summary.items():
        t, p = entry.get("throughput", {}), entry.get("primitives", {})
        shares = [p.get(f"one-peer distance {d}", {}).get("ours_link") for d in (1, 2, 4)]
        blocking = p.get("allreduce raw blocking us")
        lines.append(f"{key:<16}{t.get('best', '-'):<34}{t.get('best_vs_ddp', float('nan')):>7.2f}"
                     f"{t.get('best_vs_pmsgd', float('nan')):>9.2f}"
                     + "".join(f"{s:>7.0%}" if s is not None else f"{'-':>7}" for s in shares[:1]).rjust(14)
                     + "".join(f"{s:>7.0%}" if s is not None else f"{'-':>7}" for s in shares[1:])
                     + (f"{blocking / 1e3:>28.0f} / {p['allreduce raw nonblocking us'] / 1e3:.0f}" if blocking else ""))
    table = "\n".join(lines)
    print(table)
    (out / "cluster-summary.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
