"""OSU-style micro-benchmark of gossip's primitives against the raw MPI calls moving the same bytes.

Run as ``mpirun -np N python benchmarks/primitives.py`` (``--help`` for options). For every
message size (float32, 4 KB to 100 MB by default) and in the same run:

* ``neighbor_allreduce`` on the ring and the exponential-2 graph, against raw mpi4py
  ``Neighbor_allgather`` on a dist-graph communicator of the same graph;
* one-peer exponential-2 ``neighbor_allreduce`` (a dynamic exchange, one peer per step),
  against raw ``Sendrecv`` with the same peers, over its whole period and at each distance 2^k
  alone (send to rank + 2^k, receive from rank − 2^k: at distance n/2 two ranks exchange with
  each other, the case a TCP transport can serialise);
* ``hierarchical_neighbor_allreduce`` (machine average, one-peer exponential-2 between machines,
  machine broadcast), against the same three raw calls (``Allreduce`` on the machine,
  ``Sendrecv`` between leaders, ``Bcast`` on the machine); with one machine it is skipped;
* ``allreduce`` (mean), against raw ``Allreduce`` and raw ``Iallreduce`` (sum): the faster of
  the two is the ratio's baseline, and both are listed (over TCP the blocking one can be far
  slower).

On an emulated cluster (``gossiprun --emulate MxR --link RATE``) each row also gives the share of
the link rate used: the bytes that leave the busiest machine per op (ranks in blocks of R per
machine; the allreduce counted as a ring's 2(n−1)/n per machine) over the time and the rate.

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
MPI_LIBRARY = MPI.Get_library_version().split("\x00")[0].splitlines()[0]  # Open MPI ends it with a NUL


def parse_size(text: str) -> int:
    """Bytes in a size such as ``64K``, ``1M``, ``100MB`` or ``4096`` (K, M, G are powers of 1024)."""
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
    """Raw ``Neighbor_allgather`` of ``x`` on a dist-graph communicator of ``graph``: (op, communicator to free)."""
    rank = comm.rank
    sources = sorted(j for j in graph.predecessors(rank) if j != rank)
    destinations = sorted(i for i in graph.successors(rank) if i != rank)
    dist = comm.Create_dist_graph_adjacent(sources, destinations, reorder=False)
    recv = np.empty(max(1, len(sources)) * x.size, dtype=x.dtype)
    return (lambda step: dist.Neighbor_allgather(x, recv[: len(sources) * x.size])), dist


def raw_one_peer(comm: MPI.Comm, dynamic: topologies.OnePeerExponentialTwo, x: np.ndarray) -> Callable[[int], object]:
    """Raw ``Sendrecv`` of ``x`` with the step's one-peer exponential-2 peers."""
    recv = np.empty_like(x)

    def op(step: int) -> None:
        peers = dynamic.peers(step, comm.rank)
        if peers.dst_weights:
            (dst,), (src,) = peers.dst_weights, peers.src_weights
            comm.Sendrecv(x, dest=dst, recvbuf=recv, source=src)

    return op


def ours_one_peer(dynamic: topologies.OnePeerExponentialTwo, x: torch.Tensor, out: torch.Tensor):
    """``gossip.neighbor_allreduce`` of ``x`` into ``out`` with the step's one-peer exponential-2 peers."""
    rank = gossip.rank()
    steps = [dynamic.peers(step, rank) for step in range(dynamic.period)]

    def op(step: int) -> None:
        p = steps[step % len(steps)]
        gossip.neighbor_allreduce(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                  dst_weights=p.dst_weights, out=out)

    return op


def raw_fixed_peer(comm: MPI.Comm, distance: int, x: np.ndarray) -> Callable[[int], object]:
    """Raw ``Sendrecv`` of ``x``: send to rank + ``distance``, receive from rank − ``distance``."""
    recv = np.empty_like(x)
    dst, src = (comm.rank + distance) % comm.size, (comm.rank - distance) % comm.size
    return lambda step: comm.Sendrecv(x, dest=dst, recvbuf=recv, source=src)


def ours_fixed_peer(distance: int, x: torch.Tensor, out: torch.Tensor) -> Callable[[int], object]:
    """``gossip.neighbor_allreduce`` of ``x`` with rank ± ``distance`` (weight 1/2 each), into ``out``."""
    n, rank = gossip.size(), gossip.rank()
    src, dst = {(rank - distance) % n: 0.5}, {(rank + distance) % n: 1.0}
    return lambda step: gossip.neighbor_allreduce(x, self_weight=0.5, src_weights=src, dst_weights=dst, out=out)


