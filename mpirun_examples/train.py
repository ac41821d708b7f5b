"""Decentralized training with gossip: ``mpirun -np 4 python mpirun_examples/train.py`` (or ``gossiprun``).

Every rank trains its own copy of a small network on its own shard of the data (iid, or
label-skewed with ``--alpha``); the optimizer from ``algorithms`` mixes the copies with the
neighbours on ``--topology`` at every step (or averages gradients with allreduce for ``pmsgd``).
By default: scikit-learn's digits (offline), an MLP, DmSGD on one-peer exponential-2. Rank 0
prints one line per epoch (training loss, test accuracy of the averaged model and of rank 0's
model, consensus distance, samples/s, share of step time blocked in communication) and writes
``log.csv``, ``log.json`` and ``curves.png`` to ``--log-dir``.

Any option can come from ``--config run.toml`` (or YAML); the command line wins. Checkpoints
(``--checkpoint-dir``, every ``--checkpoint-every`` epochs) are rank-consistent and atomic; with
``--resume`` the run continues bitwise as if it had never stopped. ``--timeline trace.json``
writes a Chrome/Perfetto trace per rank. A stuck communication op aborts the job after
``--op-timeout`` seconds; a NaN/Inf loss or parameter stops it, naming the step.
Your own data: ``--dataset mypackage.mymodule:load`` where ``load()`` returns ``gossip.data.Split``.

Asynchronous training: ``adpsgd`` gossips through one-sided windows without waiting within an
epoch (epochs end together, for the log). ``asgd``, ``asgdm``, ``ormo`` and ``ormo-da`` train
through a parameter server: rank 0 serves and logs (its model's training loss and test accuracy,
the gradients' staleness), the other n − 1 ranks are workers on the data split n − 1 ways; an
epoch is one pass over the training set by all workers together.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from train_support import (
    SERVER_ALGORITHMS,
    Log,
    Progress,
    auto_schedule,
    check_settings,
    epoch_steps,
    evaluate,
    load_dataset,
    make_model,
    optimizer_settings,
    parse_args,
    server_record,
    step_delay,
)

import algorithms
import gossip
from gossip import checkpoint, timeline
from gossip.data import BatchStream, partition


def main() -> int:
    args = parse_args()
    gossip.init()  # ranks from MPI itself, whichever launcher started us (mpirun, mpiexec, srun)
    n, rank = gossip.size(), gossip.rank()
    check_settings(args, n)
    gossip.set_op_timeout(args.op_timeout)
    if args.timeline:
        timeline.start(args.timeline)
    device = torch.device("cuda", gossip.local_rank() % torch.cuda.device_count()) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one rank per GPU: local rank -> device (NCCL, caching allocator)

    data = load_dataset(args)
    if args.algorithm in SERVER_ALGORITHMS:
        return train_with_server(args, data, device)
    shard = partition(data.y_train, n, args.alpha, seed=args.seed)[rank]
    stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                         seed=args.seed * 100_003 + rank)
    steps_per_epoch = math.ceil(len(data.x_train) / (n * args.batch_size))  # the same on every rank
    delay = step_delay(args, rank)

    torch.manual_seed(args.seed)
    model = make_model(args, data).to(device)
    hyper = optimizer_settings(args, n, steps_per_epoch * args.batch_size)
    if hyper.get("topology") == "auto":  # the scheduler's pick; its describe() is printed below
        hyper.pop("global_avg_every", None)  # the scheduler applies --global-avg-every itself
        hyper["topology"] = auto_schedule(args, model, data, device)
    try:
        optimizer = algorithms.create(args.algorithm, model.parameters(), **hyper)  # broadcasts rank 0's model
    except ValueError as error:
        raise SystemExit(f"train.py: {args.algorithm}: {error}") from error
    # Per-step batch sizes: fixed, or CR-PSGD's growing ones within the same per-rank sample budget.
    batch_sizes = getattr(optimizer, "batch_sizes", [args.batch_size] * (steps_per_epoch * args.epochs))
    epochs = epoch_steps(batch_sizes, steps_per_epoch * args.batch_size, args.epochs)

    start_epoch, records = 0, []
    if args.resume and (saved := checkpoint.load(args.checkpoint_dir)) is not None:
        _, state = saved
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        start_epoch, records = state["epoch"], state["log"]
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} after epoch {start_epoch}")
    log = Log(args.log_dir, vars(args), records)
    progress = Progress(args.progress)
    if rank == 0:
        plan = optimizer.describe() if hasattr(optimizer, "describe") else optimizer.schedule.describe()
        where = f" on {args.topology}" if "topology" in hyper else ""
        batches = (f"{args.batch_size} per rank per step" if len(set(batch_sizes)) == 1 else
                   f"batches growing {batch_sizes[0]} -> {max(batch_sizes)} per rank")
        print(f"{args.algorithm}{where}, {n} ranks, {args.dataset}: {len(data.x_train)} training samples, {batches}, "
              f"{len(batch_sizes)} steps, {optimizer.x.numel():,} parameters\ncommunication: {plan}")

    for epoch in range(start_epoch, args.epochs):
        began, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        gossip.reset_waited()
        steps = epochs[epoch]
        for step in steps:
            stream.batch_size = batch_sizes[step]
            x, y = stream.next()
            optimizer.zero_grad()
            with timeline.span("forward"):
                loss = F.cross_entropy(model(x), y)
            with timeline.span("backward"):
                loss.backward()
            with timeline.span("optimizer step"):
                optimizer.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at epoch {epoch + 1}, step "
                                         f"{step - steps.start + 1}: training diverged (lower --lr?)")
            loss_sum += loss.detach()
            if delay:
                time.sleep(delay)  # --slow-ranks
            progress.update(epoch, args.epochs, step - steps.start + 1, len(steps), loss)
        progress.clear()
        seconds, waited = time.perf_counter() - began, gossip.waited_seconds()
        if not torch.isfinite(optimizer.x).all():
            raise FloatingPointError(f"rank {rank}: NaN/Inf in the parameters after epoch {epoch + 1}")
        optimizer.synchronize()
        if steps:  # with growing batches (cr-psgd) an epoch may hold no step of its own: nothing to log
            metrics = evaluate(model, optimizer.x, data, device)
            means = gossip.allreduce(torch.tensor([loss_sum.item() / len(steps), waited / seconds]), "mean")
            log.add({"epoch": epoch + 1, "train_loss": means[0].item(), **metrics,
                     "samples_per_second": n * sum(batch_sizes[t] for t in steps) / seconds,
                     "communication_share": means[1].item(), "steps": steps.stop})
        if args.checkpoint_dir and ((epoch + 1) % args.checkpoint_every == 0 or epoch + 1 == args.epochs):
            checkpoint.save(args.checkpoint_dir, epoch + 1, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "data": stream.state_dict(),
                "rng": torch.get_rng_state(), "epoch": epoch + 1, "log": log.records})

    if hasattr(optimizer, "finish"):
        optimizer.finish(average=False)  # asynchronous gossip: free its window
    if (plot := log.plot()) is not None:
        print(f"wrote {plot.parent}/log.csv, log.json and {plot.name}")
    gossip.shutdown()  # writes the timeline, if any
    return 0


def train_with_server(args, data, device: torch.device) -> int:
    """Asynchronous SGD with a parameter server: rank 0 applies gradients as they arrive and logs
    every epoch (``len(train) / batch_size`` updates); ranks 1..n−1 compute gradients on their shards."""
    n, rank = gossip.size(), gossip.rank()
    torch.manual_seed(args.seed)
    model = make_model(args, data).to(device)
    try:
        optimizer = algorithms.create(args.algorithm, model.parameters(), **optimizer_settings(args, n, 0))
    except ValueError as error:
        raise SystemExit(f"train.py: {args.algorithm}: {error}") from error
    updates_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    log = Log(args.log_dir, vars(args))
    if optimizer.is_server:
        print(f"{args.algorithm}: parameter server on rank 0, {n - 1} asynchronous workers, {args.dataset}: "
              f"{len(data.x_train)} training samples, batch {args.batch_size} per gradient, "
              f"{updates_per_epoch} updates per epoch, {optimizer.x.numel():,} parameters")
        began = [time.perf_counter(), 0]  # when the epoch began, and the staleness records it began at

        def end_epoch(epoch: int) -> None:
            seconds = time.perf_counter() - began[0]
            staleness = optimizer.rule.staleness[began[1]:]
            log.add(server_record(model, data, device, epoch, staleness, updates_per_epoch * args.batch_size / seconds))
            began[:] = [time.perf_counter(), len(optimizer.rule.staleness)]

        def on_update(w, g, ite, worker) -> None:  # before each update: after t updates
            if optimizer.rule.t and optimizer.rule.t % updates_per_epoch == 0:
                end_epoch(optimizer.rule.t // updates_per_epoch)

        optimizer.serve(updates=args.epochs * updates_per_epoch, on_update=on_update)
        end_epoch(args.epochs)
    else:
        shard = partition(data.y_train, n - 1, args.alpha, seed=args.seed)[rank - 1]
        stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                             seed=args.seed * 100_003 + rank)
        delay = step_delay(args, rank)
        while not optimizer.stopped:
            x, y = stream.next()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {rank}: the loss is {loss.item()} at the parameters of server "
                                         f"iteration {optimizer.ite}: training diverged (lower --lr?)")
            optimizer.step()
            if delay:
                time.sleep(delay)  # --slow-ranks
    if (plot := log.plot()) is not None:
        print(f"wrote {plot.parent}/log.csv, log.json and {plot.name}")
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
