"""Hierarchical neighbour averaging: exact average inside each machine, gossip between machines.

``hierarchical_neighbor_allreduce(x, machine_topology, step)`` is collective over the job. With
machines M (``gossip.machine_rank``; pretend k ranks per machine with
``GOSSIP_RANKS_PER_MACHINE=k``) it computes, on every rank of machine M,

    m_M = (1/|M|) Σ_{i∈M} x_i                                  (allreduce on the machine)
    y_M = W_MM m_M + Σ_{M'} W_MM' · s_M'M · m_M'                (the machines' leaders gossip)

and shares y_M within the machine (broadcast from its leader, local rank 0). W is the
machine-level mixing matrix: a static ``networkx`` graph on ``machine_size`` nodes (edge M' → M
carries W_MM'), or a ``topologies`` time-varying family over the machines at ``step`` (s: the
sender's scale, 1 for plain averaging). Only one rank per machine talks across machines, so the
slow inter-machine links carry one message per machine instead of one per rank; the intra-machine
allreduce and broadcast use the fast local links. With machines of equal size k this is one gossip
step with W ⊗ (11ᵀ/k). Machines of unequal sizes s_M (after a rank failure, say) would make the
uniform average of machine means the fixed point, counting a rank of a small machine more; so there
each machine takes its neighbours' weights times s_min/s_M and its own weight 1 − (1 − W_MM)s_min/s_M:
for a doubly stochastic W that matrix is row-stochastic with sᵀW̃ = sᵀ, so Σ_M s_M m_M, the sum over
ranks, is kept exactly and the ranks agree on their true average (mixing slows by at most s_min/s_max).
The default machine topology is the exponential-2 graph over the machines.
Float tensors; float16/bfloat16 are combined in float32. As the transport routes it
(:meth:`gossip.transport.Transport.route`), a CUDA tensor goes to a CUDA-aware MPI directly (the
machine average and the leaders' combination run on the GPU) or is staged through pinned host
buffers from the runtime's pool (the leaders then combine on the host).

The machine-level step is one linear averaging iteration x ← W x (Xiao and Boyd, "Fast linear
iterations for distributed averaging", Systems & Control Letters, 2004) on the machines'
averages; averaging within a machine before gossiping across machines is the hierarchical
scheme of BlueFog (Ying, Yuan, Hu, Chen and Yin, "BlueFog: Make decentralized algorithms
practical for optimization and deep learning", arXiv:2111.04287, 2021).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from gossip.ops import _prologue as prologue
from gossip.runtime import current
from gossip.transport._buffers import mpi_buffer
from gossip.transport._reduce import weighted_sum
from topologies import DynamicTopology, GraphSequence, StepPeers, exponential_two
from topologies.weights import with_weights

TAG = 401


def _describe(machine_topology) -> tuple:
    if isinstance(machine_topology, DynamicTopology):
        return (type(machine_topology).__name__, machine_topology.n, machine_topology.period)
    edges = machine_topology.edges(data=True)
    return tuple(sorted((int(j), int(i), round(float(d["weight"]), 12)) for j, i, d in edges))


@prologue.failures_raised("hierarchical_neighbor_allreduce")
def hierarchical_neighbor_allreduce(tensor: torch.Tensor, machine_topology: nx.DiGraph | DynamicTopology | None = None,
                                    step: int = 0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: average within this machine, gossip the machine averages on ``machine_topology``
    (at ``step`` for a time-varying family), share the result within the machine (module docstring).
    Returns a new tensor, or writes ``out``; ``tensor`` is untouched."""
    rt = current()
    machines, machine = rt.machine_size, rt.machine_rank
    problem = None
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in prologue.FLOATS:
        problem = f"hierarchical_neighbor_allreduce takes a float tensor, got {getattr(tensor, 'dtype', type(tensor))}"
    if machine_topology is None:
        machine_topology = exponential_two(machines)
    family = machine_topology  # a static graph becomes a one-graph sequence: one way to read peers
    if problem is None and not isinstance(machine_topology, DynamicTopology):
        try:
            machine_topology = with_weights(machine_topology)
            family = GraphSequence([machine_topology])
        except (TypeError, ValueError) as error:
            problem = f"invalid machine topology: {error}"
    if problem is None and family.n != machines:
        problem = f"the machine topology has {family.n} nodes for {machines} machines"
    if problem is None and (not isinstance(step, int | np.integer) or step < 0):
        problem = f"step must be an int >= 0, got {step!r}"
    shape = tuple(tensor.shape) if problem is None else None
    described = _describe(machine_topology) if problem is None else None
    prologue.agree(rt, "hierarchical_neighbor_allreduce", (shape, getattr(tensor, "dtype", None), described, step),
                   problem)

    x = tensor.detach().reshape(-1)
    values = x.to(prologue.wide_dtype(x.dtype)).contiguous()  # the input itself when contiguous and wide: never written
    transport, numel = rt.transport, values.numel()
    send = transport.outgoing(values)
    mean = transport.incoming(numel, values.dtype, values.device)  # where MPI reaches: pinned host when staged
    nbytes, local = numel * values.element_size(), rt.local_comm
    rt.traffic.count_allreduce("hierarchical_neighbor_allreduce", nbytes, local.size)
    rt.traffic.count_broadcast("hierarchical_neighbor_allreduce", nbytes, local.size, local.rank == 0)
    # On an error (a timeout) ``mean`` is not given back to the pool: MPI may still write into it.
    rt.watchdog.wait([rt.local_comm.Iallreduce(mpi_buffer(send), mpi_buffer(mean), op=MPI.SUM)],
                     "hierarchical_neighbor_allreduce: machine allreduce", nbytes=numel * mean.element_size())
    transport.done_with(send, values)
    mean.div_(rt.local_comm.size)
    if rt.local_comm.rank == 0 and machines > 1:
        _gossip_between_machines(rt, mean, family.peers(step, machine))
    transport.ready(mean)
    rt.watchdog.wait([rt.local_comm.Ibcast(mpi_buffer(mean), root=0)],
                     "hierarchical_neighbor_allreduce: machine broadcast", nbytes=mean.numel() * mean.element_size())
    if out is not None:  # straight into the caller's buffer (converting dtype and device as needed)
        result = out.copy_(mean.view(out.shape))
    else:
        result = mean.view(tensor.shape).to(tensor.device, tensor.dtype, copy=True)
    transport.done_with(mean)
    return result


