"""Graphs and mixing weights for gossip training (pure networkx/numpy: no MPI, no torch).

Convention used everywhere in this project: in a weighted ``networkx.DiGraph`` on nodes
``0..n-1``, an edge ``j -> i`` carries ``weight`` = w_ij, the weight that the *receiver* i gives
to the value of the *sender* j; the self-loop ``i -> i`` carries i's self weight w_ii. The mixing
matrix W therefore has ``W[i, j] = G[j][i]["weight"]`` and one gossip step is ``x <- W x``.
"""

from topologies.dynamic import OnePeerExponentialTwo
from topologies.static import exponential_two, fully_connected, ring, star
from topologies.weights import (
    from_matrix,
    is_doubly_stochastic,
    is_row_stochastic,
    mixing_matrix,
    spectral_gap,
    uniform_weights,
)

__all__ = [
    "OnePeerExponentialTwo",
    "exponential_two",
    "from_matrix",
    "fully_connected",
    "is_doubly_stochastic",
    "is_row_stochastic",
    "mixing_matrix",
    "ring",
    "spectral_gap",
    "star",
    "uniform_weights",
]
