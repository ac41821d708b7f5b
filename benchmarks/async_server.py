"""Asynchronous SGD with a parameter server in miniature: ASGD vs naive ASGDm vs OrMo vs OrMo-DA.

``gossiprun -np 9 python benchmarks/async_server.py`` (1 server + 8 workers; then ``-np 5``)

The experiment of Shi, Yang and Li, "Ordered Momentum for Asynchronous SGD", NeurIPS 2024, on a
small scale. Rank 0 serves, the others are workers that compute gradients on their iid shard of
scikit-learn's digits (offline) for a small MLP and exchange them for the newest parameters without
waiting for each other (:mod:`algorithms.async_sgd`). Every method applies the same number of
gradients (``--epochs`` passes over the training set by all workers together), from the same
initialisation, in the paper's two settings: homogeneous workers, and heterogeneous ones where
``--slow-fraction`` of the workers sleep ``--slow-delay`` seconds per gradient (their gradients
arrive much staler). The momentum methods use β = ``--momentum``; each method's lr is tuned on the
first random seed of the homogeneous setting over ``--lrs`` (lowest final training loss) and held
for the rest. Reports the server model's final training loss and test accuracy, mean ± std over
the ``--seeds`` runs, one row per method and one column group per setting as in the paper's table,
with the mean and max staleness; writes ``results/async-server-np<N>.json`` and a ``.png`` of
training loss against wall time.

Not compared: the paper's two other baselines, shifted momentum (Giladi, Nacson, Hoffer and Soudry,
ICLR 2020) and SMEGA² (Cohen, Hakimi and Schuster, ICPP 2022), which are not implemented.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_support import accuracy, mlp

import algorithms
import gossip
from gossip.tools.data import BatchStream, load_digits, partition

METHODS = {"asgd": "ASGD", "asgdm": "naive ASGDm", "ormo": "OrMo", "ormo-da": "OrMo-DA"}


@torch.no_grad()
def training_loss(model, data) -> float:
    """Mean cross-entropy of ``model`` on the whole training set."""
    return float(F.cross_entropy(model(data.x_train), data.y_train))


def run(name: str, lr: float, slow: bool, seed: int, args, data) -> dict | None:
    """One asynchronous run; the server returns its measurements, workers None."""
    n, rank = gossip.size(), gossip.rank()
    workers = n - 1
    torch.manual_seed(seed)
    model = mlp(data.x_train.shape[1], args.hidden, data.num_classes)
    hyper = {"lr": lr} if name == "asgd" else {"lr": lr, "momentum": args.momentum}
    opt = algorithms.create(name, model.parameters(), **hyper)
    updates = round(args.epochs * len(data.x_train) / args.batch_size)
    slow_workers = set(range(1, 1 + round(args.slow_fraction * workers))) if slow else set()
    gossip.barrier()
    start = time.perf_counter()
    if opt.is_server:
        curve, every = [], max(1, updates // 60)

        def record(w, g, ite, worker) -> None:
            if opt.rule.t % every == 0:
                curve.append((time.perf_counter() - start, opt.rule.t, training_loss(model, data)))

        opt.serve(updates, on_update=record)
        seconds = time.perf_counter() - start
        curve.append((seconds, updates, training_loss(model, data)))
        staleness = np.array(opt.rule.staleness)
        result = {"train_loss": curve[-1][2], "accuracy": accuracy(model, data.x_test, data.y_test),
                  "seconds": seconds, "staleness_mean": float(staleness.mean()),
                  "staleness_max": int(staleness.max()), "curve": curve}
    else:
        shard = partition(data.y_train, workers, None, seed=seed)[rank - 1]
        stream = BatchStream(data.x_train[shard], data.y_train[shard], args.batch_size, seed=seed * 1009 + rank)
        while not opt.stopped:
            x, y = stream.next()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if rank in slow_workers:
                time.sleep(args.slow_delay)
            opt.step()
        result = None
    opt.server.free()
    return result


def _stats(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(np.mean(values)), float(np.std(values))


def main(argv: list[str] | None = None) -> int:
    """Tune each method's lr, run every method in both settings; the server prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1,0.3", help="lr grid, tuned per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--slow-fraction", type=float, default=0.25, help="share of the workers that are slow")
    parser.add_argument("--slow-delay", type=float, default=0.01, help="seconds a slow worker sleeps per gradient")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds, one run each")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    gossip.init()
    torch.set_num_threads(1)
    n, rank = gossip.size(), gossip.rank()
    if n < 2:
        raise SystemExit("async_server.py needs at least 2 ranks (1 server and 1 worker)")
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; known: {', '.join(METHODS)}")
    data = load_digits()
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]

    tuned, tuning = {}, {}
    for name in methods:  # tune on the first seed, homogeneous workers
        losses = [run(name, lr, False, seeds[0], args, data) for lr in lrs]
        if rank == 0:
            tuning[name] = {lr: r["train_loss"] for lr, r in zip(lrs, losses, strict=True)}
            finite = {lr: v for lr, v in tuning[name].items() if np.isfinite(v)}
            tuned[name] = min(finite, key=finite.get) if finite else lrs[0]
        tuned[name] = gossip.broadcast(torch.tensor([tuned.get(name, 0.0)], dtype=torch.float64), root=0).item()

    results: dict = {}
    for setting, slow in (("homogeneous", False), ("heterogeneous", True)):
        for name in methods:
            for seed in seeds:
                outcome = run(name, tuned[name], slow, seed, args, data)
                if rank == 0:
                    results.setdefault(setting, {}).setdefault(name, []).append(outcome)
    if rank == 0:
        report(results, tuned, tuning, args, n)
    gossip.shutdown()
    return 0


