"""DiLoCo against synchronous and gossip training on a small language model: validation loss against
steps and against bytes sent.

The workload: :class:`CharTransformer` (``mpirun_examples/language_model.py``) on the Python standard
library's own source (:func:`gossip.tools.data.load_python_source`: offline, split by file), the
training windows split iid over the ranks. Every method starts from the same initialisation and sees
the same samples in the same order for a given seed. Bytes are this rank's :func:`gossip.traffic`
(the mean over ranks): messages counted exactly, allreduce as a ring's 2(n − 1)/n per byte.

``gossiprun -np 4 python benchmarks/diloco.py`` runs PmSGD (momentum
SGD on the allreduced gradient, what DDP with SGD does), allreduce-AdamW (AdamW on the allreduced
gradient: DDP with AdamW, the baseline of the DiLoCo paper), DmSGD on the one-peer exponential-2
graph, local SGD (momentum 0.9, period ``--local-period``), DiLoCo for every H of ``--periods``
(inner AdamW, outer Nesterov SGD lr 0.7 momentum 0.9), streaming DiLoCo (H = ``--main-period``,
``--fragments`` fragments, τ = 1, α = 0.5) and DiLoCo H = ``--main-period`` with int8 and bf16
outer gradients; then DiLoCo at that H with fp32 and int8 outer gradients over every seed of
``--seeds``. Tuned once, on the first seed, by the final validation loss: the inner AdamW lr on
DiLoCo at the main H from ``--adamw-lrs`` (also used by allreduce-AdamW), and the SGD lr on PmSGD
from ``--sgd-lrs`` (also used by DmSGD and local SGD). The table gives each method's final
validation loss, bytes sent per rank, bytes relative to PmSGD and the loss gap to PmSGD and to
allreduce-AdamW in %.

Time to a target loss on an emulated cluster, against DDP on gloo: ``benchmarks/diloco_time.py``.

Measured on a 2-core VM shared with other jobs: ``benchmarks/measured/diloco-*``.

Writes ``diloco-convergence-np<N>.{json,txt,png}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from mpi4py import MPI

import algorithms
import gossip
import topologies
from gossip.tools.data import BatchStream, load_python_source, partition

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "mpirun_examples"))
from language_model import CharTransformer, lm_loss  # noqa: E402

COMM = MPI.COMM_WORLD  # bookkeeping (evaluation, means over ranks) goes through plain MPI: never counted


@dataclass
class Method:
    """A method to train: a label, a registry name (or ``allreduce-adamw``, ``ddp``) and its hyper-parameters."""

    label: str
    name: str
    hyper: dict = field(default_factory=dict)
    lr_kind: str = "sgd"  # which tuned lr it takes: "sgd" or "adamw"


class AllreduceAdamW:
    """AdamW on the gradient averaged by :func:`gossip.allreduce` (fused): DDP with AdamW."""

    def __init__(self, params, lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.inner = torch.optim.AdamW(self.params, lr=lr)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        mean = gossip.allreduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        offset = 0
        for g in grads:
            g.copy_(mean[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.inner.step()


def build(method: Method, model: torch.nn.Module, lr: float):
    """(the model to call, the optimizer) for ``method``."""
    if method.name == "allreduce-adamw":
        return model, AllreduceAdamW(model.parameters(), lr)
    if method.name in ("ddp", "ddp-sgd"):
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        if method.name == "ddp-sgd":
            return wrapped, torch.optim.SGD(wrapped.parameters(), lr=lr, momentum=0.9)
        return wrapped, torch.optim.AdamW(wrapped.parameters(), lr=lr)
    hyper = dict(method.hyper)
    if hyper.get("topology") == "one-peer-exp2":
        hyper["topology"] = topologies.by_name("one-peer-exp2", gossip.size())
    return model, algorithms.create(method.name, model.parameters(), lr=lr, **hyper)


def add_workload_arguments(parser: argparse.ArgumentParser, batch_size: int, width: int, layers: int) -> None:
    """The workload's options (data, model, batch), with these defaults for the batch and the model."""
    parser.add_argument("--batch-size", type=int, default=batch_size, help="windows per rank per step")
    parser.add_argument("--context", type=int, default=64, help="bytes per window (the model's sequence length)")
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--train-chars", type=int, default=1_000_000)
    parser.add_argument("--val-chars", type=int, default=50_000)
    parser.add_argument("--val-windows", type=int, default=512, help="validation windows evaluated")


