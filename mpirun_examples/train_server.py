"""Asynchronous training through a parameter server: ``gossiprun -np 4 python mpirun_examples/train_server.py``.

Rank 0 is the server: it holds the model and applies every worker's gradient the moment it
arrives, with the rule of ``--algorithm`` (``asgd``, ``asgdm``, ``ormo``, ``ormo-da``; see
``algorithms.async_sgd``). Ranks 1..n−1 are workers: each computes a gradient on its shard of the
data (split n − 1 ways, iid or label-skewed with ``--alpha``) at the model it last received and
exchanges it for the newest one, never waiting for the other workers. ``--slow-ranks`` makes some
workers slower, to see what asynchrony buys. An epoch is ``len(train) / batch_size`` updates (one
pass over the training set by all workers together); after each, the server prints and logs its
model's training loss and test accuracy and the staleness of the epoch's gradients (how many
updates the server made between a worker receiving the model and its gradient being applied).
Same data, model, logging and ``--config`` as ``train.py``.

``--elastic`` (started with ``gossiprun --fault-tolerant``, which it asks for otherwise) turns on
fault-tolerant mode. A dead worker does not stop the run: the server prints one line, ``rank 2
failed at step 57; continuing with 2 workers`` (the server step its last gradient arrived at; in
``log.json``'s ``failures`` with the step the server noticed it at), and serves
the others to the last update; the dead worker's data shard is not seen again (the others keep
their shards), and OrMo's groups follow the live workers. At the end the survivors close the
server (they agree that a rank failed) and ``gossip.recover()`` together, so the runtime shuts
down cleanly. A dead server ends the run, since the model was on it: every worker raises
``gossip.RankFailure``, the lowest-ranked one prints ``the parameter server (rank 0) failed at step
N: ...`` (N: the newest server step it had received) and every worker exits with status 4.
``--inject-failure RANK:STEP`` is a testing aid: that rank kills itself with SIGKILL, as ``kill -9``
would, once it has taken STEP steps (a worker: its gradients sent; the server: its updates applied).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from train_settings import device_of, fail, injected_failures, parse_args, plural, say, step_delay
from train_support import Log, accuracy, load_dataset, make_model, make_optimizer, mean_loss

import gossip
from gossip.tools import timeline
from gossip.tools.data import BatchStream, partition

FAILED = 4  # the exit status of the workers when the server died (train.py's when a rank died without --elastic)


def main() -> int:
    args = parse_args(server=True)  # the options of train.py that a parameter server uses
    try:
        gossip.init(op_timeout=args.op_timeout, timeline=args.timeline,
                    **({"fault_tolerant": True} if args.elastic else {}))
    except gossip.GossipError as error:  # --elastic in a job started without gossiprun --fault-tolerant
        fail(f"--elastic: {error}")
    n, rank = gossip.size(), gossip.rank()
    kill_at = injected_failures(args).get(rank)  # --inject-failure: this rank dies after that many steps
    device = device_of(args)
    data = load_dataset(args)
    torch.manual_seed(args.seed)
    model = make_model(args, data).to(device)
    optimizer = make_optimizer(args, model, data, device, 0)  # the server's model goes to every worker
    updates_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    log = Log(args.log_dir, vars(args))
    say(f"{args.algorithm}: parameter server on rank 0, {n - 1} asynchronous worker{'s' * (n > 2)}, {args.dataset}: "
        f"{len(data.x_train)} training samples, batch {args.batch_size} per gradient, {updates_per_epoch} updates "
        f"per epoch, {optimizer.x.numel():,} parameters\ncommunication: {optimizer.describe()}")

    if optimizer.is_server:
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
        x_test, y_test = data.x_test.to(device), data.y_test.to(device)
        epoch_began, first_update = time.perf_counter(), 0  # when this epoch began, and its first update

        def end_epoch(epoch: int) -> None:
            nonlocal epoch_began, first_update
            staleness = optimizer.rule.staleness[first_update:]  # t − ite of each of the epoch's updates
            seconds = time.perf_counter() - epoch_began
            log.add(epoch=epoch, train_loss=mean_loss(model, x_train, y_train),
                    test_accuracy=accuracy(model, x_test, y_test),
                    samples_per_second=updates_per_epoch * args.batch_size / seconds,
                    staleness_mean=sum(staleness) / max(1, len(staleness)), staleness_max=max(staleness, default=0))
            epoch_began, first_update = time.perf_counter(), len(optimizer.rule.staleness)

        def before_update(w, g, ite, worker) -> None:  # called before each update, after t of them
            if kill_at is not None and optimizer.rule.t >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # --inject-failure
            if optimizer.rule.t and optimizer.rule.t % updates_per_epoch == 0:
                end_epoch(optimizer.rule.t // updates_per_epoch)

        def worker_failed(worker: int, applied: int) -> None:  # --elastic: the server goes on without it
            live = len(optimizer.server.workers) - len(optimizer.server.failed)
            last = optimizer.server.last_heard.get(worker, 0)  # the step its last gradient arrived at
            say(f"rank {worker} failed at step {last}; continuing with {plural(live, 'worker')}")
            log.failures.append({"failed": [worker], "step": last, "noticed_at_step": applied, "workers": live})

        optimizer.serve(updates=args.epochs * updates_per_epoch, on_update=before_update, on_failure=worker_failed)
        end_epoch(args.epochs)
    else:
        shard = partition(data.y_train, n - 1, args.alpha, seed=args.seed)[rank - 1]
        stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                             seed=args.seed * 100_003 + rank)
        delay, taken = step_delay(args, rank), 0
        try:
            while not optimizer.stopped:  # until the server has applied its last update
                if kill_at is not None and taken >= kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # --inject-failure
                x, y = stream.next()
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at the parameters of server "
                                             f"iteration {optimizer.ite}: training diverged (lower --lr?)")
                optimizer.step()  # send the gradient, receive the newest model
                taken += 1
                if delay:
                    time.sleep(delay)  # --slow-ranks
        except gossip.RankFailure as failure:  # only under --elastic: the server died, and the model with it
            return server_failed(failure.ranks or tuple(optimizer.server.servers), max(optimizer.ite or [0]),
                                 failure)

    optimizer.close()  # frees the server's communicator; with --elastic, the survivors agree whether a rank failed
    if optimizer.server.had_failures:
        gossip.recover()  # every survivor: the runtime drops the dead workers and shuts down cleanly
    log.finish(timeline.stop())
    try:
        gossip.shutdown()
    except gossip.RankFailure:  # a rank died after the server was closed: the run is complete all the same
        pass
    return 0


def server_failed(servers: tuple[int, ...], step: int, failure: gossip.RankFailure) -> int:
    """A worker after the server (``servers``) died: one line (from the lowest-ranked worker), the
    runtime let go of, and :data:`FAILED`."""
    if gossip.rank() == min(set(range(gossip.size())) - set(servers)):
        who = ", ".join(str(r) for r in servers)
        print(f"train_server.py: the parameter server (rank {who}) failed at step {step}: {failure}", file=sys.stderr,
              flush=True)
    try:
        gossip.shutdown()
    except gossip.RankFailure:
        pass  # expected: the runtime lets go of everything without collective calls
    return FAILED


if __name__ == "__main__":
    raise SystemExit(main())
