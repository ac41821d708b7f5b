"""BlueFog's MNIST training example, on scikit-learn's digits (offline) and ``gossip.compat.bluefog``.

Each rank trains the same MLP on its own shard of the 8x8 digits with its own optimizer, wrapped in
one of BlueFog's distributed optimizers: adapt-then-combine (``--dist-optimizer atc``, default),
adapt-with-combine (``awc``), gradient allreduce (``gradient_allreduce``) or window pushes
(``win_put``), combining over the static exponential-2 topology, or over one-peer exponential-2
per-step weights with ``--dynamic`` (BlueFog's ``dynamic_topology_update`` pattern). Rank 0 prints
the test accuracy of its model and of the ranks' averaged model after every epoch.

    gossiprun -np 4 python mpirun_examples/bluefog/digits_training.py [--epochs 10] [--dynamic]

With ``--min-accuracy a`` it exits 1 unless the averaged model's final test accuracy reaches a.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import gossip.compat.bluefog as bf
from gossip.compat.bluefog import topology_util
from gossip.tools.data import load_digits, partition

parser = argparse.ArgumentParser(description="decentralized training on the digits with BlueFog's optimizers")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--dist-optimizer", default="atc", choices=["atc", "awc", "gradient_allreduce", "win_put"])
parser.add_argument("--dynamic", action="store_true", help="one-peer exponential-2 per-step weights")
parser.add_argument("--min-accuracy", type=float, default=None)
args = parser.parse_args()

bf.init()
bf.set_topology(topology_util.ExponentialTwoGraph(bf.size()))
torch.manual_seed(0)
data = load_digits()
mine = torch.from_numpy(partition(data.y_train.numpy(), bf.size(), seed=0)[bf.rank()])
x_train, y_train = data.x_train[mine], data.y_train[mine]
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
bf.broadcast_parameters(model.state_dict(), root_rank=0)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
bf.broadcast_optimizer_state(optimizer, root_rank=0)
if args.dist_optimizer == "atc":
    optimizer = bf.DistributedAdaptThenCombineOptimizer(optimizer, model, bf.CommunicationType.neighbor_allreduce)
elif args.dist_optimizer == "awc":
    optimizer = bf.DistributedAdaptWithCombineOptimizer(optimizer, model, bf.CommunicationType.neighbor_allreduce)
elif args.dist_optimizer == "gradient_allreduce":
    optimizer = bf.DistributedGradientAllreduceOptimizer(optimizer, model)
else:
    optimizer = bf.DistributedWinPutOptimizer(optimizer, model)
peers = topology_util.GetDynamicOnePeerSendRecvRanks(bf.load_topology(), bf.rank())


def accuracy(net: torch.nn.Module) -> float:
    with torch.no_grad():
        return (net(data.x_test).argmax(1) == data.y_test).float().mean().item()


averaged = None
for epoch in range(args.epochs):
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch + 100 * bf.rank()))
    steps = len(x_train) // args.batch_size
    for step in range(steps):
        if args.dynamic and args.dist_optimizer in ("atc", "awc"):
            send, recv = next(peers)
            optimizer.self_weight = 1.0 / (len(recv) + 1)
            optimizer.src_weights = {r: 1.0 / (len(recv) + 1) for r in recv}
            optimizer.dst_weights = {r: 1.0 for r in send}
        batch = order[step * args.batch_size:(step + 1) * args.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        loss.backward()
        optimizer.step()
    optimizer.synchronize()
    averaged = {k: bf.allreduce(v.detach(), name=f"avg.{k}") for k, v in model.state_dict().items()}
    rank0 = accuracy(model)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(averaged)
    mean_accuracy = accuracy(model)
    model.load_state_dict(kept)
    if bf.rank() == 0:
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {rank0:.4f} (this rank), "
              f"{mean_accuracy:.4f} (averaged model)", flush=True)

optimizer.close()
ok = args.min_accuracy is None or mean_accuracy >= args.min_accuracy
bf.shutdown()
sys.exit(0 if ok else 1)
