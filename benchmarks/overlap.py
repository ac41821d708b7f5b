"""Step time of adapt-while-combine DSGD with its gossip overlapped, without overlap, and compute alone.

``gossiprun -np 4 python benchmarks/overlap.py``. Every rank trains the same MLP on synthetic data
(forward, backward, optimizer step) with ``dsgd-awc``:

* ``compute``: the same optimizer with no communication (``topology="none"``);
* ``awc, no overlap``: Gossip(x^k) started and waited for inside ``step()``;
* ``awc, overlap``: Gossip(x^{k+1}) started at the end of ``step()``, running during the next
  forward and backward.

Per-step time is the slowest rank's mean over ``--steps`` consecutive steps (after ``--warmup``),
with no barrier between steps, so that the gossip in flight at each step's end is counted. The
hidden fraction is ``(no overlap - overlap) / (no overlap - compute)``. On an oversubscribed box
MPI progress competes with compute for the same cores, which limits what overlap can hide.
Writes ``results/overlap-np<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from mpi4py import MPI

import algorithms
import gossip
import topologies


def model_of(width: int, depth: int) -> torch.nn.Module:
    """``depth`` ReLU layers of ``width`` features, then 10 logits: input (batch, width)."""
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def time_steps(mode: str, args, comm: MPI.Comm) -> float:
    """Collective: the slowest rank's mean seconds per training step in ``mode``."""
    torch.manual_seed(0)
    model = model_of(args.width, args.depth)
    topology = "none" if mode == "compute" else topologies.OnePeerExponentialTwo(comm.size)
    opt = algorithms.create("dsgd-awc", model.parameters(), lr=0.01, topology=topology,
                            overlap=(mode == "awc, overlap"))
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    opt.synchronize()
    comm.Barrier()  # once: a barrier per step would let the gossip in flight finish outside the timed steps
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    opt.synchronize()  # the last step's gossip counts too
    return comm.allreduce((time.perf_counter() - start) / args.steps, op=MPI.MAX)


def main() -> int:
    """Time the three modes; rank 0 prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gossip.init()
    comm = MPI.COMM_WORLD
    modes = ["compute", "awc, no overlap", "awc, overlap"]
    results = {mode: time_steps(mode, args, comm) for mode in modes}
    if comm.rank == 0:
        params = sum(p.numel() for p in model_of(args.width, args.depth).parameters())
        print(f"dsgd-awc, one-peer exponential-2, {comm.size} ranks, {params / 1e6:.2f} M parameters "
              f"({params * 4 / 2**20:.1f} MiB per message), batch {args.batch}")
        print(f"{'mode':<18} {'ms/step':>9}")
        for mode in modes:
            print(f"{mode:<18} {1e3 * results[mode]:>9.2f}")
        comm_cost = results["awc, no overlap"] - results["compute"]
        hidden = (results["awc, no overlap"] - results["awc, overlap"]) / comm_cost if comm_cost > 0 else float("nan")
        print(f"communication adds {1e3 * comm_cost:.2f} ms without overlap; overlap hides {100 * hidden:.0f}% of it")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"overlap-np{comm.size}.json").write_text(json.dumps({"args": vars(args), "seconds": results,
                                                                     "hidden_fraction": hidden}))
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
