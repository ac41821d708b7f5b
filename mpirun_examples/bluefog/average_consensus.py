"""BlueFog's average-consensus example on ``gossip.compat.bluefog``: the script BlueFog users know, with
its import changed.

Every rank starts with a random vector x_i(0); each iteration is one ``neighbor_allreduce`` on the
static topology, x ← W x. For a doubly stochastic W the mean x̄ is kept and ||x_i - x̄|| → 0 at rate
ρ = ||W - 11ᵀ/n||₂ per step (Xiao and Boyd, "Fast linear iterations for distributed averaging",
Systems & Control Letters, 2004). With ``--dynamic`` each step is one-peer exponential-2, from
``topology_util.GetDynamicOnePeerSendRecvRanks`` (exact average after log2 n steps when n is a
power of two; Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep
Training", NeurIPS 2021).

    gossiprun -np 4 python mpirun_examples/bluefog/average_consensus.py [--dynamic] [--iterations 60]

Prints the relative distance to the mean every few steps, then ``consensus reached`` and exits 0
when it is below ``--tolerance`` (exit 1 otherwise).
"""

import argparse
import sys

import torch

import gossip.compat.bluefog as bf
from gossip.compat.bluefog import topology_util

parser = argparse.ArgumentParser(description="average consensus with neighbor_allreduce")
parser.add_argument("--data-size", type=int, default=100_000)
parser.add_argument("--iterations", type=int, default=60)
parser.add_argument("--dynamic", action="store_true", help="one-peer exponential-2, per-step weights")
parser.add_argument("--tolerance", type=float, default=1e-5)
args = parser.parse_args()

bf.init()
bf.set_topology(topology_util.ExponentialTwoGraph(bf.size()))
torch.manual_seed(bf.rank())
x = torch.randn(args.data_size, dtype=torch.float64)
mean = bf.allreduce(x, average=True, name="x_bar")  # the answer, to measure the distance to it
start = torch.norm(x - mean).item()

peers = topology_util.GetDynamicOnePeerSendRecvRanks(bf.load_topology(), bf.rank())
for step in range(args.iterations):
    if args.dynamic:
        send, recv = next(peers)
        x = bf.neighbor_allreduce(x, self_weight=1.0 / (len(recv) + 1),
                                  src_weights={r: 1.0 / (len(recv) + 1) for r in recv}, dst_weights=send, name="x")
    else:
        x = bf.neighbor_allreduce(x, name="x")
    error = bf.allreduce(torch.tensor([torch.norm(x - mean).item() ** 2]), average=False).sqrt().item()
    if bf.rank() == 0 and (step % 10 == 0 or step == args.iterations - 1):
        print(f"step {step:3d}: relative distance to the mean {error / start:.3e}", flush=True)

final = bf.allreduce(torch.tensor([torch.norm(x - mean).item() ** 2]), average=False).sqrt().item() / start
ok = final < args.tolerance
if bf.rank() == 0:
    print(f"consensus reached: {final:.3e} < {args.tolerance:g}" if ok else
          f"consensus not reached: {final:.3e} >= {args.tolerance:g}", flush=True)
bf.shutdown()
sys.exit(0 if ok else 1)