def load(args) -> tuple:
    """(data, this rank's shard of the training windows)."""
    data = load_python_source(context=args.context, max_train_chars=args.train_chars, max_val_chars=args.val_chars)
    shard = partition(data.y_train, gossip.size(), seed=0)[gossip.rank()]
    return data, shard


def start(args) -> tuple:
    """Start the runtime (one thread per rank) and load the workload: (data, this rank's shard, the
    model's parameter count); rank 0 says what it loaded."""
    torch.set_num_threads(1)
    gossip.init()
    data, shard = load(args)
    parameters = sum(p.numel() for p in CharTransformer(256, args.context, width=args.width, layers=args.layers,
                                                        heads=args.heads).parameters())
    if gossip.rank() == 0:
        print(f"{len(data.x_train)} training windows ({len(shard)} per rank), {len(data.x_test)} validation windows "
              f"({min(args.val_windows, len(data.x_test))} evaluated); {parameters:,} parameters", flush=True)
    return data, shard, parameters


@torch.no_grad()
def averaged_validation_loss(model: torch.nn.Module, data, args) -> float:
    """Collective (plain MPI): the validation loss (nats per token) of the average of the ranks'
    models, each rank evaluating its share of the first ``--val-windows`` windows."""
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    mean = flat.copy()
    COMM.Allreduce(flat, mean, op=MPI.SUM)
    average = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(mean / COMM.size).float(), average.parameters())
    average.eval()
    windows = min(args.val_windows, len(data.x_test))
    mine = range(COMM.rank, windows, COMM.size)
    total = 0.0
    for i in range(0, len(mine), 64):
        rows = list(mine[i:i + 64])
        logits = average(data.x_test[rows])
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         data.y_test[rows].reshape(-1), reduction="sum"))
    return COMM.allreduce(total) / (windows * data.y_test.shape[1])


def mean_over_ranks(value: float) -> float:
    return COMM.allreduce(float(value)) / COMM.size


def train(method: Method, lr: float, data, shard, args, seed: int, steps: int, eval_every: int,
          targets: list[float] | None = None) -> dict:
    """Collective: ``steps`` steps of ``method`` (fewer once every target is reached); the validation
    loss of the averaged model every ``eval_every`` steps, with the steps, samples, bytes sent (mean
    over ranks) and training seconds (evaluation excluded) at that point."""
    rank = gossip.rank()
    module = CharTransformer(256, args.context, width=args.width, layers=args.layers, heads=args.heads, seed=seed)
    model, opt = build(method, module, lr)
    stream = BatchStream(data.x_train[shard], data.y_train[shard], args.batch_size, seed=seed * 1009 + rank)
    gossip.reset_traffic()
    curve, reached, seconds = [], {}, 0.0

    def record(step: int) -> float:
        loss = averaged_validation_loss(module, data, args)
        curve.append({"step": step, "samples": step * args.batch_size * gossip.size(), "val_loss": loss,
                      "bytes": mean_over_ranks(gossip.traffic().bytes), "seconds": seconds})
        return loss

    record(0)
    COMM.Barrier()
    began = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = stream.next()
        opt.zero_grad()
        lm_loss(model, x, y).backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            if hasattr(opt, "synchronize"):
                opt.synchronize()
            COMM.Barrier()
            seconds += time.perf_counter() - began
            loss = record(step)
            if not math.isfinite(loss):
                break
            for target in targets or []:
                if loss <= target and target not in reached:
                    reached[target] = {"step": step, "seconds": seconds, "bytes": curve[-1]["bytes"]}
            if targets and len(reached) == len(targets):
                break
            began = time.perf_counter()
    final = curve[-1]
    result = {"method": method.label, "name": method.name, "hyper": method.hyper, "lr": lr, "seed": seed,
              "steps": final["step"], "final_val_loss": final["val_loss"], "bytes": final["bytes"],
              "seconds": final["seconds"], "curve": curve}
    if targets is not None:
        result["reached"] = {str(t): reached.get(t) for t in targets}
    if rank == 0:
        print(f"  {method.label:<50} lr {lr:<7g} seed {seed}: val loss {final['val_loss']:.4f} after "
              f"{final['step']} steps, {final['bytes'] / 1e6:9.2f} MB sent per rank, {final['seconds']:.0f} s",
              flush=True)
    return result


