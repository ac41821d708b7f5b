"""The runtime's traffic counter: the bytes and messages each op of this rank puts on the wire.

The runtime owns one :class:`TrafficCounter` (``gossip.traffic()`` reads it, ``gossip.reset_traffic()``
zeroes it). Every op counts where it posts its transfer, per op name, before it waits: a non-blocking
op counts when it starts. What is counted is the op's data, the bytes of the message as handed to MPI
(half types travel as 16-bit words, compressed messages as their ``uint8`` bytes):

* neighbour averaging, static or with per-call peers (``neighbor_allreduce``, ``neighbor_allgather``):
  m per out-neighbour, one message per out-neighbour and chunk (``message_chunk_bytes``); with
  ``dst_weights``, 8 bytes of scale and one message more per destination (the 8-byte first dimensions
  ``neighbor_allgather`` and ``allgather`` exchange before their data are not counted);
* ``allreduce`` (a model): 2(n − 1)·m / n (integer division), 2(n − 1) messages: a ring allreduce's
  bytes per rank (reduce-scatter, then allgather); half types count as the float32 they are reduced in;
* ``broadcast``, ``broadcast_parameters`` (a model): (n − 1)·m and n − 1 messages on the root, nothing
  elsewhere: what every tree broadcast moves in total, all put on the root;
* ``allgather`` (a model): (n − 1)·m, n − 1 messages, m this rank's block: its block reaches every
  other rank, a ring allgather's total;
* ``hierarchical_neighbor_allreduce``: the machine's allreduce (the model, over its k ranks), the
  leader's broadcast (the model) and the leaders' exchange (exact, as neighbour averaging);
* window ``put`` / ``accumulate``: the slot's m plus its 8-byte version counter per destination, two
  messages each; ``get``: m per source, one message each (bytes this rank's call moves, though the
  target sends them: one-sided);
* the parameter server: every message sent, whole (gradients, parameters, indices, stops);
* the compressed ops: the compressed message's m per destination, one message per destination and
  chunk; ``compressed_allreduce``: its reduce-scatter exactly as handed to MPI (each other rank's block, in
  chunks) plus the allgather model for its own reduced block, (n − 1)·m_r.

**Collectives are models.** MPI chooses its own algorithm for ``MPI_Allreduce``, ``MPI_Bcast`` and
``MPI_Allgatherv`` (Open MPI's ``coll/tuned`` picks by size and rank count: recursive doubling sends
log₂(n)·m per rank, a ring 2(n − 1)/n·m), so what one rank sends is not observable from the API. The
counts above are those of the bandwidth-optimal algorithms (Patarasuk and Yuan, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009; Thakur, Rabenseifner and Gropp,
"Optimization of collective communication operations in MPICH", IJHPCA 19(1), 2005); summed over the
ranks they equal what those algorithms move. ``benchmarks/diloco.py`` compares the counts with the bytes
the emulated machines' interfaces send: on 4 machines at 100 Mbit/s the interfaces sent 1.03 to 1.06
times the counted bytes for allreduce, one-peer averaging, ``compressed_allreduce``, broadcast and
training steps alike (the headers and acknowledgements of TCP/IP over Ethernet), so Open MPI's
allreduce of a 0.55 MB tensor moved what a ring moves.

**Shared memory.** Neighbour averaging through node shared memory hands no message to MPI: each
out-neighbour reads the value where it lies. It is counted all the same, as m per out-neighbour and one
message each, under its own op name (``neighbor_allreduce (shared memory)``; per-call scales go through
a shared row and are not counted), so that the counts do not depend on where the ranks run.

**Not counted:** control traffic, which is small and does not grow with the tensors: the cross-rank
input check (one 16-byte allreduce per op, ``check=False`` turns it off), the row counts ``allgather``
exchanges first, the parameter server's probes, window creation, ``init``, and ``set_topology``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Traffic:
    """A snapshot of this rank's counted traffic: ``bytes`` and ``messages`` in total and ``by_op``,
    op name → ``(bytes, messages)``. Differences of snapshots (``b - a``) give the traffic between them."""

    bytes: int = 0
    messages: int = 0
    by_op: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __sub__(self, earlier: Traffic) -> Traffic:
        ops = {name: (b - earlier.by_op.get(name, (0, 0))[0], m - earlier.by_op.get(name, (0, 0))[1])
               for name, (b, m) in self.by_op.items()}
        return Traffic(self.bytes - earlier.bytes, self.messages - earlier.messages,
                       MappingProxyType({k: v for k, v in ops.items() if v != (0, 0)}))


def ring_allreduce_bytes(nbytes: int, ranks: int) -> int:
    """Bytes one rank sends in a ring allreduce of ``nbytes``: 2(n − 1)·m / n (integer division)."""
    return 2 * (ranks - 1) * nbytes // ranks if ranks > 1 else 0


class TrafficCounter:
    """This rank's counts per op (module docstring); the runtime's single instance is read by
    ``gossip.traffic()``. The ``count_*`` methods are the closed forms every op uses."""

    def __init__(self) -> None:
        self._by_op: dict[str, list[int]] = {}

    def add(self, op: str, nbytes: int, messages: int) -> None:
        """Count ``nbytes`` in ``messages`` messages under ``op``."""
        entry = self._by_op.get(op)
        if entry is None:
            entry = self._by_op[op] = [0, 0]
        entry[0] += int(nbytes)
        entry[1] += int(messages)

    def count_sends(self, op: str, nbytes: int, destinations: int, chunks: int = 1) -> None:
        """A message of ``nbytes`` to each of ``destinations`` ranks, in ``chunks`` messages each."""
        if destinations:
            self.add(op, nbytes * destinations, chunks * destinations)

    def count_allreduce(self, op: str, nbytes: int, ranks: int) -> None:
        """An allreduce of ``nbytes`` per rank over ``ranks`` ranks (the ring model)."""
        if ranks > 1:
            self.add(op, ring_allreduce_bytes(nbytes, ranks), 2 * (ranks - 1))

    def count_broadcast(self, op: str, nbytes: int, ranks: int, is_root: bool) -> None:
        """A broadcast of ``nbytes`` over ``ranks`` ranks: (n − 1)·m on the root."""
        if is_root and ranks > 1:
            self.add(op, nbytes * (ranks - 1), ranks - 1)

    def count_allgather(self, op: str, nbytes: int, ranks: int) -> None:
        """An allgather in which this rank's block is ``nbytes``: (n − 1)·m."""
        if ranks > 1:
            self.add(op, nbytes * (ranks - 1), ranks - 1)

    def snapshot(self) -> Traffic:
        """The counts so far, as a :class:`Traffic`."""
        by_op = MappingProxyType({name: (b, m) for name, (b, m) in sorted(self._by_op.items())})
        return Traffic(sum(b for b, _ in by_op.values()), sum(m for _, m in by_op.values()), by_op)

    def reset(self) -> None:
        """Start counting from zero."""
        self._by_op.clear()
