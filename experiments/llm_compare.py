"""LLM pretraining at CPU scale: residual, ANCRe, ACN and DenseFormer, the same budget, several seeds.

Every run is ``ancre fit --config experiments/configs/llm_compare.yaml`` with its connectivity and
seed (``seed_everything`` and the data order), started as a subprocess; runs go to
``--runs-dir`` (default ``experiments/runs/llm``, git-ignored). The report reads the TensorBoard
event files back and writes to ``--out`` (default ``experiments/out/llm_compare``):

- ``val_loss.png``: validation loss against step, mean over seeds with the min-max band;
- ``ancre_gates.png``: ANCRe's learned wiring at the end of each seed (``coefficients()`` of the
  connectivity rebuilt from ``last.ckpt``);
- ``results.json``: per run the curve, final validation loss and perplexity and wall time; per
  connectivity the final perplexity's mean and standard deviation; and the fraction of the steps
  each wiring needs to reach residual's final validation loss (interpolated between evaluations;
  the ANCRe paper reports about 0.66, i.e. 34 % fewer iterations);
- ``table.md``: the tables RESULTS.md quotes.

Finished runs are skipped, so the same command resumes an interrupted sweep::

    .venv/bin/python experiments/llm_compare.py --jobs 2                 # 12 runs, about 55 min on 2 idle cores
    .venv/bin/python experiments/llm_compare.py --report-only            # figures and JSON from finished runs
    .venv/bin/python experiments/llm_compare.py --quick --runs-dir /tmp/q   # a tiny end-to-end check
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    EXPERIMENTS,
    RunSpec,
    ancre_coefficients,
    done_info,
    draw_heatmap,
    interpolate_crossing,
    is_done,
    last_checkpoint,
    launch_unless_report_only,
    log_dir,
    mean_curve,
    mean_std,
    new_figure,
    read_scalars,
    resolve_folders,
    run_record,
    sweep_parser,
    validation_curve,
    validation_shift,
    write_report,
)

CONFIG = EXPERIMENTS / "configs" / "llm_compare.yaml"
CONNECTIVITIES = ["residual", "ancre", "acn", "denseformer"]
COLORS = {"residual": "tab:gray", "ancre": "tab:green", "acn": "tab:orange", "denseformer": "tab:blue"}
#: overrides of --quick: two blocks, a few steps on a small slice of the corpus
QUICK = [
    "--model.init_args.n_layers=2",
    "--data.init_args.batch_size=2",
    "--data.init_args.max_train_tokens=40000",
    "--data.init_args.max_val_tokens=8000",
    "--trainer.limit_val_batches=2",
]


def run_name(connectivity: str, seed: int) -> str:
    """Folder name of one run."""
    return f"{connectivity}_seed{seed}"


def specs(connectivities: list[str], seeds: list[int], steps: int | None, val_every: int | None, extra: list[str]) -> list[RunSpec]:
    """One :class:`RunSpec` per connectivity and seed (seed order outer, so early results cover every wiring)."""
    out = []
    for seed in seeds:
        for conn in connectivities:
            args = ["--config", str(CONFIG), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                    f"--model.init_args.connectivity={conn}"]
            if steps is not None:
                args.append(f"--trainer.max_steps={steps}")
            if val_every is not None:
                args.append(f"--trainer.val_check_interval={val_every}")
            out.append(RunSpec(run_name(conn, seed), [*args, *extra], {"connectivity": conn, "seed": seed}))
    return out


def collect(runs_dir: Path, connectivities: list[str], seeds: list[int]) -> dict:
    """Read every finished run: curves, final numbers, wall time and (ANCRe) the learned wiring."""
    runs: dict[str, dict] = {}
    for seed in seeds:
        for conn in connectivities:
            name = run_name(conn, seed)
            if not is_done(runs_dir, name):
                continue
            scalars = read_scalars(log_dir(runs_dir, name))
            val = validation_curve(scalars.get("val/loss", []), validation_shift(scalars))  # steps taken
            if not val:
                continue
            ppl = scalars.get("val/ppl", [])
            entry = {
                "connectivity": conn,
                "seed": seed,
                "val_loss": val,
                "final_step": val[-1][0],
                "final_val_loss": val[-1][1],
                "final_val_ppl": ppl[-1][1] if ppl else math.exp(val[-1][1]),
                "wall_s": done_info(runs_dir, name)["wall_s"],
            }
            ckpt = last_checkpoint(runs_dir, name)
            if conn == "ancre" and ckpt is not None:
                entry["coefficients"] = ancre_coefficients(ckpt)
            runs[name] = entry
    return runs


def summarize(runs: dict, connectivities: list[str]) -> dict:
    """Per connectivity: final perplexity and loss (mean, std over seeds), mean curve, and the
    fraction of steps needed to reach residual's final validation loss."""
    by_conn: dict[str, dict] = {}
    for conn in connectivities:
        mine = [r for r in runs.values() if r["connectivity"] == conn]
        if not mine:
            continue
        ppl_mean, ppl_std = mean_std([r["final_val_ppl"] for r in mine])
        loss_mean, loss_std = mean_std([r["final_val_loss"] for r in mine])
        by_conn[conn] = {
            "seeds": sorted(r["seed"] for r in mine),
            "final_val_ppl_mean": ppl_mean,
            "final_val_ppl_std": ppl_std,
            "final_val_loss_mean": loss_mean,
            "final_val_loss_std": loss_std,
            "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
            "mean_curve": mean_curve([r["val_loss"] for r in mine]),
        }
    ref = by_conn.get("residual")
    if ref is not None:
        level = ref["final_val_loss_mean"]
        final_step = ref["mean_curve"][-1][0]
        for conn, entry in by_conn.items():
            crossing = interpolate_crossing(entry["mean_curve"], level)
            entry["steps_to_residual_final_loss"] = crossing
            entry["fraction_of_steps_to_residual_final_loss"] = None if crossing is None else crossing / final_step
            per_seed = []  # the same with each seed's own residual run as the reference
            for r in runs.values():
                twin = runs.get(run_name("residual", r["seed"]))
                if r["connectivity"] == conn and twin is not None:
                    c = interpolate_crossing(r["val_loss"], twin["final_val_loss"])
                    per_seed.append(None if c is None else c / twin["final_step"])
            entry["fraction_per_seed"] = per_seed
    return by_conn


