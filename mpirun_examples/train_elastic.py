"""train.py ``--elastic``: training that goes on when ranks die.

Started under ``gossiprun --fault-tolerant`` (Open MPI's ULFM), every communication of the run
raises :class:`gossip.RankFailure` once a rank has died: a step's gossip, the end-of-epoch
evaluation, a checkpoint, the agreement on a stop signal. train.py catches it and calls
:meth:`Elastic.carry_on`, which on every survivor

1. calls :func:`gossip.recover`: the job shrinks to the survivors, the runtime and ``--topology``
   are rebuilt for the new number of ranks, and every optimizer adapts itself (its schedule, its
   step, its per-algorithm state: ``algorithms`` documents each);
2. agrees where training stands: the furthest any survivor got (survivors may have noticed the
   failure one step apart; one behind skips that step's batch rather than anyone repeating one);
3. re-splits the data among the survivors and plans the rest of the run as an M-rank run would
   have it: each epoch still passes over the training set once, in more steps on fewer ranks, and
   the position within the epoch is the share of its samples drawn so far (as ``--resume`` on
   another number of ranks). Growing batches (``cr-psgd``) keep their per-step batch sizes and
   steps, which the optimizer fixed at the start: their epochs see fewer samples;
4. prints one line, ``rank 2 failed at step 340; continuing on 3 ranks (recovered in 0.02 s)``, and
   records it in ``log.json`` (``failures``). Ranks are named as they were at launch.

Checkpoints written afterwards have M ranks. Whatever the failed ranks had computed since their
last message is lost with them: their data shards move to the survivors, their models are gone
(the survivors' average is what continues).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from train_checkpoints import Position, rederive, stream_state_at
from train_settings import injected_failures, plural, say

import gossip

FAILED = 4  # train.py's exit status when a rank died and --elastic was not given


def end_without_elastic(failure: gossip.RankFailure, taken: int) -> int:
    """A dead rank in a fault-tolerant job without --elastic: one line (from the lowest surviving rank that
    knows which rank died), the runtime let go of, and :data:`FAILED` for train.py to return."""
    n, rank = gossip.size(), gossip.rank()
    if failure.ranks and rank == min(set(range(n)) - set(failure.ranks)):
        who = ", ".join(str(r) for r in failure.ranks)
        print(f"train.py: rank{'s' if len(failure.ranks) > 1 else ''} {who} failed at step {taken}: the run ends "
              "(with --elastic the survivors would continue)", file=sys.stderr, flush=True)
    try:
        gossip.shutdown()
    except gossip.RankFailure:
        pass  # expected: the runtime lets go of everything without collective calls
    return FAILED


class Elastic:
    """The survivors' side of a failure (module docstring); ``origins[r]`` is the launch rank of rank r."""

    def __init__(self, args: argparse.Namespace, plan_run) -> None:
        self.args, self.plan_run = args, plan_run
        self.origins = list(range(gossip.size()))
        self.failures: list[dict] = []
        self.kill_at = injected_failures(args).get(gossip.rank()) if args.inject_failure else None

    def maybe_fail(self, taken: int) -> None:
        """``--inject-failure``: this rank kills itself (SIGKILL, as ``kill -9``) once ``taken`` steps are done."""
        if self.kill_at is not None and taken >= self.kill_at:
            print(f"--inject-failure: launch rank {self.origins[gossip.rank()]} kills itself after step {taken} "
                  f"(at {time.time():.6f} s)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def carry_on(self, failure: gossip.RankFailure, at: Position, run):
        """Collective over the survivors after ``failure``: recover, agree on the position, re-plan the
        run for the survivors; returns (the position, the new run plan). ``at`` is this rank's
        position, ``run`` its plan (stream, batch sizes, epochs) at the failure."""
        noticed, began = time.time(), time.perf_counter()
        record = gossip.recover()  # --topology is rebuilt from the builder train_support.make_topology gave
        failed = sorted(self.origins[r] for r in record.failed)
        self.origins = [self.origins[old] for old in sorted(record.ranks, key=record.ranks.get)]
        # where every survivor stands, in the old plan: (epoch, step) ordered, and this rank's loss so far
        mine = torch.tensor([at.epoch, at.step, at.taken], dtype=torch.int64)
        stands = gossip.allgather(mine.view(1, 3)).view(-1, 3)
        epoch, step, taken = max(tuple(int(v) for v in row) for row in stands)
        first = run.epochs[epoch].start if epoch < len(run.epochs) else step
        done = max(1, at.step - first) if at.epoch == epoch else 1
        loss_sum = (at.loss_sum if at.epoch == epoch and at.loss_sum is not None else torch.zeros(()))
        saved = {"epoch": epoch, "epoch_steps": done, "loss_sum": loss_sum.detach().cpu(), "taken": taken,
                 "epoch_samples": sum(run.batch_sizes[first:step])}
        new = self.plan_run(gossip.size(), gossip.rank())
        if new.growing:  # the optimizer fixed the per-step batch sizes: keep the steps, move the data
            position = Position(epoch, step, loss_sum if at.epoch == epoch else torch.zeros(()), taken)
            data = stream_state_at(new.batch_sizes, step, new.stream)
        else:
            position, data, _ = rederive(saved, record.old_size, new.batch_sizes, new.epochs, new.stream)
        new.stream.load_state_dict(data)
        position.loss_sum = position.loss_sum.to(at.loss_sum.device if at.loss_sum is not None else "cpu")
        seconds = time.perf_counter() - began
        who = ", ".join(str(r) for r in failed)
        say(f"rank{'s' if len(failed) > 1 else ''} {who} failed at step {taken}; continuing on "
            f"{plural(gossip.size(), 'rank')} (recovered in {seconds:.2f} s)")
        self.failures.append({"failed": failed, "step": taken, "ranks": gossip.size(), "noticed_at": noticed,
                              "resumed_at": time.time(), "recover_seconds": seconds,
                              "shrink_seconds": record.seconds, "attempts": record.attempts,
                              "message": str(failure)})
        return position, new
