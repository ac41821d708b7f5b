"""gossip: decentralized (gossip) communication for PyTorch on MPI.

Quick use::

    import gossip, torch
    gossip.init()                              # MPI.COMM_WORLD, exponential-2 topology
    x = torch.randn(1000)
    y = gossip.neighbor_allreduce(x)           # x_i <- sum_j w_ij x_j over in-neighbours

See ``README.md`` for the full API and ``topologies`` for graphs and weights.
"""

from gossip import checkpoint, data, timeline
from gossip.collectives import allgather, allreduce, barrier, broadcast, broadcast_parameters
from gossip.context import (
    cuda_aware,
    in_neighbors,
    init,
    is_initialized,
    layout,
    local_rank,
    local_size,
    machine_rank,
    machine_size,
    out_neighbors,
    rank,
    set_check,
    set_topology,
    shutdown,
    size,
    topology,
    uses_shared_memory,
)
from gossip.cost_model import CostModel, LinkCost
from gossip.errors import GossipError, InputMismatchError
from gossip.flat import FlatBuffer, group_by_dtype_and_device, shared_empty
from gossip.handles import Handle
from gossip.hierarchical import hierarchical_neighbor_allreduce
from gossip.neighbor import neighbor_allgather, neighbor_allreduce, neighbor_allreduce_async
from gossip.probing import probe
from gossip.schedule import Plan, Schedule, schedule_for
from gossip.scheduler import Scheduler
from gossip.waiting import OpTimeoutError, op_timeout, reset_waited, set_op_timeout, waited_seconds
from gossip.window import Window, open_windows

__all__ = [
    "CostModel",
    "LinkCost",
    "OpTimeoutError",
    "probe",
    "Window",
    "open_windows",
    "checkpoint",
    "data",
    "op_timeout",
    "reset_waited",
    "set_op_timeout",
    "timeline",
    "waited_seconds",
    "FlatBuffer",
    "GossipError",
    "Handle",
    "InputMismatchError",
    "Plan",
    "Schedule",
    "Scheduler",
    "allgather",
    "allreduce",
    "barrier",
    "broadcast",
    "broadcast_parameters",
    "cuda_aware",
    "group_by_dtype_and_device",
    "hierarchical_neighbor_allreduce",
    "in_neighbors",
    "init",
    "is_initialized",
    "layout",
    "local_rank",
    "local_size",
    "machine_rank",
    "machine_size",
    "neighbor_allgather",
    "neighbor_allreduce",
    "neighbor_allreduce_async",
    "out_neighbors",
    "rank",
    "schedule_for",
    "set_check",
    "set_topology",
    "shared_empty",
    "shutdown",
    "size",
    "topology",
    "uses_shared_memory",
]
