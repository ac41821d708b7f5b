"""train.py's and train_server.py's settings: the options with their defaults, a ``--config`` file
(TOML or YAML) under the command line, and the checks of every setting against the algorithm's
registry entry (``algorithms.spec(name)``), so a new algorithm needs no edit here. A bad setting is
reported once, by rank 0, in one line, and every rank exits with status 2 (:func:`fail`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

import torch
from mpi4py import MPI  # started by ``import gossip`` anyway; the rank is known before gossip.init

import algorithms
import gossip
from algorithms.wrapper import ALLREDUCE, COMMUNICATIONS, EMPTY, GRADIENT, NEIGHBOR

DEFAULTS = {
    "algorithm": "dmsgd", "topology": "one-peer-exp2", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
    "batch_size": 32, "epochs": 20, "global_avg_every": None, "seed": 0, "dataset": "digits", "alpha": None,
    "samples": 20000, "features": 64, "model": "mlp", "hidden": 64, "checkpoint_dir": None, "checkpoint_every": 1,
    "resume": False, "timeline": None, "device": "cpu", "log_dir": "results/train", "overwrite": False,
    "op_timeout": 300.0, "progress": None, "period": None, "base": "local-sgd", "slow_lr": None,
    "slow_momentum": None, "warmup_steps": None, "batch_growth": 2.0, "slow_ranks": "", "slow_delay": 0.02,
    "elastic": False, "inject_failure": "", "inner": None, "outer_lr": None, "outer_momentum": None,
    "nesterov": None, "fragments": None, "sync_delay": None, "mix": None, "compressor": None, "consensus_step": None,
    "context": 128, "communication": None, "form": None, "steps_per_communication": None,
}
SERVER_DEFAULTS = {**DEFAULTS, "algorithm": "ormo", "log_dir": "results/train_server"}  # train_server.py's
# Options that become an optimizer's keyword (option -> keyword); an algorithm that does not accept
# the keyword (``algorithms.spec(name).accepts``) refuses the option when it is given.
KEYWORDS = {"momentum": "momentum", "topology": "topology", "global_avg_every": "global_avg_every",
            "period": "period", "base": "base", "slow_lr": "slow_lr", "slow_momentum": "slow_momentum",
            "warmup_steps": "warmup_steps", "batch_growth": "growth", "inner": "inner", "outer_lr": "outer_lr",
            "outer_momentum": "outer_momentum", "nesterov": "nesterov", "fragments": "fragments",
            "sync_delay": "delay", "mix": "mix", "compressor": "compressor", "consensus_step": "consensus_step",
            "communication": "communication", "form": "form", "steps_per_communication": "steps_per_communication"}
# Keywords an outer loop (SlowMo, BMUF) hands to its base optimizer.
BASE_KEYWORDS = ("momentum", "topology", "global_avg_every")
# --topology auto feeds gossip.Scheduler's choice (allreduce, exponential-2, one-peer, hierarchical
# gossip) to algorithms that mix with the schedule they are given; these build their own mixing.
OWN_MIXING = {"d2": "a static symmetric W", "sgp": "push-sum over a graph", "adpsgd": "windows on a graph"}


# --- errors and output ----------------------------------------------------------------------------

PROG = {"name": "train.py"}  # the script whose settings are read (parse_args sets it)


def fail(message: str) -> None:
    """A bad setting: rank 0 prints one line, every rank exits with status 2 (no MPI_Abort: every
    rank finds the same problem, so every rank stops by itself)."""
    if MPI.COMM_WORLD.rank == 0:
        print(f"{PROG['name']}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def say(text: str) -> None:
    """Print on rank 0 only (the runtime's rank 0 once it runs: another rank after a recovery)."""
    if (gossip.rank() if gossip.is_initialized() else MPI.COMM_WORLD.rank) == 0:
        print(text, flush=True)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# --- configuration --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None, *, server: bool = False, n: int | None = None) -> argparse.Namespace:
    """Command line over an optional ``--config`` file (TOML or YAML) over :data:`DEFAULTS`, checked
    for ``n`` ranks (default: the MPI job's size). ``server``: for ``train_server.py``. A bad
    setting ends the job through :func:`fail`. ``args.given`` holds the options set explicitly."""
    parser = make_parser(server)
    PROG["name"] = parser.prog
    if MPI.COMM_WORLD.rank == 0:
        args = parser.parse_args(argv)
    else:  # argparse's usage, help and errors: once, from rank 0; the same exit status on every rank
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    settings = dict(SERVER_DEFAULTS if server else DEFAULTS)
    if args.config:
        config = read_config(args.config, parser)
        settings.update(config)
        given = {**config, **given}
    settings.update(given)
    if "op_timeout" not in given and os.environ.get("GOSSIP_OP_TIMEOUT"):
        settings["op_timeout"] = None  # gossip.init reads the variable (e.g. -x GOSSIP_OP_TIMEOUT=600 in slurm/)
    args = argparse.Namespace(**settings, given=set(given))
    check_settings(args, MPI.COMM_WORLD.size if n is None else n, server=server)
    return args


def make_parser(server: bool = False) -> argparse.ArgumentParser:
    name = "train_server.py" if server else "train.py"
    what = "Parameter-server training" if server else "Decentralized training with gossip"
    parser = argparse.ArgumentParser(
        prog=name, description=f"{what} (see mpirun_examples/{name}). Options may also come from --config; "
        "the command line wins.")

    def option(flag: str, help: str, **kw) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        default = (SERVER_DEFAULTS if server else DEFAULTS).get(dest)
        shown = "" if default in (None, "", False) else f" (default: {default})"
        parser.add_argument(flag, help=help + shown, **kw)

    parser.add_argument("--config", help="TOML or YAML file whose keys are the long options below (dashes or _)")
    kinds = ("server",) if server else tuple(k for k in _kinds() if k != "server")
    names = [s.name for s in algorithms.specs() if s.kind in kinds]
    option("--algorithm", f"one of {', '.join(names)}")
    if not server:
        option("--topology", "a name from topologies.topology_names(), e.g. ring, exp2, one-peer-exp2; "
               "hierarchical (average within each machine, one-peer exp-2 between machines); allreduce (an exact "
               "average; diloco's default); or auto "
               "(gossip.Scheduler picks from the probed links, the model size and its compute time)")
    option("--lr", "learning rate", type=float)
    option("--momentum", "momentum (algorithms that take it)", type=float)
    option("--weight-decay", "L2 weight decay", type=float)
    option("--batch-size", "samples per rank per step" if not server else "samples per gradient", type=int)
    option("--epochs", "passes over the training set", type=int)
    if not server:
        option("--global-avg-every", "Gossip-PGA: an exact average every H steps (gossip algorithms)", type=int)
        option("--period", "local-sgd, mavg, bmuf, slowmo: steps between exact averages", type=int)
        option("--base", "slowmo, bmuf: the algorithm run between averages")
        option("--slow-lr", "slowmo: slow lr alpha; bmuf: block lr zeta", type=float)
        option("--slow-momentum", "slowmo: beta; bmuf: block momentum eta; mavg: mu", type=float)
        option("--warmup-steps", "local-sgd: average after every one of the first steps", type=int)
        option("--batch-growth", "cr-psgd(-catalyst): batch growth rho > 1 (first batch --batch-size; "
               "budget --epochs of samples)", type=float)
        option("--inner", "diloco, gossip-wrapper: the inner optimizer, a torch.optim name (default adamw; --lr is "
               "its lr)")
        option("--outer-lr", "diloco: the outer optimizer's lr (default 0.7)", type=float)
        option("--outer-momentum", "diloco: the outer optimizer's momentum (default 0.9)", type=float)
        option("--nesterov", "diloco: Nesterov outer momentum (default on)", action=argparse.BooleanOptionalAction,
               default=None)
        option("--fragments", "streaming-diloco: fragments synced at staggered steps (default 4)", type=int)
        option("--sync-delay", "streaming-diloco: inner steps a fragment's average overlaps (tau, default 1)",
               type=int)
        option("--mix", "streaming-diloco: alpha in x <- alpha x + (1 - alpha) theta (default 0.5)", type=float)
        option("--compressor", "choco-sgd, diloco: what goes on the wire: bf16, fp16, int8, int4, topk-0.01, "
               "randomk-0.01, sign (gossip.compressor_by_name)")
        option("--consensus-step", "choco-sgd: consensus step gamma (default: chosen from the compressor)",
               type=float)
        option("--communication", "gossip-wrapper: neighbor_allreduce (default), hierarchical_neighbor_allreduce, "
               "allreduce (of the models), gradient_allreduce, window (one-sided pushes) or empty; --inner is the "
               "optimizer (default adamw)", choices=list(COMMUNICATIONS))
        option("--form", "gossip-wrapper: atc (combine after the inner step, default) or awc (combine the model "
               "before it, overlapped with forward and backward)", choices=["atc", "awc"])
        option("--steps-per-communication", "gossip-wrapper: communicate every K steps (local steps in between; "
               "gradient_allreduce: gradients accumulated over K steps)", type=int)
    option("--slow-ranks", "comma-separated ranks made slower by sleeping --slow-delay per step")
    option("--slow-delay", "seconds a --slow-ranks rank sleeps after each step", type=float)
    option("--seed", "seed of the data split, the model and the batches", type=int)
    option("--dataset", "digits | mnist1d | synthetic | python-source (the standard library's .py files as "
           "bytes, for --model char-transformer) | module:function returning a gossip.tools.data.Split")
    option("--alpha", "Dirichlet label skew across ranks (default: iid)", type=float)
    option("--samples", "synthetic: number of samples; python-source: training windows (at most)", type=int)
    option("--features", "synthetic: features per sample", type=int)
    option("--model", "the network", choices=["mlp", "cnn", "char-transformer"])
    option("--hidden", "MLP width / CNN channels / transformer width", type=int)
    option("--context", "python-source: tokens per window (the transformer's sequence length)", type=int)
    if not server:
        option("--checkpoint-dir", "where rank-consistent checkpoints go")
        option("--checkpoint-every", "epochs between checkpoints", type=int)
        option("--resume", "continue from the last checkpoint in --checkpoint-dir (on another number of ranks: from "
               "the averaged model)", action="store_true", default=None)
    option("--timeline", "write a Chrome/Perfetto trace per rank: FILE -> FILE.rank<r>.json")
    option("--device", "cuda: one GPU per rank (local rank -> device)", choices=["cpu", "cuda"])
    option("--log-dir", "where rank 0 writes log.csv, log.json and curves.png; a directory holding a previous "
           "run's log.json is refused unless --overwrite (or --resume)")
    option("--overwrite", "replace the previous run's logs in --log-dir", action="store_true", default=None)
    option("--op-timeout", "seconds before a stuck communication op fails the job (GOSSIP_OP_TIMEOUT if set)",
           type=float)
    option("--progress", "a progress bar on rank 0 (default: only when gossiprun's output is a terminal)",
           action=argparse.BooleanOptionalAction, default=None)
    survive = ("a dead worker: the others train on; a dead server ends the job" if server else
               "dead ranks: the survivors recover, re-split the data and train on")
    option("--elastic", f"survive {survive} (start it with gossiprun --fault-tolerant)", action="store_true",
           default=None)
    option("--inject-failure", "for testing --elastic: RANK:STEP[,RANK:STEP...] makes launch rank RANK kill itself "
           "(SIGKILL) when the run has taken STEP steps")
    return parser


def _kinds() -> list[str]:
    return sorted({s.kind for s in algorithms.specs()})


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The settings in a TOML or YAML file, typed like the command line's; a bad file: :func:`fail`."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        fail(f"--config {path}: {error.strerror or error}")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            fail(f"--config {path}: YAML configs need PyYAML (pip install pyyaml); TOML needs nothing")
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            fail(f"--config {path}: invalid YAML: {' '.join(str(error).split())}")
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            loaded = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            fail(f"--config {path}: invalid TOML: {error}")
    if not isinstance(loaded, dict):
        fail(f"--config {path}: expected a table of settings, got {type(loaded).__name__}")
    config = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    actions = {a.dest: a for a in parser._actions if a.dest in DEFAULTS}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        fail(f"--config {path}: unknown settings {unknown}; known: {sorted(actions)}")
    for key, value in config.items():
        kind = actions[key].type or (bool if actions[key].nargs == 0 else str)
        if value is not None and not (kind is float and isinstance(value, int)) and not isinstance(value, kind) \
                or isinstance(value, bool) and kind is not bool:
            fail(f"--config {path}: {key} = {value!r} should be {kind.__name__}")
        config[key] = kind(value) if value is not None else None
    return config


def check_settings(args: argparse.Namespace, n: int, server: bool = False) -> None:
    """Fail before training, with one clear line, on settings that cannot work on ``n`` ranks."""
    problems = []
    names = {s.name for s in algorithms.specs()}
    if args.algorithm not in names:
        fail(f"unknown algorithm {args.algorithm!r}; available: {', '.join(sorted(names))}")
    spec = algorithms.spec(args.algorithm)
    if spec.kind == "server" and not server:
        fail(f"{args.algorithm} trains through a parameter server: run mpirun_examples/train_server.py "
             f"--algorithm {args.algorithm} (the same options)")
    if spec.kind != "server" and server:
        fail(f"train_server.py trains through a parameter server ({_names('server')}); "
             f"for {args.algorithm} run mpirun_examples/train.py")
    if server and n < 2:
        problems.append(f"{args.algorithm} trains through a parameter server: it needs at least 2 ranks "
                        "(rank 0 serves, the others work)")
    if not args.lr > 0:
        problems.append(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.momentum < 1:
        problems.append(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.batch_size < 1 or args.epochs < 1:
        problems.append(f"--batch-size and --epochs must be >= 1, got {args.batch_size} and {args.epochs}")
    base = _base(args)
    if spec.needs_base:
        if args.base not in names or not algorithms.spec(args.base).usable_as_base:
            bases = ", ".join(s.name for s in algorithms.specs() if s.usable_as_base)
            problems.append(f"--base must be a single-level algorithm ({bases}), got {args.base!r}")
            base = None
    for option in sorted(args.given & set(KEYWORDS)):
        owner = base if option in BASE_KEYWORDS and spec.needs_base else args.algorithm
        if owner is not None and not algorithms.spec(owner).accepts(KEYWORDS[option]):
            flag = "--" + option.replace("_", "-")
            problems.append(f"{flag} is not used by {owner}" + (f" (the base of {args.algorithm})"
                                                                  if owner != args.algorithm else ""))
    if args.topology == "auto" and base in OWN_MIXING:
        problems.append(f"--topology auto chooses among allreduce, exponential-2, one-peer and hierarchical gossip; "
                        f"{base} needs {OWN_MIXING[base]}: name its topology")
    if (args.dataset == "python-source") != (args.model == "char-transformer"):
        problems.append(f"--dataset python-source goes with --model char-transformer, got --dataset {args.dataset} "
                        f"and --model {args.model}")
    if server and args.dataset == "python-source":
        problems.append("train_server.py trains classifiers; train the language model with train.py")
    if args.dataset == "python-source" and args.alpha is not None:
        problems.append("--alpha skews class labels; python-source has none (its shards are iid windows)")
    if args.context < 1:
        problems.append(f"--context must be >= 1, got {args.context}")
    if args.period is not None and args.period < 1:
        problems.append(f"--period must be >= 1, got {args.period}")
    if spec.kind == "growing-batch" and not args.batch_growth > 1:
        problems.append(f"--batch-growth must be > 1, got {args.batch_growth}")
    try:
        slow = slow_ranks(args)
        if any(not 0 <= r < n for r in slow) or args.slow_delay < 0:
            problems.append(f"--slow-ranks must be ranks of 0..{n - 1} and --slow-delay >= 0, got "
                            f"{args.slow_ranks!r} and {args.slow_delay}")
    except ValueError:
        problems.append(f"--slow-ranks is a comma-separated list of ranks, got {args.slow_ranks!r}")
    try:
        injected = injected_failures(args)
        if any(not 0 <= r < n for r in injected) or any(step < 0 for step in injected.values()):
            problems.append(f"--inject-failure ranks must be in 0..{n - 1} and steps >= 0, got {args.inject_failure!r}")
    except ValueError:
        problems.append(f"--inject-failure is RANK:STEP[,RANK:STEP...], got {args.inject_failure!r}")
    if args.elastic and spec.kind == "asynchronous-gossip":
        problems.append(f"--elastic: {args.algorithm} gossips through one-sided windows, which cannot be rebuilt "
                        "under a failed rank; resume it from a checkpoint instead (--checkpoint-dir, --resume)")
    if args.resume and not args.checkpoint_dir:
        problems.append("--resume needs --checkpoint-dir")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda but torch sees no CUDA device")
    previous = Path(args.log_dir) / "log.json"
    if not (args.overwrite or args.resume) and MPI.COMM_WORLD.bcast(
            previous.exists() if MPI.COMM_WORLD.rank == 0 else None, root=0):
        problems.append(f"--log-dir {args.log_dir} holds a previous run ({previous}): pass --overwrite to "
                        "replace it, or another --log-dir")
    if problems:
        fail("; ".join(problems))


def _names(*kinds: str) -> str:
    return ", ".join(s.name for s in algorithms.specs() if s.kind in kinds)


def _base(args: argparse.Namespace) -> str:
    """The algorithm that runs every step: --base for slowmo and bmuf, else --algorithm."""
    return args.base if algorithms.spec(args.algorithm).needs_base else args.algorithm


def takes_topology(args: argparse.Namespace) -> bool:
    """Whether the algorithm run every step gossips on ``--topology`` (DiLoCo only when it is given: by
    default its outer average is exact)."""
    return uses_topology(algorithms.spec(_base(args)), args)


def uses_topology(spec: algorithms.AlgorithmSpec, args: argparse.Namespace) -> bool:
    """Whether ``spec`` is given ``--topology``: when it gossips on one (DiLoCo only when it is given; the
    gossip wrapper unless its ``--communication`` averages exactly or not at all)."""
    if not spec.takes_topology or "topology" in args.given:
        return spec.takes_topology
    if spec.kind == "outer-optimizer":
        return False
    return spec.kind != "wrapper" or (args.communication or NEIGHBOR) not in (ALLREDUCE, GRADIENT, EMPTY)


def slow_ranks(args: argparse.Namespace) -> set[int]:
    """The ranks that ``--slow-ranks`` makes slower (to see what asynchrony buys)."""
    return {int(r) for r in str(args.slow_ranks).split(",") if r.strip()}


def injected_failures(args: argparse.Namespace) -> dict[int, int]:
    """``--inject-failure``: launch rank -> the step count at which it kills itself (a testing aid)."""
    pairs = [item.split(":") for item in str(args.inject_failure).split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(args.inject_failure)
    return {int(rank): int(step) for rank, step in pairs}


def step_delay(args: argparse.Namespace, rank: int) -> float:
    """Seconds ``rank`` sleeps after each step: ``--slow-delay`` on the ``--slow-ranks``, else 0."""
    return args.slow_delay if rank in slow_ranks(args) else 0.0


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``: the CPU, or one GPU per rank (local rank -> device, set as current for NCCL and
    the caching allocator)."""
    if args.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", gossip.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device
