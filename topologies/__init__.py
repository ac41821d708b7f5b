"""Graphs and mixing weights for gossip training (pure networkx/numpy: no MPI, no torch).

Convention used everywhere in this project: in a weighted ``networkx.DiGraph`` on nodes
``0..n-1``, an edge ``j -> i`` carries ``weight`` = w_ij, the weight that the *receiver* i gives
to the value of the *sender* j; the self-loop ``i -> i`` carries i's self weight w_ii. The mixing
matrix W therefore has ``W[i, j] = G[j][i]["weight"]`` and one gossip step is ``x <- W x``.

* Static graphs: :mod:`topologies.static`, :mod:`topologies.random_graphs`,
  :mod:`topologies.finite_time` (Base-(k+1)), :mod:`topologies.equitopo` (EquiStatic).
* Weights and checks: :mod:`topologies.weights`, :mod:`topologies.validation`.
* Time-varying families: :mod:`topologies.dynamic`, :mod:`topologies.machines`, Base-(k+1) and
  EquiDyn sequences.
* Analysis and the comparison table: :mod:`topologies.analysis`, :mod:`topologies.compare`
  (``python -m topologies N``).
"""

from topologies.analysis import (
    bytes_per_step,
    consensus_rate,
    consensus_steps,
    degrees,
    diameter,
    lambda_min,
    max_degree,
    product,
    rho,
    spectral_gap,
)
from topologies.dynamic import (
    DynamicTopology,
    GraphSequence,
    OnePeer,
    OnePeerExponentialTwo,
    OnePeerFamily,
    RandomMatching,
    StepPeers,
)
from topologies.equitopo import (
    OnePeerDirectedEquiDyn,
    OnePeerUndirectedEquiDyn,
    d_equi_static,
    u_equi_static,
)
from topologies.finite_time import BaseGraph, base_graph, hyper_hypercube, simple_base_graph
from topologies.machines import InnerOuterExponentialTwo, InnerOuterRing
from topologies.names import by_name, topology_names
from topologies.random_graphs import erdos_renyi, random_regular
from topologies.static import (
    exponential,
    exponential_two,
    fully_connected,
    grid_shape,
    hypercube,
    mesh,
    ring,
    star,
    symmetric_exponential,
    torus,
)
from topologies.validation import (
    check_weights,
    is_column_stochastic,
    is_doubly_stochastic,
    is_row_stochastic,
    is_strongly_connected,
    is_symmetric,
    validate,
)
from topologies.weights import (
    from_matrix,
    lazy,
    maximum_degree_weights,
    metropolis_hastings_weights,
    mixing_matrix,
    to_matrix,
    uniform_weights,
)

__all__ = [
    "BaseGraph",
    "OnePeerDirectedEquiDyn",
    "OnePeerUndirectedEquiDyn",
    "base_graph",
    "d_equi_static",
    "hyper_hypercube",
    "simple_base_graph",
    "u_equi_static",
    "DynamicTopology",
    "GraphSequence",
    "InnerOuterExponentialTwo",
    "InnerOuterRing",
    "OnePeer",
    "OnePeerExponentialTwo",
    "OnePeerFamily",
    "RandomMatching",
    "StepPeers",
    "by_name",
    "bytes_per_step",
    "check_weights",
    "consensus_rate",
    "consensus_steps",
    "degrees",
    "diameter",
    "erdos_renyi",
    "exponential",
    "exponential_two",
    "from_matrix",
    "fully_connected",
    "grid_shape",
    "hypercube",
    "is_column_stochastic",
    "is_doubly_stochastic",
    "is_row_stochastic",
    "is_strongly_connected",
    "is_symmetric",
    "lambda_min",
    "lazy",
    "max_degree",
    "maximum_degree_weights",
    "mesh",
    "metropolis_hastings_weights",
    "mixing_matrix",
    "product",
    "random_regular",
    "rho",
    "ring",
    "spectral_gap",
    "star",
    "symmetric_exponential",
    "to_matrix",
    "topology_names",
    "torus",
    "uniform_weights",
    "validate",
]
