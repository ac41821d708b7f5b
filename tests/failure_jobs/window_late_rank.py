"""A job of 3 ranks in which rank 2 reaches ``gossip.Window`` 12 s after the others (op timeout 3 s).

Used by tests/test_windows.py: ranks 0 and 1 must raise :class:`gossip.OpTimeoutError` naming the
window's creation within a few seconds (they print how long they waited), and the job must end.
"""

import time

import torch

import gossip

gossip.init(op_timeout=3)
x = torch.full((1000,), float(gossip.rank()))
if gossip.rank() == 2:
    time.sleep(12)
started = time.monotonic()
try:
    gossip.Window(x, "late")
except gossip.OpTimeoutError as error:
    print(f"rank {gossip.rank()}: OpTimeoutError after {time.monotonic() - started:.2f} s: {error}", flush=True)
    raise  # uncaught: the runtime aborts the job
print(f"rank {gossip.rank()}: created the window after {time.monotonic() - started:.2f} s", flush=True)
gossip.shutdown()
