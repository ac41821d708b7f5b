"""BlueFog's communication ops with ``name=``, their ``_nonblocking`` forms and the handles they return.

Each op is the runtime's op of the same meaning (:mod:`gossip.ops`); BlueFog's argument rules are
kept: ``self_weight`` and ``src_weights`` come together, ``dst_weights`` (a list of ranks, or
``{rank: scale}``) makes the exchange dynamic, and with no weights the static topology's weights
are used (uniform unless the topology was set with ``is_weighted=True``). One step of
``neighbor_allreduce`` on every rank computes

    y_i = self_weight · x_i + Σ_j src_weights[j] · s_ji · x_j,    s_ji = rank j's dst_weights[i] (1 by default),

linear averaging (Xiao and Boyd, "Fast linear iterations for distributed averaging", Systems &
Control Letters, 2004), push-sum with scaled sends (Kempe, Dobra and Gehrke, "Gossip-based
computation of aggregate information", FOCS 2003).

A ``_nonblocking`` op returns an int handle; :func:`synchronize` (or :func:`wait`) returns its
result, :func:`poll` says whether it has completed. ``name`` labels the op on the timeline
(:mod:`gossip.tools.timeline`) when one is recording; BlueFog also keys its negotiation by name,
which this runtime does not need (ops match by call order, as MPI collectives do).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import torch

import gossip
from gossip.compat.bluefog import _basics
from gossip.compat.bluefog._objects import broadcast_object

_handles: dict[int, object] = {}
_numbers = itertools.count(1)


class _Done:
    """A completed op: its result, already there."""

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def done(self) -> bool:
        return True

    def wait(self) -> torch.Tensor:
        return self.result


class _Then:
    """An op in flight whose result is passed through ``then`` once, when waited on."""

    def __init__(self, handle, then: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.handle, self.then, self.result = handle, then, None

    def done(self) -> bool:
        return self.result is not None or self.handle.done()

    def wait(self) -> torch.Tensor:
        if self.result is None:
            self.result = self.then(self.handle.wait())
        return self.result


def _register(op) -> int:
    number = next(_numbers)
    _handles[number] = op
    return number


def _label(name: str | None, op: str):
    return gossip.timeline.span(name, "op", op=op) if name else nullcontext()


def poll(handle: int) -> bool:
    """True if the nonblocking op behind ``handle`` has completed (``synchronize`` will not wait)."""
    if handle not in _handles:
        raise ValueError(f"rank {gossip.rank()}: unknown handle {handle!r} (already synchronized?)")
    return bool(_handles[handle].done())


def synchronize(handle: int) -> torch.Tensor:
    """Wait for the nonblocking op behind ``handle`` and return its result (the handle is used up)."""
    op = _handles.pop(handle, None)
    if op is None:
        raise ValueError(f"rank {gossip.rank()}: cannot find handle {handle!r} to synchronize")
    return op.wait()


def wait(handle: int) -> torch.Tensor:
    """The same as :func:`synchronize`."""
    return synchronize(handle)


def barrier() -> None:
    """Return once every rank has called it."""
    gossip.barrier()


# --- global collectives -------------------------------------------------------------------------


def _allreduce_op(tensor: torch.Tensor, average: bool, is_hierarchical_local: bool):
    op = "mean" if average else "sum"
    if is_hierarchical_local:
        return _Done(gossip.local_allreduce(tensor, op))
    return gossip.allreduce_async(tensor, op)


def allreduce_nonblocking(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
                          name: str | None = None) -> int:
    """Start the average (``average``) or sum of ``tensor`` over all ranks, or over this machine's
    ranks with ``is_hierarchical_local``; ``tensor`` is untouched. Returns a handle."""
    with _label(name, "allreduce"):
        return _register(_allreduce_op(tensor, average, is_hierarchical_local))


def allreduce(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
              name: str | None = None) -> torch.Tensor:
    """The average (or sum) of ``tensor`` over all ranks (this machine's with ``is_hierarchical_local``),
    as a new tensor."""
    return synchronize(allreduce_nonblocking(tensor, average, is_hierarchical_local, name))


def allreduce_nonblocking_(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
                           name: str | None = None) -> int:
    """As :func:`allreduce_nonblocking`, the result written into ``tensor`` when synchronized."""
    with _label(name, "allreduce"):
        return _register(_Then(_allreduce_op(tensor, average, is_hierarchical_local), tensor.copy_))


def allreduce_(tensor: torch.Tensor, average: bool = True, is_hierarchical_local: bool = False,
               name: str | None = None) -> torch.Tensor:
    """In-place :func:`allreduce`: ``tensor`` becomes the result and is returned."""
    return synchronize(allreduce_nonblocking_(tensor, average, is_hierarchical_local, name))


def _broadcast_op(tensor: torch.Tensor, root_rank: int):
    return gossip.broadcast_async(tensor, root_rank)


def broadcast_nonblocking(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """Start the broadcast of ``root_rank``'s ``tensor``; the result is a new tensor. Returns a handle."""
    with _label(name, "broadcast"):
        return _register(_broadcast_op(tensor, root_rank))


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """``root_rank``'s ``tensor`` on every rank, as a new tensor (``tensor`` untouched)."""
    return synchronize(broadcast_nonblocking(tensor, root_rank, name))


def broadcast_nonblocking_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> int:
    """In-place :func:`broadcast_nonblocking`: ``tensor`` receives the root's values when synchronized."""
    with _label(name, "broadcast"):
        return _register(_Then(_broadcast_op(tensor, root_rank), tensor.copy_))


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """In-place :func:`broadcast`; returns ``tensor``."""
    return synchronize(broadcast_nonblocking_(tensor, root_rank, name))


def allgather_nonblocking(tensor: torch.Tensor, name: str | None = None) -> int:
    """Start the concatenation of every rank's ``tensor`` along dimension 0, in rank order (first
    dimensions may differ). Returns a handle."""
    with _label(name, "allgather"):
        return _register(gossip.allgather_async(tensor))


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0, in rank order."""
    return synchronize(allgather_nonblocking(tensor, name))


# --- neighbour ops ------------------------------------------------------------------------------


def _neighbor_weights(self_weight, src_weights, dst_weights) -> dict:
    """BlueFog's argument rules, turned into the runtime op's keywords."""
    if (self_weight is None) != (src_weights is None):
        raise ValueError("Arguments self_weight and src_weights have to be presented at the same time")
    if dst_weights is not None and self_weight is None:
        raise ValueError("Arguments self_weight and src_weights have to be presented when dst_weights is given "
                         "(a dynamic topology)")
    keywords = {}
    if self_weight is not None:
        if not isinstance(src_weights, Mapping):
            raise ValueError("Argument src_weights has to be a dictionary map from the (in-)neighbor rank to "
                             f"the weight, got {type(src_weights).__name__}")
        keywords = {"self_weight": float(self_weight),
                    "src_weights": {int(r): float(w) for r, w in src_weights.items()}}
    if dst_weights is not None:
        if isinstance(dst_weights, Mapping):
            keywords["dst_weights"] = {int(r): float(w) for r, w in dst_weights.items()}
        elif isinstance(dst_weights, list | tuple):
            keywords["dst_weights"] = [int(r) for r in dst_weights]
        else:
            raise ValueError(f"Argument dst_weights has to be a list of ranks or a dictionary {{rank: weight}}, got "
                             f"{type(dst_weights).__name__}")
    return keywords


def neighbor_allreduce_nonblocking(tensor: torch.Tensor, self_weight: float | None = None,
                                   src_weights: Mapping[int, float] | None = None,
                                   dst_weights: Mapping[int, float] | list[int] | None = None,
                                   enable_topo_check: bool = True, name: str | None = None) -> int:
    """Start :func:`neighbor_allreduce`; returns a handle."""
    keywords = _neighbor_weights(self_weight, src_weights, dst_weights)
    with _label(name, "neighbor_allreduce"):
        return _register(gossip.neighbor_allreduce_async(tensor, **keywords))


def neighbor_allreduce(tensor: torch.Tensor, self_weight: float | None = None,
                       src_weights: Mapping[int, float] | None = None,
                       dst_weights: Mapping[int, float] | list[int] | None = None,
                       enable_topo_check: bool = True, name: str | None = None) -> torch.Tensor:
    """``self_weight · x_i + Σ_j src_weights[j] · s_ji · x_j`` as a new tensor (module docstring).

    No weights: the static topology's (uniform ``1/(indegree + 1)`` unless ``is_weighted``).
    ``self_weight`` and ``src_weights`` (``{in-neighbour: weight}``): those weights on the static
    topology. With ``dst_weights`` (a list of ranks, or ``{rank: scale}``): a dynamic exchange with
    the ranks named per call, each rank's send to d scaled by its ``dst_weights[d]``. Weights need
    not sum to 1. ``enable_topo_check`` is accepted; the runtime's own cross-rank check (on unless
    ``set_skip_negotiate_stage(True)`` or ``GOSSIP_CHECK=0``) verifies senders and receivers instead.
    """
    return synchronize(neighbor_allreduce_nonblocking(tensor, self_weight, src_weights, dst_weights,
                                                      enable_topo_check, name))


def _neighbor_allgather_op(tensor: torch.Tensor, src_ranks, dst_ranks):
    if (src_ranks is None) != (dst_ranks is None):
        raise ValueError("Arguments src_ranks and dst_ranks have to be presented at the same time")
    if src_ranks is None:
        return gossip.neighbor_allgather_async(tensor)
    return gossip.neighbor_allgather_async(tensor, src_ranks=[int(r) for r in src_ranks],
                                           dst_ranks=[int(r) for r in dst_ranks])


def neighbor_allgather_nonblocking(tensor: torch.Tensor, *, src_ranks: list[int] | None = None,
                                   dst_ranks: list[int] | None = None, enable_topo_check: bool = True,
                                   name: str | None = None) -> int:
    """Start :func:`neighbor_allgather`; returns a handle."""
    with _label(name, "neighbor_allgather"):
        return _register(_neighbor_allgather_op(tensor, src_ranks, dst_ranks))


def neighbor_allgather(tensor: torch.Tensor, *, src_ranks: list[int] | None = None,
                       dst_ranks: list[int] | None = None, enable_topo_check: bool = True,
                       name: str | None = None) -> torch.Tensor:
    """The in-neighbours' tensors (self excluded) concatenated along dimension 0, in rank order of
    the sources: the static topology's in-neighbours, or per call ``src_ranks`` (receiving from)
    with ``dst_ranks`` (sending to), which every rank must give. First dimensions may differ."""
    return synchronize(neighbor_allgather_nonblocking(tensor, src_ranks=src_ranks, dst_ranks=dst_ranks,
                                                      enable_topo_check=enable_topo_check, name=name))


def _hierarchical_op(tensor: torch.Tensor, self_weight, src_machine_weights, dst_machine_weights):
    given = [w is not None for w in (self_weight, src_machine_weights, dst_machine_weights)]
    machine_topology = _basics.applied_machine_topology()
    keywords: dict = {}
    if any(given):
        if not all(given):
            raise ValueError("Arguments self_weight, src_machine_weights and dst_machine_weights have to be "
                             "presented at the same time")
        if isinstance(dst_machine_weights, list | tuple):
            dst_machine_weights = dict.fromkeys((int(m) for m in dst_machine_weights), 1.0)
        src = {int(m): float(w) for m, w in src_machine_weights.items()}
        dst = {int(m): float(w) for m, w in dst_machine_weights.items()}
        own, self_weight = _basics.machine_rank(), float(self_weight)
        if own in src and own in dst:  # a machine naming itself (e.g. one machine, m + 1 mod 1): its own term
            self_weight += src.pop(own) * dst.pop(own)
        keywords = {"self_weight": self_weight, "src_machine_weights": src, "dst_machine_weights": dst}
    if keywords:
        return gossip.hierarchical_neighbor_allreduce_async(tensor, **keywords)
    return gossip.hierarchical_neighbor_allreduce_async(tensor, machine_topology)


def hierarchical_neighbor_allreduce_nonblocking(tensor: torch.Tensor, self_weight: float | None = None,
                                                src_machine_weights: Mapping[int, float] | None = None,
                                                dst_machine_weights: Mapping[int, float] | list[int] | None = None,
                                                enable_topo_check: bool = False, name: str | None = None) -> int:
    """Start :func:`hierarchical_neighbor_allreduce`; returns a handle."""
    with _label(name, "hierarchical_neighbor_allreduce"):
        return _register(_hierarchical_op(tensor, self_weight, src_machine_weights, dst_machine_weights))


def hierarchical_neighbor_allreduce(tensor: torch.Tensor, self_weight: float | None = None,
                                    src_machine_weights: Mapping[int, float] | None = None,
                                    dst_machine_weights: Mapping[int, float] | list[int] | None = None,
                                    enable_topo_check: bool = False, name: str | None = None) -> torch.Tensor:
    """Average within each machine, then neighbour averaging of the machine averages between machines:

        y_M = self_weight · m_M + Σ_{M'} src_machine_weights[M'] · s_{M'M} · m_{M'},   m_M = machine M's mean,

    shared by every rank of machine M (``s``: machine M''s ``dst_machine_weights[M]``). No weights:
    the machine topology (:func:`set_machine_topology`, default exponential-2 over machines). A
    machine that names itself in both ``src_machine_weights`` and ``dst_machine_weights`` (as
    ``(machine_rank() + 1) % machine_size()`` does on one machine) adds ``src[M] · dst[M] · m_M``,
    folded into its self weight."""
    return synchronize(hierarchical_neighbor_allreduce_nonblocking(
        tensor, self_weight, src_machine_weights, dst_machine_weights, enable_topo_check, name))


def pair_gossip_nonblocking(tensor: torch.Tensor, target_rank: int, self_weight: float | None = None,
                            pair_weight: float | None = None, name: str | None = None) -> int:
    """Start :func:`pair_gossip`; returns a handle."""
    if (self_weight is None) != (pair_weight is None):
        raise ValueError("self_weight and pair_weight have to be set at same time")
    if self_weight is None:
        self_weight = pair_weight = 0.5
    with _label(name, "pair_gossip"):
        return _register(gossip.neighbor_allreduce_async(
            tensor, self_weight=float(self_weight), src_weights={int(target_rank): float(pair_weight)},
            dst_weights=[int(target_rank)]))


def pair_gossip(tensor: torch.Tensor, target_rank: int, self_weight: float | None = None,
                pair_weight: float | None = None, name: str | None = None) -> torch.Tensor:
    """``self_weight · x + pair_weight · x_target`` (default: the pair's average); ``target_rank``
    must call it with this rank as its target at the same time."""
    return synchronize(pair_gossip_nonblocking(tensor, target_rank, self_weight, pair_weight, name))


# --- parameters and optimizer state -------------------------------------------------------------


def _named_tensors(params, what: str) -> dict[str, torch.Tensor]:
    """BlueFog's accepted forms (a dict such as ``state_dict()``, a list of tensors or of
    ``(name, tensor)`` pairs such as ``named_parameters()``) as an ordered ``{key: tensor}``."""
    if isinstance(params, torch.nn.Module):
        params = params.state_dict()
    if isinstance(params, Mapping):
        items = sorted(params.items())
    elif isinstance(params, Iterable) and not isinstance(params, torch.Tensor):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    found = {}
    for k, (name, t) in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name or k} is a {type(t).__name__}, not a tensor")
        found[f"{k}:{name}"] = t
    return found


def broadcast_parameters(params, root_rank: int) -> None:
    """Overwrite, in place, every tensor of ``params`` (``state_dict()``, ``named_parameters()``,
    ``parameters()``, a list or dict of tensors, or a module) with ``root_rank``'s values."""
    gossip.broadcast_parameters(_named_tensors(params, "broadcast_parameters"), root_rank)


