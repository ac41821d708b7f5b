"""OSU-style micro-benchmark of gossip's primitives against the raw MPI calls moving the same bytes.

Run as ``mpirun -np N python benchmarks/primitives.py`` (``--help`` for options). For every
message size (float32, 4 KB to 100 MB by default) and in the same run:

* ``neighbor_allreduce`` on the ring and the exponential-2 graph, against raw mpi4py
  ``Neighbor_allgather`` on a dist-graph communicator of the same graph;
* one-peer exponential-2 ``neighbor_allreduce`` (a dynamic exchange, one peer per step),
  against raw ``Sendrecv`` with the same peers;
* ``allreduce`` (mean), against raw ``Allreduce`` (sum).

With ``--device cuda`` every op also runs on a CUDA tensor of the same bytes (variant ``cuda``:
staged through pinned host memory in chunks, or handed to a CUDA-aware MPI), timed to the end of
its GPU work, next to the host-memory variants and the raw MPI call on host memory.

"Ours" always includes the weighted sum the raw call does not do. Variants: ``check`` (default,
one 16-byte allreduce per op to catch mismatched inputs) and ``nocheck``; with all ranks on one
machine, ``staged`` (an ordinary tensor, copied into shared memory) and ``inplace`` (a tensor from
``gossip.shared_empty``, read by the neighbours where it lies). Set ``GOSSIP_SHARED_MEMORY=0`` to
benchmark the MPI-message path used across machines.

Times are per operation, the slowest rank's, the median of ``--rounds`` rounds that alternate
ours and raw. The table goes to stdout, the rows to JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

import gossip
import topologies

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,100M"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def iterations_for(nbytes: int, budget_bytes: int) -> int:
    """Enough repetitions for a stable time, few enough for 100 MB to finish quickly."""
    return int(min(200, max(3, budget_bytes // max(nbytes, 1))))


def time_per_op(comm: MPI.Comm, op: Callable[[int], object], iterations: int, warmup: int) -> float:
    """Seconds per call of ``op(step)``: the slowest rank's average over ``iterations`` calls."""
    for step in range(warmup):
        op(step)
    comm.Barrier()
    start = time.perf_counter()
    for step in range(iterations):
        op(step)
    elapsed = (time.perf_counter() - start) / iterations
    return comm.allreduce(elapsed, op=MPI.MAX)


def raw_neighbor_allgather(comm: MPI.Comm, graph, x: np.ndarray) -> tuple[Callable[[int], object], MPI.Comm]:
    rank = comm.rank
    sources = sorted(j for j in graph.predecessors(rank) if j != rank)
    destinations = sorted(i for i in graph.successors(rank) if i != rank)
    dist = comm.Create_dist_graph_adjacent(sources, destinations, reorder=False)
    recv = np.empty(max(1, len(sources)) * x.size, dtype=x.dtype)
    return (lambda step: dist.Neighbor_allgather(x, recv[: len(sources) * x.size])), dist


def raw_one_peer(comm: MPI.Comm, dynamic: topologies.OnePeerExponentialTwo, x: np.ndarray) -> Callable[[int], object]:
    recv = np.empty_like(x)

    def op(step: int) -> None:
        peers = dynamic.peers(step, comm.rank)
        if peers.dst_weights:
            (dst,), (src,) = peers.dst_weights, peers.src_weights
            comm.Sendrecv(x, dest=dst, recvbuf=recv, source=src)

    return op


def ours_one_peer(dynamic: topologies.OnePeerExponentialTwo, x: torch.Tensor, out: torch.Tensor):
    rank = gossip.rank()
    steps = [dynamic.peers(step, rank) for step in range(dynamic.period)]

    def op(step: int) -> None:
        p = steps[step % len(steps)]
        gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                  dst_weights=p.dst_weights, out=out)

    return op


def synced(op: Callable[[int], object]) -> Callable[[int], object]:
    """``op`` followed by a device synchronisation, so that its time includes the GPU's work."""
    def run(step: int) -> object:
        result = op(step)
        torch.cuda.synchronize()
        return result
    return run


