"""Training throughput of gossip against allreduce baselines, in Horovod's synthetic-benchmark format.

``gossiprun -np 8 python benchmarks/throughput.py --model mlp --width 1024``. Synthetic data, a
model of adjustable size (``--width`` sweeps the communication/computation ratio), and in the same
run, one after the other on the same ranks:

* gossip: each of ``--algorithm`` (comma-separated, default ``dmsgd``) on each ``--topology``
  (default one-peer exponential-2 and static exponential-2; also ``hierarchical``, machine
  average plus one-peer exponential-2 between machines, and ``auto``, the scheduler's pick from
  the probed links, this model's bytes and its measured compute time); or a periodic-averaging
  method (``local-sgd``, ``mavg``, ``bmuf``/``slowmo`` over ``--base``) with ``--period``;
* PmSGD: allreduce of the fused gradient over ``gossip.allreduce`` (the Horovod way);
* PyTorch ``DistributedDataParallel`` on the gloo backend (NCCL with ``--device cuda``), its
  process group initialised from the MPI ranks (rank 0's address and a free port are broadcast
  over MPI; the address is ``MASTER_ADDR`` if set, else the host name's address if it resolves to
  a non-loopback one, else the first non-loopback IPv4 address of rank 0's interfaces).

Run it on an emulated cluster to see a network: ``gossiprun --emulate 4x1 --link 250mbit python
benchmarks/throughput.py ...`` (:mod:`gossip.tools.emulate`).

``--device cuda`` puts each rank's model and data on GPU ``local rank mod GPUs`` and synchronises
the device before reading the clock.

Each prints "samples/sec per rank: mean ± 1.96·std" over ``--num-iters`` iterations of
``--num-batches-per-iter`` batches after ``--num-warmup-batches``, and the total; then a table of
each method's ratio to each baseline. Writes ``results/throughput-<model>-np<N>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import socket
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import algorithms
import gossip
import topologies


class ResidualBlock(torch.nn.Module):
    """Two 3x3 convolutions with batch norm and a skip connection; (batch, channels, H, W) in and out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def make_model(name: str, width: int, classes: int = 10) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """(model, input shape per sample): an MLP on 784 features or a small ResNet on 3x32x32."""
    if name == "mlp":
        layers = [torch.nn.Linear(784, width), torch.nn.ReLU()]
        for _ in range(2):
            layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes)), (784,)
    if name == "resnet":
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            ResidualBlock(width), torch.nn.MaxPool2d(2), ResidualBlock(width), torch.nn.MaxPool2d(2),
            ResidualBlock(width), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, classes),
        ), (3, 32, 32)
    raise ValueError(f"unknown model {name!r}")


