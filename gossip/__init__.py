"""gossip: decentralized (gossip) communication for PyTorch on MPI.

Quick use::

    import gossip, torch
    gossip.init()                              # MPI.COMM_WORLD, exponential-2 topology
    x = torch.randn(1000)
    y = gossip.neighbor_allreduce(x)           # x_i <- sum_j w_ij x_j over in-neighbours

The package, one concern per subpackage:

* :mod:`gossip.runtime` and :mod:`gossip.settings`: ``init``/``shutdown``, the communicators and
  machine layout, the settings (``init`` arguments or ``GOSSIP_*`` environment variables, parsed
  once) and the resources the runtime owns (windows, trace recorder, parameter servers).
* :mod:`gossip.ops`: what users call: neighbour ops, global collectives, hierarchical gossip,
  one-sided windows, the parameter server, handles of non-blocking ops, and the recovery from a
  failed rank in fault-tolerant mode (``recover``, ``on_recover``).
* :mod:`gossip.transport`: the one place that decides how bytes move (shared memory, MPI
  message, staged through pinned host memory, CUDA-aware), buffers and the watchdog.
* :mod:`gossip.plan`: what a step communicates (plans and schedules), the topology-aware
  scheduler, its cost model, the link probe and cluster profiles.
* :mod:`gossip.tools`: timeline, checkpoints, metrics, datasets for examples, the launcher and the
  multi-machine emulator.
"""

# gossip.transport comes first: it sets the MPI transport defaults before MPI starts (mpi_settings).
# ruff: noqa: I001
from gossip import transport  # noqa: F401
from gossip import ops, plan, tools  # noqa: F401 - the subpackages, as gossip.ops etc.
from gossip.errors import GossipError, InputMismatchError, OpTimeoutError, RankFailure
from gossip.ops.collectives import (
    allgather,
    allgather_async,
    allreduce,
    allreduce_async,
    barrier,
    broadcast,
    broadcast_async,
    broadcast_parameters,
)
from gossip.ops.compressed import (
    compressed_allreduce,
    compressed_allreduce_async,
    compressed_neighbor_allreduce,
    compressed_neighbor_exchange,
)
from gossip.ops.compression import (
    BFloat16,
    Compressor,
    Float16,
    Identity,
    Int4,
    Int8,
    RandomK,
    SignNorm,
    TopK,
    compressor_by_name,
)
from gossip.ops.flat import FlatBuffer
from gossip.ops.handles import Handle
from gossip.ops.hierarchical import (
    hierarchical_neighbor_allreduce,
    hierarchical_neighbor_allreduce_async,
    local_allreduce,
)
from gossip.ops.neighbor import neighbor_allreduce, neighbor_allreduce_async
from gossip.ops.neighbor_gather import neighbor_allgather, neighbor_allgather_async
from gossip.ops.recovery import Recovery, on_recover, recover
from gossip.ops.window import Window, open_windows
from gossip.plan.cost_model import CostModel, LinkCost
from gossip.plan.probing import probe
from gossip.plan.schedule import Plan, Schedule
from gossip.plan.scheduler import Scheduler
from gossip.runtime import (
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
    reset_traffic,
    reset_waited,
    set_check,
    set_op_timeout,
    set_topology,
    settings,
    shared_empty,
    shutdown,
    size,
    topology,
    traffic,
    uses_shared_memory,
    waited_seconds,
)
from gossip.settings import Settings
from gossip.tools import checkpoint, metrics, timeline
from gossip.transport import Traffic

__all__ = [
    "BFloat16",
    "Compressor",
    "CostModel",
    "FlatBuffer",
    "Float16",
    "GossipError",
    "Handle",
    "Identity",
    "InputMismatchError",
    "Int4",
    "Int8",
    "LinkCost",
    "OpTimeoutError",
    "Plan",
    "RandomK",
    "RankFailure",
    "Recovery",
    "Schedule",
    "Scheduler",
    "Settings",
    "SignNorm",
    "TopK",
    "Traffic",
    "Window",
    "allgather",
    "allgather_async",
    "allreduce",
    "allreduce_async",
    "barrier",
    "broadcast",
    "broadcast_async",
    "broadcast_parameters",
    "checkpoint",
    "compressed_allreduce",
    "compressed_allreduce_async",
    "compressed_neighbor_allreduce",
    "compressed_neighbor_exchange",
    "compressor_by_name",
    "cuda_aware",
    "hierarchical_neighbor_allreduce",
    "hierarchical_neighbor_allreduce_async",
    "in_neighbors",
    "init",
    "is_initialized",
    "layout",
    "local_allreduce",
    "local_rank",
    "local_size",
    "machine_rank",
    "machine_size",
    "metrics",
    "neighbor_allgather",
    "neighbor_allgather_async",
    "neighbor_allreduce",
    "neighbor_allreduce_async",
    "on_recover",
    "open_windows",
    "out_neighbors",
    "probe",
    "rank",
    "recover",
    "reset_traffic",
    "reset_waited",
    "set_check",
    "set_op_timeout",
    "set_topology",
    "settings",
    "shared_empty",
    "shutdown",
    "size",
    "timeline",
    "topology",
    "traffic",
    "uses_shared_memory",
    "waited_seconds",
]