def raw_hierarchical(x: np.ndarray) -> Callable[[int], object]:
    """The raw MPI calls hierarchical averaging makes: machine Allreduce, leaders' one-peer Sendrecv, machine Bcast."""
    rt = gossip.runtime.current()
    local, leaders = rt.local_comm, rt.leaders_comm
    family = topologies.OnePeerExponentialTwo(rt.machine_size)
    mean, recv = np.empty_like(x), np.empty_like(x)

    def op(step: int) -> None:
        local.Allreduce(x, mean)
        if leaders != MPI.COMM_NULL:
            p = family.peers(step, rt.machine_rank)
            if p.dst_weights:
                (dst,), (src,) = p.dst_weights, p.src_weights
                leaders.Sendrecv(mean, dest=dst, recvbuf=recv, source=src)
        local.Bcast(mean, root=0)

    return op


def raw_iallreduce(comm: MPI.Comm, x: np.ndarray, into: np.ndarray) -> Callable[[int], object]:
    """Raw ``Iallreduce`` (sum) of ``x`` into ``into``, waited for at once."""
    return lambda step: comm.Iallreduce(x, into).Wait()


def machine_bytes(label: str, nbytes: int, n: int, per_machine: int) -> float | None:
    """Bytes leaving the busiest machine in one op of ``label`` (ranks in blocks of ``per_machine``)."""
    def leaving(distances: list[int]) -> int:
        return max(sum(nbytes for r in range(m * per_machine, (m + 1) * per_machine) for d in distances
                       if ((r + d) % n) // per_machine != m) for m in range(n // per_machine))
    if n // per_machine < 2:
        return None
    if label.startswith("one-peer distance "):
        return leaving([int(label.split()[-1])])
    if label == "one-peer exp2":
        period = max(1, (n - 1).bit_length())
        return sum(leaving([1 << k]) for k in range(period)) / period
    if label == "neighbor_allreduce exp2":
        return leaving([1 << k for k in range((n - 1).bit_length())])
    if label == "neighbor_allreduce ring":
        return leaving([1, n - 1])
    if label == "hierarchical":
        return nbytes
    if label == "allreduce":
        return 2 * (n - 1) / n * nbytes
    return None


def synced(op: Callable[[int], object]) -> Callable[[int], object]:
    """``op`` followed by a device synchronisation, so that its time includes the GPU's work."""
    def run(step: int) -> object:
        result = op(step)
        torch.cuda.synchronize()
        return result
    return run


def measure_size(comm: MPI.Comm, nbytes: int, args: argparse.Namespace) -> list[dict]:
    """Collective: one row (times in µs, ratio to raw, link share) per op and variant at ``nbytes``."""
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
    dynamic_machines = topologies.OnePeerExponentialTwo(gossip.machine_size())
    variants = {"staged" if shared else "check": ours_one_peer(dynamic, plain, out),
                "nocheck": nocheck(ours_one_peer(dynamic, plain, out))}
    if shared:
        variants["inplace"] = ours_one_peer(dynamic, in_place, out)
    cases.append(("one-peer exp2", raw_one_peer(comm, dynamic, raw_x), variants, None))
    if args.distances:
        for k in range(max(0, (n - 1).bit_length())):
            cases.append((f"one-peer distance {1 << k}", raw_fixed_peer(comm, 1 << k, raw_x),
                          {"check": ours_fixed_peer(1 << k, plain, out)}, None))
    if gossip.machine_size() > 1:
        cases.append(("hierarchical", raw_hierarchical(raw_x),
                      {"check": lambda step: gossip.hierarchical_neighbor_allreduce(
                          plain, dynamic_machines, step, out=out)}, None))
    raw_sum = np.empty_like(raw_x)
    cases.append(("allreduce", lambda step: comm.Allreduce(raw_x, raw_sum),
                  {"check": lambda step: gossip.allreduce(plain, out=out),
                   "nocheck": nocheck(lambda step: gossip.allreduce(plain, out=out))},
                  raw_iallreduce(comm, raw_x, raw_sum)))
    if args.device == "cuda":  # the same ops on a CUDA tensor of the same bytes: staged or CUDA-aware
        gpu = torch.device("cuda", gossip.local_rank() % torch.cuda.device_count())
        on_gpu, out_gpu = plain.to(gpu), torch.empty_like(plain, device=gpu)
        gpu_ops = [synced(ours_static(on_gpu, out_gpu)), synced(ours_static(on_gpu, out_gpu)),
                   synced(ours_one_peer(dynamic, on_gpu, out_gpu)),
                   synced(lambda step: gossip.allreduce(on_gpu, out=out_gpu))]
        for (_, _, case_variants, _), op in zip(cases, gpu_ops, strict=True):
            case_variants["cuda"] = op

    link_bits = float(os.environ.get("GOSSIP_EMULATED_LINK_BITS", "0"))
    per_machine = gossip.layout().ranks_per_machine
    for label, raw, variants, extra in cases:
        graph_case = isinstance(extra, tuple)
        if graph_case:
            gossip.set_topology(extra[0])
        raw_ops = {"raw": raw} if graph_case or extra is None else {"raw": raw, "raw_nonblocking": extra}
        times: dict[str, list[float]] = {**{r: [] for r in raw_ops}, **{v: [] for v in variants}}
        for _ in range(args.rounds):
            for name, op in raw_ops.items():
                times[name].append(time_per_op(comm, op, iterations, args.warmup))
            for variant, op in variants.items():
                times[variant].append(time_per_op(comm, op, iterations, args.warmup))
        raw_times = {name: statistics.median(times[name]) for name in raw_ops}
        raw_time = min(raw_times.values())
        leaving = machine_bytes(label, numel * 4, n, per_machine)
        for variant in variants:
            ours = statistics.median(times[variant])
            row = {"op": label, "variant": variant, "bytes": numel * 4, "iterations": iterations,
                   "ours_us": ours * 1e6, "raw_us": raw_time * 1e6, "ratio": ours / raw_time,
                   "extra_us": (ours - raw_time) * 1e6}
            if len(raw_times) > 1:
                row["raw_blocking_us"] = raw_times["raw"] * 1e6
                row["raw_nonblocking_us"] = raw_times["raw_nonblocking"] * 1e6
            if link_bits and leaving is not None:
                row["link_share"] = leaving * 8 / ours / link_bits
                row["raw_link_share"] = leaving * 8 / raw_time / link_bits
            rows.append(row)
        if graph_case:
            extra[1].Free()
    return rows


def format_bytes(nbytes: int) -> str:
    """``nbytes`` as ``'4 KB'``, ``'1 MB'`` or ``'100 B'`` (powers of 1024)."""
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def main() -> None:
    """Measure every size; rank 0 prints the table and writes the JSON rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; the median is kept")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", default="256M", help="bytes moved per timed loop (sets iterations per size)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: add a 'cuda' variant of every op on a CUDA tensor of the same bytes "
                             "(staged through pinned memory, or direct with a CUDA-aware MPI), next to the "
                             "host-memory variants and the raw MPI call on host memory")
    parser.add_argument("--distances", action="store_true",
                        help="also time one-peer exchanges at each distance 2^k alone")
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
              f"shared-memory path: {gossip.uses_shared_memory()}, MPI: {MPI_LIBRARY}")
        link = os.environ.get("GOSSIP_EMULATED_LINK_BITS")
        if link:
            print(f"# emulated links: {float(link) / 1e6:g} Mbit/s each way; 'link' = bytes leaving the busiest "
                  "machine per op / (time x rate), ours (raw)")
        print(f"{'size':>9} {'op':<27} {'variant':<8} {'ours us':>11} {'raw us':>11} {'ratio':>6} {'extra us':>9}"
              + (f" {'link':>13}" if link else ""))
    for nbytes in sizes:
        size_rows = measure_size(comm, nbytes, args)
        rows += size_rows
        if comm.rank == 0:
            for row in size_rows:
                share = (f" {row['link_share']:>6.0%} ({row['raw_link_share']:.0%})" if "link_share" in row
                         else "")
                blocking = (f"  [raw Allreduce {row['raw_blocking_us']:.0f}, "
                            f"Iallreduce {row['raw_nonblocking_us']:.0f}]" if "raw_blocking_us" in row else "")
                print(f"{format_bytes(row['bytes']):>9} {row['op']:<27} {row['variant']:<8} {row['ours_us']:>11.1f} "
                      f"{row['raw_us']:>11.1f} {row['ratio']:>6.2f} {row['extra_us']:>9.1f}{share}{blocking}",
                      flush=True)
    if comm.rank == 0:
        path = Path(args.json or f"results/primitives-np{comm.size}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ranks": comm.size, "machines": gossip.machine_size(), "shared_memory": gossip.uses_shared_memory(),
                "link_bits": float(os.environ.get("GOSSIP_EMULATED_LINK_BITS", "0")) or None,
                "device": args.device, "cuda_aware": gossip.cuda_aware(),
                "mpi": MPI_LIBRARY, "torch": torch.__version__,
                "host": platform.node(), "cpus": os.cpu_count()}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"# wrote {path}")
    gossip.shutdown()


if __name__ == "__main__":
    main()
