"""Asynchronous vs synchronous gossip: wall time to a target training loss, with and without slow ranks.

``gossiprun -np 4 python benchmarks/async_gossip.py --slow-ranks 0 --slow-delay 0.02``

Synchronous DSGD (Lian, Zhang, Zhang, Hsieh, Zhang and Liu, NeurIPS 2017) and asynchronous AD-PSGD
(Lian, Zhang, Zhang and Liu, "Asynchronous Decentralized Parallel Stochastic Gradient Descent",
ICML 2018; ``adpsgd``, over one-sided windows) train the same MLP on scikit-learn's digits
(offline, iid shards) over the same time-varying topology (one-peer exponential-2) for the same
wall-time budget, from the same initialisation, each twice: with every rank at full speed, and with
the ``--slow-ranks`` sleeping ``--slow-delay`` seconds after every step. Synchronous gossip moves
at the pace of its slowest rank; asynchronous gossip lets the others go on.

Every rank logs its own model's loss on the whole training set every ``--eval-every`` seconds of
its training time (the clock stops while it evaluates). The curve is the mean over ranks of their
latest logged loss; "time to target" is the first time it reaches ``--target`` (averaged over the
random seeds whose runs reach it; the table says how many did). At the end the models are averaged
exactly, and the averaged model's training loss and test accuracy are reported. Prints a table
(mean over the random seeds of ``--seeds``) and writes ``results/async-gossip-np<N>.json`` and a
loss-vs-time ``.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_support import final_measurements, mlp
from mpi4py import MPI

import algorithms
import gossip
import topologies
from gossip.tools.data import BatchStream, load_digits, partition

ALGORITHMS = {"dsgd": "synchronous DSGD", "adpsgd": "asynchronous AD-PSGD"}


@torch.no_grad()
def training_loss(model, data) -> float:
    """Mean cross-entropy of ``model`` on the whole training set."""
    return float(F.cross_entropy(model(data.x_train), data.y_train))


def run(name: str, slow: bool, seed: int, args, data, shard) -> dict:
    """Train ``name`` for ``args.budget`` seconds of training time; this rank's log and the final measurements."""
    n, rank = gossip.size(), gossip.rank()
    torch.manual_seed(seed)
    model = mlp(data.x_train.shape[1], args.hidden, data.num_classes)
    opt = algorithms.create(name, model.parameters(), lr=args.lr, topology=topologies.OnePeerExponentialTwo(n))
    stream = BatchStream(data.x_train[shard], data.y_train[shard], args.batch_size, seed=seed * 1009 + rank)
    delay = args.slow_delay if slow and rank in args.slow_ranks else 0.0
    synchronous = name != "adpsgd"
    log = [(0.0, training_loss(model, data))]
    steps, paused, next_eval = 0, 0.0, args.eval_every
    gossip.barrier()
    start = time.perf_counter()
    while True:
        now = time.perf_counter() - start - paused
        if synchronous:  # all ranks must stop at the same step: one joint decision every 8 steps
            over = steps % 8 == 0 and gossip.allreduce(torch.tensor([float(now >= args.budget)]), "sum").item() > 0
        else:
            over = now >= args.budget
        if over:
            break
        if now >= next_eval:
            evaluating = time.perf_counter()
            log.append((now, training_loss(model, data)))
            paused += time.perf_counter() - evaluating
            next_eval += args.eval_every
        x, y = stream.next()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps += 1
        if delay:
            time.sleep(delay)
    log.append((time.perf_counter() - start - paused, training_loss(model, data)))
    measured = final_measurements(model, opt, data)
    if not synchronous:
        opt.finish(average=False)  # the models are already averaged; free the window
    return {"log": log, "steps": steps, **measured}


def mean_curve(logs: list[list[tuple[float, float]]], grid: np.ndarray) -> np.ndarray:
    """At each grid time, the mean over ranks of each rank's latest logged loss."""
    curves = []
    for log in logs:
        times = np.array([t for t, _ in log])
        losses = np.array([v for _, v in log])
        curves.append(losses[np.searchsorted(times, grid, side="right") - 1])
    return np.mean(curves, axis=0)


