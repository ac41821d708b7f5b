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
step with W ⊗ (11ᵀ/k). The default machine topology is the exponential-2 graph over the machines.
Float tensors; float16/bfloat16 are combined in float32. CUDA tensors go to a CUDA-aware MPI
directly (the machine average and the leaders' combination run on the GPU) or are staged through
pinned host buffers from the runtime's pool (the leaders then combine on the host).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from gossip import waiting
from gossip.collectives import _agree_all
from gossip.context import current
from gossip.reduce import weighted_sum
from gossip.tensors import mpi_buffer
from topologies import DynamicTopology, GraphSequence, StepPeers, exponential_two
from topologies.weights import with_weights

TAG = 401
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _describe(machine_topology) -> tuple:
    if isinstance(machine_topology, DynamicTopology):
        return (type(machine_topology).__name__, machine_topology.n, machine_topology.period)
    edges = machine_topology.edges(data=True)
    return tuple(sorted((int(j), int(i), round(float(d["weight"]), 12)) for j, i, d in edges))


def hierarchical_neighbor_allreduce(tensor: torch.Tensor, machine_topology: nx.DiGraph | DynamicTopology | None = None,
                                    step: int = 0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: average within this machine, gossip the machine averages on ``machine_topology``
    (at ``step`` for a time-varying family), share the result within the machine (module docstring).
    Returns a new tensor, or writes ``out``; ``tensor`` is untouched."""
    rt = current()
    machines, machine = rt.machine_size, rt.machine_rank
    problem = None
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _FLOATS:
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
    _agree_all(rt, "hierarchical_neighbor_allreduce", (shape, getattr(tensor, "dtype", None), described, step),
               problem)

    x = tensor.detach().reshape(-1)
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    values = x.to(wide).contiguous()  # the input itself when already contiguous and wide: never written
    transport, numel = rt.transport, values.numel()
    staged = transport.staged(values)  # CUDA without a CUDA-aware MPI: the wire is pinned host memory
    send = transport.outgoing(values)
    mean = rt.pool.acquire(numel, wide, torch.device("cpu") if staged else values.device, pinned=staged)
    # On an error (a timeout) ``mean`` is not given back to the pool: MPI may still write into it.
    waiting.wait([rt.local_comm.Iallreduce(mpi_buffer(send), mpi_buffer(mean), op=MPI.SUM)],
                 "hierarchical_neighbor_allreduce: machine allreduce", nbytes=numel * mean.element_size())
    transport.done_with(send, values)
    mean.div_(rt.local_comm.size)
    if rt.local_comm.rank == 0 and machines > 1:
        _gossip_between_machines(rt, mean, family.peers(step, machine))
    _ready(mean)
    waiting.wait([rt.local_comm.Ibcast(mpi_buffer(mean), root=0)],
                 "hierarchical_neighbor_allreduce: machine broadcast", nbytes=mean.numel() * mean.element_size())
    if out is not None:  # straight into the caller's buffer (converting dtype and device as needed)
        result = out.copy_(mean.view(out.shape))
    else:
        result = mean.view(tensor.shape).to(tensor.device, tensor.dtype, copy=True)
    rt.pool.release(mean)
    return result


def _ready(t: torch.Tensor) -> None:
    """Device work writing ``t`` has finished before MPI reads it (a CUDA-aware MPI on device memory)."""
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


def _gossip_between_machines(rt, mean: torch.Tensor, peers: StepPeers) -> None:
    """On a machine's leader: mean ← W_MM mean + Σ W_MM' s_M'M mean_M' over the leaders'
    communicator, in the memory MPI uses (the GPU's with a CUDA-aware MPI, pinned host otherwise)."""
    self_weight, sources, destinations = peers.self_weight, peers.src_weights, peers.dst_weights
    leaders, pool = rt.leaders_comm, rt.pool
    numel, pinned = mean.numel(), not mean.is_cuda and mean.is_pinned()
    received = {src: pool.acquire(numel, mean.dtype, mean.device, pinned=pinned) for src in sources}
    scaled = {dst: torch.mul(mean, scale, out=pool.acquire(numel, mean.dtype, mean.device, pinned=pinned))
              for dst, scale in destinations.items() if scale != 1.0}
    _ready(mean)
    requests = rt.transport.exchange(leaders, list(received.items()),
                                     [(dst, scaled.get(dst, mean)) for dst in destinations], TAG)
    waiting.wait(requests, "hierarchical_neighbor_allreduce: gossip between machines",
                 peers=sorted(set(sources) | set(destinations)), nbytes=numel * mean.element_size())
    weighted_sum([(self_weight, mean), *((weight, received[src]) for src, weight in sources.items())], mean)
    for buf in (*received.values(), *scaled.values()):  # only once complete: on an error MPI may still use them
        pool.release(buf)
