"""CR-PSGD in miniature: it reaches fixed-batch parallel SGD's loss with O(log T) communication rounds.

``gossiprun -np 8 python benchmarks/dynamic_batch.py``. The claim of Yu and Jin, "On the
Computation and Communication Complexity of Parallel SGD with Dynamic Batch Sizes for Stochastic
Non-Convex Optimization", ICML 2019, on a small scale. A PL problem: L2-regularised softmax
regression (strongly convex, hence PL) on scikit-learn's digits, iid across the ranks, in float64.
f* is computed once by full-batch L-BFGS. For each per-worker sample budget T of ``--budgets``:

* parallel SGD with a fixed per-worker batch B₁ (``pmsgd`` without momentum): T / B₁ rounds;
* parallel SGD with a fixed large batch (``--large-batch``): T / B_large rounds;
* CR-PSGD (B₁, growth ρ): batch ⌊ρ^{t−1} B₁⌋, about log_ρ(T (ρ − 1)/B₁) rounds;
* CR-PSGD-Catalyst (θ): ⌊√(NT)⌋ rounds of CR-PSGD on the proximal problem.

The paper leaves the growth ρ > 1 free; by default we take ρ = 1/(1 − γλ) (λ bounds the PL
constant from below), so that the sampling error shrinks as fast as gradient descent's error
contracts, in the spirit of the paper's analysis.

All with the same step size γ and the same budget, over the random seeds of ``--seeds``. Prints,
per T: rounds, final suboptimality f(x) − f* (mean ± std over the random seeds) and the rounds each
method needs to reach fixed-batch SGD's final suboptimality; then the growth of rounds with T.
Plots suboptimality vs rounds and vs samples for the largest T. Writes
``results/dynamic-batch-np<N>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import algorithms
import gossip
from gossip.tools.data import BatchStream, load_digits, partition


def objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """f(w) = mean cross-entropy + (λ/2)‖w‖² (weights and bias)."""
    return F.cross_entropy(model(x), y) + 0.5 * l2 * sum(p.square().sum() for p in model.parameters())


def optimum(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> float:
    """f* by full-batch L-BFGS (deterministic: every rank computes the same value without communicating)."""
    model = torch.nn.Linear(x.shape[1], classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5000, tolerance_grad=1e-13,
                              tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = objective(model, x, y, l2)
        loss.backward()
        return loss

    for _ in range(5):
        lbfgs.step(closure)
    with torch.no_grad():
        return float(objective(model, x, y, l2))


def run(name: str, hyper: dict, args, x_all, y_all, shard, seed: int, f_star: float, classes: int) -> dict:
    """One method at one budget: suboptimality after every round, with rounds and samples so far."""
    rank = gossip.rank()
    model = torch.nn.Linear(x_all.shape[1], classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    hyper = dict(hyper)
    fixed = [hyper.pop("_batch")] * hyper.pop("_rounds") if "_batch" in hyper else None
    opt = algorithms.create(name, model.parameters(), lr=args.lr, weight_decay=args.l2, **hyper)
    sizes = opt.batch_sizes if fixed is None else fixed
    stream = BatchStream(x_all[shard], y_all[shard], sizes[0], seed=seed * 7919 + rank)
    curve, samples = [], 0
    with torch.no_grad():
        curve.append((0, 0, float(objective(model, x_all, y_all, args.l2)) - f_star))
    for t, size in enumerate(sizes):
        stream.batch_size = size
        bx, by = stream.next()
        opt.zero_grad()
        F.cross_entropy(model(bx), by).backward()  # weight decay (λ w) is added by the optimizer
        opt.step()
        samples += size
        with torch.no_grad():
            curve.append((t + 1, samples, float(objective(model, x_all, y_all, args.l2)) - f_star))
    return {"rounds": len(sizes), "samples": samples, "curve": curve, "final": curve[-1][2]}


def rounds_to_reach(curve: list, target: float) -> int | None:
    """The first round count in ``curve`` ((rounds, samples, f(x) − f*) tuples) whose gap is <= ``target``, or None."""
    for rounds, _, gap in curve:
        if gap <= target:
            return rounds
    return None


def main() -> int:
    """Run every method at every budget and random seed; rank 0 prints the tables and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="500,2000,8000", help="per-worker sample budgets T")
    parser.add_argument("--first-batch", type=int, default=4, help="B1, also fixed-batch SGD's batch")
    parser.add_argument("--large-batch", type=int, default=64)
    parser.add_argument("--growth", type=float, default=None,
                        help="CR-PSGD's rho (default 1/(1 - γλ): the batch grows as fast as GD's error contracts)")
    parser.add_argument("--theta", type=float, default=0.5, help="CR-PSGD-Catalyst's proximal weight")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--l2", type=float, default=0.1, help="λ: the problem is λ-strongly convex")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated random seeds, one run each")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.growth is None:
        args.growth = 1.0 / (1.0 - args.lr * args.l2)
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    data = load_digits()
    x_all, y_all = data.x_train.double(), data.y_train
    began = time.perf_counter()
    f_star = optimum(x_all, y_all, data.num_classes, args.l2)
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = {
        f"PSGD, batch {args.first_batch}": lambda t: ("pmsgd", {"momentum": 0.0, "_batch": args.first_batch,
                                                                "_rounds": t // args.first_batch}),
        f"PSGD, batch {args.large_batch}": lambda t: ("pmsgd", {"momentum": 0.0, "_batch": args.large_batch,
                                                                "_rounds": t // args.large_batch}),
        f"CR-PSGD (rho {args.growth:.3g})": lambda t: ("cr-psgd", {"budget": t, "first_batch": args.first_batch,
                                                                 "growth": args.growth}),
        "CR-PSGD-Catalyst": lambda t: ("cr-psgd-catalyst", {"budget": t, "first_batch": args.first_batch,
                                                            "growth": args.growth, "theta": args.theta}),
    }
    results = []
    for budget in budgets:
        for seed in seeds:
            shard = partition(y_all, n, None, seed=seed)[rank]
            for label, make in methods.items():
                name, hyper = make(budget)
                try:
                    outcome = run(name, hyper, args, x_all, y_all, shard, seed, f_star, data.num_classes)
                except ValueError as error:  # e.g. the catalyst's inner budget below B1 at small T
                    if rank == 0:
                        print(f"({label} at T = {budget}: {error})")
                    continue
                results.append({"method": label, "budget": budget, "seed": seed, **outcome})
    if rank == 0:
        print(f"softmax regression on digits, λ = {args.l2}, n = {n} workers, γ = {args.lr}, f* = {f_star:.6f}; "
              f"mean ± std over {len(seeds)} random seeds ({time.perf_counter() - began:.0f} s)")
        reference = f"PSGD, batch {args.first_batch}"
        for budget in budgets:
            print(f"\nper-worker budget T = {budget} samples")
            print(f"{'method':<24}{'rounds':>8}{'f(x) − f*':>24}{'rounds to reach PSGD-B1':>26}")
            target = np.mean([r["final"] for r in results if r["budget"] == budget and r["method"] == reference])
            for label in methods:
                runs = [r for r in results if r["budget"] == budget and r["method"] == label]
                if not runs:
                    continue
                finals = np.array([r["final"] for r in runs])
                reach = [rounds_to_reach(r["curve"], target) for r in runs]
                reached = "never" if any(v is None for v in reach) else f"{np.mean(reach):.0f}"
                print(f"{label:<24}{runs[0]['rounds']:>8}{f'{finals.mean():.3e} ± {finals.std():.1e}':>24}"
                      f"{reached:>26}")
        print("\nrounds as T grows (×4 each): " + "; ".join(
            f"{label}: " + " -> ".join(str(next((r["rounds"] for r in results if r["method"] == label
                                                 and r["budget"] == b), "-")) for b in budgets)
            for label in methods))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"dynamic-batch-np{n}"
        stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "f_star": f_star, "results": results}))
        try:
            plot(results, methods, budgets[-1], stem.with_suffix(".png"), n)
        except ImportError:
            pass
    gossip.shutdown()
    return 0


def plot(results: list[dict], methods: dict, budget: int, path: Path, n: int) -> None:
    """f(x) − f* against communication rounds and against samples per worker, at ``budget``, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, label in enumerate(methods):
        runs = [r for r in results if r["budget"] == budget and r["method"] == label]
        if not runs:
            continue
        curve = np.array(runs[0]["curve"])  # first seed
        axes[0].plot(np.maximum(curve[:, 0], 1), curve[:, 2], f"C{k}-", label=label)
        axes[1].plot(np.maximum(curve[:, 1], 1), curve[:, 2], f"C{k}-", label=label)
    for axis, xlabel in ((axes[0], "communication rounds"), (axes[1], "samples per worker")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("f(x) − f*")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"softmax regression on digits, n = {n}, budget T = {budget} samples per worker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
