"""Decentralized training with gossip: ``gossiprun -np 4 python mpirun_examples/train.py`` (or mpirun, srun).

Every rank trains its own copy of a small network on its own shard of the data (iid, or
label-skewed with ``--alpha``); the optimizer from ``algorithms`` mixes the copies with the
neighbours on ``--topology`` at every step (or averages gradients with allreduce for ``pmsgd``,
or the models every ``--period`` steps for local SGD and SlowMo). By default: scikit-learn's
digits (offline), an MLP, DmSGD on one-peer exponential-2. Rank 0 prints one line per epoch
(training loss, test accuracy of the averaged model and of rank 0's model, consensus distance,
samples/s, share of step time blocked in communication) and writes ``log.csv``, ``log.json`` and
``curves.png`` to ``--log-dir`` (a previous run there is kept unless ``--overwrite``).

Options may come from ``--config run.toml`` (or YAML); the command line wins; ``--help`` lists
them with their defaults. Checkpoints (``--checkpoint-dir``) are rank-consistent and atomic; with
``--resume`` the run continues bitwise as if it had never stopped, or, on another number of ranks,
from the averaged model (``train_checkpoints.py``). SIGTERM or SIGUSR1 (Slurm's warning before
the time limit) makes every rank stop after the same step, write a checkpoint and exit with
status 3. ``--timeline trace.json``
writes a Chrome/Perfetto trace per rank. A stuck communication op fails the job after
``--op-timeout`` seconds; a NaN/Inf loss or parameter stops it, naming the step. Your own data:
``--dataset mypackage.mymodule:load`` where ``load()`` returns ``gossip.tools.data.Split``.
``adpsgd`` gossips asynchronously through one-sided windows (epochs end together, for the log).
Parameter-server training (asgd, asgdm, ormo, ormo-da) is ``train_server.py``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from train_checkpoints import STOPPED, Checkpoints, Position, StopSignal
from train_settings import device_of, parse_args, plural, say, step_delay, takes_topology
from train_support import Log, Progress, accuracy, epoch_steps, load_dataset, make_model, make_optimizer

import algorithms
import gossip
from gossip.tools import metrics, timeline
from gossip.tools.data import BatchStream, partition


def main() -> int:
    args = parse_args()  # command line over --config over defaults; a bad setting: one line, exit status 2
    gossip.init(op_timeout=args.op_timeout, timeline=args.timeline)  # ranks from mpirun / mpiexec / srun
    n, rank = gossip.size(), gossip.rank()
    device = device_of(args)

    data = load_dataset(args)
    shard = partition(data.y_train, n, args.alpha, seed=args.seed)[rank]  # this rank's part of the data
    stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                         seed=args.seed * 100_003 + rank)
    steps_per_epoch = math.ceil(len(data.x_train) / (n * args.batch_size))  # the same on every rank
    torch.manual_seed(args.seed)
    model = make_model(args, data).to(device)
    optimizer = make_optimizer(args, model, data, device, steps_per_epoch * args.batch_size)  # rank 0's model to all
    # Per-step batch sizes: fixed, or CR-PSGD's growing ones within the same per-rank sample budget.
    growing = algorithms.spec(args.algorithm).kind == "growing-batch"
    batch_sizes = optimizer.batch_sizes if growing else [args.batch_size] * (steps_per_epoch * args.epochs)
    epochs = epoch_steps(batch_sizes, steps_per_epoch * args.batch_size, args.epochs)

    # SIGTERM/SIGUSR1 from here on: a checkpoint at a step all ranks agree on (every 10 steps; asynchronous
    # gossip, whose ranks do not wait for each other within an epoch: at the end of each epoch)
    stop = StopSignal(steps_per_epoch if algorithms.spec(args.algorithm).kind == "asynchronous-gossip" else 10)
    checkpoints = Checkpoints(args, model, optimizer, stream, batch_sizes, epochs)
    at, records = Position(), []  # where training starts: the beginning, unless --resume finds a checkpoint
    if args.resume:  # on the same number of ranks bitwise; on another from the averaged model
        at, records, how = checkpoints.resume()
        say(how)
    log = Log(args.log_dir, vars(args), records)
    batches = (f"{args.batch_size} per rank per step" if len(set(batch_sizes)) == 1 else
               f"batches growing {batch_sizes[0]} -> {max(batch_sizes)} per rank")
    where = f" on {args.topology}" if takes_topology(args) else ""
    say(f"{args.algorithm}{where}, {plural(n, 'rank')}, {args.dataset}: {len(data.x_train)} training samples, "
        f"{batches}, {len(batch_sizes)} steps, {optimizer.x.numel():,} parameters\n"
        f"communication: {optimizer.describe()}")
    if at.epoch >= args.epochs:
        say(f"the run in {args.checkpoint_dir} has finished its {at.epoch} epochs: nothing to train "
            "(a larger --epochs continues it)")
    progress, delay = Progress(args.progress), step_delay(args, rank)

    for epoch in range(at.epoch, args.epochs):
        steps, began = epochs[epoch], time.perf_counter()
        todo = range(max(steps.start, at.step), steps.stop)  # the whole epoch, unless resumed within it
        loss_sum = at.loss_sum if epoch == at.epoch and at.loss_sum is not None else torch.zeros((), device=device)
        gossip.reset_waited()
        for step in todo:
            stream.batch_size = batch_sizes[step]
            x, y = stream.next()
            optimizer.zero_grad()
            with timeline.span("forward"):
                loss = F.cross_entropy(model(x), y)
            with timeline.span("backward"):
                loss.backward()
            with timeline.span("optimizer step"):
                optimizer.step()  # the local update and this step's communication
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                         f"{step - steps.start + 1}: training diverged (lower --lr?)")
            loss_sum += loss.detach()
            if delay:
                time.sleep(delay)  # --slow-ranks
            progress.update(epoch, args.epochs, step - steps.start + 1, len(steps), loss)
            if stop.agreed(step + 1):  # SIGTERM/SIGUSR1 on some rank: every rank stops after this same step
                break
        progress.clear()
        if stop.stopped:
            optimizer.synchronize()
            saved = checkpoints.save(epoch, step + 1, loss_sum, log.records) if args.checkpoint_dir else None
            say(f"stopped by {stop.name} after step {step + 1 - steps.start} of epoch {epoch + 1}: " +
                (f"checkpoint {saved}; --resume continues" if saved else "no --checkpoint-dir, nothing saved"))
            break
        seconds, waited = time.perf_counter() - began, gossip.waited_seconds()
        if not torch.isfinite(optimizer.x).all():
            raise FloatingPointError(f"rank {rank}: NaN/Inf in the parameters after epoch {epoch + 1}")
        optimizer.synchronize()  # finish communication in flight before measuring the models
        if steps:  # with growing batches (cr-psgd) an epoch may hold no step of its own: nothing to log
            own, averaged, distance = metrics.evaluate_averaged(
                optimizer.x, lambda: accuracy(model, data.x_test.to(device), data.y_test.to(device)))
            log.add(epoch=epoch + 1, train_loss=metrics.mean_over_ranks(loss_sum.item() / len(steps)),
                    test_accuracy_averaged=averaged, test_accuracy_rank0=own, consensus_distance=distance,
                    samples_per_second=n * sum(batch_sizes[t] for t in todo) / seconds,
                    communication_share=metrics.mean_over_ranks(waited / seconds), steps=steps.stop)
        if args.checkpoint_dir and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            checkpoints.save(epoch + 1, steps.stop, torch.zeros(()), log.records)

    optimizer.close()  # e.g. adpsgd frees its window
    log.finish(timeline.stop())
    gossip.shutdown()
    return STOPPED if stop.stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
