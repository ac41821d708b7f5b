"""Named cluster profiles: the cost model's parameters for hardware this machine does not have.

``cluster_profile(name, gpus)`` is the :class:`gossip.CostModel` of ``gpus`` GPUs, one rank each,
on machines of ``gpus_per_machine`` GPUs. Every profile has NVLink inside the machine (V100, as
in AWS p3.16xlarge and DGX-1) and differs in the network between machines. The values and where
they come from (published specifications, NVIDIA's NCCL cost model, measured reports); each is
an estimate of what a collective achieves, not a guarantee:

* NVLink (V100, NVLink 2.0): 6 links of 25 GB/s per direction; NCCL models 20 GB/s per V100
  link (``SM70_NVLINK_BW 20.0`` in NVIDIA/nccl ``src/graph/topo.h``), so β = 1/(6 × 20 GB/s).
  α = 10 µs: NCCL's model of an 8-GPU ring, 3.6 µs base plus 0.47 µs per NVLink hop over 14
  hops (``src/graph/tuning.cc``).
* ``ethernet-25g``: 25 Gb/s per machine (AWS p3.16xlarge: 8 V100 with NVLink, "25 Gbps"
  networking, AWS's P3 launch announcement), β = 1/3.125 GB/s. α = 30 µs: a round trip of
  37–42 µs between instances in a cluster placement group (amzn/amzn-drivers issue 148), about
  20 µs one way, plus the MPI/TCP software path (our estimate).
* ``ethernet-25g-per-flow-10g``: the same, but AWS caps one TCP flow at 10 Gb/s inside a
  placement group (5 Gb/s outside; AWS EC2 network documentation), so a ring, whose machine
  sends one flow, sees 10 Gb/s, not 25. β = 1/1.25 GB/s, the pessimistic reading.
* ``infiniband-100g``: EDR InfiniBand, 4 × 25.78125 Gb/s with 64b/66b coding = 100 Gb/s =
  12.5 GB/s; NCCL models 12 GB/s for 100 Gb/s networks (``NET_BW 12.0``, ``topo.h``): β =
  1/12 GB/s. α = 5 µs: MPI latency is under 1 µs (D. K. Panda, MVAPICH2, SC'18), NCCL's model
  adds 2.7–9.6 µs per network hop (``tuning.cc``).

All profiles: γ = 3 bytes moved per reduced byte at the V100's 900 GB/s HBM2 bandwidth (NVIDIA
V100 datasheet); ``overhead`` = 25 µs per op, NCCL's predicted small-message time across two
machines (NVIDIA/nccl issue 1453; 40–48 µs measured on InfiniBand in nccl-tests issue 182).
"""

from __future__ import annotations

from gossip.plan.cost_model import CostModel, LinkCost

_REDUCE = 3 / 900e9  # read two operands, write one, at 900 GB/s
NVLINK_V100 = LinkCost(latency=10e-6, inverse_bandwidth=1 / (6 * 20e9), reduce=_REDUCE)
NETWORKS = {
    "ethernet-25g": LinkCost(latency=30e-6, inverse_bandwidth=1 / 3.125e9, reduce=_REDUCE),
    "ethernet-25g-per-flow-10g": LinkCost(latency=30e-6, inverse_bandwidth=1 / 1.25e9, reduce=_REDUCE),
    "infiniband-100g": LinkCost(latency=5e-6, inverse_bandwidth=1 / 12e9, reduce=_REDUCE),
}
OVERHEAD = 25e-6


def profile_names() -> list[str]:
    """The names :func:`cluster_profile` accepts, sorted."""
    return sorted(NETWORKS)


def cluster_profile(name: str, gpus: int, gpus_per_machine: int = 8) -> CostModel:
    """The cost model of ``gpus`` ranks (one per GPU) on machines of ``gpus_per_machine`` GPUs."""
    if name not in NETWORKS:
        raise ValueError(f"unknown cluster profile {name!r}; known: {', '.join(profile_names())}")
    if gpus < 1 or gpus_per_machine < 1:
        raise ValueError(f"need gpus >= 1 and gpus_per_machine >= 1, got {gpus} and {gpus_per_machine}")
    return CostModel(NVLINK_V100, NETWORKS[name], size=gpus, ranks_per_machine=min(gpus, gpus_per_machine),
                     overhead=OVERHEAD)