def time_to(grid: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    """The first grid time (s) at which ``curve`` is <= ``target``, or None if it never is."""
    reached = np.flatnonzero(curve <= target)
    return float(grid[reached[0]]) if len(reached) else None


def summarise(results: dict, args) -> list[dict]:
    """One row per (setting, algorithm): mean curve, time to target, steps per rank, final loss and accuracy."""
    rows = []
    grid = np.linspace(0.0, args.budget, 401)
    for (setting, name), runs in results.items():
        curves = [mean_curve(r["logs"], grid) for r in runs]
        times = [time_to(grid, c, args.target) for c in curves]
        reached = [t for t in times if t is not None]
        rows.append({"setting": setting, "algorithm": name, "curve": np.mean(curves, axis=0).tolist(),
                     "time_to_target": float(np.mean(reached)) if reached else None,  # over the runs that reached it
                     "reached": f"{len(reached)}/{len(times)}",
                     "steps_min": int(np.mean([min(r["steps"]) for r in runs])),
                     "steps_max": int(np.mean([max(r["steps"]) for r in runs])),
                     "train_loss": float(np.mean([r["train_loss"] for r in runs])),
                     "accuracy": float(np.mean([r["averaged_accuracy"] for r in runs]))})
    return rows


def print_table(rows: list[dict], args, n: int) -> None:
    """Print the rows of :func:`summarise` as a table."""
    print(f"\nn = {n}, budget {args.budget:g} s, target loss {args.target:g}, slow ranks {args.slow_ranks} "
          f"(+{1000 * args.slow_delay:g} ms/step), random seeds {args.seeds}")
    print(f"{'setting':<12} {'algorithm':<22} {'steps/rank':>13} {'time to target':>15} {'final loss':>11} "
          f"{'test acc':>9}")
    for row in rows:
        reached = "never" if row["time_to_target"] is None else f"{row['time_to_target']:.2f} s"
        if not row["reached"].startswith(str(len(args.seeds.split(",")))):
            reached += f" ({row['reached']})"
        print(f"{row['setting']:<12} {ALGORITHMS[row['algorithm']]:<22} "
              f"{row['steps_min']:>6}-{row['steps_max']:<6} {reached:>15} {row['train_loss']:>11.4f} "
              f"{100 * row['accuracy']:>8.2f}%")


def plot(rows: list[dict], args, path: Path, n: int) -> None:
    """Mean training loss against wall time (s), one panel per setting, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0.0, args.budget, 401)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, setting in zip(axes, ("homogeneous", "slow ranks"), strict=True):
        for row in rows:
            if row["setting"] == setting:
                ax.plot(grid, row["curve"], label=ALGORITHMS[row["algorithm"]])
        ax.axhline(args.target, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"{setting}, n = {n}", xlabel="wall time (s)", yscale="log")
        ax.legend()
    axes[0].set_ylabel("mean training loss of the ranks' models")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run both algorithms in both settings for every random seed; rank 0 prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=6.0, help="training seconds per run")
    parser.add_argument("--target", type=float, default=0.1, help="the training loss to reach")
    parser.add_argument("--slow-ranks", type=lambda s: [int(r) for r in s.split(",") if r], default=[0])
    parser.add_argument("--slow-delay", type=float, default=0.02, help="seconds a slow rank sleeps per step")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--eval-every", type=float, default=0.1, help="seconds of training between evaluations")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds, one run each")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    gossip.init()
    torch.set_num_threads(1)
    n, rank = gossip.size(), gossip.rank()
    bad = [r for r in args.slow_ranks if not 0 <= r < n]
    if bad:
        raise SystemExit(f"--slow-ranks {bad} out of range for {n} ranks")
    data = load_digits()
    results: dict = {}
    for seed in map(int, args.seeds.split(",")):
        shard = partition(data.y_train, n, None, seed=seed)[rank]
        for setting, slow in (("homogeneous", False), ("slow ranks", True)):
            for name in ALGORITHMS:
                outcome = run(name, slow, seed, args, data, shard)
                gathered = MPI.COMM_WORLD.gather((outcome["log"], outcome["steps"]), root=0)
                if rank == 0:
                    results.setdefault((setting, name), []).append(
                        {"logs": [g[0] for g in gathered], "steps": [g[1] for g in gathered],
                         **{k: outcome[k] for k in ("train_loss", "averaged_accuracy")}})
    if rank == 0:
        rows = summarise(results, args)
        print_table(rows, args, n)
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"async-gossip-np{n}"
        stem.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "rows": rows}, indent=1))
        plot(rows, args, stem.with_suffix(".png"), n)
        print(f"wrote {stem}.json and {stem}.png")
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
