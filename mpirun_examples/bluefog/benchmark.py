"""BlueFog's synthetic benchmark on ``gossip.compat.bluefog``: images per second of a small CNN on
random 3x32x32 images with a distributed optimizer, as BlueFog's ``pytorch_benchmark.py`` prints it.

    gossiprun -np 4 python mpirun_examples/bluefog/benchmark.py [--dist-optimizer neighbor_allreduce]

Each iteration is ``--num-batches-per-iter`` steps of ``--batch-size`` images per rank; after
``--num-warmup-batches`` warm-up steps rank 0 prints every iteration's img/sec per rank, then the
mean ± 1.96 standard deviations, per rank and over all ranks.
"""

import argparse
import timeit

import numpy as np
import torch
import torch.nn.functional as F

import gossip.compat.bluefog as bf

parser = argparse.ArgumentParser(description="synthetic benchmark with BlueFog's distributed optimizers")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--num-warmup-batches", type=int, default=2)
parser.add_argument("--num-batches-per-iter", type=int, default=5)
parser.add_argument("--num-iters", type=int, default=5)
parser.add_argument("--dist-optimizer", default="neighbor_allreduce",
                    choices=["neighbor_allreduce", "hierarchical_neighbor_allreduce", "allreduce",
                             "gradient_allreduce", "win_put", "empty"])
parser.add_argument("--atc-style", action="store_true", help="adapt-then-combine instead of adapt-with-combine")
args = parser.parse_args()

bf.init()
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01 * bf.size())
if args.dist_optimizer == "gradient_allreduce":
    optimizer = bf.DistributedGradientAllreduceOptimizer(optimizer, model)
elif args.dist_optimizer == "win_put":
    optimizer = bf.DistributedWinPutOptimizer(optimizer, model)
else:
    build = bf.DistributedAdaptThenCombineOptimizer if args.atc_style else bf.DistributedAdaptWithCombineOptimizer
    optimizer = build(optimizer, model, bf.CommunicationType[args.dist_optimizer])
bf.broadcast_parameters(model.state_dict(), root_rank=0)

data = torch.randn(args.batch_size, 3, 32, 32)
target = torch.randint(0, 10, (args.batch_size,))


def benchmark_step() -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(data), target).backward()
    optimizer.step()


def log(text: str) -> None:
    if bf.rank() == 0:
        print(text, flush=True)


log(f"Model: small CNN, batch size {args.batch_size}, {bf.size()} ranks, optimizer {args.dist_optimizer}")
timeit.timeit(benchmark_step, number=args.num_warmup_batches)
rates = []
for it in range(args.num_iters):
    seconds = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
    rate = args.batch_size * args.num_batches_per_iter / seconds
    log(f"Iter #{it}: {rate:.1f} img/sec per rank")
    rates.append(rate)
mean, spread = np.mean(rates), 1.96 * np.std(rates)
log(f"Img/sec per rank: {mean:.1f} +-{spread:.1f}")
log(f"Total img/sec on {bf.size()} ranks: {bf.size() * mean:.1f} +-{bf.size() * spread:.1f}")
optimizer.close()
bf.shutdown()