def _gossip_between_machines(rt, mean: torch.Tensor, peers: StepPeers) -> None:
    """On a machine's leader: mean ← W_MM mean + Σ W_MM' s_M'M mean_M' over the leaders'
    communicator, in the memory MPI uses (the GPU's with a CUDA-aware MPI, pinned host otherwise)."""
    self_weight, sources, destinations = peers.self_weight, peers.src_weights, peers.dst_weights
    sizes = rt.layout.machine_sizes
    if sizes and min(sizes) != max(sizes):  # unequal machines (after a failure): keep the average over ranks
        keep = min(sizes) / sizes[rt.machine_rank]
        self_weight, sources = 1 - keep * (1 - self_weight), {src: keep * w for src, w in sources.items()}
    transport, numel = rt.transport, mean.numel()
    received = {src: transport.like(mean) for src in sources}
    scaled = {dst: torch.mul(mean, scale, out=transport.like(mean))
              for dst, scale in destinations.items() if scale != 1.0}
    transport.ready(mean)
    rt.traffic.count_sends("hierarchical_neighbor_allreduce", numel * mean.element_size(), len(destinations),
                           len(transport.chunk_spans(numel, mean.element_size())))
    requests = transport.exchange(rt.leaders_comm, list(received.items()),
                                  [(dst, scaled.get(dst, mean)) for dst in destinations], TAG)
    rt.watchdog.wait(requests, "hierarchical_neighbor_allreduce: gossip between machines",
                     peers=sorted(set(sources) | set(destinations)), nbytes=numel * mean.element_size())
    weighted_sum([(self_weight, mean), *((weight, received[src]) for src, weight in sources.items())], mean)
    for buf in (*received.values(), *scaled.values()):  # only once complete: on an error MPI may still use them
        transport.done_with(buf)
