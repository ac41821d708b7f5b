"""The parts of ``train.py`` that are not training: configuration, data and models, metrics, logs, plots.

Kept apart so that ``train.py`` reads top to bottom as the training loop itself.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import algorithms
import gossip
import topologies
from gossip.data import Split, load_digits, load_mnist1d, synthetic_classification

DEFAULTS = {
    "algorithm": "dmsgd", "topology": "one-peer-exp2", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
    "batch_size": 32, "epochs": 20, "global_avg_every": None, "seed": 0, "dataset": "digits", "alpha": None,
    "samples": 20000, "features": 64, "model": "mlp", "hidden": 64, "checkpoint_dir": None, "checkpoint_every": 1,
    "resume": False, "timeline": None, "device": "cpu", "log_dir": "results/train", "op_timeout": 300.0,
    "progress": True, "period": None, "base": "local-sgd", "slow_lr": None, "slow_momentum": None,
    "warmup_steps": 0, "batch_growth": 2.0, "slow_ranks": "", "slow_delay": 0.02,
}
SERVER_ALGORITHMS = ("asgd", "asgdm", "ormo", "ormo-da")  # rank 0 serves, the others work
GOSSIP_FREE = ("pmsgd", "local-sgd", "mavg", "cr-psgd", "cr-psgd-catalyst", *SERVER_ALGORITHMS)  # no --topology
WITHOUT_MOMENTUM = ("dsgd", "dsgd-awc", "gradient-tracking", "mavg", "cr-psgd-catalyst", "asgd")  # nor --momentum
FIXED_TOPOLOGY = {"d2": "a static symmetric W", "sgp": "push-sum over a graph", "adpsgd": "windows on a graph"}
OUTER = ("slowmo", "bmuf")  # these run --base between their averages
PERIODIC = ("local-sgd", "mavg", *OUTER)  # these take --period


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over an optional ``--config`` file (TOML or YAML) over :data:`DEFAULTS`."""
    parser = argparse.ArgumentParser(description="Decentralized training with gossip (see mpirun_examples/train.py)")
    parser.add_argument("--config", help="TOML or YAML file whose keys are the long options below (dashes or _)")
    parser.add_argument("--algorithm", help=f"one of {', '.join(algorithms.available())}")
    parser.add_argument("--topology", help="a name from topologies.topology_names(), e.g. ring, exp2, one-peer-exp2; "
                        "hierarchical (average within each machine, one-peer exp-2 between machines); or auto "
                        "(gossip.Scheduler picks from the probed links, the model size and its compute time)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--batch-size", type=int, help="per rank")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--global-avg-every", type=int, help="Gossip-PGA: exact average every H steps")
    parser.add_argument("--period", type=int, help="local-sgd, mavg, bmuf, slowmo: steps between exact averages")
    parser.add_argument("--base", help="slowmo, bmuf: the base algorithm run between averages (default local-sgd)")
    parser.add_argument("--slow-lr", type=float, help="slowmo: slow lr alpha; bmuf: block lr zeta")
    parser.add_argument("--slow-momentum", type=float, help="slowmo: beta; bmuf: block momentum eta; mavg: mu")
    parser.add_argument("--warmup-steps", type=int, help="local-sgd: average after every one of the first steps")
    parser.add_argument("--batch-growth", type=float, help="cr-psgd(-catalyst): batch growth rho > 1 "
                        "(first batch --batch-size; budget --epochs of samples)")
    parser.add_argument("--slow-ranks", help="comma-separated ranks made slower by sleeping --slow-delay per step")
    parser.add_argument("--slow-delay", type=float, help="seconds a --slow-ranks rank sleeps after each step")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dataset", help="digits | mnist1d | synthetic | module:function returning gossip.data.Split")
    parser.add_argument("--alpha", type=float, help="Dirichlet label skew across ranks (default: iid)")
    parser.add_argument("--samples", type=int, help="synthetic: number of samples")
    parser.add_argument("--features", type=int, help="synthetic: features per sample")
    parser.add_argument("--model", choices=["mlp", "cnn"])
    parser.add_argument("--hidden", type=int, help="MLP width / CNN channels")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from --checkpoint-dir")
    parser.add_argument("--timeline", help="write a Chrome trace per rank: FILE -> FILE.rank<r>.json")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--log-dir", help="where rank 0 writes log.csv, log.json and curves.png")
    parser.add_argument("--op-timeout", type=float, help="seconds before a stuck communication op aborts the job")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = parser.parse_args(argv)
    settings = dict(DEFAULTS)
    if args.config:
        settings.update(read_config(args.config))
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return argparse.Namespace(**settings)