def measure_size(comm: MPI.Comm, nbytes: int, args: argparse.Namespace) -> list[dict]:
    n = comm.size
    numel = max(1, nbytes // 4)
    iterations = iterations_for(nbytes, parse_size(args.budget))
    plain = torch.rand(numel, dtype=torch.float32)
    out = torch.empty_like(plain)
    in_place = gossip.shared_empty(numel, torch.float32)
    in_place.copy_(plain)
    shared = gossip.uses_shared_memory()
    raw_x = plain.numpy()

    def ours_static(x: torch.Tensor, into: torch.Tensor = out) -> Callable[[int], object]:
        return lambda step: gossip.neighbor_allreduce(x, out=into)

    def nocheck(op: Callable[[int], object]) -> Callable[[int], object]:
        def run(step: int) -> object:
            gossip.set_check(False)
            try:
                return op(step)
            finally:
                gossip.set_check(True)
        return run

    rows = []
    cases: list[tuple[str, Callable[[int], object], dict[str, Callable[[int], object]], object]] = []
    for name, graph in (("ring", topologies.ring(n)), ("exp2", topologies.exponential_two(n))):
        raw, dist = raw_neighbor_allgather(comm, graph, raw_x)
        variants = {"staged" if shared else "check": ours_static(plain),
                    "nocheck": nocheck(ours_static(plain))}
        if shared:
            variants["inplace"] = ours_static(in_place)
        cases.append((f"neighbor_allreduce {name}", raw, variants, (graph, dist)))
    dynamic = topologies.OnePeerExponentialTwo(n)
    variants = {"staged" if shared else "check": ours_one_peer(dynamic, plain, out),
                "nocheck": nocheck(ours_one_peer(dynamic, plain, out))}
    if shared:
        variants["inplace"] = ours_one_peer(dynamic, in_place, out)
    cases.append(("one-peer exp2", raw_one_peer(comm, dynamic, raw_x), variants, None))
    raw_sum = np.empty_like(raw_x)
    cases.append(("allreduce", lambda step: comm.Allreduce(raw_x, raw_sum),
                  {"check": lambda step: gossip.allreduce(plain, out=out),
                   "nocheck": nocheck(lambda step: gossip.allreduce(plain, out=out))},
                  None))
    if args.device == "cuda":  # the same ops on a CUDA tensor of the same bytes: staged or CUDA-aware
        gpu = torch.device("cuda", gossip.local_rank() % torch.cuda.device_count())
        on_gpu, out_gpu = plain.to(gpu), torch.empty_like(plain, device=gpu)
        gpu_ops = [synced(ours_static(on_gpu, out_gpu)), synced(ours_static(on_gpu, out_gpu)),
                   synced(ours_one_peer(dynamic, on_gpu, out_gpu)),
                   synced(lambda step: gossip.allreduce(on_gpu, out=out_gpu))]
        for (_, _, case_variants, _), op in zip(cases, gpu_ops, strict=True):
            case_variants["cuda"] = op

    for label, raw, variants, extra in cases:
        if extra is not None:
            gossip.set_topology(extra[0])
        times: dict[str, list[float]] = {"raw": [], **{v: [] for v in variants}}
        for _ in range(args.rounds):
            times["raw"].append(time_per_op(comm, raw, iterations, args.warmup))
            for variant, op in variants.items():
                times[variant].append(time_per_op(comm, op, iterations, args.warmup))
        raw_time = statistics.median(times["raw"])
        for variant in variants:
            ours = statistics.median(times[variant])
            rows.append({"op": label, "variant": variant, "bytes": numel * 4, "iterations": iterations,
                         "ours_us": ours * 1e6, "raw_us": raw_time * 1e6, "ratio": ours / raw_time,
                         "extra_us": (ours - raw_time) * 1e6})
        if extra is not None:
            extra[1].Free()
    return rows


def format_bytes(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; the median is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", default="256M", help="bytes moved per timed loop (sets iterations per size)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: add a 'cuda' variant of every op on a CUDA tensor of the same bytes "
                             "(staged through pinned memory, or direct with a CUDA-aware MPI), next to the "
                             "host-memory variants and the raw MPI call on host memory")
    parser.add_argument("--json", default=None, help="output JSON path (default results/primitives-np<N>.json)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one core per rank, as MPI jobs are usually laid out
    gossip.init()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("primitives.py: --device cuda but torch sees no CUDA device")
        torch.cuda.set_device(gossip.local_rank() % torch.cuda.device_count())
    comm = MPI.COMM_WORLD
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows: list[dict] = []
    if comm.rank == 0:
        print(f"# gossip primitives: {comm.size} ranks, {gossip.machine_size()} machine(s), "
              f"shared-memory path: {gossip.uses_shared_memory()}, MPI: {MPI.Get_library_version().splitlines()[0]}")
        print(f"{'size':>9} {'op':<27} {'variant':<8} {'ours us':>11} {'raw us':>11} {'ratio':>6} {'extra us':>9}")
    for nbytes in sizes:
        size_rows = measure_size(comm, nbytes, args)
        rows += size_rows
        if comm.rank == 0:
            for row in size_rows:
                print(f"{format_bytes(row['bytes']):>9} {row['op']:<27} {row['variant']:<8} {row['ours_us']:>11.1f} "
                      f"{row['raw_us']:>11.1f} {row['ratio']:>6.2f} {row['extra_us']:>9.1f}", flush=True)
    if comm.rank == 0:
        path = Path(args.json or f"results/primitives-np{comm.size}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ranks": comm.size, "machines": gossip.machine_size(), "shared_memory": gossip.uses_shared_memory(),
                "device": args.device, "cuda_aware": gossip.cuda_aware(),
                "mpi": MPI.Get_library_version().splitlines()[0], "torch": torch.__version__,
                "host": platform.node(), "cpus": os.cpu_count()}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"# wrote {path}")
    gossip.shutdown()


if __name__ == "__main__":
    main()
