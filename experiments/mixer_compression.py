"""Auto-compression: Res-Mixer against AC-Mixer (and ANCRe) on Fashion-MNIST, the same budget.

Every run is ``ancre fit --config configs/classifier/mixer_fmnist_<wiring>.yaml`` (residual = the
ACN paper's Res-Mixer, acn = its AC-Mixer, ancre = learned wiring) made deeper and shorter by
overrides (default 12 blocks, 2 epochs, validation twice an epoch), started as a subprocess; runs go
to ``--runs-dir`` (default ``experiments/runs/mixer``, git-ignored). The configs' EarlyExitEvaluation
callback evaluates, at every validation, the accuracy of every exit k = 0..K (the shared norm and
head applied to the state after k blocks; for ACN the partial sum) and the cutoff layer (the earliest
exit within 1 % of the full network's accuracy). The report (``--out``, default
``experiments/out/mixer_compression``) reads the event files back:

- ``exits.png``: final accuracy of every exit against depth; cutoff layer and validation accuracy
  over training;
- ``ancre_gates.png``: ANCRe's learned wiring at the end;
- ``results.json`` and ``table.md``: final accuracy, per-exit accuracy, cutoff layer (and the
  fraction of the depth it uses), and the layers each wiring needs to reach a common accuracy
  (99 % of Res-Mixer's full accuracy), i.e. how many fewer layers than Res-Mixer (the ACN paper
  reports 30-80 % fewer at equal accuracy).

Finished runs are skipped, so the same command resumes::

    .venv/bin/python experiments/mixer_compression.py --jobs 1     # 3 runs, about 30 min on 2 idle cores
    .venv/bin/python experiments/mixer_compression.py --report-only
    .venv/bin/python experiments/mixer_compression.py --quick       # a tiny end-to-end check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    ROOT,
    RunSpec,
    ancre_coefficients,
    done_info,
    draw_heatmap,
    is_done,
    last_checkpoint,
    launch_unless_report_only,
    log_dir,
    new_figure,
    read_scalars,
    resolve_folders,
    run_record,
    sweep_parser,
    validation_curve,
    validation_shift,
    write_report,
)

WIRINGS = ["residual", "acn", "ancre"]
LABELS = {"residual": "Res-Mixer", "acn": "AC-Mixer", "ancre": "ANCRe-Mixer"}
COLORS = {"residual": "tab:gray", "acn": "tab:orange", "ancre": "tab:green"}
#: the deeper, shorter variant of the shipped CPU configs (6 blocks, 5 epochs)
DEFAULT_OVERRIDES = ["--model.init_args.depth=12", "--trainer.max_epochs=2", "--trainer.val_check_interval=0.5"]
#: overrides of --quick: 3 blocks, 3 training batches on a small slice
QUICK = [
    "--model.init_args.depth=3",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--data.init_args.batch_size=32",
    "--data.init_args.max_train_samples=512",
    "--model.init_args.warmup_steps=1",
]
#: common accuracy for "layers needed": this fraction of Res-Mixer's full-network accuracy
EQUAL_ACCURACY = 0.99


def run_name(wiring: str, seed: int) -> str:
    """Folder name of one run."""
    return f"{wiring}_seed{seed}"


def config(wiring: str) -> Path:
    """The shipped Fashion-MNIST Mixer config of a wiring."""
    return ROOT / "configs" / "classifier" / f"mixer_fmnist_{wiring}.yaml"


def specs(wirings: list[str], seeds: list[int], overrides: list[str]) -> list[RunSpec]:
    """One :class:`RunSpec` per wiring and seed."""
    return [
        RunSpec(run_name(w, s), ["--config", str(config(w)), f"--seed_everything={s}", *overrides], {"wiring": w, "seed": s})
        for s in seeds for w in wirings
    ]


def exit_series(scalars: dict, metric: str = "accuracy") -> tuple[list[int], list[list[float]]]:
    """Steps of the early-exit evaluations and, for each, the metric of exits 0..K."""
    prefix = f"early_exit/{metric}_exit"
    tags = sorted((t for t in scalars if t.startswith(prefix) and t[len(prefix):].isdigit()), key=lambda t: int(t[len(prefix):]))
    if not tags:
        return [], []
    steps = sorted(set.intersection(*(set(s for s, _ in scalars[t]) for t in tags)))
    tables = [dict(scalars[t]) for t in tags]
    return steps, [[tab[s] for tab in tables] for s in steps]


def first_exit_reaching(accuracies: list[float], level: float) -> int | None:
    """The earliest exit whose accuracy is at least ``level`` (None: not even the full network)."""
    return next((k for k, a in enumerate(accuracies) if a >= level), None)


def collect(runs_dir: Path, wirings: list[str], seeds: list[int]) -> dict:
    """Read every finished run: validation accuracy, per-exit accuracy over training, cutoff layers."""
    runs: dict[str, dict] = {}
    for seed in seeds:
        for w in wirings:
            name = run_name(w, seed)
            if not is_done(runs_dir, name):
                continue
            scalars = read_scalars(log_dir(runs_dir, name))
            steps, per_exit = exit_series(scalars)
            if not steps:
                continue
            entry = {
                "wiring": w,
                "seed": seed,
                "val_acc1": validation_curve(scalars.get("val/acc1", []), validation_shift(scalars)),  # steps taken
                "exit_steps": steps,
                "exit_accuracy": per_exit,
                "final_exit_accuracy": per_exit[-1],
                "final_accuracy": per_exit[-1][-1],
                "num_blocks": len(per_exit[-1]) - 1,
                "cutoff_layer": [v for _, v in scalars.get("early_exit/cutoff_layer", [])],
                "wall_s": done_info(runs_dir, name)["wall_s"],
            }
            entry["final_cutoff_layer"] = int(entry["cutoff_layer"][-1]) if entry["cutoff_layer"] else None
            ckpt = last_checkpoint(runs_dir, name)
            if w == "ancre" and ckpt is not None:
                entry["coefficients"] = ancre_coefficients(ckpt)
            runs[name] = entry
    return runs


def compare(runs: dict, seeds: list[int]) -> list[dict]:
    """Per seed: the layers each wiring needs to reach 99 % of Res-Mixer's full accuracy, and how
    many fewer that is than Res-Mixer (1 - layers / Res-Mixer's layers)."""
    rows = []
    for seed in seeds:
        ref = runs.get(run_name("residual", seed))
        if ref is None:
            continue
        level = EQUAL_ACCURACY * ref["final_accuracy"]
        ref_layers = first_exit_reaching(ref["final_exit_accuracy"], level)
        for r in runs.values():
            if r["seed"] != seed:
                continue
            layers = first_exit_reaching(r["final_exit_accuracy"], level)
            rows.append({
                "seed": seed,
                "wiring": r["wiring"],
                "level": level,
                "layers_needed": layers,
                "fewer_layers_than_residual": None if layers is None or not ref_layers else 1 - layers / ref_layers,
            })
    return rows


def plot_exits(runs: dict, path: Path) -> None:
    """Final accuracy per exit; cutoff layer and validation accuracy over training."""
    fig = new_figure(14, 4.0)
    ax_exit, ax_cut, ax_acc = fig.subplots(1, 3)
    for r in runs.values():
        label = f"{LABELS.get(r['wiring'], r['wiring'])} seed {r['seed']}"
        color = COLORS.get(r["wiring"])
        acc = r["final_exit_accuracy"]
        ax_exit.plot(range(len(acc)), acc, marker="o", markersize=3, color=color, label=label)
        if r["final_cutoff_layer"] is not None:
            ax_exit.axvline(r["final_cutoff_layer"], color=color, linestyle=":", linewidth=1)
        if r["cutoff_layer"]:
            ax_cut.plot(r["exit_steps"][-len(r["cutoff_layer"]):], r["cutoff_layer"], marker="o", color=color, label=label)
        if r["val_acc1"]:
            ax_acc.plot([s for s, _ in r["val_acc1"]], [v for _, v in r["val_acc1"]], marker=".", color=color, label=label)
    ax_exit.set_xlabel("exit: blocks used (k)")
    ax_exit.set_ylabel("validation accuracy of exit k")
    ax_exit.set_title("per-exit accuracy at the end\n(dotted: cutoff layer, 1 % tolerance)", fontsize=9)
    ax_exit.set_ylim(0.0, 1.0)
    ax_exit.legend(fontsize=7)
    ax_cut.set_xlabel("optimizer step")
    ax_cut.set_ylabel("cutoff layer")
    ax_cut.set_title("cutoff layer over training", fontsize=9)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("val/acc1 (full network)")
    ax_acc.set_title("validation accuracy", fontsize=9)
    for ax in (ax_exit, ax_cut, ax_acc):
        ax.grid(True, alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def plot_gates(runs: dict, path: Path) -> bool:
    """ANCRe-Mixer's learned wiring at the end of each seed; False if there is none."""
    ancre = [r for r in sorted(runs.values(), key=lambda r: r["seed"]) if r.get("coefficients")]
    if not ancre:
        return False
    k = ancre[0]["num_blocks"]
    side = max(4.0, 0.42 * (k + 1) + 1.5)
    fig = new_figure(side * len(ancre) + 0.8, side)
    axes = fig.subplots(1, len(ancre), squeeze=False)[0]
    image = None
    for ax, r in zip(axes, ancre):
        image = draw_heatmap(ax, next(iter(r["coefficients"].values())), f"ANCRe-Mixer seed {r['seed']}, end of training")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.savefig(path)
    return True


def table(runs: dict, rows: list[dict]) -> str:
    """Markdown tables: final and per-exit accuracy, cutoff layer, layers needed at equal accuracy."""
    lines = ["| wiring | seed | final val accuracy | cutoff layer / K (1 % tol.) | layers for 99 % of Res-Mixer acc. | fewer layers than Res-Mixer | wall (min) |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["wiring"], r["seed"]): r for r in rows}
    for r in runs.values():
        c = by.get((r["wiring"], r["seed"]), {})
        layers = c.get("layers_needed")
        fewer = c.get("fewer_layers_than_residual")
        lines.append(
            f"| {LABELS.get(r['wiring'], r['wiring'])} | {r['seed']} | {r['final_accuracy']:.4f} | "
            f"{r['final_cutoff_layer']} / {r['num_blocks']} | {'-' if layers is None else layers} | "
            f"{'-' if fewer is None else f'{100 * fewer:.0f} %'} | {r['wall_s'] / 60:.1f} |"
        )
    lines += ["", "| exit k | " + " | ".join(f"{LABELS.get(r['wiring'], r['wiring'])} s{r['seed']}" for r in runs.values()) + " |",
              "|---" * (len(runs) + 1) + "|"]
    depth = max(r["num_blocks"] for r in runs.values())
    for k in range(depth + 1):
        cells = [f"{r['final_exit_accuracy'][k]:.4f}" if k < len(r["final_exit_accuracy"]) else "" for r in runs.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(runs_dir: Path, out: Path, wirings: list[str], seeds: list[int]) -> dict:
    """Read the finished runs and write ``exits.png``, ``ancre_gates.png``, ``results.json`` and ``table.md``."""
    runs = collect(runs_dir, wirings, seeds)
    head = run_record(runs_dir, runs, len(wirings) * len(seeds))
    rows = compare(runs, seeds)
    out.mkdir(parents=True, exist_ok=True)
    plot_exits(runs, out / "exits.png")
    has_gates = plot_gates(runs, out / "ancre_gates.png")
    results = {**head, "equal_accuracy_fraction_of_residual": EQUAL_ACCURACY, "layers_at_equal_accuracy": rows, "runs": runs}
    write_report(out, results, table(runs, rows), [out / "exits.png"] + ([out / "ancre_gates.png"] if has_gates else []))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = sweep_parser("Res-Mixer vs AC-Mixer vs ANCRe-Mixer on Fashion-MNIST: per-exit accuracy and cutoff layers", "mixer", 1,
                     "tiny end-to-end check: 3 blocks, 3 steps", "--model.init_args.dim=96")
    p.add_argument("--wirings", nargs="+", default=WIRINGS, help="wirings to compare (configs mixer_fmnist_<wiring>.yaml)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds")
    p.add_argument("--depth", type=int, default=None, help="Mixer blocks K (default 12)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Launch the missing runs (unless ``--report-only``), then write the report."""
    args = parse_args(argv)
    overrides = list(QUICK if args.quick else DEFAULT_OVERRIDES)
    if args.depth is not None:
        overrides.append(f"--model.init_args.depth={args.depth}")
    if args.epochs is not None:
        overrides.append(f"--trainer.max_epochs={args.epochs}")
    overrides += args.override
    resolve_folders(args, "mixer", "mixer_compression")
    launch_unless_report_only(args, specs(args.wirings, args.seeds, overrides))
    return report(args.runs_dir, args.out, args.wirings, args.seeds)


if __name__ == "__main__":
    main()
