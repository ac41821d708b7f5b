"""Consensus error against steps for the main topologies, predicted from W(k) and measured under MPI.

``python benchmarks/topology_consensus.py`` (one process) computes, for n = 16, 24 and 64 (``--sizes``), the
worst-case consensus error ``||W(k-1) ... W(0) - 11^T/n||_2`` after k steps for the ring, torus,
static exponential-2, one-peer exponential-2, Base-2, Base-3, U-EquiStatic, OD-EquiDyn and the
fully connected graph; prints a table, writes ``results/topologies-consensus.json`` and a plot
``results/topologies-consensus.png``.

``mpirun -np 8 python benchmarks/topology_consensus.py --measure`` also gossips a random vector on every
rank with ``gossip.neighbor_allreduce`` for each family at n = 8 and compares the measured
relative error ``||X_k - X_bar||_F / ||X_0 - X_bar||_F`` with the prediction
``||(P_k - J) X_0||_F / ||(I - J) X_0||_F`` from the mixing matrices (``P_k`` the product), and
checks that it stays below the worst case above. Results: ``results/topologies-measured-np<N>.json``.
(Not named ``benchmarks/topologies.py``: run as a script, that name would shadow the ``topologies``
package for every script in this folder.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import topologies


def families(n: int) -> dict[str, object]:
    """The benchmarked families at n ranks: static graphs and time-varying schedules."""
    return {
        "ring": topologies.ring(n),
        "torus": topologies.torus(n),
        "exponential-2": topologies.exponential_two(n),
        "U-EquiStatic": topologies.u_equi_static(n, seed=0),
        "fully connected": topologies.fully_connected(n),
        "one-peer exp-2": topologies.OnePeerExponentialTwo(n),
        "Base-2": topologies.BaseGraph(n, 1),
        "Base-3": topologies.BaseGraph(n, 2),
        "OD-EquiDyn": topologies.OnePeerDirectedEquiDyn(n, seed=0),
    }


def step_matrix(topology, step: int) -> np.ndarray:
    """W(step), n x n: the static graph's W, or the time-varying family's at ``step``."""
    if isinstance(topology, topologies.DynamicTopology):
        return topology.mixing_matrix(step)
    return topologies.to_matrix(topology)


def error_curve(topology, n: int, steps: int) -> list[float]:
    """``||P_k - J||_2`` for k = 0..steps (P_0 = I)."""
    average = np.full((n, n), 1.0 / n)
    product = np.eye(n)
    curve = [float(np.linalg.norm(product - average, ord=2))]
    for k in range(steps):
        product = step_matrix(topology, k) @ product
        curve.append(float(np.linalg.norm(product - average, ord=2)))
    return curve


def predicted(sizes: list[int], steps: int, message_bytes: int) -> dict:
    """Per n and family: the error curve, steps to 1e-6, max degree and bytes per step (busiest rank)."""
    out = {}
    for n in sizes:
        rows = {}
        for name, topology in families(n).items():
            sent = topologies.bytes_per_step(topology, message_bytes)
            rows[name] = {"error": error_curve(topology, n, steps),
                          "steps_to_1e-6": topologies.consensus_steps(topology, 1e-6, 5000),
                          "max_degree": topologies.max_degree(topology),
                          "bytes_per_step": int(sent.max())}
        out[n] = rows
    return out


def print_table(results: dict, steps: int) -> None:
    """Print the predicted errors at a few step counts, one table per n."""
    marks = [k for k in (1, 2, 4, 6, 8, 16, 32, 64, 128) if k <= steps]
    for n, rows in results.items():
        print(f"\nn = {n}: worst-case consensus error ||W(k-1)...W(0) - J||_2 after k steps")
        header = f"{'topology':<16} {'deg':>3} " + " ".join(f"{f'k={k}':>9}" for k in marks) + f" {'to 1e-6':>8}"
        print(header)
        print("-" * len(header))
        for name, row in rows.items():
            to_tol = row["steps_to_1e-6"]
            print(f"{name:<16} {row['max_degree']:>3} " + " ".join(f"{row['error'][k]:>9.2e}" for k in marks)
                  + f" {to_tol if to_tol is not None else '>5000':>8}")


def plot(results: dict, path: Path) -> None:
    """The predicted error curves, one panel per n, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (n, rows) in zip(axes[0], results.items(), strict=True):
        for name, row in rows.items():
            curve = np.maximum(np.array(row["error"]), 1e-17)
            axis.semilogy(range(len(curve)), curve, label=name, linestyle="--" if name in DYNAMIC else "-")
        axis.set_title(f"n = {n}")
        axis.set_xlabel("gossip steps k")
        axis.set_ylabel("||W(k-1)...W(0) - 11^T/n||_2")
        axis.set_ylim(1e-17, 2)
        axis.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DYNAMIC = {"one-peer exp-2", "Base-2", "Base-3", "OD-EquiDyn"}