class Runs:
    """Every run of the convergence experiment, kept by (method, lr, seed): a run asked for twice is run once."""

    def __init__(self, data, shard, args) -> None:
        self.data, self.shard, self.args, self.done = data, shard, args, {}

    def get(self, method: Method, lr: float, seed: int) -> dict:
        key = (method.label, lr, seed)
        if key not in self.done:
            self.done[key] = train(method, lr, self.data, self.shard, self.args, seed, self.args.steps,
                                   self.args.eval_every)
        return self.done[key]

    def tune(self, method: Method, lrs: list[float]) -> float:
        """The lr of ``lrs`` with the lowest final validation loss on the first seed (diverged: infinite)."""
        losses = [self.get(method, lr, self.args.seeds[0])["final_val_loss"] for lr in lrs]
        return min(zip((v if math.isfinite(v) else math.inf for v in losses), lrs, strict=True))[1]


def convergence_methods(args) -> tuple[list[Method], Method, Method]:
    """The methods, DiLoCo at the main period and its int8 variant."""
    h = args.main_period
    diloco = {"inner": "adamw", "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}
    main = Method(f"DiLoCo H={h}", "diloco", {"period": h, **diloco}, "adamw")
    int8 = Method(f"DiLoCo H={h}, int8 outer gradients", "diloco", {"period": h, "compressor": "int8", **diloco},
                  "adamw")
    methods = [Method("PmSGD (allreduce, momentum SGD)", "pmsgd", {"momentum": 0.9}),
               Method("allreduce-AdamW (DDP with AdamW)", "allreduce-adamw", {}, "adamw"),
               Method("DmSGD (one-peer exp-2)", "dmsgd", {"momentum": 0.9, "topology": "one-peer-exp2"}),
               Method(f"local SGD (momentum 0.9, H={args.local_period})", "local-sgd",
                      {"momentum": 0.9, "period": args.local_period})]
    methods += [main if p == h else Method(f"DiLoCo H={p}", "diloco", {"period": p, **diloco}, "adamw")
                for p in sorted(set(args.periods) | {h})]
    methods += [Method(f"streaming DiLoCo H={h} (P={args.fragments}, tau=1, alpha=0.5)", "streaming-diloco",
                       {"period": h, "fragments": args.fragments, "delay": 1, "mix": 0.5, **diloco}, "adamw"),
                int8,
                Method(f"DiLoCo H={h}, bf16 outer gradients", "diloco", {"period": h, "compressor": "bf16", **diloco},
                       "adamw")]
    return methods, main, int8


def convergence(args, data, shard) -> dict:
    """Collective: the lrs tuned first, every method on the first seed, then fp32 vs int8 over the seeds."""
    methods, main, int8 = convergence_methods(args)
    runs = Runs(data, shard, args)
    if gossip.rank() == 0:
        print(f"tuning the inner AdamW lr on {main.label} from {args.adamw_lrs}, the SGD lr on PmSGD from "
              f"{args.sgd_lrs} ({args.steps} steps, seed {args.seeds[0]})", flush=True)
    lrs = {"adamw": runs.tune(main, args.adamw_lrs), "sgd": runs.tune(methods[0], args.sgd_lrs)}
    tuning = {kind: [{"lr": lr, "final_val_loss": runs.get(method, lr, args.seeds[0])["final_val_loss"]}
                     for lr in grid] for kind, method, grid in (("adamw", main, args.adamw_lrs),
                                                                ("sgd", methods[0], args.sgd_lrs))}
    if gossip.rank() == 0:
        print("every method:", flush=True)
    results = [runs.get(m, lrs[m.lr_kind], args.seeds[0]) for m in methods]
    if gossip.rank() == 0:
        print(f"{main.label} with fp32 and int8 outer gradients over seeds {args.seeds}:", flush=True)
    seeds = [runs.get(m, lrs["adamw"], seed) for seed in args.seeds for m in (main, int8)]
    return {"tuning": {"adamw_lr": lrs["adamw"], "sgd_lr": lrs["sgd"], "runs": tuning}, "results": results,
            "seeds": seeds}


def convergence_table(report: dict, args) -> str:
    results = report["results"]
    base = next(r for r in results if r["name"] == "pmsgd")
    adamw = next((r for r in results if r["name"] == "allreduce-adamw"), None)
    lines = [f"{args.steps} steps, batch {args.batch_size} x {gossip.size()} ranks of {args.context}-byte windows, "
             f"CharTransformer width {args.width}, {args.layers} layers ({report['parameters']:,} parameters); "
             f"seed {args.seeds[0]}; lrs tuned: inner AdamW {report['tuning']['adamw_lr']:g} (on DiLoCo "
             f"H={args.main_period}, from {args.adamw_lrs}), SGD {report['tuning']['sgd_lr']:g} (on PmSGD, from "
             f"{args.sgd_lrs})",
             f"{'method':<50}{'val loss':>9}{'MB sent/rank':>14}{'bytes ÷ PmSGD':>15}{'gap to PmSGD':>14}"
             f"{'gap to AR-AdamW':>17}"]
    for r in results:
        ratio = base["bytes"] / r["bytes"] if r["bytes"] else math.inf
        gap = 100 * (r["final_val_loss"] / base["final_val_loss"] - 1)
        gap_adamw = 100 * (r["final_val_loss"] / adamw["final_val_loss"] - 1) if adamw else math.nan
        lines.append(f"{r['method']:<50}{r['final_val_loss']:>9.4f}{r['bytes'] / 1e6:>14.2f}"
                     f"{'1/' + format(ratio, '.1f'):>15}{gap:>+13.2f}%{gap_adamw:>+16.2f}%")
    main = next((r for r in results if r["method"] == f"DiLoCo H={args.main_period}"), None)
    for label, other in (("PmSGD", base), ("allreduce-AdamW", adamw)):
        if main is not None and other is not None:
            gap = 100 * (main["final_val_loss"] / other["final_val_loss"] - 1)
            fewer = other["bytes"] / main["bytes"] if main["bytes"] else math.inf
            met = "met" if gap <= 3 and fewer >= 30 else "not met"
            lines.append(f"target (DiLoCo H={args.main_period} within 3 % of {label}'s validation loss at the same "
                         f"samples, >= 30x fewer bytes): {gap:+.2f} %, {fewer:.1f}x fewer bytes: {met}")
    fp32 = [r["final_val_loss"] for r in report["seeds"] if "int8" not in r["method"]]
    int8 = [r["final_val_loss"] for r in report["seeds"] if "int8" in r["method"]]
    if fp32 and int8:
        lines.append(f"DiLoCo H={args.main_period} over seeds {args.seeds}: fp32 outer gradients {_mean_std(fp32)}, "
                     f"int8 {_mean_std(int8)}; per seed (fp32 - int8): "
                     + ", ".join(f"{a - b:+.4f}" for a, b in zip(fp32, int8, strict=True)))
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def plot(report: dict, path: Path, x_keys: tuple[str, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(x_keys), figsize=(6 * len(x_keys), 4.2))
    for axis, key in zip(axes, x_keys, strict=True):
        for r in report["results"]:
            points = [p for p in r["curve"] if key != "bytes" or p["bytes"] > 0]
            axis.plot([p[key] for p in points], [p["val_loss"] for p in points], label=r["method"], marker=".")
        axis.set_xlabel({"step": "steps", "bytes": "bytes sent per rank", "seconds": "training seconds"}[key])
        if key == "bytes":
            axis.set_xscale("log")
        axis.set_ylabel("validation loss (nats/byte)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="convergence: steps per run")
    parser.add_argument("--eval-every", type=int, default=100, help="convergence: steps between evaluations")
    add_workload_arguments(parser, batch_size=16, width=64, layers=2)
    parser.add_argument("--periods", type=lambda s: [int(v) for v in s.split(",")], default=[10, 50, 100])
    parser.add_argument("--main-period", type=int, default=50,
                        help="DiLoCo's H for tuning, streaming, compressed outer gradients and the seeds")
    parser.add_argument("--fragments", type=int, default=4, help="streaming DiLoCo's fragments")
    parser.add_argument("--local-period", type=int, default=50)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--adamw-lrs", type=floats, default=[1e-3, 3e-3, 6e-3])
    parser.add_argument("--sgd-lrs", type=floats, default=[0.1, 0.3])
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    data, shard, parameters = start(args)
    report = convergence(args, data, shard)
    report["parameters"] = parameters
    if gossip.rank() == 0:
        table = convergence_table(report, args)
        print("\n" + table)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"diloco-convergence-np{gossip.size()}"
        report["args"] = {k: v for k, v in vars(args).items()}
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".txt").write_text(table + "\n")
        plot(report, stem.with_suffix(".png"), ("step", "bytes"))
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
