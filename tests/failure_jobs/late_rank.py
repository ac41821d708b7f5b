"""A job in which rank 2 reaches a collective call (``init``, ``set_topology`` or ``shutdown``) 12 s
after the others, under an op timeout of 3 s (``GOSSIP_OP_TIMEOUT``).

Used by tests/test_blocking_timeouts.py: ranks 0 and 1 must raise :class:`gossip.OpTimeoutError`
naming the call within a few seconds (each prints one line saying when and what; ``init`` prints
the error itself as it aborts, and the first rank to abort may end the other before it prints),
and the job must then end (the error aborts it) before rank 2 wakes up.
"""

import sys
import time

from mpi4py import MPI

import gossip
import topologies

where = sys.argv[1]
LATE = 12.0
rank = MPI.COMM_WORLD.rank


def late_call(call) -> None:
    if rank == 2:
        time.sleep(LATE)
        print("rank 2: woke up", flush=True)
    started = time.monotonic()
    try:
        call()
    except gossip.OpTimeoutError as error:
        print(f"rank {rank}: OpTimeoutError after {time.monotonic() - started:.2f} s: {error}", flush=True)
        time.sleep(1.0)  # the other early rank prints too before the first abort ends the job
        raise
    print(f"rank {rank}: {where} returned after {time.monotonic() - started:.2f} s", flush=True)


if where == "init":
    late_call(gossip.init)
else:
    gossip.init()
    if where == "set_topology":
        late_call(lambda: gossip.set_topology(topologies.ring))
    else:
        late_call(gossip.shutdown)
print(f"rank {rank}: finished", flush=True)
