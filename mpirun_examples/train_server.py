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
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from train_settings import device_of, parse_args, say, step_delay
from train_support import Log, accuracy, load_dataset, make_model, make_optimizer, mean_loss

import gossip
from gossip.tools import timeline
from gossip.tools.data import BatchStream, partition


def main() -> int:
    args = parse_args(server=True)  # the options of train.py that a parameter server uses
    gossip.init(op_timeout=args.op_timeout, timeline=args.timeline)
    n, rank = gossip.size(), gossip.rank()
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
            if optimizer.rule.t and optimizer.rule.t % updates_per_epoch == 0:
                end_epoch(optimizer.rule.t // updates_per_epoch)

        optimizer.serve(updates=args.epochs * updates_per_epoch, on_update=before_update)
        end_epoch(args.epochs)
    else:
        shard = partition(data.y_train, n - 1, args.alpha, seed=args.seed)[rank - 1]
        stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                             seed=args.seed * 100_003 + rank)
        delay = step_delay(args, rank)
        while not optimizer.stopped:  # until the server has applied its last update
            x, y = stream.next()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at the parameters of server "
                                         f"iteration {optimizer.ite}: training diverged (lower --lr?)")
            optimizer.step()  # send the gradient, receive the newest model
            if delay:
                time.sleep(delay)  # --slow-ranks

    optimizer.close()  # frees the server's communicator
    log.finish(timeline.stop())
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
