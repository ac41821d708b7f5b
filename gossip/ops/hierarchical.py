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

**Per-call machine weights** (BlueFog's dynamic form): with ``dst_machine_weights`` (the machines
this machine sends to, ``{machine: scale}`` or a list for scale 1), ``src_machine_weights`` (the
machines it receives from, ``{machine: weight}`` or a list for uniform weights 1/(k + 1)) and
``self_weight``, the leaders compute

    y_M = self_weight · m_M + Σ_{M' ∈ src} src_machine_weights[M'] · dst_machine_weights_{M'}[M] · m_M'

exactly as given, whatever the machine sizes and whether or not the weights sum to 1 (push-sum and
plain sums need weights that do not). Every machine's ``dst_machine_weights`` must name exactly the
machines that list it in their ``src_machine_weights``, and every rank of a machine must pass the
same weights; with the cross-rank check on, anything else raises :class:`gossip.InputMismatchError`
on every rank.

``hierarchical_neighbor_allreduce_async`` returns a :class:`gossip.Handle`: the machine allreduce
(fast, local) completes before it returns, the leaders' exchange (the slow links) moves in the
background, and ``wait()`` combines and broadcasts within the machine. As with any MPI collective,
the ranks of one machine wait on these handles in the same order. ``local_allreduce`` is the first
stage alone: the sum or mean within each machine.

Float tensors; float16/bfloat16 are combined in float32. As the transport routes it
(:meth:`gossip.transport.Transport.route`), a CUDA tensor goes to a CUDA-aware MPI directly (the
machine average and the leaders' combination run on the GPU) or is staged through pinned host
buffers from the runtime's pool (the leaders then combine on the host). A machine's mean is its sum
divided by its size once (correctly rounded), never a product with the rounded 1/|M|.

The machine-level step is one linear averaging iteration x ← W x (Xiao and Boyd, "Fast linear
iterations for distributed averaging", Systems & Control Letters, 2004) on the machines'
averages; averaging within a machine before gossiping across machines is the hierarchical
scheme of BlueFog (Ying, Yuan, Hu, Chen and Yin, "BlueFog: Make decentralized algorithms
practical for optimization and deep learning", arXiv:2111.04287, 2021); scaled sends are the
push-sum step (Kempe, Dobra and Gehrke, "Gossip-based computation of aggregate information",
FOCS 2003).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from mpi4py import MPI

from gossip.ops import _checks as checks
from gossip.ops import _prologue as prologue
from gossip.ops.handles import Handle
from gossip.runtime import Runtime, current
from gossip.transport._buffers import mpi_buffer
from gossip.transport._reduce import weighted_sum
from topologies import DynamicTopology, GraphSequence, exponential_two
from topologies.weights import with_weights

TAG = 401
_OP = "hierarchical_neighbor_allreduce"
_REDUCIBLE = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
# What each form votes in the cross-rank check (ranks taking different forms would wait on each other).
_STATIC, _PER_CALL, _LOCAL = 0, 1, 2

MachineWeights = Mapping[int, float] | Sequence[int] | None


@dataclass
class _MachineStep:
    """This machine's part of the exchange between leaders: weights by machine index."""

    self_weight: float
    sources: dict[int, float]  # machine -> weight given to what it sends
    destinations: dict[int, float]  # machine -> scale of what this machine sends it


def _describe(machine_topology) -> tuple:
    if isinstance(machine_topology, DynamicTopology):
        return (type(machine_topology).__name__, machine_topology.n, machine_topology.period)
    edges = machine_topology.edges(data=True)
    return tuple(sorted((int(j), int(i), round(float(d["weight"]), 12)) for j, i, d in edges))


def _per_call_step(rt: Runtime, self_weight: float | None, src_machine_weights: MachineWeights,
                   dst_machine_weights: MachineWeights) -> _MachineStep:
    """The per-call weights as this machine's step, or ValueError."""
    if dst_machine_weights is None:
        raise ValueError("src_machine_weights and self_weight need dst_machine_weights (the machines this "
                         "machine sends to): give all three, or none for the machine topology")
    machines, machine = rt.machine_size, rt.machine_rank
    dst = prologue.weight_map(dst_machine_weights, "dst_machine_weights", machine, machines, 1.0, unit="machine")
    src = {} if src_machine_weights is None else \
        prologue.weight_map(src_machine_weights, "src_machine_weights", machine, machines, None, unit="machine")
    if self_weight is None:  # as neighbor_allreduce: what is kept plus what is sent (scaled), else received
        scaled = any(w != 1.0 for w in dst.values())
        sw = 1.0 - sum(dst.values()) if scaled else 1.0 - sum(src.values())
    elif isinstance(self_weight, int | float | np.number) and not isinstance(self_weight, bool) \
            and math.isfinite(self_weight):
        sw = float(self_weight)
    else:
        raise ValueError(f"self_weight must be a finite number, got {self_weight!r}")
    return _MachineStep(sw, dict(sorted(src.items())), dict(sorted(dst.items())))


def _translate(group_comm: MPI.Comm, ranks: list[int], comm: MPI.Comm) -> list[int]:
    """Ranks of ``group_comm`` as ranks of ``comm`` (a local operation on the groups)."""
    if not ranks:
        return []
    group, whole = group_comm.Get_group(), comm.Get_group()
    try:
        return [int(r) for r in MPI.Group.Translate_ranks(group, ranks, whole)]
    finally:
        group.Free()
        whole.Free()


def _machine_ring(rt: Runtime) -> tuple[list[int], list[int]]:
    """Edges (ranks of the job) of a ring through this rank's machine: a check on them makes every rank
    of the machine share one signature."""
    local = rt.local_comm
    if local.size == 1:
        return [], []
    succ, pred = _translate(local, [(local.rank + 1) % local.size, (local.rank - 1) % local.size], rt.comm)
    return [succ], [pred]


def _weights_differ_in_machine(rt: Runtime, per_call: bool, step: _MachineStep | None) -> bool:
    """True if the ranks of this machine passed different per-call weights, or some passed weights and
    some did not (one 16-byte allreduce on the machine)."""
    if rt.local_comm.size == 1:
        return False
    described = None if step is None else (step.self_weight, tuple(step.sources.items()),
                                           tuple(step.destinations.items()))
    h = checks.signature("machine weights", per_call, described)
    mine = np.array([h, (1 << 64) - 1 - h], dtype=np.uint64)
    most = np.zeros(2, dtype=np.uint64)
    rt.watchdog.wait([rt.local_comm.Iallreduce(mine, most, op=MPI.MAX)], f"{_OP}: the machine's weights")
    return int(most[0]) != h or int(most[1]) != (1 << 64) - 1 - h  # max == min  <=>  all equal


def _prepare(rt: Runtime, tensor: torch.Tensor, machine_topology, step: int, self_weight: float | None,
             src_machine_weights: MachineWeights, dst_machine_weights: MachineWeights,
             out: torch.Tensor | None) -> _MachineStep:
    """Validate, agree across ranks, and resolve this machine's exchange (on its leader; else an empty one)."""
    machines, machine = rt.machine_size, rt.machine_rank
    per_call = not (self_weight is None and src_machine_weights is None and dst_machine_weights is None)
    problem: prologue.Problem = None
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in prologue.FLOATS:
        problem = f"{_OP} takes a float tensor, got {getattr(tensor, 'dtype', type(tensor))}"
    elif out is not None and (not isinstance(out, torch.Tensor) or out.numel() != tensor.numel()):
        problem = f"out must be a tensor of {tensor.numel()} elements, got {getattr(out, 'shape', type(out))}"
    resolved: _MachineStep | None = None
    family = machine_topology
    if per_call:
        if problem is None and machine_topology is not None:
            problem = "give either machine_topology or per-call machine weights, not both"
        if problem is None and step != 0:
            problem = f"step picks a step of machine_topology: with per-call machine weights it must be 0, not {step!r}"
        if problem is None:
            try:
                resolved = _per_call_step(rt, self_weight, src_machine_weights, dst_machine_weights)
            except ValueError as error:
                problem = error
    else:
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
    # Before the check across the job, in both forms (a machine whose ranks take different forms must not wait
    # in two different collectives): the ranks of each machine must pass the same machine weights.
    if rt.check and _weights_differ_in_machine(rt, per_call, resolved) and problem is None:
        problem = (f"the ranks of machine {machine} pass different machine weights (this rank: self_weight "
                   f"{self_weight!r}, src_machine_weights {src_machine_weights!r}, dst_machine_weights "
                   f"{dst_machine_weights!r}); every rank of a machine must pass its machine's weights")
    shape = tuple(tensor.shape) if problem is None else None
    dtype = getattr(tensor, "dtype", None)
    if not per_call:
        described = _describe(machine_topology) if problem is None else None
        prologue.agree(rt, _OP, (shape, dtype, described, step), problem, protocol=_STATIC)
    else:
        sends_to, receives_from = _machine_ring(rt)
        if rt.local_comm.rank == 0 and resolved is not None and machines > 1:
            sends_to += _translate(rt.leaders_comm, list(resolved.destinations), rt.comm)
            receives_from += _translate(rt.leaders_comm, list(resolved.sources), rt.comm)
        prologue.agree(rt, _OP, (shape, dtype, "per-call machine weights"), problem,
                       description=f"{_OP} of shape {shape} {dtype} with per-call machine weights",
                       sends_to=sends_to, receives_from=receives_from, protocol=_PER_CALL)
    if rt.local_comm.rank != 0:
        return _MachineStep(1.0, {}, {})
    if per_call:
        assert resolved is not None
        return resolved
    if machines == 1:
        return _MachineStep(1.0, {}, {})
    peers = family.peers(int(step), machine)
    self_w, sources = peers.self_weight, dict(peers.src_weights)
    sizes = rt.layout.machine_sizes
    if sizes and min(sizes) != max(sizes):  # unequal machines (after a failure): keep the average over ranks
        keep = min(sizes) / sizes[machine]
        self_w, sources = 1 - keep * (1 - self_w), {src: keep * w for src, w in sources.items()}
    return _MachineStep(self_w, sources, dict(peers.dst_weights))


def _start(rt: Runtime, tensor: torch.Tensor, ex: _MachineStep, out: torch.Tensor | None) -> Handle:
    """Average within the machine (blocking: the fast local links), post the leaders' exchange and
    return a handle whose ``wait()`` combines on the leader and broadcasts within the machine."""
    x = tensor.detach().reshape(-1)
    values = x.to(prologue.wide_dtype(x.dtype)).contiguous()  # the input itself when contiguous and wide: never written
    transport, numel, local = rt.transport, values.numel(), rt.local_comm
    send = transport.outgoing(values)
    mean = transport.incoming(numel, values.dtype, values.device)  # where MPI reaches: pinned host when staged
    nbytes = numel * values.element_size()
    rt.traffic.count_allreduce(_OP, nbytes, local.size)
    rt.traffic.count_broadcast(_OP, nbytes, local.size, local.rank == 0)
    # On an error (a timeout) ``mean`` is not given back to the pool: MPI may still write into it.
    rt.watchdog.wait([local.Iallreduce(mpi_buffer(send), mpi_buffer(mean), op=MPI.SUM)],
                     f"{_OP}: machine allreduce", nbytes=nbytes)
    transport.done_with(send, values)
    mean.div_(local.size)  # the sum divided once: correctly rounded
    requests: list[MPI.Request] = []
    received: dict[int, torch.Tensor] = {}
    scaled: dict[int, torch.Tensor] = {}
    if ex.sources or ex.destinations:  # on a leader with machines to talk to
        received = {src: transport.like(mean) for src in ex.sources}
        scaled = {dst: torch.mul(mean, scale, out=transport.like(mean))
                  for dst, scale in ex.destinations.items() if scale != 1.0}
        transport.ready(mean)
        chunks = len(transport.chunk_spans(numel, mean.element_size()))
        rt.traffic.count_sends(_OP, nbytes, len(ex.destinations), chunks)
        requests = transport.exchange(rt.leaders_comm, list(received.items()),
                                      [(dst, scaled.get(dst, mean)) for dst in ex.destinations], TAG)

    def finish() -> torch.Tensor:
        if local.rank == 0:
            weighted_sum([(ex.self_weight, mean), *((w, received[src]) for src, w in ex.sources.items())], mean)
        for buf in (*received.values(), *scaled.values()):  # only once complete: on an error MPI may still use them
            transport.done_with(buf)
        transport.ready(mean)
        rt.watchdog.wait([local.Ibcast(mpi_buffer(mean), root=0)], f"{_OP}: machine broadcast", nbytes=nbytes)
        if out is not None:  # straight into the caller's buffer (converting dtype and device as needed)
            result = out.copy_(mean.view(out.shape))
        else:
            result = mean.view(tensor.shape).to(tensor.device, tensor.dtype, copy=True)
        transport.done_with(mean)
        return result

    peers = sorted({*ex.sources, *ex.destinations})
    return Handle(requests, finish, what=f"{_OP}: gossip between machines", peers=peers or None, nbytes=nbytes,
                  in_flight=rt.in_flight, keep=(mean, *received.values(), *scaled.values()))


@prologue.failures_raised(_OP)
def hierarchical_neighbor_allreduce(tensor: torch.Tensor, machine_topology: nx.DiGraph | DynamicTopology | None = None,
                                    step: int = 0, *, self_weight: float | None = None,
                                    src_machine_weights: MachineWeights = None,
                                    dst_machine_weights: MachineWeights = None,
                                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective: average within this machine, gossip the machine averages between machines, share
    the result within the machine (module docstring). Returns a new tensor, or writes ``out``;
    ``tensor`` is untouched.

    The machines gossip on ``machine_topology`` (at ``step`` for a time-varying family; default: the
    exponential-2 graph over the machines), or, with per-call weights, as ``self_weight``,
    ``src_machine_weights`` (``{machine: weight}`` or a list of machines) and ``dst_machine_weights``
    (``{machine: scale}`` or a list of machines for scale 1) say: y_M = self_weight · m_M +
    Σ_{M'} src_machine_weights[M'] · scale_{M'→M} · m_M'. ``self_weight`` defaults to 1 minus the
    sum of the scales when some scale is not 1, else 1 minus the sum of ``src_machine_weights``.
    """
    rt = current()
    ex = _prepare(rt, tensor, machine_topology, step, self_weight, src_machine_weights, dst_machine_weights, out)
    return _start(rt, tensor, ex, out).wait()


@prologue.failures_raised(f"{_OP}_async")
def hierarchical_neighbor_allreduce_async(tensor: torch.Tensor,
                                          machine_topology: nx.DiGraph | DynamicTopology | None = None,
                                          step: int = 0, *, self_weight: float | None = None,
                                          src_machine_weights: MachineWeights = None,
                                          dst_machine_weights: MachineWeights = None,
                                          out: torch.Tensor | None = None) -> Handle:
    """Start :func:`hierarchical_neighbor_allreduce`; the handle's ``wait()`` returns its result.

    The cross-rank check and the allreduce within the machine complete before this returns; the
    leaders' exchange between machines then moves in the background, and ``wait()`` combines and
    broadcasts within the machine (the ranks of a machine wait on these handles in the same order).
    The handle holds the buffers MPI uses, so the caller may drop ``tensor``.
    """
    rt = current()
    ex = _prepare(rt, tensor, machine_topology, step, self_weight, src_machine_weights, dst_machine_weights, out)
    return _start(rt, tensor, ex, out)


@prologue.failures_raised("local_allreduce")
def local_allreduce(tensor: torch.Tensor, op: str = "mean", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Collective over the job: the elementwise ``"mean"`` or ``"sum"`` of ``tensor`` over the ranks of
    this rank's machine only (``gossip.local_size()`` ranks), m_M = (1/|M|) Σ_{i∈M} x_i for the mean.

    Every rank calls it; ranks of one machine pass tensors of one shape and dtype (machines may
    differ). Returns a new tensor (or writes ``out``); ``tensor`` is untouched. float16/bfloat16 are
    reduced in float32; integer tensors support ``"sum"`` only. The mean is the sum divided by the
    machine's size once (correctly rounded).
    """
    rt = current()
    problem = prologue.tensor_problem(tensor, "local_allreduce", _REDUCIBLE)
    if problem is None and op not in ("mean", "sum"):
        problem = f"local_allreduce op must be 'mean' or 'sum', got {op!r}"
    if problem is None and op == "mean" and not tensor.is_floating_point():
        problem = f"local_allreduce op 'mean' needs a floating-point tensor, got {tensor.dtype}"
    if problem is None and out is not None:
        try:
            prologue.check_out(out, tensor)
        except (TypeError, ValueError) as error:
            problem = error
    shape = tuple(tensor.shape) if problem is None else None
    sends_to, receives_from = _machine_ring(rt)
    prologue.agree(rt, "local_allreduce", (shape, getattr(tensor, "dtype", None), op), problem,
                   sends_to=sends_to, receives_from=receives_from, protocol=_LOCAL)
    x = tensor.detach().contiguous()
    wide = prologue.widen(x)
    result = prologue.pick_output(out, wide, avoid=x)
    flat, into = wide.view(-1), result.view(-1)
    nbytes = flat.numel() * flat.element_size()
    local, transport = rt.local_comm, rt.transport
    rt.traffic.count_allreduce("local_allreduce", nbytes, local.size)
    send, recv = transport.outgoing(flat), transport.receiving(into)
    rt.watchdog.wait([local.Iallreduce(mpi_buffer(send), mpi_buffer(recv), op=MPI.SUM)], "local_allreduce",
                     nbytes=nbytes)
    transport.received(recv, into)
    transport.done_with(send, flat)
    if op == "mean":
        result.div_(local.size)  # the sum divided once: correctly rounded
    if result.dtype != x.dtype:
        result = result.to(x.dtype)
    return prologue.deliver(result, out)


__all__ = ["hierarchical_neighbor_allreduce", "hierarchical_neighbor_allreduce_async", "local_allreduce"]
