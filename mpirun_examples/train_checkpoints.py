"""train.py's checkpoints: what each rank saves, resuming on the same or on another number of ranks,
and stopping cleanly on a signal.

* **Same number of ranks**: each rank loads its own model, optimizer, data position, RNG and the
  partial epoch's loss (:func:`gossip.tools.checkpoint.load`); the run continues bitwise as if it
  had never stopped, also from a checkpoint written in the middle of an epoch.
* **Another number of ranks** (a checkpoint of N ranks resumed on M ≠ N, e.g. a requeued Slurm job
  given fewer nodes): :func:`gossip.tools.checkpoint.load_combined` averages the N models; the
  optimizer state is combined buffer by buffer as :data:`COMBINE` says (averaged where it goes
  with the averaged model, restarted where it is each rank's own; an optimizer with a buffer
  :data:`COMBINE` does not know is refused, naming it); the data is re-split for M ranks, and the
  step, the position in each rank's data and the epoch's loss so far are those an M-rank run would
  have after the same share of the epoch (rounded down: a few samples may be seen twice, none
  skipped); the RNG state is rank 0's (every rank of train.py draws alike). One line says so:
  ``resumed from 8 ranks onto 4: models averaged; ...``. Checkpoints written afterwards have M ranks.
* **A finished run** (its last epoch checkpointed) resumed with the same ``--epochs`` has nothing
  to train: it says so, writes the run's log to ``--log-dir`` and exits with status 0; a larger
  ``--epochs`` extends it (except for growing batches, whose sizes follow from ``--epochs``).
* The settings that define the run (:data:`RUN_SETTINGS`) must be the checkpoint's: a different
  ``--lr`` would be silently replaced by the saved one, a different model or algorithm cannot load.
* **Signals**: SIGTERM or SIGUSR1 (Slurm's warning before the time limit, ``#SBATCH
  --signal=B:USR1@120``; a preemption) asks for a checkpoint. A signal reaches the ranks at
  different steps, so they agree on one: every :attr:`StopSignal.every` steps each rank
  contributes whether it got one to an allgather, and all ranks stop after the same step, write a
  checkpoint there, and exit with status :data:`STOPPED`; ``--resume`` continues bitwise.

Checkpoint directories are numbered by the steps taken since the run began (across changes of the
number of ranks, so the numbers only grow).
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass

import torch
from train_settings import fail, plural

import algorithms
import gossip
from gossip.tools import checkpoint

STOPPED = 3  # train.py's exit status after a signal: the checkpoint is written, --resume continues
# Settings an optimizer's or the data's state depends on: a resumed run must use the checkpoint's.
# --topology may change with the number of ranks (another graph may be needed on M ranks).
RUN_SETTINGS = ("algorithm", "base", "topology", "lr", "momentum", "weight_decay", "batch_size", "global_avg_every",
                "period", "slow_lr", "slow_momentum", "warmup_steps", "batch_growth", "seed", "dataset", "alpha",
                "samples", "features", "model", "hidden", "inner", "outer_lr", "outer_momentum", "nesterov",
                "fragments", "sync_delay", "mix", "compressor", "consensus_step", "context")
AVERAGED, RESTARTED, PUSH_SUM = "averaged", "restarted", "push-sum"
# How each optimizer buffer (``buffer_names`` in algorithms/) is combined from N ranks onto M:
COMBINE = {
    # heavy-ball momentum (dmsgd, decentlam, awc-/da-dmsgd, pmsgd, local-sgd, sgp, d2, adpsgd, cr-psgd):
    # linear in the gradients, so the ranks' mean momentum is the momentum of the mean iterates
    "momentum_buffer": AVERAGED,
    "quasi_global_momentum": AVERAGED,  # qg-dmsgd: the same, for the quasi-global direction
    "anchor": AVERAGED,  # cr-psgd-catalyst: the proximal centre y, equal on every rank
    # D² (Tang et al., ICML 2018): each rank's previous iterate and direction on the old W; restarted,
    # the next step takes the first-step form (as after reset_state)
    "previous_x": RESTARTED, "previous_direction": RESTARTED,
    # gradient tracking (Nedić et al., SIAM J. Optim. 2017): y_i tracks the mean gradient over the old
    # shards; restarted, y^0 = g^0 on the new shards
    "tracker": RESTARTED, "mixed_tracker": RESTARTED, "previous_gradient": RESTARTED,
    # SGP (Assran et al., ICML 2019): numerators and masses; the model becomes the push-sum average
    # Σ x_i / Σ w_i, push-sum restarts from it with mass 1 on every rank (the masses sum to M)
    "numerator": PUSH_SUM,
    # DiLoCo (Douillard et al., 2023): the outer loop's start point θ, equal on every rank with the exact
    # average (gossiped: each rank's own, averaged as the models are); averages in flight are dropped
    "start": AVERAGED,
    # CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019): the public copies x̂ and their mix s; restarted from
    # zero, as after a recovery (a copy must be the same on every rank that holds it)
    "x_hat": RESTARTED, "s": RESTARTED,
    # gossip-wrapper with gradient allreduce every K steps: the gradient summed so far in this round;
    # restarted (zero), the round starts again on the new shards
    "accumulated_gradient": RESTARTED,
}
# SlowMo, BMUF, MAVG: the outer loop's start point and momentum are equal on every rank; averaged.


@dataclass
class Position:
    """Where training stands: the epoch in progress (0-based; ``epochs`` when finished), the next step
    of the run's schedule, this rank's loss summed over that epoch's steps so far, and the steps
    taken since the run began (which numbers the checkpoints)."""

    epoch: int = 0
    step: int = 0
    loss_sum: torch.Tensor | None = None
    taken: int = 0


class Checkpoints:
    """train.py's checkpoints in ``--checkpoint-dir``: :meth:`save` (collective) and :meth:`resume` (collective)."""

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module, optimizer, stream,
                 batch_sizes: list[int], epochs: list[range]) -> None:
        self.args, self.model, self.optimizer, self.stream = args, model, optimizer, stream
        self.batch_sizes, self.epochs = batch_sizes, epochs
        self.device = optimizer.x.device
        self.offset = 0  # steps taken since the run began, minus the schedule's step (they differ after a resize)
        self.redone = False  # after a failure (--elastic): the checkpoint about to be written may exist already

    def moved(self, run, at: Position) -> None:
        """After a failure (--elastic): the run goes on as ``run`` (stream, batch sizes, epochs) from ``at``."""
        self.stream, self.batch_sizes, self.epochs = run.stream, run.batch_sizes, run.epochs
        self.offset, self.redone = at.taken - at.step, True

    def save(self, epoch: int, step: int, loss_sum: torch.Tensor, records: list[dict]):
        """Collective: the checkpoint of every rank before ``step`` of ``epoch``; returns its directory."""
        if self.redone:  # the survivors of a failure during a save: it may have been published before it
            self.redone, saved = False, checkpoint.latest(self.args.checkpoint_dir)
            if saved is not None and saved.step == step + self.offset:
                return saved.path
        first = self.epochs[epoch].start if epoch < len(self.epochs) else step
        position = {"epoch": epoch, "step": step, "taken": step + self.offset, "loss_sum": loss_sum.detach().cpu(),
                    "epoch_steps": step - first, "epoch_samples": sum(self.batch_sizes[first:step])}
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "data": self.stream.state_dict(), "rng": torch.get_rng_state(), "position": position,
                 "log": records}
        info = {"epoch": epoch, "epochs": self.args.epochs,
                "settings": {name: getattr(self.args, name) for name in RUN_SETTINGS}}
        return checkpoint.save(self.args.checkpoint_dir, step + self.offset, state, info=info)

    def resume(self) -> tuple[Position, list[dict], str]:
        """Collective: load the newest checkpoint into the model, optimizer and data stream; returns where
        training stands, the log so far and one line saying what was done (a fresh start if there is none)."""
        directory, n = self.args.checkpoint_dir, gossip.size()
        saved = checkpoint.latest(directory)
        if saved is None:
            return Position(), [], f"--resume: no checkpoint in {directory} yet: starting from the beginning"
        check_resumable(self.args, saved, n)
        if saved.ranks == n:
            _, state = checkpoint.load(directory)
            p = state["position"]
            into = f", {plural(p['epoch_steps'], 'step')} into epoch {p['epoch'] + 1}" if p["epoch_steps"] else ""
            position = Position(p["epoch"], p["step"], p["loss_sum"], p["taken"])
            message = f"resumed from {saved.path} after epoch {p['epoch']}{into}"
        else:
            saved, state = checkpoint.load_combined(directory, rule=_rule)
            position, where = self._rederive(state, saved.ranks)
            notes = combine_optimizer_state(state["optimizer"], self.args.algorithm, saved.ranks, n, position.step)
            message = (f"resumed from {saved.ranks} ranks onto {n}: models averaged; {notes}; data re-split for "
                       f"{n} ranks ({saved.path}: {where})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.stream.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        inner = _inner(self.optimizer)
        if saved.ranks != n and "numerator" in inner.buffers:  # push-sum: z = Σ x_i / Σ w_i; numerator = z, mass = 1
            inner.set_parameters(inner.buffers["numerator"] / inner.mass)
        position.loss_sum = position.loss_sum.to(self.device)
        self.offset = position.taken - position.step
        return position, state["log"], message

    def _rederive(self, state: dict, ranks: int) -> tuple[Position, str]:
        """The position an M-rank run has after the share of the epoch that ``ranks`` ranks had drawn
        (``state["position"]``); sets ``state["data"]`` there; returns it and where it is, in words."""
        position, state["data"], where = rederive(state["position"], ranks, self.batch_sizes, self.epochs, self.stream)
        return position, where


def rederive(saved: dict, ranks: int, sizes: list[int], epochs: list[range], stream) -> tuple[Position, dict, str]:
    """Where a run on this job's number of ranks stands after the share of an epoch that ``ranks``
    ranks had drawn: ``saved`` holds the epoch, the samples each old rank drew in it
    (``epoch_samples``), its steps (``epoch_steps``), its loss sum and the steps taken; ``sizes`` and
    ``epochs`` are the new run's per-step batch sizes and epochs, ``stream`` this rank's new data
    stream. Returns the position (rounded down: a few samples may be seen twice, none skipped), the
    stream's state there and where it is, in words."""
    n, epoch = gossip.size(), saved["epoch"]
    if epoch >= len(epochs):
        step = first = len(sizes)
    else:
        first = step = epochs[epoch].start
        drawn, target = 0, saved["epoch_samples"] * ranks  # samples all old ranks drew in this epoch
        while step < epochs[epoch].stop and (drawn + sizes[step]) * n <= target:
            drawn, step = drawn + sizes[step], step + 1
    per_step = saved["loss_sum"] / saved["epoch_steps"] if saved["epoch_steps"] else torch.zeros(())
    data = stream_state_at(sizes, step, stream)
    into = f", {plural(step - first, 'step')} into epoch {epoch + 1}" if step > first else ""
    where = f"after epoch {epoch}{into}"
    return Position(epoch, step, per_step * (step - first), saved["taken"]), data, where


def stream_state_at(sizes: list[int], step: int, stream) -> dict:
    """The state of ``stream`` (this rank's shard) in a run with per-step batch ``sizes`` before ``step``."""
    consumed, shard = sum(sizes[:step]), len(stream.x)
    return {"epoch": consumed // shard, "position": consumed % shard, "seed": stream.seed,
            "batch_size": sizes[min(step, len(sizes) - 1)]}


def check_resumable(args: argparse.Namespace, saved: checkpoint.Saved, n: int) -> None:
    """Fail in one line if the run's defining settings (:data:`RUN_SETTINGS`) differ from those the
    checkpoint ``saved`` was written with (``--topology`` may change with the number of ranks; for
    growing batches ``--epochs`` may not, since it fixes the batch sizes)."""
    before = dict(saved.info.get("settings", {}))
    names = [s for s in RUN_SETTINGS if s != "topology" or saved.ranks == n]
    if algorithms.spec(args.algorithm).kind == "growing-batch" and "epochs" in saved.info:
        before["epochs"], names = saved.info["epochs"], [*names, "epochs"]
    changed = [s for s in names if s in before and before[s] != getattr(args, s)]
    if changed:
        flags = ", ".join(f"--{s.replace('_', '-')} {before[s]}" for s in changed)
        now = ", ".join(f"--{s.replace('_', '-')} {getattr(args, s)}" for s in changed)
        fail(f"--resume: the checkpoint in {args.checkpoint_dir} was written with {flags}; this run has {now}: "
             "resume with the checkpoint's settings, or give another --checkpoint-dir")


def combine_optimizer_state(state: dict, algorithm: str, saved_ranks: int, ranks: int, step: int) -> str:
    """Apply :data:`COMBINE` to an optimizer state averaged over ``saved_ranks`` ranks (in place) for a run
    on ``ranks`` ranks, and set its step to the schedule's ``step``; returns what was done, in words. An
    unknown buffer: :func:`fail`, naming it."""
    inner = state["base"] if "base" in state else state  # an outer loop (SlowMo, BMUF, MAVG): its base's
    ours = inner["decentralized"]
    ours["step"] = step
    done: dict[str, list[str]] = {AVERAGED: [], RESTARTED: [], PUSH_SUM: []}
    for name, buffer in ours["buffers"].items():
        how = COMBINE.get(name)
        if how is None:
            fail(f"--resume: cannot resume {algorithm} from {saved_ranks} ranks onto {ranks}: no rule "
                 f"combines its optimizer state {name!r} (known: {', '.join(COMBINE)}); resume it on "
                 f"{saved_ranks} ranks")
        if how == RESTARTED:
            buffer.zero_()
            ours["fresh"] = True
        done[how].append(name)
    if "in_flight" in state:  # DiLoCo: the old ranks' averages in flight are not this job's
        state["in_flight"] = {"fragments": [], "received": state["in_flight"]["received"][:0]}
        done[AVERAGED].append("the inner and outer optimizers' state")
    elif "outer" in state:
        done[AVERAGED].append("the outer loop's start and momentum")
    if "choco" in state:  # CHOCO-SGD on a time-varying family: one public copy per edge, all restarted
        state["choco"]["sent_copies"], state["choco"]["received_copies"] = {}, {}
    words = [f"{', '.join(names)} {how}" for how, names in done.items() if names and how != PUSH_SUM]
    if done[PUSH_SUM]:
        words.append("push-sum restarted from the push-sum average")
    return "; ".join(words) or "no optimizer state"


def _rule(path: tuple, value) -> str:
    """How :func:`gossip.tools.checkpoint.load_combined` folds a leaf: SGP's mass (a number) is averaged
    too; everything else by the default (floating-point tensors averaged, rank 0's value of the rest)."""
    if path[-1:] == ("mass",):
        return checkpoint.MEAN
    return checkpoint.default_rule(path, value)


def _inner(optimizer):
    """The optimizer that holds the buffers: an outer loop's base, or the optimizer itself."""
    return getattr(optimizer, "base", optimizer)


class StopSignal:
    """SIGTERM or SIGUSR1 asks every rank to stop after the same step (module docstring).

    ``every``: steps between the ranks' agreements (an allgather of one number per rank); for
    asynchronous gossip, whose ranks do not wait for each other within an epoch, once an epoch.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, every: int = 10) -> None:
        self.every, self.received, self.name = max(1, every), 0, None
        for number in self.SIGNALS:
            signal.signal(number, self._note)

    def _note(self, number: int, frame) -> None:
        self.received = self.received or number

    @property
    def stopped(self) -> bool:
        """Whether the ranks have agreed to stop."""
        return self.name is not None

    def agreed(self, steps: int) -> bool:
        """Collective at every ``every``-th value of ``steps`` (the schedule's steps taken, the same on every
        rank): whether any rank has received a signal; then every rank returns True at the same step."""
        if self.stopped or steps % self.every:
            return self.stopped
        received = [int(v) for v in gossip.allgather(torch.tensor([self.received], dtype=torch.int64)) if v]
        if received:
            self.name = signal.Signals(received[0]).name
        return self.stopped
