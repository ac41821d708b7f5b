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
status 3. With ``--elastic`` (under ``gossiprun --fault-tolerant``) a dead rank does not end the run:
the survivors recover, re-split the data and train on (``train_elastic.py``). ``--timeline trace.json``
writes a Chrome/Perfetto trace per rank. A stuck communication op fails the job after
``--op-timeout`` seconds; a NaN/Inf loss or parameter stops it, naming the step. Your own data:
``--dataset mypackage.mymodule:load`` where ``load()`` returns ``gossip.tools.data.Split``.
``adpsgd`` gossips asynchronously through one-sided windows (epochs end together, for the log).
Parameter-server training (asgd, asgdm, ormo, ormo-da) is ``train_server.py``.
"""

from __future__ import annotations

import functools
import time

import torch
from train_checkpoints import STOPPED, Checkpoints, Position, StopSignal
from train_elastic import Elastic, end_without_elastic
from train_settings import device_of, parse_args, plural, say, step_delay, takes_topology
from train_support import (
    Log,
    Progress,
    evaluate,
    load_dataset,
    loss_of,
    make_model,
    make_optimizer,
    plan_run,
    samples_per_epoch,
)

import algorithms
import gossip
from gossip.tools import metrics, timeline


def main() -> int:
    args = parse_args()  # command line over --config over defaults; a bad setting: one line, exit status 2
    gossip.init(op_timeout=args.op_timeout, timeline=args.timeline,  # ranks from mpirun / mpiexec / srun
                **({"fault_tolerant": True} if args.elastic else {}))
    device = device_of(args)

    data = load_dataset(args)
    torch.manual_seed(args.seed)
    model = make_model(args, data).to(device)
    optimizer = make_optimizer(args, model, data, device, samples_per_epoch(args, data, gossip.size()))  # rank 0's
    plan = functools.partial(plan_run, args, data, device, optimizer)  # a rank's data and steps on n ranks
    run = plan(gossip.size(), gossip.rank())  # this rank's shard and batch stream, the steps of each epoch

    # SIGTERM/SIGUSR1 from here on: a checkpoint at a step all ranks agree on (every 10 steps; asynchronous
    # gossip, whose ranks do not wait for each other within an epoch: at the end of each epoch)
    asynchronous = algorithms.spec(args.algorithm).kind == "asynchronous-gossip"
    stop = StopSignal(len(run.epochs[0]) if asynchronous else 10)
    checkpoints = Checkpoints(args, model, optimizer, run.stream, run.batch_sizes, run.epochs)
    at, records = Position(), []  # where training starts: the beginning, unless --resume finds a checkpoint
    if args.resume:  # on the same number of ranks bitwise; on another from the averaged model
        at, records, how = checkpoints.resume()
        say(how)
    log = Log(args.log_dir, vars(args), records)
    elastic = Elastic(args, plan) if args.elastic or args.inject_failure else None
    batches = (f"{args.batch_size} per rank per step" if not run.growing else
               f"batches growing {run.batch_sizes[0]} -> {max(run.batch_sizes)} per rank")
    where = f" on {args.topology}" if takes_topology(args) else ""
    say(f"{args.algorithm}{where}, {plural(gossip.size(), 'rank')}, {args.dataset}: {len(data.x_train)} training "
        f"samples, {batches}, {len(run.batch_sizes)} steps, {optimizer.x.numel():,} parameters\n"
        f"communication: {optimizer.describe()}")
    if at.epoch >= args.epochs:
        say(f"the run in {args.checkpoint_dir} has finished its {at.epoch} epochs: nothing to train "
            "(a larger --epochs continues it)")
    progress = Progress(args.progress)

    while at.epoch < args.epochs and not stop.stopped:  # one epoch a turn; after a failure (--elastic) the rest
        n, rank, epoch, steps = gossip.size(), gossip.rank(), at.epoch, run.epochs[at.epoch]
        delay, began, first = step_delay(args, rank), time.perf_counter(), max(steps.start, at.step)
        at.loss_sum = at.loss_sum if at.loss_sum is not None else torch.zeros((), device=device)
        gossip.reset_waited()
        sent = gossip.traffic().bytes  # this epoch's messages, to its synchronize (resumed: from the resume)
        try:
            for step in range(first, steps.stop):  # the whole epoch, unless resumed (or recovered) within it
                if elastic:
                    elastic.maybe_fail(at.taken)  # --inject-failure: this rank dies here
                run.stream.batch_size = run.batch_sizes[step]
                x, y = run.stream.next()
                optimizer.zero_grad()
                with timeline.span("forward"):
                    loss = loss_of(model, x, y)
                with timeline.span("backward"):
                    loss.backward()
                with timeline.span("optimizer step"):
                    optimizer.step()  # the local update and this step's communication
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                             f"{step - steps.start + 1}: training diverged (lower --lr?)")
                at.loss_sum += loss.detach()
                at.step, at.taken = step + 1, at.taken + 1
                if delay:
                    time.sleep(delay)  # --slow-ranks
                progress.update(epoch, args.epochs, step - steps.start + 1, len(steps), loss)
                if stop.agreed(step + 1):  # SIGTERM/SIGUSR1 on some rank: every rank stops after this same step
                    break
            progress.clear()
            if stop.stopped:
                optimizer.synchronize()
                saved = checkpoints.save(epoch, at.step, at.loss_sum, log.records) if args.checkpoint_dir else None
                say(f"stopped by {stop.name} after step {at.step - steps.start} of epoch {epoch + 1}: " +
                    (f"checkpoint {saved}; --resume continues" if saved else "no --checkpoint-dir, nothing saved"))
                break
            seconds, waited = time.perf_counter() - began, gossip.waited_seconds()
            if not torch.isfinite(optimizer.x).all():
                raise FloatingPointError(f"rank {rank}: NaN/Inf in the parameters after epoch {epoch + 1}")
            optimizer.synchronize()  # finish communication in flight before measuring the models
            sent = gossip.traffic().bytes - sent
            if steps:  # with growing batches (cr-psgd) an epoch may hold no step of its own: nothing to log
                own, averaged, distance = metrics.evaluate_averaged(optimizer.x, lambda: evaluate(model, data, device))
                measure = "validation_loss" if args.model == "char-transformer" else "test_accuracy"
                log.add(epoch=epoch + 1, train_loss=metrics.mean_over_ranks(at.loss_sum.item() / len(steps)),
                        **{f"{measure}_averaged": averaged, f"{measure}_rank0": own}, consensus_distance=distance,
                        samples_per_second=n * sum(run.batch_sizes[first:steps.stop]) / seconds,
                        communication_share=metrics.mean_over_ranks(waited / seconds),
                        bytes_sent_per_rank=metrics.mean_over_ranks(sent), steps=at.taken)
            if args.checkpoint_dir and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
                checkpoints.save(epoch + 1, steps.stop, torch.zeros(()), log.records)
            at = Position(epoch + 1, steps.stop, None, at.taken)
        except gossip.RankFailure as failure:  # only under gossiprun --fault-tolerant
            progress.clear()
            if not args.elastic:  # a fault-tolerant job without --elastic: one line, exit status 4
                return end_without_elastic(failure, at.taken)
            at, run = elastic.carry_on(failure, at, run)  # the survivors recover and plan the rest
            checkpoints.moved(run, at)
            log.failures = elastic.failures

    optimizer.close()  # e.g. adpsgd frees its window
    log.finish(timeline.stop())
    try:
        gossip.shutdown()
    except gossip.RankFailure:  # a rank died after the last epoch: the run is complete all the same
        pass
    return STOPPED if stop.stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