def report(results: dict, tuned: dict, tuning: dict, args, n: int) -> None:
    """Print the table (loss, accuracy, staleness per method and setting) and write the JSON and plot."""
    workers = n - 1
    slow = round(args.slow_fraction * workers)
    print(f"\n{workers} workers + 1 server, {args.epochs:g} epochs, batch {args.batch_size}, β = {args.momentum}, "
          f"random seeds {args.seeds}; heterogeneous: {slow} of {workers} workers sleep {1000 * args.slow_delay:g} ms "
          f"per gradient")
    print("lr tuned per method on the first seed (homogeneous): "
          + ", ".join(f"{METHODS[m]} {lr:g}" for m, lr in tuned.items()))
    header = f"{'method':<14}" + "".join(f"{s + ': train loss':>26}{'test acc':>16}{'staleness':>12}"
                                          for s in results)
    print(header)
    rows = {}
    for name in tuned:
        line = f"{METHODS[name]:<14}"
        for setting, by_method in results.items():
            runs = by_method[name]
            loss, loss_std = _stats([r["train_loss"] for r in runs])
            acc, acc_std = _stats([100 * r["accuracy"] for r in runs])
            stale = np.mean([r["staleness_mean"] for r in runs])
            most = max(r["staleness_max"] for r in runs)
            line += f"{loss:>19.4f} ± {loss_std:.4f}{acc:>9.2f} ± {acc_std:.2f}{stale:>7.1f}/{most:<4}"
            rows.setdefault(name, {})[setting] = {"train_loss": [loss, loss_std], "accuracy": [acc, acc_std],
                                                  "staleness_mean": float(stale), "staleness_max": most}
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"async-server-np{n}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "tuned_lr": tuned,
         "tuning": {m: {str(k): v for k, v in t.items()} for m, t in tuning.items()}, "rows": rows,
         "curves": {s: {m: [r["curve"] for r in runs] for m, runs in b.items()} for s, b in results.items()}},
        indent=1))
    plot(results, stem.with_suffix(".png"), workers)
    print(f"wrote {stem}.json and {stem}.png")


def plot(results: dict, path: Path, workers: int) -> None:
    """The server model's training loss against wall time (s), one panel per setting, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (setting, by_method) in zip(axes[0], results.items(), strict=True):
        for k, (name, runs) in enumerate(by_method.items()):
            for j, r in enumerate(runs):
                times, _, losses = zip(*r["curve"], strict=True)
                ax.plot(times, losses, color=f"C{k}", alpha=0.8, label=METHODS[name] if j == 0 else None)
        ax.set(title=f"{setting}, {workers} workers", xlabel="wall time (s)", yscale="log")
        ax.legend()
    axes[0][0].set_ylabel("training loss of the server's model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