def read_config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as error:
            raise SystemExit(f"{path}: YAML configs need PyYAML (pip install pyyaml); TOML needs nothing") from error
        loaded = yaml.safe_load(text) or {}
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        loaded = tomllib.loads(text)
    config = {key.replace("-", "_"): value for key, value in loaded.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"{path}: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    return config


def check_settings(args: argparse.Namespace, n: int) -> None:
    """Fail before training, with a clear message, on settings that cannot work."""
    problems = []
    if args.algorithm not in algorithms.available():
        problems.append(f"unknown algorithm {args.algorithm!r}; available: {', '.join(algorithms.available())}")
    if not args.lr > 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.momentum < 1:
        problems.append(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.batch_size < 1 or args.epochs < 1:
        problems.append(f"--batch-size and --epochs must be >= 1, got {args.batch_size} and {args.epochs}")
    if args.algorithm in SERVER_ALGORITHMS and n < 2:
        problems.append(f"{args.algorithm} trains through a parameter server: it needs at least 2 ranks "
                        "(rank 0 serves, the others work)")
    if args.algorithm in SERVER_ALGORITHMS and (args.checkpoint_dir or args.resume):
        problems.append(f"checkpoints are not supported for parameter-server training ({args.algorithm})")
    if args.algorithm in OUTER and (args.base in OUTER or args.base in ("mavg", "cr-psgd", "cr-psgd-catalyst")
                                    or args.base not in algorithms.available()):
        problems.append(f"--base must be a single-level algorithm (local-sgd, dsgd, dmsgd, sgp, pmsgd, ...), "
                        f"got {args.base!r}")
    if args.topology == "auto" and _base(args) in FIXED_TOPOLOGY:
        problems.append(f"--topology auto chooses among allreduce, exponential-2, one-peer and hierarchical gossip; "
                        f"{_base(args)} needs {FIXED_TOPOLOGY[_base(args)]}: name its topology")
    if args.global_avg_every is not None and _base(args) in GOSSIP_FREE:
        problems.append(f"--global-avg-every is for gossip algorithms; {_base(args)} does not gossip "
                        "(local-sgd and mavg average every --period steps)")
    if args.period is not None and (args.algorithm not in PERIODIC or args.period < 1):
        problems.append(f"--period is an int >= 1 for {', '.join(PERIODIC)}; got {args.period} for {args.algorithm}")
    if args.algorithm.startswith("cr-psgd") and not args.batch_growth > 1:
        problems.append(f"--batch-growth must be > 1, got {args.batch_growth}")
    try:
        slow = slow_ranks(args)
        if any(not 0 <= r < n for r in slow) or args.slow_delay < 0:
            problems.append(f"--slow-ranks must be ranks of 0..{n - 1} and --slow-delay >= 0, got "
                            f"{args.slow_ranks!r} and {args.slow_delay}")
    except ValueError:
        problems.append(f"--slow-ranks is a comma-separated list of ranks, got {args.slow_ranks!r}")
    if args.resume and not args.checkpoint_dir:
        problems.append("--resume needs --checkpoint-dir")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda but torch sees no CUDA device")
    if problems:
        raise SystemExit("train.py: " + "; ".join(problems))


def slow_ranks(args: argparse.Namespace) -> set[int]:
    """The ranks that ``--slow-ranks`` makes slower (to see what asynchrony buys)."""
    return {int(r) for r in str(args.slow_ranks).split(",") if r.strip()}


def step_delay(args: argparse.Namespace, rank: int) -> float:
    """Seconds ``rank`` sleeps after each step: ``--slow-delay`` on the ``--slow-ranks``, else 0."""
    return args.slow_delay if rank in slow_ranks(args) else 0.0


def _base(args: argparse.Namespace) -> str:
    """The algorithm that runs every step: --base for slowmo and bmuf, else --algorithm."""
    return args.base if args.algorithm in OUTER else args.algorithm


def optimizer_settings(args: argparse.Namespace, n: int, samples_per_epoch: int) -> dict:
    """The keyword arguments of ``algorithms.create(args.algorithm, ...)`` for these settings
    (``samples_per_epoch``: per rank, CR-PSGD's budget is --epochs of them)."""
    hyper = {"lr": args.lr, "weight_decay": args.weight_decay}
    base = _base(args)
    if base not in GOSSIP_FREE:
        hyper["topology"] = make_topology(args, n)
        if args.global_avg_every is not None:
            hyper["global_avg_every"] = args.global_avg_every
    if base not in WITHOUT_MOMENTUM:
        hyper["momentum"] = args.momentum
    if args.algorithm in OUTER:
        hyper["base"] = args.base
    if args.algorithm in PERIODIC and args.period is not None:
        hyper["period"] = args.period
    if args.algorithm in OUTER and args.slow_lr is not None:
        hyper["slow_lr"] = args.slow_lr
    if args.algorithm in (*OUTER, "mavg") and args.slow_momentum is not None:
        hyper["slow_momentum"] = args.slow_momentum
    if args.algorithm == "local-sgd" and args.warmup_steps:
        hyper["warmup_steps"] = args.warmup_steps
    if args.algorithm.startswith("cr-psgd"):
        hyper.update(budget=args.epochs * samples_per_epoch, first_batch=args.batch_size, growth=args.batch_growth)
    return hyper


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


def make_topology(args: argparse.Namespace, n: int):
    if args.topology in ("hierarchical", "auto"):  # hierarchical: machine average + one-peer exp-2 between machines
        return args.topology  # auto: chosen by auto_schedule once the model exists
    try:
        return topologies.by_name(args.topology, n, seed=args.seed, local_size=gossip.local_size())
    except ValueError as error:
        raise SystemExit(f"train.py: --topology {args.topology!r} on {n} ranks: {error}") from error


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
    compute = gossip.allreduce(torch.tensor([float(np.median(times[1:]))], dtype=torch.float64), "mean").item()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return gossip.Scheduler.auto(nbytes, compute_seconds=compute, global_avg_every=args.global_avg_every)


def load_dataset(args: argparse.Namespace) -> Split:
    if args.dataset == "digits":
        return load_digits(flat=args.model != "cnn", seed=args.seed)
    if args.model == "cnn":
        raise SystemExit("train.py: --model cnn is for the 8x8 digits images; use --model mlp")
    if args.dataset == "mnist1d":
        return load_mnist1d(seed=args.seed)
    if args.dataset == "synthetic":
        return synthetic_classification(args.samples, args.features, seed=args.seed)
    if ":" in args.dataset:  # the hook for a user's own data
        module, function = args.dataset.split(":", 1)
        split = getattr(importlib.import_module(module), function)()
        if not isinstance(split, Split):
            raise SystemExit(f"train.py: {args.dataset} must return gossip.data.Split, got {type(split).__name__}")
        return split
    raise SystemExit(f"train.py: unknown --dataset {args.dataset!r}: digits, mnist1d, synthetic or module:function")


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
def evaluate(model: torch.nn.Module, flat: torch.Tensor, data: Split, device: torch.device) -> dict[str, float]:
    """Collective: test accuracy of this rank's model and of the averaged model; consensus distance."""
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    own = accuracy(model, x_test, y_test)
    mine = flat.detach().clone()
    mean = gossip.allreduce(mine, "mean")
    consensus = gossip.allreduce((mine - mean).square().sum().reshape(1), "mean").item()
    flat.copy_(mean)
    averaged = accuracy(model, x_test, y_test)
    flat.copy_(mine)
    return {"test_accuracy_averaged": averaged, "test_accuracy_rank0": own, "consensus_distance": consensus}


@torch.no_grad()
def server_record(model: torch.nn.Module, data: Split, device: torch.device, epoch: int, staleness: list[int],
                  samples_per_second: float) -> dict:
    """The parameter server's log record for an epoch: its model's training loss and test accuracy
    (local, no communication), and the staleness of the epoch's gradients."""
    loss = sum(float(F.cross_entropy(model(data.x_train[i:i + 4096].to(device)), data.y_train[i:i + 4096].to(device),
                                     reduction="sum")) for i in range(0, len(data.x_train), 4096))
    test = accuracy(model, data.x_test.to(device), data.y_test.to(device))
    return {"epoch": epoch, "train_loss": loss / len(data.x_train), "test_accuracy_averaged": test,
            "test_accuracy_rank0": test, "consensus_distance": 0.0, "samples_per_second": samples_per_second,
            "communication_share": float("nan"), "staleness_mean": sum(staleness) / max(1, len(staleness)),
            "staleness_max": max(staleness, default=0)}


class Progress:
    """A one-line progress bar on rank 0 (only when writing to a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and gossip.rank() == 0 and sys.stdout.isatty()

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
        self.settings = settings
        self.records: list[dict] = list(resumed_records or [])
        self.started = time.perf_counter() - (self.records[-1]["wall_seconds"] if self.records else 0.0)

    def add(self, record: dict) -> None:
        record["wall_seconds"] = time.perf_counter() - self.started
        self.records.append(record)
        if gossip.rank() != 0:
            return
        if "staleness_mean" in record:  # the parameter server's record
            print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  test acc (server model) "
                  f"{100 * record['test_accuracy_averaged']:5.2f}%  staleness mean {record['staleness_mean']:.1f} "
                  f"max {record['staleness_max']}  {record['samples_per_second']:,.0f} samples/s", flush=True)
        else:
            print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  "
                  f"test acc (averaged) {100 * record['test_accuracy_averaged']:5.2f}%  "
                  f"(rank 0) {100 * record['test_accuracy_rank0']:5.2f}%  "
                  f"consensus {record['consensus_distance']:.2e}  {record['samples_per_second']:,.0f} samples/s  "
                  f"communication {100 * record['communication_share']:4.1f}% of step time", flush=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.records[0]))
            writer.writeheader()
            writer.writerows(self.records)
        (self.directory / "log.json").write_text(json.dumps({"settings": self.settings, "epochs": self.records},
                                                            indent=1))

    def plot(self) -> Path | None:
        if gossip.rank() != 0 or not self.records:
            return None
        try:
            import matplotlib
        except ImportError:
            print("(matplotlib not installed: no plot; pip install 'gossip[examples]')")
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.records]
        wall = [r["wall_seconds"] for r in self.records]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for axis, xs, label in ((axes[0], epochs, "epoch"), (axes[1], wall, "wall time (s)")):
            axis.plot(xs, [r["train_loss"] for r in self.records], "C0-", label="training loss")
            axis.set_xlabel(label)
            axis.set_ylabel("training loss", color="C0")
            twin = axis.twinx()
            twin.plot(xs, [100 * r["test_accuracy_averaged"] for r in self.records], "C1-", label="averaged")
            twin.plot(xs, [100 * r["test_accuracy_rank0"] for r in self.records], "C2--", label="rank 0")
            twin.set_ylabel("test accuracy (%)")
            twin.legend(loc="center right")
        fig.suptitle(f"{self.settings['algorithm']} on {self.settings['topology']}, {gossip.size()} ranks, "
                     f"{self.settings['dataset']}")
        fig.tight_layout()
        path = self.directory / "curves.png"
        fig.savefig(path, dpi=110)
        return path
