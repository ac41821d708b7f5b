"""Large-batch training in miniature: test accuracy of decentralized momentum methods vs PmSGD.

``gossiprun -np 8 python benchmarks/large_batch.py``. The large-batch table of Yuan, Chen, Huang,
Zhang, Pan, Xu and Yin, "DecentLaM: Decentralized Momentum SGD for Large-Batch Deep Training", ICCV
2021, on a small scale. A real dataset that ships offline
(scikit-learn's digits by default, or ``--dataset mnist1d``), label-skewed across the ranks with
Dirichlet(α) class shares, a small MLP, and per-rank batches so large that an epoch is a few steps.
Every method gets the same model initialisation, data order, learning-rate schedule (linear
warm-up, linear scaling with the total batch, step decay) and topology, for several random seeds
(``--seeds``) and per-rank batch sizes. Printed, in the layout of the paper's table: final test
accuracy of the averaged model, mean ± std over the random seeds, one column per total batch; then
the mean accuracy of the ranks' own models and the final consensus distance. The paper's claim:
with large batches DmSGD loses accuracy to PmSGD (momentum amplifies the inconsistency bias),
DecentLaM does not. Writes ``results/large_batch-<dataset>-np<N>.json`` and ``.png``.
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
from gossip.tools.data import BatchStream, Split, load_digits, load_mnist1d, partition

# label -> registry name; every method gets the same lr schedule, momentum β and topology; LARS
# adds its trust coefficient η and Gossip-PGA its period H
METHODS: dict[str, str] = {
    "PmSGD": "pmsgd",
    "PmSGD+LARS": "pmsgd",
    "DmSGD": "dmsgd",
    "DA-DmSGD": "da-dmsgd",
    "AWC-DmSGD": "awc-dmsgd",
    "AWC-DmSGD (shared m)": "awc-dmsgd",
    "QG-DmSGD": "qg-dmsgd",
    "D2-DmSGD": "d2",
    "Gossip-PGA (DmSGD)": "dmsgd",
    "DecentLaM": "decentlam",
}


def ring(n: int, self_weight: float):
    """Ring with W_ii = self_weight and (1 − self_weight)/2 to each side (symmetric, doubly stochastic)."""
    if n < 3:
        return topologies.fully_connected(n)
    w = np.eye(n) * self_weight
    for i in range(n):
        w[i, (i + 1) % n] += (1 - self_weight) / 2
        w[i, (i - 1) % n] += (1 - self_weight) / 2
    return topologies.from_matrix(w)


def make_topology(name: str, n: int, self_weight: float):
    """The ``--topology`` graph on n ranks: ``ring`` (with W_ii = ``self_weight``), ``symmetric-exp`` or ``exp2``."""
    if name == "ring":
        return ring(n, self_weight)
    if name == "symmetric-exp":
        return topologies.symmetric_exponential(n, 2)
    if name == "exp2":
        return topologies.exponential_two(n)
    raise ValueError(f"unknown topology {name!r}")


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then ×0.1 at 50% and again at 75% of training."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 ** ((step >= steps // 2) + (step >= 3 * steps // 4)))


def run(label: str, args, data: Split, shard: np.ndarray, topology, per_rank_batch: int, seed: int) -> dict:
    """Train one method from one seed; return final accuracies, loss and consensus distance."""
    name = METHODS[label]
    n, rank = gossip.size(), gossip.rank()
    hyper = {"lr": 1.0, "momentum": args.momentum, "weight_decay": args.weight_decay}
    if label == "PmSGD+LARS":
        hyper.update(lars=True, trust_coefficient=args.trust_coefficient)
    if label == "AWC-DmSGD (shared m)":
        hyper["share_momentum"] = True
    if label.startswith("Gossip-PGA"):
        hyper["global_avg_every"] = args.global_avg_every
    if algorithms.spec(name).takes_topology:
        hyper["topology"] = topology
    torch.manual_seed(seed)
    model = mlp(data.x_train.shape[1], args.hidden, data.num_classes)
    opt = algorithms.create(name, model.parameters(), **hyper)
    stream = BatchStream(data.x_train[shard], data.y_train[shard], per_rank_batch, seed=seed * 1009 + rank)
    total_batch = per_rank_batch * n
    steps = max(1, round(args.epochs * len(data.x_train) / total_batch))
    peak = args.lr * total_batch / 256
    warmup = max(1, round(args.warmup_epochs * len(data.x_train) / total_batch))
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak, warmup)
        x, y = stream.next()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.synchronize()
    seconds = time.perf_counter() - started
    return {"method": label, "seed": seed, "per_rank_batch": per_rank_batch, "total_batch": total_batch,
            "steps": steps, "peak_lr": peak, **final_measurements(model, opt, data), "seconds": seconds}


def summarise(results: list[dict], key: str, scale: float = 100.0, fmt: str = "{:6.2f} ± {:4.2f}") -> list[str]:
    """Table lines: one row per method, one column per total batch, ``key`` × ``scale`` as mean ± std."""
    batches = sorted({r["total_batch"] for r in results})
    lines = [f"{'method':<20}" + "".join(f"{f'total batch {b}':>20}" for b in batches)]
    for label in dict.fromkeys(r["method"] for r in results):
        cells = []
        for b in batches:
            values = np.array([r[key] for r in results if r["method"] == label and r["total_batch"] == b]) * scale
            cells.append(f"{fmt.format(values.mean(), values.std()):>20}")
        lines.append(f"{label:<20}" + "".join(cells))
    return lines


def plot(results: list[dict], path: Path, title: str) -> None:
    """Test accuracy (%) of the averaged model against total batch size, one line per method, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["total_batch"] for r in results})
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["method"] for r in results):
        means, stds = [], []
        for b in batches:
            v = np.array([r["averaged_accuracy"] for r in results if r["method"] == label and r["total_batch"] == b])
            means.append(100 * v.mean())
            stds.append(100 * v.std())
        axis.errorbar(batches, means, yerr=stds, marker="o", capsize=3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("total batch size")
    axis.set_ylabel("test accuracy of the averaged model (%)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Run every method for every batch size and random seed; rank 0 prints the tables and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label skew")
    parser.add_argument("--batch-sizes", default="8,32,64", help="per-rank batch sizes, comma-separated")
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--warmup-epochs", type=float, default=5)
    parser.add_argument("--lr", type=float, default=0.2, help="peak lr for a total batch of 256 (scaled linearly)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--trust-coefficient", type=float, default=0.2, help="LARS η")
    parser.add_argument("--global-avg-every", type=int, default=8, help="Gossip-PGA's H")
    parser.add_argument("--topology", choices=["ring", "symmetric-exp", "exp2"], default="ring")
    parser.add_argument("--self-weight", type=float, default=0.4, help="ring: W_ii (D² needs λ_min(W) > −1/3)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds, one run each")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels of METHODS")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    data = load_digits() if args.dataset == "digits" else load_mnist1d()
    topology = make_topology(args.topology, n, args.self_weight)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    results = []
    for per_rank_batch in [int(b) for b in args.batch_sizes.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            shard = partition(data.y_train, n, args.alpha, seed=seed, min_size=1)[rank]
            for label in methods:
                results.append(run(label, args, data, shard, topology, per_rank_batch, seed))
                if rank == 0:
                    r = results[-1]
                    print(f"  batch {r['total_batch']:>5} seed {seed} {label:<20}"
                          f" acc {100 * r['averaged_accuracy']:6.2f}"
                          f"  ranks {100 * r['rank_accuracy']:6.2f}  loss {r['train_loss']:.4f}"
                          f"  consensus {r['consensus_distance']:.2e}  {r['seconds']:.1f}s", flush=True)
    if rank == 0:
        title = (f"{args.dataset}, Dirichlet alpha={args.alpha}, n={n}, {args.topology}, {args.epochs:g} epochs, "
                 f"momentum {args.momentum}")
        print(f"\n{title}; random seeds {args.seeds}")
        print("test accuracy of the averaged model (%), mean ± std over the random seeds")
        print("\n".join(summarise(results, "averaged_accuracy")))
        print("\nmean test accuracy of the ranks' own models (%)")
        print("\n".join(summarise(results, "rank_accuracy")))
        print("\nconsensus distance (1/n) sum_i ||x_i - x̄||^2 at the end")
        print("\n".join(summarise(results, "consensus_distance", 1.0, "{:8.2e} ± {:7.1e}")))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"large_batch-{args.dataset}-np{n}"
        stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        plot(results, stem.with_suffix(".png"), title)
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