def measure(steps: int, numel: int, seed: int) -> dict | None:
    """Gossip under MPI (every rank) and compare with the prediction; rank 0 returns the rows."""
    import torch
    from mpi4py import MPI

    import gossip

    gossip.init()
    comm = MPI.COMM_WORLD
    n, rank = comm.size, comm.rank
    x0 = np.random.default_rng([seed, rank]).standard_normal(numel)
    everyone = np.stack(comm.allgather(x0))  # (n, numel): the prediction's starting point
    deviation = everyone - everyone.mean(axis=0)
    rows = {}
    for name, topology in families(n).items():
        dynamic = isinstance(topology, topologies.DynamicTopology)
        if not dynamic:
            gossip.set_topology(topology)
        x = torch.from_numpy(x0.copy())
        product = np.eye(n)
        measured, predicted_error, bound = [], [], []
        for k in range(steps):
            if dynamic:
                p = topology.peers(k, rank)
                x = gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                              dst_weights=p.dst_weights)
            else:
                x = gossip.neighbor_allreduce(x)
            product = step_matrix(topology, k) @ product
            now = np.stack(comm.allgather(x.numpy()))
            measured.append(float(np.linalg.norm(now - everyone.mean(axis=0)) / np.linalg.norm(deviation)))
            target = (product - 1.0 / n) @ everyone
            predicted_error.append(float(np.linalg.norm(target) / np.linalg.norm(deviation)))
            bound.append(float(np.linalg.norm(product - 1.0 / n, ord=2)))
        rows[name] = {"measured": measured, "predicted": predicted_error, "worst_case": bound}
    gossip.set_topology(topologies.exponential_two(n))
    return rows if rank == 0 else None


def print_measured(rows: dict, n: int) -> None:
    """Print the measured errors against the predicted and the worst case."""
    print(f"\nmeasured under MPI at n = {n}: relative consensus error ||X_k - X_bar||_F / ||X_0 - X_bar||_F")
    header = (f"{'topology':<16} {'k=1':>9} {'k=4':>9} {'final':>9} {'predicted':>9} {'max |meas-pred|':>16} "
              f"{'<= bound':>8}")
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        gap = max(abs(m - p) for m, p in zip(row["measured"], row["predicted"], strict=True))
        within = all(m <= b + 1e-12 for m, b in zip(row["measured"], row["worst_case"], strict=True))
        m = row["measured"]
        print(f"{name:<16} {m[0]:>9.2e} {m[min(3, len(m) - 1)]:>9.2e} {m[-1]:>9.2e} {row['predicted'][-1]:>9.2e} "
              f"{gap:>16.2e} {'yes' if within else 'NO':>8}")


def main(argv: list[str] | None = None) -> int:
    """Predict (and with ``--measure``, measure under MPI); print the tables and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,24,64", help="comma-separated n for the predicted curves")
    parser.add_argument("--steps", type=int, default=64, help="gossip steps per curve")
    parser.add_argument("--message-mb", type=float, default=4.0, help="message size for bytes per step")
    parser.add_argument("--measure", action="store_true", help="also gossip under MPI at n = world size")
    parser.add_argument("--measure-steps", type=int, default=24)
    parser.add_argument("--numel", type=int, default=4096, help="float64 elements per rank when measuring")
    parser.add_argument("--out", default="results", help="output folder")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rank = 0
    measured = None
    if args.measure:
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.rank
        measured = measure(args.measure_steps, args.numel, seed=1)
    if rank != 0:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = predicted(sizes, args.steps, int(args.message_mb * 2**20))
    print_table(results, args.steps)
    (out / "topologies-consensus.json").write_text(json.dumps({str(n): r for n, r in results.items()}, indent=1))
    if not args.no_plot:
        plot(results, out / "topologies-consensus.png")
        print(f"\nplot: {out / 'topologies-consensus.png'}")
    if measured is not None:
        from mpi4py import MPI

        n = MPI.COMM_WORLD.size
        print_measured(measured, n)
        (out / f"topologies-measured-np{n}.json").write_text(json.dumps(measured, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
