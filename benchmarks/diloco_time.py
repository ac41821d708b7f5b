"""DiLoCo against PyTorch DDP on gloo: time to a target validation loss on an emulated cluster, with
every method's learning rate tuned first, and the bytes counted checked against the bytes on the wire.

The workload is ``benchmarks/diloco.py``'s (:class:`CharTransformer` on the Python standard library's
source, the same initialisation and samples for every method), by default in a size that makes DDP
communication-bound on a 100 Mbit/s link, as any language model is there: width 128, 4 layers
(0.87 M parameters, 3.5 MB), 8 windows of 64 bytes per rank and step.

* ``gossiprun -np 4 python benchmarks/diloco_time.py --experiment tune`` (any MPI job; the steps a
  method needs to reach a loss do not depend on the network): for every lr of ``--lrs``, AdamW on the
  allreduced gradient (what DDP with AdamW computes), DiLoCo (H = ``--period``, inner AdamW, outer
  Nesterov SGD lr 0.7 momentum 0.9) and streaming DiLoCo (H = ``--period``, ``--fragments``
  fragments, τ = 1, α = 0.5) train until every ``--targets`` loss or ``--max-steps``. Each method's
  lr is the one that reaches the last target in the fewest steps (then the lowest final loss). The
  table gives the steps to each target per lr.
* ``python benchmarks/diloco_time.py`` (``--experiment cluster``; root, Linux): starts ``gossiprun
  --emulate 4x1 --link 100mbit`` running ``--experiment time``. First every rank reads its machine's
  interface counters (``/sys/class/net/eth0/statistics``) around each op kind and around a few
  training steps, so that the counted bytes can be checked against the bytes on the wire, headers
  included. Then DDP on gloo with AdamW (lr ``--ddp-lr``), DiLoCo and streaming DiLoCo (inner lr
  ``--diloco-lr``, ``--streaming-lr``; defaults: what ``tune`` chose, the same for batches of 8 and
  of 4 windows: 1e-3 for DDP, 5e-4 for both DiLoCos) train until every target; the
  training time to each target is reported (evaluation excluded), with what each machine's
  interface sent (gloo's traffic too, which :func:`gossip.traffic` does not see). ``--all-methods``
  adds DDP, PmSGD, DmSGD on one-peer exponential-2 and local SGD (H = ``--period``), all with
  momentum SGD (lr ``--sgd-lr``, tuned by ``benchmarks/diloco.py`` on its smaller model, not here),
  DiLoCo at every H of ``--periods`` and DiLoCo with int8 outer gradients.

Measured on a 2-core VM (the 4 emulated machines share its 2 cores): ``benchmarks/measured/diloco-*``.

Writes ``diloco-{tune,time}-np<N>.{json,txt,png}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

# diloco (first) puts mpirun_examples/ on the path, for language_model
from diloco import COMM, Method, add_workload_arguments, build, floats, plot, start, train
from language_model import CharTransformer, lm_loss

import gossip
import topologies
from gossip.tools.data import BatchStream

OUTER = {"inner": "adamw", "outer_lr": 0.7, "outer_momentum": 0.9, "nesterov": True}


def diloco(args) -> Method:
    return Method(f"DiLoCo H={args.period}", "diloco", {"period": args.period, **OUTER}, "adamw")


def streaming(args) -> Method:
    return Method(f"streaming DiLoCo H={args.period} (P={args.fragments}, tau=1, alpha=0.5)", "streaming-diloco",
                  {"period": args.period, "fragments": args.fragments, "delay": 1, "mix": 0.5, **OUTER}, "adamw")


# --- tuning: steps to each target per lr (no network needed) ---------------------------------------

def first_reaching(run: dict, target: float) -> int | None:
    hit = run["reached"][str(target)]
    return hit["step"] if hit else None


def tune(args, data, shard) -> dict:
    """Collective: every method at every lr until every target; the chosen lr per method."""
    methods = [Method("allreduce-AdamW (DDP with AdamW)", "allreduce-adamw", {}, "adamw"), diloco(args),
               streaming(args)]
    runs, chosen = [], {}
    for method in methods:
        mine = [train(method, lr, data, shard, args, args.seeds[0], args.max_steps, args.eval_every, args.targets)
                for lr in args.lrs]
        runs += mine

        def rank(run: dict) -> tuple:
            last = first_reaching(run, args.targets[-1])
            return (last is None, last or 0, run["final_val_loss"] if math.isfinite(run["final_val_loss"])
                    else math.inf)

        chosen[method.label] = min(mine, key=rank)["lr"]
    return {"results": runs, "chosen": chosen}


def tune_table(report: dict, args) -> str:
    lines = [f"steps to each validation loss, at most {args.max_steps} steps, evaluated every {args.eval_every}; "
             f"batch {args.batch_size} x {gossip.size()} ranks of {args.context}-byte windows, CharTransformer width "
             f"{args.width}, {args.layers} layers ({report['parameters']:,} parameters), seed {args.seeds[0]}",
             f"{'method':<52}{'lr':>8}" + "".join(f"{f'to {t:g}':>10}" for t in args.targets) + f"{'final':>9}"]
    for r in report["results"]:
        cells = [first_reaching(r, t) for t in args.targets]
        mark = "  <- chosen" if report["chosen"][r["method"]] == r["lr"] else ""
        lines.append(f"{r['method']:<52}{r['lr']:>8g}" + "".join(f"{c if c else '-':>10}" for c in cells)
                     + f"{r['final_val_loss']:>9.4f}{mark}")
    return "\n".join(lines)


# --- the emulated cluster: wire bytes and time to target ------------------------------------------

def interface_counters(interface: str = "eth0") -> tuple[int, int]:
    """(bytes, packets) this machine's ``interface`` has sent (the network namespace's own sysfs)."""
    base = Path("/sys/class/net") / interface / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "tx_packets").read_text())
    except OSError:
        return 0, 0


def on_the_wire(label: str, action) -> dict:
    """Collective: run ``action``; the counted bytes (summed over ranks) against the bytes and packets
    the machines' interfaces sent meanwhile (read by each machine's first rank)."""
    leader = gossip.local_rank() == 0
    COMM.Barrier()
    counted, wire = gossip.traffic(), interface_counters() if leader else (0, 0)
    action()
    COMM.Barrier()
    after = interface_counters() if leader else (0, 0)
    delta = gossip.traffic() - counted
    row = {"what": label, "counted_bytes": COMM.allreduce(delta.bytes),
           "counted_messages": COMM.allreduce(delta.messages), "wire_bytes": COMM.allreduce(after[0] - wire[0]),
           "wire_packets": COMM.allreduce(after[1] - wire[1])}
    row["wire_per_counted"] = row["wire_bytes"] / row["counted_bytes"] if row["counted_bytes"] else None
    if gossip.rank() == 0:
        ratio = f"{row['wire_per_counted']:.3f}" if row["wire_per_counted"] else "-"
        print(f"  {label:<52} counted {row['counted_bytes'] / 1e6:9.2f} MB, wire {row['wire_bytes'] / 1e6:9.2f} MB "
              f"in {row['wire_packets']} packets: wire/counted {ratio}", flush=True)
    return row


@torch.no_grad()
def _one_peer_weights(family, step: int) -> dict:
    peers = family.peers(step, gossip.rank())
    return {"self_weight": peers.self_weight, "src_weights": dict(peers.src_weights),
            "dst_weights": dict(peers.dst_weights)}


def _steps(method: Method, lr: float, data, shard, args, steps: int) -> None:
    module = CharTransformer(256, args.context, width=args.width, layers=args.layers, heads=args.heads, seed=0)
    model, opt = build(method, module, lr)
    stream = BatchStream(data.x_train[shard], data.y_train[shard], args.batch_size, seed=gossip.rank())
    for _ in range(steps):
        x, y = stream.next()
        opt.zero_grad()
        lm_loss(model, x, y).backward()
        opt.step()


def wire_check(args, data, shard) -> list[dict]:
    """Collective: counted against wire bytes for each op kind and for a few training steps."""
    numel = sum(p.numel() for p in CharTransformer(256, args.context, width=args.width, layers=args.layers,
                                                   heads=args.heads).parameters())
    x = torch.randn(numel)
    one_peer = topologies.by_name("one-peer-exp2", gossip.size())
    reps = args.wire_reps
    rows = [on_the_wire(f"allreduce of {4 * numel / 1e6:.2f} MB x {reps}",
                        lambda: [gossip.allreduce(x) for _ in range(reps)]),
            on_the_wire(f"one-peer neighbor_allreduce x {reps}",
                        lambda: [gossip.neighbor_allreduce(x, **_one_peer_weights(one_peer, k)) for k in range(reps)]),
            on_the_wire(f"compressed_allreduce int8 x {reps}",
                        lambda: [gossip.compressed_allreduce(x, gossip.Int8()) for _ in range(reps)]),
            on_the_wire(f"broadcast x {reps}", lambda: [gossip.broadcast(x) for _ in range(reps)])]
    steps = args.wire_steps
    for method, lr in ((Method("PmSGD", "pmsgd", {"momentum": 0.9}), args.sgd_lr), (diloco(args), args.diloco_lr)):
        rows.append(on_the_wire(f"training: {method.label}, {steps} steps",
                                lambda m=method, lr=lr: _steps(m, lr, data, shard, args, steps)))
    return rows


def time_to_target(args, data, shard) -> dict:
    """Collective, on the emulated cluster: the wire check, then each method until every target."""
    from throughput import init_process_group

    if gossip.rank() == 0:
        print(f"wire check ({gossip.machine_size()} machines of {gossip.local_size()} ranks):", flush=True)
    rows = wire_check(args, data, shard)
    init_process_group("gloo")
    methods = [(Method("DDP (gloo), AdamW", "ddp", {}, "adamw"), args.ddp_lr)]
    sgd = {"momentum": 0.9}
    if args.all_methods:
        methods += [(Method("DDP (gloo), momentum SGD", "ddp-sgd", sgd), args.sgd_lr),
                    (Method("PmSGD (gossip.allreduce), momentum SGD", "pmsgd", sgd), args.sgd_lr),
                    (Method("DmSGD (one-peer exp-2)", "dmsgd", {**sgd, "topology": "one-peer-exp2"}), args.sgd_lr),
                    (Method(f"local SGD (momentum 0.9, H={args.period})", "local-sgd", {**sgd, "period": args.period}),
                     args.sgd_lr)]
    methods.append((diloco(args), args.diloco_lr))
    if args.all_methods:
        methods += [(Method(f"DiLoCo H={h}", "diloco", {"period": h, **OUTER}, "adamw"), args.diloco_lr)
                    for h in args.periods if h != args.period]
        methods.append((Method(f"DiLoCo H={args.period}, int8 outer gradients", "diloco",
                               {"period": args.period, "compressor": "int8", **OUTER}, "adamw"), args.diloco_lr))
    methods.append((streaming(args), args.streaming_lr))
    if gossip.rank() == 0:
        print(f"time to validation loss {args.targets}:", flush=True)
    results, leader = [], gossip.local_rank() == 0
    for method, lr in methods:
        before = interface_counters() if leader else (0, 0)
        run = train(method, lr, data, shard, args, args.seeds[0], args.max_steps, args.eval_every, args.targets)
        after = interface_counters() if leader else (0, 0)
        run["wire_bytes_per_machine"] = COMM.allreduce(after[0] - before[0]) / gossip.machine_size()
        results.append(run)
    return {"wire": rows, "results": results}


def crossing(run: dict, target: float) -> float | None:
    """The training seconds at which ``run``'s validation loss reached ``target``, interpolated
    linearly between the evaluation before and the first at or below it (None: never reached)."""
    curve = run["curve"]
    for before, after in zip(curve, curve[1:], strict=False):
        if after["val_loss"] <= target:
            share = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
            return before["seconds"] + share * (after["seconds"] - before["seconds"])
    return None


def time_table(report: dict, args) -> str:
    results = report["results"]
    lines = [f"emulated cluster {report['cluster']}, CharTransformer width {args.width}, {args.layers} layers "
             f"({report['parameters']:,} parameters), batch {args.batch_size} per rank, eval every {args.eval_every} "
             f"steps (time to a target: at the first evaluation at or below it, and interpolated between it and the "
             f"one before; evaluation excluded from the time; wire bytes: what each machine's eth0 sent during the "
             f"run, evaluation included, DDP's gloo traffic too, which gossip.traffic does not see)",
             f"{'method':<52}{'lr':>8}{'s/step':>8}{'MB counted/rank':>17}{'MB wire/machine':>17}"
             + "".join(f"{f'to {t:g}: steps, s, interp. s':>30}" for t in args.targets)]
    for r in results:
        cells = []
        for t in args.targets:
            hit = r["reached"][str(t)]
            cells.append(f"{hit['step']:>10} {hit['seconds']:>8.1f} {crossing(r, t):>8.1f}" if hit
                         else f"{'not reached':>28}")
        per_step = r["seconds"] / r["steps"] if r["steps"] else math.nan
        lines.append(f"{r['method']:<52}{r['lr']:>8g}{per_step:>8.3f}{r['bytes'] / 1e6:>17.2f}"
                     f"{r['wire_bytes_per_machine'] / 1e6:>17.2f}" + "".join(f"{c:>30}" for c in cells))
    ours = [r for r in results if r["name"] in ("diloco", "streaming-diloco")]
    for t in args.targets:
        for baseline in (r for r in results if r["name"].startswith("ddp")):
            theirs = baseline["reached"][str(t)]
            for mine in ours:
                hit = mine["reached"][str(t)]
                if hit and theirs:
                    lines.append(f"to {t:g}: {baseline['method']} took {theirs['seconds'] / hit['seconds']:.2f}x "
                                 f"(interpolated {crossing(baseline, t) / crossing(mine, t):.2f}x) the time of "
                                 f"{mine['method']}")
    lines.append("\nbytes counted (gossip.traffic, summed over ranks) against bytes the machines' eth0 sent:")
    for row in report["wire"]:
        ratio = f"{row['wire_per_counted']:.3f}" if row["wire_per_counted"] else "-"
        lines.append(f"  {row['what']:<52}{row['counted_bytes'] / 1e6:>10.2f} MB counted"
                     f"{row['wire_bytes'] / 1e6:>10.2f} MB on the wire ({row['wire_packets']} packets): {ratio}")
    return "\n".join(lines)


def launch_cluster(args, argv: list[str]) -> int:
    """Run ``--experiment time`` on ``gossiprun --emulate SHAPE --link RATE``; echo its output."""
    forwarded = [a for a in argv if a not in ("--experiment", "cluster")]
    cmd = [sys.executable, "-m", "gossip.tools.launch", "--emulate", args.shape, "--link", args.link, sys.executable,
           str(Path(__file__).resolve()), *forwarded, "--experiment", "time", "--shape", args.shape,
           "--link", args.link]
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["cluster", "time", "tune"], default="cluster")
    add_workload_arguments(parser, batch_size=8, width=128, layers=4)
    parser.add_argument("--period", type=int, default=50, help="DiLoCo's and streaming DiLoCo's H")
    parser.add_argument("--fragments", type=int, default=4, help="streaming DiLoCo's fragments")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0])
    parser.add_argument("--targets", type=floats, default=[2.4, 2.2], help="validation losses to reach")
    parser.add_argument("--max-steps", type=int, default=800, help="at most this many steps per method")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lrs", type=floats, default=[2.5e-4, 5e-4, 1e-3, 2e-3], help="tune: the AdamW lrs tried")
    parser.add_argument("--ddp-lr", type=float, default=1e-3, help="time: DDP's AdamW lr")
    parser.add_argument("--diloco-lr", type=float, default=5e-4, help="time: DiLoCo's inner AdamW lr")
    parser.add_argument("--streaming-lr", type=float, default=5e-4, help="time: streaming DiLoCo's inner AdamW lr")
    parser.add_argument("--all-methods", action="store_true",
                        help="time: DDP, PmSGD, DmSGD and local SGD with momentum SGD, DiLoCo at every H of --periods "
                             "and with int8 outer gradients too")
    parser.add_argument("--periods", type=lambda s: [int(v) for v in s.split(",")], default=[10, 50, 100],
                        help="time, --all-methods: DiLoCo's H")
    parser.add_argument("--sgd-lr", type=float, default=0.3,
                        help="time: momentum SGD's lr (the convergence experiment's tuned lr; and the wire check's)")
    parser.add_argument("--shape", default="4x1", help="cluster: machines x ranks")
    parser.add_argument("--link", default="100mbit", help="cluster: each machine's link rate (time: as reported)")
    parser.add_argument("--wire-reps", type=int, default=10, help="time: repetitions of each op in the wire check")
    parser.add_argument("--wire-steps", type=int, default=20, help="time: training steps in the wire check")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    if args.experiment == "cluster":
        return launch_cluster(args, argv)
    data, shard, parameters = start(args)
    if args.experiment == "tune":
        report = tune(args, data, shard)
    else:
        report = time_to_target(args, data, shard)
        report["cluster"] = f"{gossip.machine_size()} machines x {gossip.local_size()} ranks, {args.link}"
    report["parameters"] = parameters
    if gossip.rank() == 0:
        table = tune_table(report, args) if args.experiment == "tune" else time_table(report, args)
        print("\n" + table)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"diloco-{args.experiment}-np{gossip.size()}"
        report["args"] = dict(vars(args))
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".txt").write_text(table + "\n")
        curves = {"results": [{**r, "method": f"{r['method']}, lr {r['lr']:g}"} for r in report["results"]]}
        plot(curves, stem.with_suffix(".png"), ("step", "seconds"))
    gossip.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
