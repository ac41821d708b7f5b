"""A comparison table of topologies for n ranks: degree, rho, steps to consensus, bytes per step.

``python -m topologies 16 64 --message-mb 100`` prints one table per n; :func:`compare` returns
the rows for programs (the scheduler's cost model reads the same quantities).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from topologies import analysis
from topologies.dynamic import DynamicTopology, OnePeerExponentialTwo, RandomMatching
from topologies.equitopo import OnePeerDirectedEquiDyn, OnePeerUndirectedEquiDyn, d_equi_static, u_equi_static
from topologies.finite_time import BaseGraph
from topologies.random_graphs import random_regular
from topologies.static import exponential_two, fully_connected, hypercube, ring, symmetric_exponential, torus


@dataclass
class Row:
    """One topology's line of the table.

    ``rho`` is ``||W - J||_2`` for a static graph and, for a time-varying one, the per-step
    geometric mean ``consensus_rate(T) ** (1/T)`` over one period (16 steps if it has none).
    ``steps`` is :func:`analysis.consensus_steps` to ``tol`` (None: not within the step limit);
    ``bytes_per_step`` the most any rank sends in one step.
    """

    name: str
    kind: str
    max_degree: int
    rho: float
    steps: int | None
    bytes_per_step: int

    @property
    def bytes_to_consensus(self) -> int | None:
        """What the busiest rank sends before consensus (steps x bytes per step)."""
        return None if self.steps is None else self.steps * self.bytes_per_step


def candidates(n: int, seed: int = 0) -> dict[str, object]:
    """The standard families at n ranks (those defined for n), by display name."""
    out: dict[str, object] = {"ring": ring(n), "torus": torus(n)}
    if n & (n - 1) == 0:
        out["hypercube"] = hypercube(n)
    out["exponential-2"] = exponential_two(n)
    out["symmetric exp-2"] = symmetric_exponential(n)
    if n >= 5 and n % 2 == 0:
        out["random 4-regular"] = random_regular(n, 4, seed=seed)
    out["D-EquiStatic"] = d_equi_static(n, seed=seed)
    out["U-EquiStatic"] = u_equi_static(n, seed=seed)
    out["fully connected"] = fully_connected(n)
    out["one-peer exp-2"] = OnePeerExponentialTwo(n)
    out["Base-2"] = BaseGraph(n, 1)
    out["Base-3"] = BaseGraph(n, 2)
    out["OD-EquiDyn"] = OnePeerDirectedEquiDyn(n, seed=seed)
    out["OU-EquiDyn"] = OnePeerUndirectedEquiDyn(n, seed=seed)
    out["random matching"] = RandomMatching(n, seed=seed)
    return out


def describe(name: str, topology, message_bytes: int, tol: float = 1e-6, max_steps: int = 2000) -> Row:
    """Measure one topology: a :class:`Row`."""
    if isinstance(topology, DynamicTopology):
        horizon = topology.period or 16
        rate = analysis.consensus_rate(topology, horizon) ** (1.0 / horizon)
        sent = max(int(analysis.bytes_per_step(topology, message_bytes, s).max()) for s in range(horizon))
        kind = "dynamic"
    else:
        rate = analysis.rho(topology)
        sent = int(analysis.bytes_per_step(topology, message_bytes).max())
        kind = "static"
    steps = analysis.consensus_steps(topology, tol, max_steps)
    return Row(name, kind, analysis.max_degree(topology), float(rate), steps, sent)


def compare(n: int, message_bytes: int = 4 * 2**20, tol: float = 1e-6, max_steps: int = 2000,
            seed: int = 0) -> list[Row]:
    """Rows for every candidate family at n ranks, in the order of :func:`candidates`."""
    return [describe(name, t, message_bytes, tol, max_steps) for name, t in candidates(n, seed).items()]


def format_table(rows: list[Row], tol: float = 1e-6) -> str:
    """A fixed-width table of ``rows`` a person can read."""
    header = f"{'topology':<18} {'kind':<8} {'degree':>6} {'rho':>7} {f'steps to {tol:g}':>15} {'MB/step':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        steps = f">{'limit'}" if r.steps is None else str(r.steps)
        lines.append(f"{r.name:<18} {r.kind:<8} {r.max_degree:>6} {r.rho:>7.4f} {steps:>15} "
                     f"{r.bytes_per_step / 2**20:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m topologies``: print the table (or JSON rows) for each n given."""
    parser = argparse.ArgumentParser(prog="python -m topologies", description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="*", default=[16, 64], help="numbers of ranks (default 16 64)")
    parser.add_argument("--message-mb", type=float, default=4.0, help="message size per neighbour in MiB")
    parser.add_argument("--tol", type=float, default=1e-6, help="consensus tolerance ||W(k)...W(1) - J||_2")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random families")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)
    message_bytes = int(args.message_mb * 2**20)
    for n in args.n:
        rows = compare(n, message_bytes, args.tol, args.max_steps, args.seed)
        if args.json:
            import json

            print(json.dumps({"n": n, "message_bytes": message_bytes,
                              "rows": [asdict(r) | {"bytes_to_consensus": r.bytes_to_consensus} for r in rows]}))
        else:
            print(f"n = {n}, {args.message_mb:g} MiB per message")
            print(format_table(rows, args.tol))
            print()
    return 0



