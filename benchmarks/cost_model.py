"""The cost model against measurement: predicted vs measured seconds per step for each plan.

``GOSSIP_RANKS_PER_MACHINE=2 gossiprun -np 4 python benchmarks/cost_model.py`` (and ``-np 8``)

Measures the model's parameters with :func:`gossip.probe`, then for message sizes from 1 KB to
100 MB times (median over ``--repeats`` after a warm-up, the slowest rank's time) each plan as
the library runs it: MPI's allreduce (compared with the better of the model's ring and tree,
since the MPI library picks its own algorithm), neighbour averaging on the static exponential-2
graph (degree ⌈log2 n⌉), one-peer exponential-2, and hierarchical averaging (one-peer
exponential-2 between the machines; pretend machines with ``GOSSIP_RANKS_PER_MACHINE``). Prints
predicted, measured and their ratio per plan and size, and the median absolute log-error per
plan; writes ``results/cost-model-np<N>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import gossip
import topologies
from gossip.plan.probing import slowest_median


def timed(call, repeats: int) -> float:
    """The slowest rank's median seconds per call (after one warm-up call), as the probe times ops."""
    return slowest_median(gossip.runtime.current().comm, call, repeats)


def plans(x: torch.Tensor, rank: int, one_peer, machines, degree: int) -> dict:
    """One call per plan, each communicating ``x`` as the library does (time-varying ones step on)."""
    step = [0]

    def one_peer_step() -> None:
        p = one_peer.peers(step[0] % one_peer.period, rank)
        gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights, dst_weights=p.dst_weights)
        step[0] += 1

    def hierarchical_step() -> None:
        gossip.hierarchical_neighbor_allreduce(x, machines, step[0] % machines.period)
        step[0] += 1

    return {"allreduce (MPI)": lambda: gossip.allreduce(x),
            f"static exp-2 (degree {degree})": lambda: gossip.neighbor_allreduce(x),
            "one-peer exp-2": one_peer_step, "hierarchical": hierarchical_step}


def main(argv: list[str] | None = None) -> int:
    """Probe, time every plan at every size; rank 0 prints predicted vs measured and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7,1e8", help="message sizes in bytes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    gossip.init()
    n, rank = gossip.size(), gossip.rank()
    model = gossip.probe()
    degree = len(gossip.in_neighbors())  # the runtime's default: static exponential-2
    one_peer = topologies.OnePeerExponentialTwo(n)
    machines = topologies.OnePeerExponentialTwo(gossip.machine_size())
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        x = torch.randn(max(1, size // 4))
        nbytes = x.numel() * 4
        repeats = args.repeats if nbytes < 2e7 else max(3, args.repeats // 3)
        guesses = {"allreduce (MPI)": min(model.ring_allreduce(nbytes), model.tree_allreduce(nbytes)),
                   f"static exp-2 (degree {degree})": model.exponential(nbytes),
                   "one-peer exp-2": model.one_peer(nbytes), "hierarchical": model.hierarchical(nbytes)}
        for plan, call in plans(x, rank, one_peer, machines, degree).items():
            rows.append({"bytes": nbytes, "plan": plan, "predicted": guesses[plan], "measured": timed(call, repeats)})
    if rank == 0:
        print(f"n = {n}, {gossip.machine_size()} machine(s) of up to {model.ranks_per_machine} ranks; probed: "
              f"intra α = {model.intra.latency * 1e6:.2f} µs, {model.intra.bandwidth / 1e9:.2f} GB/s; "
              f"inter α = {model.inter.latency * 1e6:.2f} µs, {model.inter.bandwidth / 1e9:.2f} GB/s per machine; "
              f"γ = {model.intra.reduce * 1e9:.3f} ns/byte; overhead {model.overhead * 1e6:.0f} µs (allreduce), "
              f"{(model.gossip_overhead or 0) * 1e6:.0f} µs (gossip), "
              f"{(model.hierarchical_overhead or 0) * 1e6:.0f} µs (hierarchical); allreduce per-byte factor "
              f"{model.allreduce_per_byte_factor:.2f}, gossip copies {model.copy_per_byte * 1e9:.3f} ns/byte")
        print(f"{'bytes':>10} {'plan':<24} {'predicted':>12} {'measured':>12} {'measured/predicted':>19}")
        for row in rows:
            print(f"{row['bytes']:>10} {row['plan']:<24} {row['predicted'] * 1e3:>10.3f}ms "
                  f"{row['measured'] * 1e3:>10.3f}ms {row['measured'] / row['predicted']:>19.2f}")
        print("median |log10(measured/predicted)| per plan (0.30 = a factor of 2):")
        for plan in dict.fromkeys(r["plan"] for r in rows):
            errors = [abs(np.log10(r["measured"] / r["predicted"])) for r in rows if r["plan"] == plan]
            print(f"  {plan:<24} {np.median(errors):.2f}")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"cost-model-np{n}.json"
        path.write_text(json.dumps({"model": {"intra": vars(model.intra), "inter": vars(model.inter),
                                              "size": model.size, "ranks_per_machine": model.ranks_per_machine,
                                              "overhead": model.overhead, "gossip_overhead": model.gossip_overhead,
                                              "hierarchical_overhead": model.hierarchical_overhead,
                                              "allreduce_per_byte_factor": model.allreduce_per_byte_factor,
                                              "copy_per_byte": model.copy_per_byte},
                                    "rows": rows}, indent=1))
        print(f"wrote {path}")
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
