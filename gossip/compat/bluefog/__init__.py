"""BlueFog's ``bluefog.torch`` API on this library: ``import gossip.compat.bluefog as bf``.

BlueFog (Ying, Yuan, Hu, Chen and Yin, "BlueFog: Make decentralized algorithms practical for
optimization and deep learning", arXiv:2111.04287, 2021) is unmaintained and does not build on
torch 2.x. A script written for it runs here once its ``import bluefog.torch as bf`` becomes
``import gossip.compat.bluefog as bf`` (and ``bluefog.common.topology_util`` becomes
``gossip.compat.bluefog.topology_util``); the README's "Running BlueFog scripts" lists every
difference. What each name maps onto:

* start, ranks, topologies (:mod:`._basics`): ``init``, ``shutdown``, ``size``, ``rank``,
  ``local_size``, ``local_rank``, ``machine_size``, ``machine_rank``, ``set_topology``,
  ``load_topology``, ``in_neighbor_ranks``, ``out_neighbor_ranks``, the machine topology, support
  queries, ``suspend``/``resume`` (no-ops) and timeline activities;
* ops (:mod:`._ops`): global collectives, neighbour averaging and gathering, hierarchical
  averaging, pair gossip, their ``_nonblocking`` forms, ``poll``/``synchronize``/``wait``,
  ``barrier``, broadcasting parameters and optimizer state;
* one-sided windows (:mod:`._windows`): the ``win_*`` family on :class:`gossip.Window`;
* distributed optimizers (:mod:`._optimizers`) on :class:`algorithms.GossipWrapper`;
* ``topology_util``: BlueFog's graphs and schedules (:mod:`.topology_util`), its names also here, as
  ``bluefog.torch`` has them (``bf.ExponentialGraph``).
"""

from gossip.compat.bluefog import topology_util
from gossip.compat.bluefog._basics import (
    get_skip_negotiate_stage,
    in_neighbor_machine_ranks,
    in_neighbor_ranks,
    init,
    is_homogeneous,
    is_machine_topo_weighted,
    is_topo_weighted,
    load_machine_topology,
    load_topology,
    local_rank,
    local_size,
    machine_rank,
    machine_size,
    mpi_threads_supported,
    nccl_built,
    out_neighbor_machine_ranks,
    out_neighbor_ranks,
    rank,
    resume,
    set_machine_topology,
    set_skip_negotiate_stage,
    set_topology,
    shutdown,
    size,
    suspend,
    timeline_context,
    timeline_end_activity,
    timeline_start_activity,
    unified_mpi_window_model_supported,
)
from gossip.compat.bluefog._ops import (
    allgather,
    allgather_nonblocking,
    allreduce,
    allreduce_,
    allreduce_nonblocking,
    allreduce_nonblocking_,
    allreduce_parameters,
    barrier,
    broadcast,
    broadcast_,
    broadcast_nonblocking,
    broadcast_nonblocking_,
    broadcast_optimizer_state,
    broadcast_parameters,
    hierarchical_neighbor_allreduce,
    hierarchical_neighbor_allreduce_nonblocking,
    neighbor_allgather,
    neighbor_allgather_nonblocking,
    neighbor_allreduce,
    neighbor_allreduce_nonblocking,
    pair_gossip,
    pair_gossip_nonblocking,
    poll,
    synchronize,
    wait,
)
from gossip.compat.bluefog._optimizers import (
    BlueFogOptimizer,
    CommunicationType,
    DistributedAdaptThenCombineOptimizer,
    DistributedAdaptWithCombineOptimizer,
    DistributedAllreduceOptimizer,
    DistributedGradientAllreduceOptimizer,
    DistributedHierarchicalNeighborAllreduceOptimizer,
    DistributedNeighborAllreduceOptimizer,
    DistributedWinPutOptimizer,
)
from gossip.compat.bluefog._windows import (
    get_current_created_window_names,
    get_win_version,
    turn_off_win_ops_with_associated_p,
    turn_on_win_ops_with_associated_p,
    win_accumulate,
    win_accumulate_nonblocking,
    win_associated_p,
    win_create,
    win_free,
    win_get,
    win_get_nonblocking,
    win_lock,
    win_mutex,
    win_poll,
    win_put,
    win_put_nonblocking,
    win_update,
    win_update_then_collect,
    win_wait,
)
from gossip.compat.bluefog.topology_util import (
    ExponentialGraph,
    ExponentialTwoGraph,
    FullyConnectedGraph,
    GetDynamicOnePeerSendRecvRanks,
    GetExp2DynamicSendRecvMachineRanks,
    GetInnerOuterExpo2DynamicSendRecvRanks,
    GetInnerOuterRingDynamicSendRecvRanks,
    GetRecvWeights,
    GetSendWeights,
    InferDestinationFromSourceRanks,
    InferSourceFromDestinationRanks,
    IsRegularGraph,
    IsTopologyEquivalent,
    MeshGrid2DGraph,
    RingGraph,
    StarGraph,
    SymmetricExponentialGraph,
    isPowerOf,
)