def allreduce_parameters(params) -> None:
    """Replace, in place, every tensor of ``params`` (forms as :func:`broadcast_parameters`) by its
    average over all ranks (one allreduce per dtype and device)."""
    tensors = list(_named_tensors(params, "allreduce_parameters").values())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for group in groups.values():
            averaged = gossip.allreduce(torch.cat([t.detach().reshape(-1) for t in group]), "mean")
            offset = 0
            for t in group:
                t.copy_(averaged[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer inside a distributed wrapper (or the optimizer itself)."""
    seen = optimizer
    while not isinstance(seen, torch.optim.Optimizer) or hasattr(seen, "base_optimizer"):
        inner = getattr(seen, "base_optimizer", None) or getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            break
        seen = inner
    if not isinstance(seen, torch.optim.Optimizer):
        raise ValueError(f"broadcast_optimizer_state takes a torch.optim optimizer, got {type(optimizer).__name__}")
    return seen


def broadcast_optimizer_state(optimizer, root_rank: int) -> None:
    """Make every rank's optimizer state and hyper-parameters ``root_rank``'s.

    A fresh optimizer first gets its state created by one step of the wrapped ``torch.optim``
    optimizer with zero gradients (as BlueFog does; no communication). Tensors of the state are
    broadcast in place (fused per dtype), scalars and the groups' options through one pickled
    broadcast. ``torch.optim.LBFGS`` is refused.
    """
    base = _base_optimizer(optimizer)
    if isinstance(base, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    if not base.state:
        for group in base.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        base.step()
    params = [p for group in base.param_groups for p in group["params"]]
    tensors, scalars = {}, {}
    for k, p in enumerate(params):
        for key, value in sorted(base.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                tensors[f"{k}.{key}"] = value
            else:
                scalars[(k, key)] = value
    options = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    root_scalars, root_options = broadcast_object((scalars, options), root_rank)
    if tensors:
        gossip.broadcast_parameters(tensors, root_rank)
    for (k, key), value in root_scalars.items():
        base.state[params[k]][key] = value
    for group, chosen in zip(base.param_groups, root_options, strict=True):
        group.update(chosen)
