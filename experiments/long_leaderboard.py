"""The long leaderboard: eight wirings at 16 blocks for 4,000 steps, three seeds each.

The depth sweep (``depth_scaling.py``) stops at 540 steps, where the loss is still falling and
what it ranks is early speed. This driver runs the setup of the ANCRe ablation's long phase
(``ancre_ablation.py``: ``experiments/configs/depth_scaling.yaml``, a byte-level LLaMA-style model
of width 64 on the Wikipedia leads, 16 blocks, 20 warm-up steps, 4,000 AdamW steps at 3e-3 with a
cosine to 10 %, 8.2M tokens, validation every 200 steps on 16k tokens) for

    residual, ancre, denseformer (blocks); hyper (4 streams), mhc (4 streams), attnres (full),
    attnres-block (4 sub-layers a block) (sub-layers); mudd (blocks)

with seeds 0, 1 and 2 (model init and data order; one seed gives every wiring the same block
weights and batches). Each wiring runs as the depth sweep runs it (``depth_scaling.wiring_args``).
The ablation's finished long runs of residual, ancre and denseformer have exactly this setup and
are reused: their records are copied (``reused_from`` names the source) instead of run again.
Those records predate the whole-split evaluation, so they have no ``final_val_loss_full``;
``--no-reuse`` runs them here too.

Records and resuming as in the other drivers: one committed record per finished run in
``<out>/runs/`` (curves, final loss on the training-time 16k tokens and on the whole validation
split of 64k tokens, tokens/s, the final wiring matrix), finished runs skipped, ``--start-until``
to end a session with nothing cut off, ``--report-only`` from the records alone. The report
(``--out``, default ``experiments/out/long_leaderboard``):

- ``results.json``: one record per run (``wiring``, ``depth``, ``seed``, ``final_step``,
  ``final_val_loss``, ``final_val_loss_full``, curves, tokens/s, ``reused_from``), the summary per
  wiring (mean, std, min, max, the gap to residual unpaired and paired by seed with raw and
  Benjamini-Hochberg p-values), sign tests, the step from which each run stays ahead of its
  residual twin, and the ranking at 540 steps from the depth sweep's 16-block runs beside this one;
- ``curves.png``: validation loss against step (mean over seeds, min-max band; right: the second half);
- ``gap.png``: each wiring's validation loss minus its same-seed residual run against step;
- ``gates*.png``: the learned wirings at the end (lowest seed with a saved matrix), one figure per
  kind of matrix (weights of 0 to 1, weights that can exceed 1, signed coefficients);
- ``table.md``: the leaderboard, and the two rankings side by side.

Commands (about 13 core-hours for what is not reused; 2 runs at a time on 2 idle cores)::

    .venv/bin/python experiments/long_leaderboard.py --jobs 2 --threads 1   # the runs, then the report
    .venv/bin/python experiments/long_leaderboard.py --report-only          # the report from the records
    .venv/bin/python experiments/long_leaderboard.py --quick                # end-to-end check, a few minutes
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ancre_lightning.atomic import atomic_write_bytes  # noqa: E402

from _runs import (  # noqa: E402
    EXPERIMENTS,
    RunRecords,
    RunSpec,
    fmt_t,
    launch_unless_report_only,
    portable,
    resolve_folders,
    run_record,
    sweep_parser,
    write_report,
)
import _runs  # noqa: E402
import ancre_ablation  # noqa: E402
import depth_scaling  # noqa: E402

CONFIG = EXPERIMENTS / "configs" / "depth_scaling.yaml"
DEPTH = 16
STEPS = 4000
VAL_EVERY = 200
WARMUP = 20
SEEDS = [0, 1, 2]
WIRINGS = ["residual", "ancre", "denseformer", "hyper", "mhc", "attnres", "attnres-block", "mudd"]
#: slowest first within a seed (from the depth sweep's step times at 16 blocks), so that two runs
#: at a time finish close together
ORDER = ["mhc", "hyper", "attnres", "attnres-block", "mudd", "denseformer", "ancre", "residual"]
#: wirings whose ablation long runs (``long_<wiring>_seed<s>``) have this leaderboard's setup
REUSABLE = ["residual", "ancre", "denseformer"]
ABLATION_RECORDS = EXPERIMENTS / "out" / "ancre_ablation" / "runs"
#: the depth sweep's records: its 16-block runs give the 540-step ranking
SWEEP_RECORDS = EXPERIMENTS / "out" / "depth_scaling" / "runs"


def run_name(wiring: str, seed: int) -> str:
    """Folder and record name of one run."""
    return f"{wiring}_seed{seed}"


def spec(wiring: str, seed: int, steps: int = STEPS, val_every: int = VAL_EVERY, extra: list[str] | None = None) -> RunSpec:
    """One run: the config at 16 blocks and 20 warm-up steps, the wiring as the depth sweep runs
    it, ``seed`` for the model and the data order, ``steps`` with validation every ``val_every``."""
    args = ["--config", str(CONFIG), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            f"--model.init_args.n_layers={DEPTH}", f"--model.init_args.warmup_steps={WARMUP}",
            *depth_scaling.wiring_args(wiring), f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}"]
    return RunSpec(run_name(wiring, seed), [*args, *(extra or [])], {"wiring": wiring, "depth": DEPTH, "seed": seed, "steps": steps})


def specs(wirings: list[str], seeds: list[int], steps: int = STEPS, val_every: int = VAL_EVERY,
          extra: list[str] | None = None) -> list[RunSpec]:
    """Seeds outer (early results cover every wiring), the slowest wirings first within a seed."""
    ordered = sorted(wirings, key=lambda w: ORDER.index(w) if w in ORDER else -1)
    return [spec(w, s, steps, val_every, extra) for s in seeds for w in ordered]


def without_defaults(args: list[str]) -> list[str]:
    """A run's arguments without the wiring options that are their defaults (``{}`` and block
    granularity), to compare setups written two ways."""
    return [a for a in args if a not in ("--model.init_args.connectivity_options={}", "--model.init_args.granularity=block")]


def reuse_ablation_runs(records: RunRecords, run_specs: list[RunSpec], source: Path = ABLATION_RECORDS) -> list[str]:
    """Copy the ablation's long records of the reusable wirings into ``records`` for the runs that
    have none yet, when their arguments are this run's (checked, not assumed); the copy keeps the
    source's curves and timings, takes this run's name and meta, and says where it came from.
    Returns the names adopted."""
    adopted = []
    for s in run_specs:
        if s.meta["wiring"] not in REUSABLE or records.has(s.name):
            continue
        name = ancre_ablation.run_name("long", s.meta["wiring"], s.meta["seed"])
        src = Path(source) / f"{name}.json"
        if not src.is_file():
            continue
        record = json.loads(src.read_text(encoding="utf-8"))
        theirs = ancre_ablation.spec("long", s.meta["wiring"], s.meta["seed"], STEPS, VAL_EVERY, []).args
        if without_defaults([portable(a) for a in s.args]) != without_defaults([portable(a) for a in theirs]) \
                or record["final_step"] != s.meta["steps"]:
            continue
        records.folder.mkdir(parents=True, exist_ok=True)
        record.update(name=s.name, meta=s.meta, reused_from=portable(src))
        png = Path(source) / f"{name}_gates.png"
        if record.get("gates_png") and png.is_file():
            shutil.copyfile(png, records.png_path(s.name))
            record["gates_png"] = records.png_path(s.name).name
            records.written.append(records.png_path(s.name))
        atomic_write_bytes(records.json_path(s.name), (json.dumps(record, indent=1) + "\n").encode("utf-8"))
        records.written.append(records.json_path(s.name))
        adopted.append(s.name)
    return adopted


# --------------------------------------------------------------------------- the report

def full_split_losses(rows: list[dict], wiring: str) -> dict[int, float]:
    """``{seed: loss of the final weights on the whole validation split}`` where the record has it."""
    return {r["seed"]: r["final_val_loss_full"] for r in rows if r["wiring"] == wiring and r.get("final_val_loss_full") is not None}


def summary_with_tests(rows: list[dict], wirings: list[str]) -> dict:
    """Per wiring: the depth sweep's summary at 16 blocks (final loss over seeds, gap to residual
    with Welch's and the paired t-test), the gap on the whole validation split (paired), the step
    from which each seed stays ahead of its residual twin, and a sign test over seeds; p-values
    corrected with Benjamini-Hochberg over every test of the table."""
    summary = {w: by_depth[str(DEPTH)] for w, by_depth in depth_scaling.summarize(rows, wirings, [DEPTH]).items()}
    for w, entry in summary.items():
        mine = sorted((r for r in rows if r["wiring"] == w), key=lambda r: r["seed"])
        full = full_split_losses(rows, w)
        entry["final_val_loss_full_per_seed"] = full
        entry["minus_residual_full_paired"] = None if w == "residual" else _runs.paired(full, full_split_losses(rows, "residual"))
        entry["ahead_of_residual_from_per_seed"] = [r["ahead_of_residual_from"] for r in mine]
        entry["reused_from"] = [r.get("reused_from") for r in mine]
        if w != "residual":
            mine_by_seed = depth_scaling.losses_by_seed(rows, w, DEPTH)
            base = depth_scaling.losses_by_seed(rows, "residual", DEPTH)
            entry["sign_test"] = _runs.sign_test([mine_by_seed[s] - base[s] for s in sorted(set(mine_by_seed) & set(base))])
    _runs.add_benjamini_hochberg([e.get(k) for e in summary.values()
                                  for k in ("minus_residual_welch", "minus_residual_paired", "minus_residual_full_paired")])
    _runs.add_benjamini_hochberg([e.get("sign_test") for e in summary.values()])  # a family of its own
    return summary


def short_ranking(wirings: list[str], seeds: list[int], folder: Path | None = None) -> dict:
    """The depth sweep's 16-block runs (540 steps) of the same wirings: mean final loss per wiring
    over the seeds it has, from the committed records."""
    records = RunRecords(folder or SWEEP_RECORDS, depth_scaling.run_summary)
    wanted = [depth_scaling.spec(depth_scaling.PRESETS["cpu"], w, DEPTH, s, None, None, []) for w in wirings for s in seeds]
    rows = depth_scaling.collect(records, wanted)
    out = {}
    for w in wirings:
        losses = [r["final_val_loss"] for r in rows if r["wiring"] == w]
        if losses:
            out[w] = {"seeds": sorted(r["seed"] for r in rows if r["wiring"] == w),
                      "final_val_loss_mean": sum(losses) / len(losses), "final_step": rows[0]["final_step"]}
    return out


def ranks(means: dict[str, float]) -> dict[str, int]:
    """Rank 1 = lowest loss."""
    return {w: i for i, w in enumerate(sorted(means, key=means.get), 1)}


def table(summary: dict, short: dict, steps: int) -> str:
    """Markdown: the leaderboard ranked by mean final loss, then the 540-step ranking beside it."""
    lines = [f"Leaderboard at {DEPTH} blocks, {steps} steps (final validation loss in nats/byte on the training-time "
             "16k tokens; whole split: the same weights on all 64k validation tokens; p: raw, BH: Benjamini-Hochberg "
             "over the t-tests of this table, and over the sign tests as a family of their own; a sign test counts "
             "the seeds on which the wiring's loss is below its same-seed residual run's):", "",
             "| rank | wiring | seeds | final val loss (mean +- std) | min..max | minus residual +- se (Welch t, p) | "
             "paired by seed (t, p) | whole split, paired by seed (t, p) | sign test (wins/n, p) | "
             "ahead of its residual twin from step (per seed) | tokens/s | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rank, (w, e) in enumerate(sorted(summary.items(), key=lambda item: item[1]["final_val_loss_mean"]), 1):
        ahead = "-" if w == "residual" else ", ".join("never" if a is None else f"{a:.0f}" for a in e["ahead_of_residual_from_per_seed"])
        sign = _runs.fmt_sign(e.get("sign_test"))
        reused = " (reused)" if any(e["reused_from"]) else ""
        lines.append(
            f"| {rank} | {w}{reused} | {len(e['seeds'])} | {e['final_val_loss_mean']:.4f} +- {e['final_val_loss_std']:.4f} | "
            f"{e['final_val_loss_min']:.4f}..{e['final_val_loss_max']:.4f} | {fmt_t(e['minus_residual_welch'])} | "
            f"{fmt_t(e['minus_residual_paired'])} | {fmt_t(e['minus_residual_full_paired'])} | {sign} | {ahead} | "
            f"{depth_scaling.fmt(e['tokens_per_s_mean'], '.0f')} | {e['parameters']:,} |")
    if short:
        long_ranks = ranks({w: e["final_val_loss_mean"] for w, e in summary.items() if w in short})
        short_ranks = ranks({w: e["final_val_loss_mean"] for w, e in short.items() if w in summary})
        step = next(iter(short.values()))["final_step"]
        lines += ["", f"Ranking at {step} steps (the depth sweep's {DEPTH}-block runs, their own schedule) and at {steps} "
                  "steps, over the wirings both have:", "",
                  f"| wiring | rank at {step} | loss at {step} (seeds) | rank at {steps} | loss at {steps} |", "|---|---|---|---|---|"]
        for w in sorted(long_ranks, key=long_ranks.get):
            lines.append(f"| {w} | {short_ranks[w]} | {short[w]['final_val_loss_mean']:.4f} ({len(short[w]['seeds'])}) | "
                         f"{long_ranks[w]} | {summary[w]['final_val_loss_mean']:.4f} |")
    return "\n".join(lines) + "\n"


def report(args, records: RunRecords, run_specs: list[RunSpec], wirings: list[str]) -> dict:
    """Read the records and write the figures, ``results.json`` and ``table.md``."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = ancre_ablation.phase_rows(records, run_specs)
    head = run_record(args.runs_dir, {r["name"]: r for r in rows}, len(run_specs), records)
    present = [w for w in wirings if any(r["wiring"] == w for r in rows)]
    summary = summary_with_tests(rows, present)
    short = short_ranking(present, SEEDS) if not args.quick else {}
    figures = [out / "curves.png", out / "gap.png"]
    depth_scaling.plot_curves_deepest(rows, {w: {str(DEPTH): e} for w, e in summary.items()}, DEPTH, figures[0])
    ancre_ablation.plot_gap(rows, present, figures[1])
    figures += depth_scaling.plot_gates_deepest(rows, present, DEPTH, out / "gates.png")
    results = {
        **head,
        "config": str(CONFIG.relative_to(EXPERIMENTS.parent)),
        "setup": {"depth": DEPTH, "steps": rows[0]["final_step"], "val_every": VAL_EVERY, "warmup_steps": WARMUP,
                  "seeds": SEEDS, "wirings": wirings},
        "summary": summary,
        "ranking_at_540_steps": short,
        "runs": [{**{k: v for k, v in r.items() if k not in ("val_loss_by_wall_s", "gates_matrix")},
                  "gates_png": r["gates_png"] and portable(r["gates_png"])} for r in rows],
    }
    write_report(out, results, table(summary, short, rows[0]["final_step"]), figures)
    return results


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None):
    """Command-line options."""
    p = sweep_parser(f"eight wirings at {DEPTH} blocks for {STEPS} steps, three seeds (width 64, Wikipedia bytes)",
                     "long_leaderboard", 2, "end-to-end check: residual, ancre and mhc, 6 steps, seed 0", "--trainer.max_steps=300")
    p.add_argument("--wirings", nargs="+", default=WIRINGS, help="wirings to compare")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="seeds (model init and data order)")
    p.add_argument("--no-reuse", action="store_true",
                   help="run residual, ancre and denseformer here too instead of adopting the ablation's long runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Adopt the reusable runs, launch the missing ones (unless ``--report-only``), write the report."""
    args = parse_args(argv)
    steps, val_every, extra = STEPS, VAL_EVERY, list(args.override)
    if args.quick:
        steps, val_every, extra = 6, 3, depth_scaling.QUICK + extra
        args.seeds = [0]
        if args.wirings == WIRINGS:
            args.wirings = ["residual", "ancre", "mhc"]
    resolve_folders(args, "long_leaderboard", "long_leaderboard")
    records = RunRecords(args.out / "runs", ancre_ablation.record_body)
    run_specs = specs(args.wirings, args.seeds, steps, val_every, extra)
    if not args.no_reuse and not args.quick:
        adopted = reuse_ablation_runs(records, run_specs)
        if adopted:
            print(f"reused the ablation's long runs: {', '.join(adopted)}", flush=True)
    launch_unless_report_only(args, run_specs, records)
    results = report(args, records, run_specs, args.wirings)
    records.print_written()
    return results


if __name__ == "__main__":
    main()
