"""Average consensus: repeated ``neighbor_allreduce`` drives every rank's vector to the global mean.

Rank i starts with a random vector x_i(0) (seed i). One gossip step is x <- W x, with W the mixing
matrix (``W[i, j]`` = the weight rank i gives to rank j). For a doubly stochastic W the mean is
kept and the consensus error contracts:

    ||X(k) - 1 x_bar^T||_F <= ||Phi(k) - 11^T/n||_2 * ||X(0) - 1 x_bar^T||_F,    Phi(k) = W(k-1)...W(0).

For a static topology Phi(k) = W^k, and since every graph here is circulant (so W is normal),
``||W^k - 11^T/n||_2 = rho^k`` with ``rho = ||W - 11^T/n||_2 = 1 - topologies.spectral_gap(W)``:
rho is the worst-case per-step rate, and a random start decays no faster than the worst case
allows (measured rate <= rho). Time-varying schedules (one-peer exponential-2, Base-(k+1),
OD-EquiDyn, random matchings) change W every step; their bound is the norm of the actual product,
which is 0 after log2(n) steps for one-peer exponential-2 when n is a power of two and after one
period for Base-(k+1) graphs at any n (exact averaging); the looser product of the per-step norms
is printed beside it.

Run from the repository root (``pip install -e .`` or ``PYTHONPATH=.``)::

    gossiprun -np 4 python mpirun_examples/average_consensus.py --topology ring

Exits non-zero if the error ever exceeds its bound, if the mean drifts, or (with
``--max-error``) if the final error is above the given value, so it doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

import gossip
import topologies
from gossip import metrics

STATIC = {"exp2": topologies.exponential_two, "ring": topologies.ring, "fully_connected": topologies.fully_connected,
          "torus": topologies.torus, "symmetric_exp2": topologies.symmetric_exponential,
          "u_equi_static": topologies.u_equi_static}
DYNAMIC = {"one_peer_exp2": topologies.OnePeerExponentialTwo, "base2": lambda n: topologies.BaseGraph(n, 1),
           "base3": lambda n: topologies.BaseGraph(n, 2), "od_equidyn": topologies.OnePeerDirectedEquiDyn,
           "random_matching": topologies.RandomMatching}
ROUND_OFF = 1e-12  # relative error at which float64 consensus counts as exact
SLACK = 1e-9  # allowed excess of a measured relative error over its bound (round-off)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", choices=[*STATIC, *DYNAMIC], default="exp2")
    parser.add_argument("--iterations", type=int, default=30, help="gossip steps (default 30)")
    parser.add_argument("--size", type=int, default=10_000, help="vector length per rank (default 10000)")
    parser.add_argument("--max-error", type=float, default=None,
                        help="also fail if the final relative error is above this")
    return parser.parse_args()


def rho_of(w: np.ndarray) -> float:
    """``||W - 11^T/n||_2``: the worst-case per-step contraction of the consensus error."""
    return 1.0 - topologies.spectral_gap(w)


def consensus_error(x: torch.Tensor, mean: torch.Tensor) -> float:
    """Collective: ``||X - 1 mean^T||_F``, the rows of X being the ranks' vectors (n times the
    consensus distance of :func:`gossip.metrics.consensus_distance`, square-rooted)."""
    return math.sqrt(gossip.size() * metrics.consensus_distance(x, mean))


def main() -> int:
    args = parse_args()
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    average = np.ones((n, n)) / n

    # The schedule: mixing matrices W(k) and, per step, how to call neighbor_allreduce.
    if args.topology in STATIC:
        graph = STATIC[args.topology](n)
        gossip.set_topology(graph)
        w = topologies.mixing_matrix(graph)
        rho = rho_of(w)
        schedule = None
        mixing = lambda step: w
        rate_predicted = rho
        say(f"{args.topology}, n={n}: rho = ||W - 11^T/n||_2 = {rho:.6f} "
            f"(spectral gap {topologies.spectral_gap(w):.6f}); worst-case error after k steps: rho^k")
    else:
        schedule = DYNAMIC[args.topology](n)
        mixing = schedule.mixing_matrix
        horizon = schedule.period or 16
        rate_predicted = topologies.consensus_rate(schedule, horizon) ** (1.0 / horizon)
        say(f"{args.topology}, n={n}: period {schedule.period}; per-step rho(W(k)) = "
            f"{[round(rho_of(mixing(s)), 6) for s in range(min(horizon, 8))]}; predicted rate "
            f"||Phi({horizon}) - 11^T/n||_2^(1/{horizon}) = {rate_predicted:.4g}")
        exact = topologies.consensus_steps(schedule, tol=ROUND_OFF, max_steps=horizon)
        if n > 1 and exact is not None:
            say(f"the product of the first {exact} steps is 11^T/n: every rank holds the exact average "
                f"after {exact} steps")

    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.size, dtype=torch.float64, generator=generator)
    mean = gossip.allreduce(x, op="mean")
    initial = consensus_error(x, mean)

    product = np.eye(n)  # Phi(k)
    product_bound = 1.0  # prod_s ||W(s) - 11^T/n||_2, looser than ||Phi(k) - 11^T/n||_2
    errors: list[float] = []
    failures: list[str] = []
    say(f"{'step':>4}  {'error':>10}  {'bound':>10}" + (f"  {'prod rho':>10}" if schedule else ""))
    say(f"{0:>4}  {1.0 if initial else 0.0:>10.3e}  {np.linalg.norm(product - average, ord=2):>10.3e}")
    for step in range(args.iterations):
        if schedule is None:
            x = gossip.neighbor_allreduce(x)
        else:
            p = schedule.peers(step, rank)
            x = gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                          dst_weights=p.dst_weights)
        product = mixing(step) @ product
        product_bound *= rho_of(mixing(step))
        bound = rate_predicted**(step + 1) if schedule is None else float(np.linalg.norm(product - average, ord=2))
        error = consensus_error(x, mean) / initial if initial else 0.0
        errors.append(error)
        extra = f"  {product_bound:>10.3e}" if schedule else ""
        say(f"{step + 1:>4}  {error:>10.3e}  {bound:>10.3e}" + extra)
        if error > bound + SLACK:
            failures.append(f"step {step + 1}: error {error:.3e} exceeds its bound {bound:.3e}")

    drift = float(torch.linalg.vector_norm(gossip.allreduce(x, op="mean") - mean)) / max(initial, 1e-300)
    if initial and drift > SLACK:
        failures.append(f"the mean drifted by {drift:.3e} (relative): W is not doubly stochastic?")
    final = errors[-1] if errors else 0.0
    if args.max_error is not None and final > args.max_error:
        failures.append(f"final error {final:.3e} > --max-error {args.max_error:.3e}")

    # Measured per-step rate: geometric mean of the per-step error ratios, up to round-off.
    if not initial:
        measured = "n/a (n=1: every rank already holds the mean)"
    else:
        k = next((i + 1 for i, e in enumerate(errors) if e <= ROUND_OFF), len(errors))
        note = f", where the error reached round-off (< {ROUND_OFF:g})" if k and errors[k - 1] <= ROUND_OFF else ""
        measured = f"{errors[k - 1] ** (1.0 / k):.4g} (steps 1..{k}{note})" if k else "n/a (0 iterations)"
    verdict = "OK" if not failures else "FAIL"
    say(f"summary: {args.topology} n={n}: measured rate {measured}; predicted rho {rate_predicted:.4g}; "
        f"final error {final:.3e}: {verdict}")
    for failure in failures:
        say(f"  {failure}")
    gossip.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
