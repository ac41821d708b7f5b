"""gossip: decentralized (gossip) communication for PyTorch on MPI.

Quick use::

    import gossip, torch
    gossip.init()                              # MPI.COMM_WORLD, exponential-2 topology
    x = torch.randn(1000)
    y = gossip.neighbor_allreduce(x)           # x_i <- sum_j w_ij x_j over in-neighbours

See ``README.md`` for the full API and ``topologies`` for graphs and weights.
"""

from gossip import mpi_settings as _mpi_settings

_mpi_settings.apply_defaults()  # before anything imports mpi4py's MPI, which starts MPI

from gossip import checkpoint, data, timeline  # noqa: E402
from gossip.collectives import allgather, allreduce, barrier, broadcast, broadcast_parameters  # noqa: E402
from gossip.context import (  # noqa: E402
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
from gossip.cost_model import CostModel, LinkCost  # noqa: E402
from gossip.errors import GossipError, InputMismatchError  # noqa: E402
from gossip.flat import FlatBuffer, group_by_dtype_and_device, shared_empty  # noqa: E402
from gossip.handles import Handle  # noqa: E402
from gossip.hierarchical import hierarchical_neighbor_allreduce  # noqa: E402
from gossip.neighbor import neighbor_allgather, neighbor_allreduce, neighbor_allreduce_async  # noqa: E402
from gossip.probing import probe  # noqa: E402
from gossip.schedule import Plan, Schedule, schedule_for  # noqa: E402
from gossip.scheduler import Scheduler  # noqa: E402
from gossip.waiting import OpTimeoutError, op_timeout, reset_waited, set_op_timeout, waited_seconds  # noqa: E402
from gossip.window import Window, open_windows  # noqa: E402

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