def plot_curves(runs: dict, by_conn: dict, path: Path) -> None:
    """Validation loss against step: mean over seeds and the min-max band; right panel zooms on the second half."""
    fig = new_figure(11, 4.2)
    axes = fig.subplots(1, 2)
    for ax, zoom in zip(axes, (False, True)):
        for conn, entry in by_conn.items():
            curves = [dict(r["val_loss"]) for r in runs.values() if r["connectivity"] == conn]
            steps = [s for s, _ in entry["mean_curve"]]
            lo = [min(c[s] for c in curves) for s in steps]
            hi = [max(c[s] for c in curves) for s in steps]
            mean = [v for _, v in entry["mean_curve"]]
            label = f"{conn} (ppl {entry['final_val_ppl_mean']:.3f} +- {entry['final_val_ppl_std']:.3f})"
            ax.plot(steps, mean, color=COLORS.get(conn), label=label, linewidth=1.6)
            ax.fill_between(steps, lo, hi, color=COLORS.get(conn), alpha=0.2, linewidth=0)
        if "residual" in by_conn:
            ax.axhline(by_conn["residual"]["final_val_loss_mean"], color="tab:gray", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        if zoom and by_conn:
            last = max(e["mean_curve"][-1][0] for e in by_conn.values())
            ax.set_xlim(last / 2, last * 1.01)
            tail = [v for e in by_conn.values() for s, v in e["mean_curve"] if s >= last / 2]
            ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
            ax.set_title("second half (dotted: residual's final loss)", fontsize=9)
        else:
            ax.set_title("byte-level LM on Wikipedia: mean over seeds, band = min..max", fontsize=9)
            ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def plot_gates(runs: dict, path: Path) -> bool:
    """ANCRe's learned wiring at the end of each seed, side by side; False if there is none."""
    ancre = [r for r in sorted(runs.values(), key=lambda r: r["seed"]) if r.get("coefficients")]
    if not ancre:
        return False
    fig = new_figure(3.6 * len(ancre) + 0.8, 3.6)
    axes = fig.subplots(1, len(ancre), squeeze=False)[0]
    image = None
    for ax, r in zip(axes, ancre):
        matrix = next(iter(r["coefficients"].values()))
        image = draw_heatmap(ax, matrix, f"ANCRe seed {r['seed']}, step {r['final_step']}")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.savefig(path)
    return True


def table(by_conn: dict, runs: dict) -> str:
    """Markdown tables: final perplexity per wiring, and the steps fraction."""
    lines = ["| wiring | seeds | final val loss (mean +- std) | final val perplexity (mean +- std) | "
             "steps to residual's final loss (fraction) | per seed | wall per run (min) |",
             "|---|---|---|---|---|---|---|"]
    for conn, e in by_conn.items():
        frac = e.get("fraction_of_steps_to_residual_final_loss")
        per_seed = ", ".join("never" if f is None else f"{f:.2f}" for f in e.get("fraction_per_seed", []))
        lines.append(
            f"| {conn} | {len(e['seeds'])} | {e['final_val_loss_mean']:.4f} +- {e['final_val_loss_std']:.4f} | "
            f"{e['final_val_ppl_mean']:.4f} +- {e['final_val_ppl_std']:.4f} | "
            f"{'never' if frac is None else f'{frac:.2f}'} | {per_seed} | {e['wall_s_mean'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def report(runs_dir: Path, out: Path, connectivities: list[str], seeds: list[int]) -> dict:
    """Read the finished runs and write the figures, ``results.json`` and ``table.md``."""
    runs = collect(runs_dir, connectivities, seeds)
    head = run_record(runs_dir, runs, len(connectivities) * len(seeds))
    by_conn = summarize(runs, connectivities)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, by_conn, out / "val_loss.png")
    has_gates = plot_gates(runs, out / "ancre_gates.png")
    results = {**head, "config": str(CONFIG.relative_to(EXPERIMENTS.parent)), "connectivities": by_conn, "runs": runs}
    write_report(out, results, table(by_conn, runs), [out / "val_loss.png"] + ([out / "ancre_gates.png"] if has_gates else []))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = sweep_parser("residual vs ANCRe vs ACN vs DenseFormer on the Wikipedia byte corpus", "llm", 2,
                     "tiny end-to-end check: 2 blocks, 4 steps, seed 0", "--model.init_args.n_layers=6")
    p.add_argument("--connectivities", nargs="+", default=CONNECTIVITIES, help="wirings to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (model init and data order)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's 800)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: the config's 50)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Launch the missing runs (unless ``--report-only``), then write the report."""
    args = parse_args(argv)
    extra = list(args.override)
    if args.quick:
        extra = QUICK + extra
        args.steps = args.steps or 4
        args.val_every = args.val_every or 2
        if args.seeds == [0, 1, 2]:
            args.seeds = [0]
    resolve_folders(args, "llm", "llm_compare")
    launch_unless_report_only(args, specs(args.connectivities, args.seeds, args.steps, args.val_every, extra))
    return report(args.runs_dir, args.out, args.connectivities, args.seeds)


if __name__ == "__main__":
    main()