__all__ = [
    "BlueFogOptimizer", "CommunicationType", "DistributedAdaptThenCombineOptimizer",
    "DistributedAdaptWithCombineOptimizer", "DistributedAllreduceOptimizer", "DistributedGradientAllreduceOptimizer",
    "DistributedHierarchicalNeighborAllreduceOptimizer", "DistributedNeighborAllreduceOptimizer",
    "DistributedWinPutOptimizer", "ExponentialGraph", "ExponentialTwoGraph", "FullyConnectedGraph",
    "GetDynamicOnePeerSendRecvRanks", "GetExp2DynamicSendRecvMachineRanks", "GetInnerOuterExpo2DynamicSendRecvRanks",
    "GetInnerOuterRingDynamicSendRecvRanks", "GetRecvWeights", "GetSendWeights", "InferDestinationFromSourceRanks",
    "InferSourceFromDestinationRanks", "IsRegularGraph", "IsTopologyEquivalent", "MeshGrid2DGraph", "RingGraph",
    "StarGraph", "SymmetricExponentialGraph", "allgather", "allgather_nonblocking", "allreduce", "allreduce_",
    "allreduce_nonblocking", "allreduce_nonblocking_", "allreduce_parameters", "barrier", "broadcast", "broadcast_",
    "broadcast_nonblocking", "broadcast_nonblocking_", "broadcast_optimizer_state", "broadcast_parameters",
    "get_current_created_window_names", "get_skip_negotiate_stage", "get_win_version",
    "hierarchical_neighbor_allreduce", "hierarchical_neighbor_allreduce_nonblocking", "in_neighbor_machine_ranks",
    "in_neighbor_ranks", "init", "isPowerOf", "is_homogeneous", "is_machine_topo_weighted", "is_topo_weighted",
    "load_machine_topology", "load_topology", "local_rank", "local_size", "machine_rank", "machine_size",
    "mpi_threads_supported", "nccl_built", "neighbor_allgather", "neighbor_allgather_nonblocking",
    "neighbor_allreduce", "neighbor_allreduce_nonblocking", "out_neighbor_machine_ranks", "out_neighbor_ranks",
    "pair_gossip", "pair_gossip_nonblocking", "poll", "rank", "resume", "set_machine_topology",
    "set_skip_negotiate_stage", "set_topology", "shutdown", "size", "suspend", "synchronize", "timeline_context",
    "timeline_end_activity", "timeline_start_activity", "topology_util", "turn_off_win_ops_with_associated_p",
    "turn_on_win_ops_with_associated_p", "unified_mpi_window_model_supported", "wait", "win_accumulate",
    "win_accumulate_nonblocking", "win_associated_p", "win_create", "win_free", "win_get", "win_get_nonblocking",
    "win_lock", "win_mutex", "win_poll", "win_put", "win_put_nonblocking", "win_update", "win_update_then_collect",
    "win_wait",
]
