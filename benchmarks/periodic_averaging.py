"""MAVG vs K-AVG at equal samples, and SlowMo vs its base at equal steps, in miniature.

``gossiprun -np 8 python benchmarks/periodic_averaging.py`` (then again with ``-np 4`` to see how the
best μ moves with n). Scikit-learn's digits (offline), iid across the ranks, a small MLP, constant
learning rate, every run from the same initialisation and data order for a given random seed.

* ``--experiment mavg`` (Cong and Liu, "Accelerate Distributed Stochastic Descent for Nonconvex
  Optimization with Momentum", MLHPC workshop at SC 2020): plain local SGD with averaging every K
  steps (K-AVG, μ = 0) and MAVG's meta momentum μ > 0, for each K of ``--periods`` and μ of
  ``--mus``, all for the same number of epochs (equal samples: S = n·B·K·meta-steps fixed). Prints
  the final training loss of the averaged model (mean ± std over the ``--seeds`` runs) as a K × μ
  table, the best μ for each K, and the test accuracy. The lr is tuned for K-AVG (per K, from
  ``--lrs``, on the first random seed) and then held for every μ, so that μ > 0 cannot win by a
  larger step alone. The paper's claims: the best μ is > 0; it grows with n; with momentum a
  smaller K is best.
* ``--experiment slowmo`` (Wang, Tantia, Ballas and Rabbat, "SlowMo: Improving
  Communication-Efficient Distributed SGD with Slow Momentum", ICLR 2020): SlowMo (α = 1, β in
  ``--betas``) over local SGD with local momentum 0.9 and over DSGD on a ring, against the bare
  base (local SGD is its own β = 0 case; for DSGD β = 0 means "DSGD with an exact average every τ
  steps", and the bare base never averages), at equal steps, with the lr tuned for the bare base.
  The paper's claim: SlowMo improves the base's optimization and generalization.

Writes ``results/periodic-<experiment>-np<N>.json`` and a ``.png``.
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

import algorithms
import gossip
import topologies
from gossip.tools.data import BatchStream, load_digits, partition


def train(name: str, hyper: dict, args, data, shard, seed: int, lr: float) -> dict:
    """One run of ``args.epochs`` epochs of per-rank batches ``args.batch_size``; final measurements."""
    n, rank = gossip.size(), gossip.rank()
    torch.manual_seed(seed)
    model = mlp(data.x_train.shape[1], args.hidden, data.num_classes)
    opt = algorithms.create(name, model.parameters(), lr=lr, **hyper)
    stream = BatchStream(data.x_train[shard], data.y_train[shard], args.batch_size, seed=seed * 1009 + rank)
    steps = max(1, round(args.epochs * len(data.x_train) / (n * args.batch_size)))
    started = time.perf_counter()
    for _ in range(steps):
        x, y = stream.next()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    seconds = time.perf_counter() - started
    return {"seed": seed, "steps": steps, "lr": lr, **final_measurements(model, opt, data), "seconds": seconds}


def tuned_lr(name: str, hyper: dict, args, data, shards) -> float:
    """The lr of ``--lrs`` with the lowest final training loss for ``name`` on the first random seed
    (a diverged run counts as infinite loss)."""
    seed, shard = shards[0]
    losses = []
    for lr in map(float, args.lrs.split(",")):
        loss = train(name, hyper, args, data, shard, seed, lr)["train_loss"]
        losses.append((loss if np.isfinite(loss) else np.inf, lr))
    return min(losses)[1]


def _stats(values: list[float], scale: float = 1.0) -> tuple[float, float]:
    v = np.array(values) * scale
    return float(v.mean()), float(v.std())


def mavg_experiment(args, data, shards) -> dict:
    """Collective: K-AVG and MAVG for every K × μ and random seed; prints the tables on rank 0."""
    periods = [int(k) for k in args.periods.split(",")]
    mus = [float(m) for m in args.mus.split(",")]
    results, lrs = [], {}
    for period in periods:
        lrs[period] = tuned_lr("local-sgd", {"period": period}, args, data, shards)  # tuned for K-AVG
        for mu in mus:
            for seed, shard in shards:
                if mu == 0:  # K-AVG
                    run = train("local-sgd", {"period": period}, args, data, shard, seed, lrs[period])
                else:
                    run = train("mavg", {"period": period, "slow_momentum": mu}, args, data, shard, seed,
                                lrs[period])
                results.append({"period": period, "mu": mu, **run})
    if gossip.rank() == 0:
        n = gossip.size()
        for key, label, scale, fmt in (("train_loss", "final training loss of the averaged model", 1.0,
                                        "{:.4f} ± {:.4f}"),
                                       ("averaged_accuracy", "test accuracy (%) of the averaged model", 100.0,
                                        "{:5.2f} ± {:4.2f}")):
            print(f"\n{label}, n = {n}, {args.epochs:g} epochs, batch {args.batch_size} per rank, lr tuned for "
                  f"K-AVG from {args.lrs}, mean ± std over {len(shards)} random seeds")
            print(f"{'K':>4}{'lr':>6}" + "".join(f"{'K-AVG' if mu == 0 else f'μ = {mu:g}':>20}" for mu in mus)
                  + f"{'best μ':>10}")
            for period in periods:
                cells, means = [], []
                for mu in mus:
                    mean, std = _stats([r[key] for r in results if r["period"] == period and r["mu"] == mu], scale)
                    means.append(mean)
                    cells.append(f"{fmt.format(mean, std):>20}")
                best = mus[int(np.argmin(means) if key == "train_loss" else np.argmax(means))]
                print(f"{period:>4}{lrs[period]:>6g}" + "".join(cells) + f"{best:>10g}")
    return {"experiment": "mavg", "results": results}


def slowmo_experiment(args, data, shards) -> dict:
    """Collective: SlowMo for every β over each base, and the bare bases; prints the tables on rank 0."""
    n = gossip.size()
    betas = [float(b) for b in args.betas.split(",")]
    ring = topologies.ring(n) if n > 2 else topologies.fully_connected(n)
    bases = {"local SGD (momentum 0.9)": ("local-sgd", {"momentum": 0.9}),
             "DSGD (ring)": ("dsgd", {"topology": ring})}
    results, lrs = [], {}
    for label, (base, base_hyper) in bases.items():
        bare = ({"period": args.period} if base == "local-sgd" else {}) | base_hyper
        lrs[label] = lr = tuned_lr(base, bare, args, data, shards)  # tuned for the bare base
        for seed, shard in shards:
            if base == "dsgd":
                results.append({"base": label, "beta": None, **train(base, bare, args, data, shard, seed, lr)})
            for beta in betas:
                hyper = {"base": base, "period": args.period, "slow_lr": 1.0, "slow_momentum": beta, **base_hyper}
                results.append({"base": label, "beta": beta, **train("slowmo", hyper, args, data, shard, seed, lr)})
    if gossip.rank() == 0:
        columns = [None, *betas]
        for key, label, scale, fmt in (("train_loss", "final training loss of the averaged model", 1.0,
                                        "{:.4f} ± {:.4f}"),
                                       ("averaged_accuracy", "test accuracy (%) of the averaged model", 100.0,
                                        "{:5.2f} ± {:4.2f}")):
            print(f"\n{label}, n = {n}, τ = {args.period}, {args.epochs:g} epochs (equal steps), batch "
                  f"{args.batch_size} per rank, lr tuned for the bare base from {args.lrs}, mean ± std over "
                  f"{len(shards)} random seeds")
            print(f"{'base':<26}{'lr':>6}" + "".join(f"{'bare base' if b is None else f'SlowMo β = {b:g}':>20}"
                                            for b in columns))
            for base in bases:
                cells = []
                for beta in columns:
                    values = [r[key] for r in results if r["base"] == base and r["beta"] == beta]
                    cells.append(f"{fmt.format(*_stats(values, scale)):>20}" if values else f"{'(= β = 0)':>20}")
                print(f"{base:<26}{lrs[base]:>6g}" + "".join(cells))
    return {"experiment": "slowmo", "results": results}


def plot(summary: dict, path: Path, n: int) -> None:
    """Final training loss against μ (per K) or β (per base), mean ± std over the random seeds, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    fig, axis = plt.subplots(figsize=(7, 4.5))
    if summary["experiment"] == "mavg":
        for period in dict.fromkeys(r["period"] for r in results):
            mus = sorted({r["mu"] for r in results})
            stats = [_stats([r["train_loss"] for r in results if r["period"] == period and r["mu"] == mu])
                     for mu in mus]
            axis.errorbar(mus, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                          label=f"K = {period}")
        axis.set_xlabel("meta momentum μ (0 = K-AVG)")
        axis.set_title(f"MAVG vs K-AVG at equal samples, n = {n}")
    else:
        for base in dict.fromkeys(r["base"] for r in results):
            betas = sorted({r["beta"] for r in results if r["base"] == base and r["beta"] is not None})
            stats = [_stats([r["train_loss"] for r in results if r["base"] == base and r["beta"] == b]) for b in betas]
            line = axis.errorbar(betas, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                                 label=f"SlowMo over {base}")
            bare = [r["train_loss"] for r in results if r["base"] == base and r["beta"] is None]
            if bare:
                axis.axhline(np.mean(bare), color=line[0].get_color(), linestyle="--", label=f"bare {base}")
        axis.set_xlabel("slow momentum β (α = 1)")
        axis.set_title(f"SlowMo vs its base at equal steps, n = {n}")
    axis.set_ylabel("final training loss of the averaged model")
    axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Run the experiments of ``--experiment``; rank 0 prints and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["mavg", "slowmo", "all"], default="all")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lrs", default="0.025,0.05,0.1,0.2,0.4,0.8",
                        help="lrs tried for the baseline (K-AVG, the bare base) on the first seed; the best is used")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--periods", default="2,4,8,16", help="mavg: the K values")
    parser.add_argument("--mus", default="0,0.2,0.4,0.6,0.8", help="mavg: meta momenta (0 = K-AVG)")
    parser.add_argument("--period", type=int, default=8, help="slowmo: τ")
    parser.add_argument("--betas", default="0,0.2,0.4,0.6,0.8", help="slowmo: slow momenta")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds, one run each")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    data = load_digits()
    shards = [(seed, partition(data.y_train, n, None, seed=seed)[rank]) for seed in map(int, args.seeds.split(","))]
    experiments = ["mavg", "slowmo"] if args.experiment == "all" else [args.experiment]
    for experiment in experiments:
        began = time.perf_counter()
        summary = (mavg_experiment if experiment == "mavg" else slowmo_experiment)(args, data, shards)
        if rank == 0:
            print(f"({experiment}: {time.perf_counter() - began:.0f} s)")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = out / f"periodic-{experiment}-np{n}"
            stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), **summary}, indent=1))
            try:
                plot(summary, stem.with_suffix(".png"), n)
            except ImportError:
                pass
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
