"""The parts of ``train.py`` and ``train_server.py`` that are not training and not settings
(:mod:`train_settings`): the optimizer and topology from the settings, data and models, the
progress bar, logs and plots. Kept apart so that the two scripts read top to bottom as training
loops.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from language_model import CharTransformer, validation_loss
from train_settings import BASE_KEYWORDS, KEYWORDS, fail, plural, uses_topology

import algorithms
import gossip
import topologies
from gossip.tools.data import (
    BatchStream,
    Split,
    TextSplit,
    load_digits,
    load_mnist1d,
    load_python_source,
    partition,
    synthetic_classification,
)

TERMINAL = "GOSSIPRUN_STDOUT_IS_TERMINAL"  # set by gossiprun: "1" if its own stdout is a terminal
LAUNCHED = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")  # set by mpirun / srun


# --- the optimizer --------------------------------------------------------------------------------

def make_optimizer(args: argparse.Namespace, model: torch.nn.Module, data: Split, device: torch.device,
                   samples_per_epoch: int):
    """``algorithms.create(args.algorithm, ...)`` with the options it accepts (collective: it
    broadcasts rank 0's model). ``samples_per_epoch``: per rank; CR-PSGD's budget is --epochs of them."""
    spec = algorithms.spec(args.algorithm)
    base = algorithms.spec(args.base) if spec.needs_base else spec
    n = gossip.size()
    hyper = {"lr": args.lr, "weight_decay": args.weight_decay}
    for option, keyword in KEYWORDS.items():
        owner = base if option in BASE_KEYWORDS else spec
        value = getattr(args, option)
        if option == "topology":
            if uses_topology(owner, args):
                hyper["topology"] = make_topology(args, n, model, data, device)
        elif value is not None and owner.accepts(keyword):
            hyper[keyword] = value
    if spec.kind == "growing-batch":
        hyper.update(budget=args.epochs * samples_per_epoch, first_batch=args.batch_size, growth=args.batch_growth)
    if isinstance(hyper.get("topology"), gossip.Scheduler):
        hyper.pop("global_avg_every", None)  # the scheduler applies --global-avg-every itself
    try:
        return algorithms.create(args.algorithm, model.parameters(), **hyper)
    except (TypeError, ValueError) as error:
        fail(f"{args.algorithm}: {error}")


def make_topology(args: argparse.Namespace, n: int, model: torch.nn.Module, data: Split, device: torch.device):
    """``--topology``: a graph or time-varying family by name, "hierarchical", "allreduce", or the
    scheduler's choice for ``auto`` (collective). With ``--elastic`` a static graph comes as a
    builder ``n -> graph``, so that the optimizer's schedule can be rebuilt for the survivors."""
    if args.topology in ("hierarchical", "allreduce"):  # machine average + one-peer exp-2 between machines;
        return args.topology  # an exact average
    if args.topology == "auto":
        return auto_schedule(args, model, data, device)
    try:
        topology = topologies.by_name(args.topology, n, seed=args.seed, local_size=gossip.local_size())
    except ValueError as error:
        fail(f"--topology {args.topology!r} on {plural(n, 'rank')}: {error}")
    if args.elastic and isinstance(topology, nx.DiGraph):  # a builder, which gossip.recover() calls for the survivors
        return lambda m: topologies.by_name(args.topology, m, seed=args.seed, local_size=gossip.local_size())
    return topology


def auto_schedule(args: argparse.Namespace, model: torch.nn.Module, data: Split,
                  device: torch.device) -> gossip.Scheduler:
    """``--topology auto`` (collective): time this model's forward and backward on one batch (the
    ranks' mean), probe the links, and let :class:`gossip.Scheduler` choose for the model's bytes."""
    x, y = data.x_train[:args.batch_size].to(device), data.y_train[:args.batch_size].to(device)
    rng, times = torch.get_rng_state(), []
    for _ in range(5):
        began = time.perf_counter()
        loss_of(model, x, y).backward()
        times.append(time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    compute = gossip.metrics.mean_over_ranks(float(np.median(times[1:])))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return gossip.Scheduler.auto(nbytes, compute_seconds=compute, global_avg_every=args.global_avg_every)


@dataclass
class RunPlan:
    """This rank's part of a run on some number of ranks: its data stream (its shard of the training
    set), the per-step batch sizes, the steps of each epoch, and whether the batches grow (fixed by
    the optimizer, CR-PSGD)."""

    stream: BatchStream
    batch_sizes: list[int]
    epochs: list[range]
    growing: bool


def samples_per_epoch(args: argparse.Namespace, data: Split, n: int) -> int:
    """Samples one rank draws per epoch on ``n`` ranks: whole steps of ``--batch-size`` covering the
    training set once between them."""
    return math.ceil(len(data.x_train) / (n * args.batch_size)) * args.batch_size


def plan_run(args: argparse.Namespace, data: Split, device: torch.device, optimizer, n: int, rank: int) -> RunPlan:
    """The run on ``n`` ranks as ``rank`` sees it: its shard (iid or ``--alpha`` label skew), its batch
    stream, and the steps: fixed batches, or CR-PSGD's growing ones within the same per-rank budget."""
    shard = partition(data.y_train, n, args.alpha, seed=args.seed)[rank]
    stream = BatchStream(data.x_train[shard].to(device), data.y_train[shard].to(device), args.batch_size,
                         seed=args.seed * 100_003 + rank)
    per_rank = samples_per_epoch(args, data, n)
    growing = algorithms.spec(args.algorithm).kind == "growing-batch"
    batch_sizes = list(optimizer.batch_sizes) if growing else [args.batch_size] * (per_rank // args.batch_size *
                                                                                   args.epochs)
    return RunPlan(stream, batch_sizes, epoch_steps(batch_sizes, per_rank, args.epochs), growing)


def epoch_steps(batch_sizes: list[int], samples_per_epoch: int, epochs: int) -> list[range]:
    """The steps of each epoch: step t belongs to the epoch in which its first sample falls (with
    growing batches a late epoch may have no step of its own)."""
    bounds, consumed, epoch = [0] * (epochs + 1), 0, 0
    for t, size in enumerate(batch_sizes):
        while epoch < epochs - 1 and consumed >= (epoch + 1) * samples_per_epoch:
            epoch += 1
            bounds[epoch] = t
        consumed += size
    for later in range(epoch + 1, epochs + 1):
        bounds[later] = len(batch_sizes)
    return [range(bounds[e], bounds[e + 1]) for e in range(epochs)]


# --- data and models ------------------------------------------------------------------------------

def load_dataset(args: argparse.Namespace) -> Split:
    if args.dataset == "digits":
        return load_digits(flat=args.model != "cnn", seed=args.seed)
    if args.dataset == "python-source":  # offline text: byte windows of the standard library's source
        return load_python_source(context=args.context, max_train_chars=args.samples * args.context + 1, seed=args.seed)
    if args.model == "cnn":
        fail("--model cnn is for the 8x8 digits images; use --model mlp")
    if args.dataset == "mnist1d":
        return load_mnist1d(seed=args.seed)
    if args.dataset == "synthetic":
        return synthetic_classification(args.samples, args.features, seed=args.seed)
    if ":" in args.dataset:  # the hook for a user's own data
        module, function = args.dataset.split(":", 1)
        try:
            split = getattr(importlib.import_module(module), function)()
        except (ImportError, AttributeError) as error:
            fail(f"--dataset {args.dataset}: {error}")
        if not isinstance(split, Split):
            fail(f"--dataset {args.dataset} must return gossip.tools.data.Split, got {type(split).__name__}")
        return split
    fail(f"unknown --dataset {args.dataset!r}: digits, mnist1d, synthetic or module:function")


def make_model(args: argparse.Namespace, data: Split) -> torch.nn.Module:
    if args.model == "char-transformer":
        return CharTransformer(data.vocab_size, data.context, width=args.hidden)
    classes = data.num_classes
    if args.model == "cnn":
        c = args.hidden // 2
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(c * 16, args.hidden), torch.nn.ReLU(),
            torch.nn.Linear(args.hidden, classes))
    features = data.x_train[0].numel()
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(features, args.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
                               torch.nn.Linear(args.hidden, classes))


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every prediction: logits (batch, classes) or (batch, length, vocabulary)."""
    return F.cross_entropy(model(x).flatten(0, -2), y.flatten())


def evaluate(model: torch.nn.Module, data: Split, device: torch.device) -> float:
    """The per-epoch measure: test accuracy, or a language model's validation loss (nats per token)."""
    x, y = data.x_test.to(device), data.y_test.to(device)
    return validation_loss(model, x, y) if isinstance(data, TextSplit) else accuracy(model, x, y)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


@torch.no_grad()
def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    return sum(float(F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
               for i in range(0, len(x), batch)) / len(x)


# --- progress, logs and plots ---------------------------------------------------------------------

def output_is_terminal() -> bool:
    """Whether rank output reaches a terminal. Under gossiprun the launcher says so (Open MPI hands
    ranks a pseudo-terminal even when its own output goes to a file); under plain mpirun or srun,
    no; run directly, ask stdout."""
    told = os.environ.get(TERMINAL)
    if told is not None:
        return told == "1"
    if any(name in os.environ for name in LAUNCHED):
        return False
    return sys.stdout.isatty()


class Progress:
    """A one-line progress bar on rank 0: with ``--progress``, or by default when the output is a
    terminal (:func:`output_is_terminal`)."""

    def __init__(self, wanted: bool | None) -> None:
        self.enabled = gossip.rank() == 0 and (output_is_terminal() if wanted is None else wanted)

    def update(self, epoch: int, epochs: int, step: int, steps: int, loss: torch.Tensor) -> None:
        if self.enabled:
            done = int(30 * step / steps)
            bar = "#" * done + "." * (30 - done)
            print(f"\repoch {epoch + 1}/{epochs} [{bar}] {step}/{steps} loss {loss.item():.4f}", end="", flush=True)

    def clear(self) -> None:
        if self.enabled:
            print("\r" + " " * 90 + "\r", end="", flush=True)


class Log:
    """Rank 0's per-epoch records: printed, and written as CSV and JSON (and a PNG at the end)."""

    def __init__(self, directory: str, settings: dict, resumed_records: list[dict] | None = None) -> None:
        self.directory = Path(directory)
        self.settings = {k: v for k, v in settings.items() if k != "given"}
        self.records: list[dict] = list(resumed_records or [])
        self.failures: list[dict] = []  # --elastic: the failures survived (train_elastic.Elastic.failures)
        self.started = time.perf_counter() - (self.records[-1]["wall_seconds"] if self.records else 0.0)

    def add(self, **record) -> None:
        """Record (and on rank 0 print and write) one epoch; an epoch recorded before replaces it (an
        epoch's end done again after a failure, --elastic)."""
        record["wall_seconds"] = time.perf_counter() - self.started
        self.records = [r for r in self.records if r.get("epoch") != record.get("epoch")] + [record]
        if gossip.rank() != 0:
            return
        head = f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  "
        if "staleness_mean" in record:  # the parameter server's record
            line = (f"test acc (server model) {100 * record['test_accuracy']:5.2f}%  staleness mean "
                    f"{record['staleness_mean']:.1f} max {record['staleness_max']}  "
                    f"{record['samples_per_second']:,.0f} samples/s")
        else:
            if "validation_loss_averaged" in record:
                measured = (f"validation loss (averaged) {record['validation_loss_averaged']:.4f} = "
                            f"{record['validation_loss_averaged'] / math.log(2):.3f} bits/char  (rank 0) "
                            f"{record['validation_loss_rank0']:.4f}")
            else:
                measured = (f"test acc (averaged) {100 * record['test_accuracy_averaged']:5.2f}%  "
                            f"(rank 0) {100 * record['test_accuracy_rank0']:5.2f}%")
            line = (f"{measured}  consensus {record['consensus_distance']:.2e}  "
                    f"{record['samples_per_second']:,.0f} samples/s  "
                    f"communication {100 * record['communication_share']:4.1f}% of step time, "
                    f"{record['bytes_sent_per_rank'] / 1e6:.2f} MB sent/rank")
        print(head + line, flush=True)
        self.write()

    def write(self) -> None:
        """Rank 0: ``log.csv`` and ``log.json`` in the log directory (made if missing)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
            writer.writeheader()
            writer.writerows(self.records)
        log = {"settings": self.settings, "epochs": self.records, **({"failures": self.failures} if self.failures
                                                                      else {})}
        (self.directory / "log.json").write_text(json.dumps(log, indent=1))

    def finish(self, trace: Path | None) -> None:
        """Rank 0: the logs (also those of a resumed run that had nothing left to train), the plot, and
        where every output went (``trace``: this rank's timeline file)."""
        if gossip.rank() != 0:
            return
        if self.records:
            self.write()
        plot = self.plot() if self.records else None
        if self.records:
            print(f"wrote {self.directory}/log.csv, log.json" + (f" and {plot.name}" if plot else ""))
        if trace is not None:
            every = trace.name.replace(".rank0", ".rank<r>")
            print(f"wrote the timeline: {trace.parent / every} for r = 0..{gossip.size() - 1} "
                  "(open in https://ui.perfetto.dev)")

    def plot(self) -> Path | None:
        try:
            import matplotlib
        except ImportError:
            print("(matplotlib not installed: no plot; pip install 'gossip-mpi[examples]')")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.records]
        wall = [r["wall_seconds"] for r in self.records]
        server = "test_accuracy" in self.records[0]
        text = "validation_loss_averaged" in self.records[0]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, xs, label in ((axes[0], epochs, "epoch"), (axes[1], wall, "wall time (s)")):
            axis.plot(xs, [r["train_loss"] for r in self.records], "C0-", label="training loss")
            axis.set_xlabel(label)
            axis.set_ylabel("training loss", color="C0")
            twin = axis.twinx()
            if server:
                twin.plot(xs, [100 * r["test_accuracy"] for r in self.records], "C1-", label="server model")
            elif text:
                twin.plot(xs, [r["validation_loss_averaged"] for r in self.records], "C1-", label="averaged")
                twin.plot(xs, [r["validation_loss_rank0"] for r in self.records], "C2--", label="rank 0")
            else:
                twin.plot(xs, [100 * r["test_accuracy_averaged"] for r in self.records], "C1-", label="averaged")
                twin.plot(xs, [100 * r["test_accuracy_rank0"] for r in self.records], "C2--", label="rank 0")
            twin.set_ylabel("validation loss (nats/char)" if text else "test accuracy (%)")
            twin.legend(loc="center right")
        where = "" if server else f" on {self.settings['topology']}"
        fig.suptitle(f"{self.settings['algorithm']}{where}, {plural(gossip.size(), 'rank')}, "
                     f"{self.settings['dataset']}")
        fig.tight_layout()
        path = self.directory / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
