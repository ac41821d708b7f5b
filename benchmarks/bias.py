"""Momentum's limiting bias on full-batch linear regression with heterogeneous data: DSGD, DmSGD, DecentLaM.

``gossiprun -np 8 python benchmarks/bias.py``. Rank i holds its own least-squares problem
``f_i(x) = ||A_i x - b_i||^2 / (2 m)`` whose minimiser differs from rank to rank (heterogeneous
data); x* minimises the average. Every algorithm runs full batch (no gradient noise, so what
remains is the inconsistency bias) on a ring with the same learning rate, through the real
optimizers and ``neighbor_allreduce``. Printed: the mean squared distance ``(1/n) sum_i
||x_i - x*||^2`` at the end and how fast each gets there. The claim tested is that of
Yuan, Chen, Huang, Zhang, Pan, Xu and Yin, "DecentLaM: Decentralized Momentum SGD for
Large-Batch Deep Training", ICCV 2021: DmSGD's bias is about ``1/(1 - beta)^2`` times DSGD's, DecentLaM's is close to
DSGD's, and DecentLaM is as fast as DmSGD. Writes ``results/bias-np<N>.json`` and
``results/bias-np<N>.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import algorithms
import gossip
import topologies


def problem(rank: int, n: int, dim: int, rows: int, spread: float, seed: int):
    """This rank's (A_i, b_i) and, computed identically on every rank, the global minimiser x*."""
    everyone = []
    for r in range(n):
        rng = np.random.default_rng([seed, r])
        a = rng.standard_normal((rows, dim))
        x_local = rng.standard_normal(dim) * spread  # heterogeneity: each rank's own minimiser
        b = a @ x_local + 0.01 * rng.standard_normal(rows)
        everyone.append((a, b))
    gram = sum(a.T @ a for a, _ in everyone)
    x_star = np.linalg.solve(gram, sum(a.T @ b for a, b in everyone))
    a, b = everyone[rank]
    return torch.from_numpy(a), torch.from_numpy(b), x_star


def run(name: str, hyper: dict, a: torch.Tensor, b: torch.Tensor, x_star: np.ndarray, steps: int) -> list[float]:
    """Collective: ``steps`` full-batch steps of optimizer ``name`` on a ring from x = 0 (float64, shape (d,));
    returns ``(1/n) sum_i ||x_i - x*||^2`` after each step."""
    x = torch.nn.Parameter(torch.zeros(a.shape[1], dtype=torch.float64))
    opt = algorithms.create(name, [x], topology=topologies.ring(gossip.size()), **hyper)
    target = torch.from_numpy(x_star)
    distances = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (a @ x - b).square().sum() / (2 * a.shape[0])
        loss.backward()
        opt.step()
        local = (x.detach() - target).square().sum().reshape(1)
        distances.append(float(gossip.allreduce(local, "mean").item()))
    opt.synchronize()
    return distances


def main() -> int:
    """Run DSGD, DmSGD and DecentLaM on the same problem; rank 0 prints the table and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--spread", type=float, default=1.0, help="scale of the per-rank minimisers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    a, b, x_star = problem(rank, n, args.dim, args.rows, args.spread, args.seed)
    runs = {
        "DSGD": run("dsgd", {"lr": args.lr}, a, b, x_star, args.steps),
        f"DmSGD (beta={args.momentum})": run("dmsgd", {"lr": args.lr, "momentum": args.momentum}, a, b, x_star,
                                             args.steps),
        f"DecentLaM (beta={args.momentum})": run("decentlam", {"lr": args.lr, "momentum": args.momentum}, a, b,
                                                 x_star, args.steps),
    }
    if rank == 0:
        dsgd_final = runs["DSGD"][-1]
        print(f"full-batch linear regression, ring n={n}, d={args.dim}, lr={args.lr}, {args.steps} steps")
        print(f"{'algorithm':<24} {'final (1/n)sum||x_i-x*||^2':>28} {'/ DSGD':>8} {'steps to 1.1x final':>20}")
        for name, curve in runs.items():
            final = curve[-1]
            reach = next(k + 1 for k, d in enumerate(curve) if d <= 1.1 * final)
            print(f"{name:<24} {final:>28.4e} {final / dsgd_final:>8.2f} {reach:>20}")
        print(f"1/(1-beta)^2 = {1 / (1 - args.momentum) ** 2:.1f}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bias-np{n}.json").write_text(json.dumps({"args": vars(args), "curves": runs}))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axis = plt.subplots(figsize=(6, 4))
        for name, curve in runs.items():
            axis.semilogy(range(1, len(curve) + 1), curve, label=name)
        axis.set_xlabel("iteration")
        axis.set_ylabel("(1/n) sum_i ||x_i - x*||^2")
        axis.set_title(f"full-batch linear regression, ring, n = {n}")
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"bias-np{n}.png", dpi=110)
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