def interface_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback excluded, in interface order (Linux ``SIOCGIFADDR``)."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this interface
            address = socket.inet_ntoa(packed[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                found.append(address)
    return found


def rendezvous_address(single_machine: bool) -> str:
    """An address of this host the other ranks can reach: ``MASTER_ADDR``; the host name's address
    if it resolves and is not loopback (or all ranks share this machine); else an interface's."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    try:
        resolved = socket.gethostbyname(socket.gethostname())
        if single_machine or not ipaddress.ip_address(resolved).is_loopback:
            return resolved
    except OSError:
        resolved = None
    candidates = interface_addresses()
    if candidates:
        return candidates[0]
    if single_machine:
        return "127.0.0.1"
    raise SystemExit(f"throughput.py: no address for the DDP rendezvous: host name {socket.gethostname()!r} "
                     f"resolves to {resolved!r} and no interface has a non-loopback IPv4 address; set MASTER_ADDR "
                     "(and GLOO_SOCKET_IFNAME for gloo's traffic)")


def init_process_group(backend: str) -> None:
    """torch.distributed on ``backend`` (gloo, nccl), rendezvous address from rank 0 over MPI (no
    launcher variables)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    address = None
    if gossip.rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            address = f"tcp://{rendezvous_address(gossip.machine_size() == 1)}:{s.getsockname()[1]}"
    from mpi4py import MPI

    address = MPI.COMM_WORLD.bcast(address, root=0)
    dist.init_process_group(backend, init_method=address, rank=gossip.rank(), world_size=gossip.size())


def measure(label: str, args, build) -> dict:
    """Run warm-up and timed iterations of one method; return per-iteration samples/s per rank."""
    torch.manual_seed(0)
    model, shape = make_model(args.model, args.width)
    model, step, opt = build(model.to(args.device))
    x = torch.randn(args.batch_size, *shape).to(args.device)
    y = torch.randint(0, 10, (args.batch_size,)).to(args.device)
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)

    def batch() -> None:
        step(F.cross_entropy(model(x), y))

    for _ in range(args.num_warmup_batches):
        batch()
    sync()
    gossip.barrier()  # once: a barrier between iterations would hide an overlapped method's gossip in flight
    rates = []
    began = time.perf_counter()
    for k in range(args.num_iters):
        for _ in range(args.num_batches_per_iter):
            batch()
        if k == args.num_iters - 1 and hasattr(opt, "synchronize"):  # ours; not torch.optim (DDP)
            opt.synchronize()  # the last step's gossip, still in flight, counts too
        sync()
        now = time.perf_counter()
        rates.append(args.batch_size * args.num_batches_per_iter / (now - began))
        began = now
    rates = gossip.allreduce(torch.tensor(rates, dtype=torch.float64), "mean").numpy()
    parameters = sum(p.numel() for p in model.parameters())
    result = {"method": label, "per_rank_mean": float(rates.mean()), "per_rank_ci": float(1.96 * rates.std()),
              "total": float(rates.mean() * gossip.size()), "parameters": parameters}
    if gossip.rank() == 0:
        print(f"{label}: samples/sec per rank: {result['per_rank_mean']:.1f} +- {result['per_rank_ci']:.1f}; "
              f"total on {gossip.size()} ranks: {result['total']:.1f}", flush=True)
    return result


def with_optimizer(model: torch.nn.Module, opt) -> tuple:
    """(model, one training step on a loss, the optimizer)."""
    def step(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, step, opt


def topology_for(name: str, args):
    """A ``--topology`` name as optimizers take it; ``auto`` asks the scheduler (collective: it
    times this model's forward and backward and probes the links) and prints its reasoning."""
    if name == "hierarchical":
        return name
    if name != "auto":
        return topologies.by_name(name, gossip.size())
    torch.manual_seed(0)
    model, shape = make_model(args.model, args.width)
    model = model.to(args.device)
    x = torch.randn(args.batch_size, *shape).to(args.device)
    y = torch.randint(0, 10, (args.batch_size,)).to(args.device)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - began)
    compute = gossip.allreduce(torch.tensor([sorted(times)[2]], dtype=torch.float64), "mean").item()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    scheduler = gossip.Scheduler.auto(nbytes, compute_seconds=compute)
    if gossip.rank() == 0:
        print(scheduler.describe(), flush=True)
    return scheduler


def main() -> int:
    """Run every method, then the baselines; rank 0 prints the tables and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "resnet"], default="mlp")
    parser.add_argument("--width", type=int, default=1024, help="MLP hidden width / ResNet channels")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--num-warmup-batches", type=int, default=5)
    parser.add_argument("--num-batches-per-iter", type=int, default=5)
    parser.add_argument("--num-iters", type=int, default=10)
    parser.add_argument("--algorithm", default="dmsgd", help="comma-separated registry names")
    parser.add_argument("--topology", default="one-peer-exp2,exp2",
                        help="comma-separated topology names, 'hierarchical' or 'auto'")
    parser.add_argument("--period", type=int, help="local-sgd, mavg, bmuf, slowmo: steps between exact averages")
    parser.add_argument("--base", default="local-sgd", help="slowmo, bmuf: the base algorithm")
    parser.add_argument("--no-ddp", action="store_true", help="skip the DistributedDataParallel baseline")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: one GPU per rank (local rank mod GPUs); DDP on NCCL")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gossip.init()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("throughput.py: --device cuda but torch sees no CUDA device")
        args.device = torch.device("cuda", gossip.local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(args.device)
    else:
        args.device = torch.device("cpu")
    n = gossip.size()
    names = args.algorithm.split(",")
    if any(name.startswith("cr-psgd") for name in names):
        raise SystemExit("throughput.py: cr-psgd changes its batch size every step; one step at a given batch costs "
                         "what pmsgd's does. Its gain is fewer rounds: see benchmarks/dynamic_batch.py")
    results = []
    schedules = {}
    for algorithm in names:
        hyper = {"lr": 0.01}
        outer = algorithms.spec(algorithm).needs_base
        if outer:
            hyper["base"] = args.base
        if args.period is not None:
            hyper["period"] = args.period
        gossip_free = not algorithms.spec(args.base if outer else algorithm).takes_topology
        label = algorithm + (f" over {args.base}" if "base" in hyper else "") + (
            f", period {args.period}" if args.period else "")
        for name in [None] if gossip_free else args.topology.split(","):
            if name is not None and name not in schedules:
                schedules[name] = topology_for(name, args)
            comm = {} if name is None else {"topology": schedules[name]}
            results.append(measure(label + ("" if name is None else f" on {name}"), args, lambda m, a=algorithm,
                                   h=hyper, c=comm: with_optimizer(m, algorithms.create(a, m.parameters(), **h, **c))))
    results.append(measure("PmSGD (gossip.allreduce)", args, lambda m: with_optimizer(
        m, algorithms.create("pmsgd", m.parameters(), lr=0.01))))
    if not args.no_ddp:
        backend = "nccl" if args.device.type == "cuda" else "gloo"
        init_process_group(backend)
        from torch.nn.parallel import DistributedDataParallel

        def ddp(m):
            wrapped = DistributedDataParallel(m, device_ids=[args.device] if args.device.type == "cuda" else None)
            return with_optimizer(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9))

        results.append(measure(f"DDP ({backend})", args, ddp))
    if gossip.rank() == 0:
        baselines = results[-2:] if not args.no_ddp else results[-1:]
        print(f"\n{args.model} width {args.width}: {results[0]['parameters']:,} parameters, batch {args.batch_size} "
              f"per rank, {n} ranks")
        wide = max(32, *(len(r["method"]) + 2 for r in results))
        print(f"{'method':<{wide}}{'samples/s per rank':>22}" + "".join(f"{'÷ ' + b['method'][:14]:>20}"
                                                                     for b in baselines))
        for r in results:
            cell = f"{r['per_rank_mean']:.1f} ± {r['per_rank_ci']:.1f}"
            print(f"{r['method']:<{wide}}{cell:>22}" + "".join(f"{r['per_rank_mean'] / b['per_rank_mean']:>20.2f}"
                                                         for b in baselines))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"throughput-{args.model}-w{args.width}-np{n}"
        settings = {**vars(args), "device": str(args.device), "cuda_aware": gossip.cuda_aware()}
        stem.with_suffix(".json").write_text(json.dumps({"args": settings, "results": results}, indent=1))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axis = plt.subplots(figsize=(7, 3.5))
            axis.barh([r["method"] for r in results], [r["total"] for r in results],
                      xerr=[r["per_rank_ci"] * n for r in results])
            axis.set_xlabel(f"samples/s, total on {n} ranks")
            axis.set_title(f"{args.model} width {args.width}, batch {args.batch_size} per rank")
            fig.tight_layout()
            fig.savefig(stem.with_suffix(".png"), dpi=110)
        except ImportError:
            pass
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
