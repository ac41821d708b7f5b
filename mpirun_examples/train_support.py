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
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_settings import BASE_KEYWORDS, KEYWORDS, fail, plural

import algorithms
import gossip
import topologies
from gossip.tools.data import Split, load_digits, load_mnist1d, synthetic_classification

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
            if owner.takes_topology:
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
    """``--topology``: a graph or time-varying family by name, "hierarchical", or the scheduler's
    choice for ``auto`` (collective)."""
    if args.topology == "hierarchical":  # machine average + one-peer exp-2 between machines
        return args.topology
    if args.topology == "auto":
        return auto_schedule(args, model, data, device)
    try:
        return topologies.by_name(args.topology, n, seed=args.seed, local_size=gossip.local_size())
    except ValueError as error:
        fail(f"--topology {args.topology!r} on {plural(n, 'rank')}: {error}")


def auto_schedule(args: argparse.Namespace, model: torch.nn.Module, data: Split,
                  device: torch.device) -> gossip.Scheduler:
    """``--topology auto`` (collective): time this model's forward and backward on one batch (the
    ranks' mean), probe the links, and let :class:`gossip.Scheduler` choose for the model's bytes."""
    x, y = data.x_train[:args.batch_size].to(device), data.y_train[:args.batch_size].to(device)
    rng, times = torch.get_rng_state(), []
    for _ in range(5):
        began = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - began)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    compute = gossip.metrics.mean_over_ranks(float(np.median(times[1:])))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return gossip.Scheduler.auto(nbytes, compute_seconds=compute, global_avg_every=args.global_avg_every)


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
        self.started = time.perf_counter() - (self.records[-1]["wall_seconds"] if self.records else 0.0)

    def add(self, **record) -> None:
        record["wall_seconds"] = time.perf_counter() - self.started
        self.records.append(record)
        if gossip.rank() != 0:
            return
        if "staleness_mean" in record:  # the parameter server's record
            print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  test acc (server model) "
                  f"{100 * record['test_accuracy']:5.2f}%  staleness mean {record['staleness_mean']:.1f} "
                  f"max {record['staleness_max']}  {record['samples_per_second']:,.0f} samples/s", flush=True)
        else:
            print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  "
                  f"test acc (averaged) {100 * record['test_accuracy_averaged']:5.2f}%  "
                  f"(rank 0) {100 * record['test_accuracy_rank0']:5.2f}%  "
                  f"consensus {record['consensus_distance']:.2e}  {record['samples_per_second']:,.0f} samples/s  "
                  f"communication {100 * record['communication_share']:4.1f}% of step time", flush=True)
        self.write()

    def write(self) -> None:
        """Rank 0: ``log.csv`` and ``log.json`` in the log directory (made if missing)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
            writer.writeheader()
            writer.writerows(self.records)
        (self.directory / "log.json").write_text(json.dumps({"settings": self.settings, "epochs": self.records},
                                                            indent=1))

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
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, xs, label in ((axes[0], epochs, "epoch"), (axes[1], wall, "wall time (s)")):
            axis.plot(xs, [r["train_loss"] for r in self.records], "C0-", label="training loss")
            axis.set_xlabel(label)
            axis.set_ylabel("training loss", color="C0")
            twin = axis.twinx()
            if server:
                twin.plot(xs, [100 * r["test_accuracy"] for r in self.records], "C1-", label="server model")
            else:
                twin.plot(xs, [100 * r["test_accuracy_averaged"] for r in self.records], "C1-", label="averaged")
                twin.plot(xs, [100 * r["test_accuracy_rank0"] for r in self.records], "C2--", label="rank 0")
            twin.set_ylabel("test accuracy (%)")
            twin.legend(loc="center right")
        where = "" if server else f" on {self.settings['topology']}"
        fig.suptitle(f"{self.settings['algorithm']}{where}, {plural(gossip.size(), 'rank')}, "
                     f"{self.settings['dataset']}")
        fig.tight_layout()
        path = self.directory / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
