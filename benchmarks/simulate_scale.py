"""Communication time per iteration at cluster scale, from the cost model and a cluster profile.

``python benchmarks/simulate_scale.py`` (no MPI needed)

For ResNet-50 (25.5 M parameters) and BERT-large (300 M, the size the paper below gives), float32
(4 bytes a parameter), on 8 to 1024 GPUs (8 per machine, NVLink inside), predicts one iteration's
communication with :mod:`gossip.plan.cost_model` for ring allreduce and three partial-averaging
plans: static exponential-2, one-peer exponential-2 and hierarchical (machine average, one-peer
exponential-2 between machines), and what :class:`gossip.Scheduler` would pick (no compute time). The cluster profiles
(``gossip.plan.profiles``) document their values and sources.

Then compares with the communication times per iteration measured on 256 GPUs by Chen, Yuan, Zhang,
Pan, Xu and Yin, "Accelerating Gossip SGD with Periodic Global Averaging", ICML 2021 (ResNet-50:
278 ms ring allreduce vs 150 ms partial average; BERT: 1469 vs 567 ms), and prints
predicted/measured for each profile. Writes ``results/simulate-scale.json`` and a plot of
time per iteration against GPU count (``results/simulate-scale.png``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gossip.plan.profiles import cluster_profile, profile_names
from gossip.plan.scheduler import rank_candidates

MODELS = {"ResNet-50": 25.5e6 * 4, "BERT-large": 300e6 * 4}
# seconds of communication per iteration on 256 GPUs, as measured by Chen, Yuan et al., ICML 2021
PAPER_256 = {"ResNet-50": {"ring allreduce": 0.278, "partial average": 0.150},
             "BERT-large": {"ring allreduce": 1.469, "partial average": 0.567}}
PLANS = ("ring allreduce", "static exponential-2", "one-peer exponential-2", "hierarchical")
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)


def predict(profile: str, model_bytes: float, gpus: int) -> dict:
    """Predicted seconds per iteration of each plan in :data:`PLANS` for ``model_bytes`` on ``gpus`` GPUs of
    ``profile``, and (key ``"scheduler"``) the plan :func:`gossip.plan.scheduler.rank_candidates` picks."""
    cost = cluster_profile(profile, gpus)
    row = {"ring allreduce": cost.ring_allreduce(model_bytes), "static exponential-2": cost.exponential(model_bytes),
           "one-peer exponential-2": cost.one_peer(model_bytes), "hierarchical": cost.hierarchical(model_bytes)}
    chosen = next(c for c in rank_candidates(cost, model_bytes) if c.chosen)
    row["scheduler"] = f"{chosen.name}" + (f", H={chosen.global_avg_every}" if chosen.global_avg_every else "")
    return row


def compare_with_paper(table: dict) -> list[str]:
    """Lines comparing the 256-GPU predictions of ``table`` with the measurements of :data:`PAPER_256`."""
    lines = ["", "256 GPUs against the measurement of Chen, Yuan et al., ICML 2021 (predicted / measured):"]
    for profile, models in table.items():
        for model, rows in models.items():
            row, paper = rows["256"], PAPER_256[model]
            best = min(PLANS[1:], key=lambda p: row[p])
            partial = row[best]
            lines.append(f"  {profile:<26} {model:<10} ring {row['ring allreduce'] * 1e3:7.1f} ms / "
                         f"{paper['ring allreduce'] * 1e3:.0f} = "
                         f"{row['ring allreduce'] / paper['ring allreduce']:.2f}; "
                         f"best partial ({best}) {partial * 1e3:7.1f} ms / {paper['partial average'] * 1e3:.0f} = "
                         f"{partial / paper['partial average']:.2f}; ring/partial {row['ring allreduce'] / partial:.2f}"
                         f" (paper {paper['ring allreduce'] / paper['partial average']:.2f})")
    return lines




def plot(table: dict, path: Path) -> None:
    """Communication per iteration (ms) against GPU count, one panel per model, with the paper's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4.5))
    styles = {"ethernet-25g": "-", "ethernet-25g-per-flow-10g": ":", "infiniband-100g": "--"}
    colours = dict(zip(PLANS, ("black", "tab:orange", "tab:blue", "tab:green"), strict=True))
    for ax, model in zip(axes, MODELS, strict=True):
        for profile, models in table.items():
            for plan in PLANS:
                ax.plot(GPU_COUNTS, [models[model][str(g)][plan] * 1e3 for g in GPU_COUNTS], styles.get(profile, "-"),
                        color=colours[plan], marker="o", markersize=3, label=f"{plan} ({profile})")
        for plan, seconds in PAPER_256[model].items():
            ax.plot([256], [seconds * 1e3], "*", markersize=12, color="red" if plan == "ring allreduce" else "purple",
                    label=f"Chen, Yuan et al. 2021, 256 GPUs: {plan}")
        ax.set(xscale="log", yscale="log", xlabel="GPUs (8 per machine)", ylabel="communication per iteration (ms)",
               title=f"{model} ({MODELS[model] / 4e6:.1f} M parameters, float32)")
        ax.set_xticks(GPU_COUNTS, [str(g) for g in GPU_COUNTS])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Print the tables and the comparison; write the JSON and (unless ``--no-plot``) the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default=",".join(profile_names()), help="comma-separated profile names")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    table = {p: {m: {str(g): predict(p, nbytes, g) for g in GPU_COUNTS} for m, nbytes in MODELS.items()}
             for p in profiles}
    for profile, models in table.items():
        for model, rows in models.items():
            print(f"\n{profile}, {model} ({MODELS[model] / 1e6:.0f} MB): ms per iteration")
            print(f"{'GPUs':>6}" + "".join(f"{p:>24}" for p in PLANS) + "   scheduler picks")
            for gpus, row in rows.items():
                print(f"{gpus:>6}" + "".join(f"{row[p] * 1e3:>24.1f}" for p in PLANS) + f"   {row['scheduler']}")
    print("\n".join(compare_with_paper(table)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "simulate-scale.json").write_text(json.dumps({"models_bytes": MODELS, "paper_256": PAPER_256,
                                                              "predicted_seconds": table}, indent=1))
    if not args.no_plot:
        plot(table, args.out / "simulate-scale.png")
    print(f"wrote {args.out / 'simulate-scale.json'}" + ("" if args.no_plot else " and simulate-scale.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
