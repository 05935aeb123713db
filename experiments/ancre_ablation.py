"""What makes ANCRe work: its ingredients switched one at a time at 16 blocks, the stream in view.

Every run is ``ancre fit --config experiments/configs/depth_scaling.yaml`` (a byte-level
LLaMA-style model of width 64 on the Wikipedia leads, batch 16 x 128, AdamW 3e-3, cosine to 10 %)
at 16 blocks with 20 warm-up steps, one variant and one seed, started as a subprocess; runs go to
``--runs-dir`` (default ``experiments/runs/ancre_ablation``, git-ignored). Every run logs the
stream's RMS after every block at each validation (``StreamGrowth``, on by default in ``ancre fit``).

Two phases:

- ``short``: every variant of :data:`VARIANTS` (residual, DenseFormer and the ANCRe variants), 400
  steps, seeds 0, 1 and 2, validation every 25 steps;
- ``long``: residual, DenseFormer and 4 ANCRe variants, 4000 steps (ten times longer), seeds 0 and 1
  (and seed 2 for residual and ANCRe as released, the comparison the phase is about), validation
  every 200 steps. Unless ``--long-variants`` names them, the 4 are ANCRe as released and
  the 3 other ANCRe variants with the lowest mean short-phase loss (chosen once every short run is
  done). DenseFormer (``--long-references``), the best short-phase wiring that is not ANCRe, tells
  whether what ANCRe gains with the longer budget is ANCRe's or any dense wiring's.

Records, resuming, the report: as in ``depth_scaling.py`` (one committed record per finished run in
``<out>/runs/``, with its curves, the ``stream/*`` scalars, the learned ANCRe wiring of its last
checkpoint and its last heatmap; finished runs are skipped; ``--report-only`` rebuilds the report
from the records). The report (``--out``, default ``experiments/out/ancre_ablation``):

- ``results.json``: one record per run, the summary per phase and variant (final validation loss
  mean, std, min, max, minus residual's, the step each seed reaches residual's final loss, the
  stream's growth at the end), the sign tests against residual (``sign_tests``), and beside every
  test's ``p`` its Benjamini-Hochberg adjusted ``p_bh`` (``p_value_families``: each family's size);
- ``short_losses.png``: final validation loss per variant, every seed a point;
- ``short_curves.png`` / ``long_curves.png``: validation loss against step (mean, min-max band);
- ``long_gap.png``: each variant's validation loss minus its same-seed residual run's, against step
  (every seed a thin line, their mean thick): where a variant falls behind, crosses and leads;
- ``stream_growth.png`` / ``long_stream_growth.png``: the output's RMS over the embedding's during
  training, per variant, and the profile after every block at the end;
- ``gates.png`` / ``long_gates.png``: the learned wirings at the end of each phase (lowest seed),
  redrawn from their matrices (``gates_matrix``, or the ANCRe coefficients of the last
  checkpoint) on one 0-to-1 colour scale (``experiments/_figures.py``); when the short phase has
  more panels than one figure holds legibly, the sub-layer variants go to ``gates_sublayer.png``;
- ``table.md``: both phases as tables, then the sign tests of every variant against residual over
  seeds (per phase, and pooled over both phases for the variants of the long phase). Every p-value
  has its Benjamini-Hochberg adjusted value (``BH``) beside it: the t-tests of both phases are one
  family, the sign tests another.

Commands::

    .venv/bin/python experiments/ancre_ablation.py --jobs 2 --threads 1   # both phases, about 2 + 2 h on 2 idle cores
    .venv/bin/python experiments/ancre_ablation.py --phase short          # only the 400-step phase
    .venv/bin/python experiments/ancre_ablation.py --report-only          # figures and JSON from the records
    .venv/bin/python experiments/ancre_ablation.py --quick                # end-to-end check, ~2 min
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    EXPERIMENTS,
    RunRecords,
    RunSpec,
    add_benjamini_hochberg,
    ancre_coefficients,
    fmt_sign,
    fmt_t,
    last_checkpoint,
    launch_unless_report_only,
    mean_curve,
    mean_std,
    new_figure,
    portable,
    resolve_folders,
    run_record,
    sign_test,
    sweep_parser,
    write_report,
)
from _figures import colors  # noqa: E402
from depth_scaling import ANNEAL, QUICK, collect, fmt, plot_curves_deepest, plot_gates_deepest, run_summary, summarize  # noqa: E402

CONFIG = EXPERIMENTS / "configs" / "depth_scaling.yaml"
DEPTH = 16
#: the recipe of the issue on top of the depth-scaling config: 16 blocks, 20 warm-up steps
BASE = [f"--model.init_args.n_layers={DEPTH}", "--model.init_args.warmup_steps=20"]
ANCRE = ["--model.init_args.connectivity=ancre"]


def ancre(**options) -> list[str]:
    """``ancre fit`` overrides for ANCRe with ``options`` (the released defaults otherwise)."""
    return [*ANCRE, f"--model.init_args.connectivity_options={json.dumps(options)}"]


#: name -> (``ancre fit`` overrides, what it changes). Gate learning rates are relative to lr 3e-3.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "residual": (["--model.init_args.connectivity=residual"], "plain residual (the baseline)"),
    "denseformer": (["--model.init_args.connectivity=denseformer"], "DenseFormer (depth-weighted averages, identity start)"),
    "ancre": (ancre(), "as released: learned, tau 0.01, incoming, uniform start, inner residuals"),
    "ancre-constant": (ancre(parameterization="constant"), "weights frozen at uniform"),
    "ancre-tau1": (ancre(tau=1.0), "tau 1"),
    "ancre-anneal": (ancre() + ANNEAL, "tau annealed 1 -> 0.01 (exponential)"),
    "ancre-gatelr10": (ancre() + ["--model.init_args.gate_lr=0.03"], "gate learning rate x10"),
    "ancre-gatelr0.1": (ancre() + ["--model.init_args.gate_lr=0.0003"], "gate learning rate x0.1"),
    "ancre-outgoing": (ancre(normalization="outgoing"), "outgoing normalisation"),
    "ancre-embedding": (ancre(init="embedding", init_weight=0.9), "started on h_0 (weight 0.9)"),
    "ancre-no-inner": (ancre(inner_residual=False), "no inner residual: the merge is the blocks' only skip"),
    "ancre-sublayer": (ancre() + ["--model.init_args.granularity=sublayer"], "sub-layer granularity (32 layers)"),
    "ancre-residual-start": (
        ancre(inner_residual=False, init="predecessor", init_weight=0.99) + ["--model.init_args.granularity=sublayer"],
        "sub-layers, no inner residual, started on the predecessor (0.99): residual at the start, no stream growth",
    ),
}
SHORT = {"steps": 400, "val_every": 25, "seeds": [0, 1, 2]}
LONG = {"steps": 4000, "val_every": 200, "seeds": [0, 1], "third_seed": 2, "third_seed_variants": ["residual", "ancre"]}
LONG_PICKED = 4  # ANCRe variants in the long phase (as released + the best others), plus residual
#: the long phase's wirings beside residual that are not ANCRe: the reference for ANCRe's late lead
LONG_REFERENCES = ["denseformer"]
QUICK_VARIANTS = ["residual", "ancre", "ancre-no-inner", "ancre-residual-start"]


def run_name(phase: str, variant: str, seed: int) -> str:
    """Folder name of one run."""
    return f"{phase}_{variant}_seed{seed}"


def spec(phase: str, variant: str, seed: int, steps: int, val_every: int, extra: list[str]) -> RunSpec:
    """One run: a variant at the phase's budget and one seed (model init and data order)."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    args = ["--config", str(CONFIG), f"--seed_everything={seed}", f"--data.init_args.seed={seed}", *BASE,
            *VARIANTS[variant][0], f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}"]
    meta = {"phase": phase, "wiring": variant, "depth": DEPTH, "seed": seed, "steps": steps}
    return RunSpec(run_name(phase, variant, seed), [*args, *extra], meta)


def record_body(runs_dir: Path, s: RunSpec, done: dict) -> dict:
    """A finished run's record: the depth-scaling summary (curves, ``stream/*`` included) and, for
    ANCRe, the learned (K, K+1) wiring of its last checkpoint."""
    body = run_summary(runs_dir, s, done)
    ckpt = last_checkpoint(runs_dir, s.name)
    if s.meta["wiring"].startswith("ancre") and ckpt is not None:
        coefficients = ancre_coefficients(ckpt)
        body["coefficients"] = {k: [[round(v, 5) for v in row] for row in m] for k, m in coefficients.items()}
    return body


def stream_growth(record: dict) -> tuple[list[tuple[int, float]], list[float]]:
    """The run's ``stream/growth`` over training ``[(step, ratio)]`` and its last RMS profile over
    the embedding's after every block (empty if the run logged none)."""
    curves = record["curves"]
    growth = [(step, v) for step, v, _ in curves.get("stream/growth", [])]
    profile = [curves[f"stream/rms_exit{k}"][-1][1] for k in range(len(curves)) if f"stream/rms_exit{k}" in curves]
    return growth, [p / profile[0] for p in profile] if profile and profile[0] > 0 else []


def gap_to_twin(curve: list[tuple[int, float]], twin: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """``curve`` minus ``twin`` (the same seed's residual run) at the steps both logged: ``[(step, gap)]``."""
    other = dict(twin)
    return [(step, value - other[step]) for step, value in curve if step in other]


def ahead_from(gap: list[tuple[int, float]]) -> float | None:
    """The step from which a run stays ahead of its residual twin to the end (gap below 0 at every
    later evaluation), interpolated between the two evaluations around the last crossing; None when
    it ends level or behind. A run ahead at its first evaluation is ahead from that step."""
    if not gap or gap[-1][1] >= 0:
        return None
    last_behind = max((i for i, (_, g) in enumerate(gap) if g >= 0), default=None)
    if last_behind is None:
        return float(gap[0][0])
    (s0, g0), (s1, g1) = gap[last_behind], gap[last_behind + 1]
    return s0 + (s1 - s0) * g0 / (g0 - g1)


def phase_rows(records: RunRecords, phase_specs: list[RunSpec]) -> list[dict]:
    """The finished runs of one phase, with steps to residual's final loss, the gap to the same
    seed's residual run over training (and the step from which it stays ahead), and the stream growth."""
    rows = collect(records, phase_specs)  # with the steps to residual's final loss (of this phase's residual runs)
    twins = {r["seed"]: r for r in rows if r["wiring"] == "residual"}
    for r in rows:
        record = records.load(r["name"])
        r["stream_growth"], r["stream_profile"] = stream_growth(record)
        if "reused_from" in record:  # a record adopted from another driver's run (the long leaderboard)
            r["reused_from"] = record["reused_from"]
        r["final_stream_growth"] = r["stream_growth"][-1][1] if r["stream_growth"] else None
        twin = twins.get(r["seed"])
        r["gap_to_residual"] = None if twin is None or r is twin else gap_to_twin(r["val_loss"], twin["val_loss"])
        r["ahead_of_residual_from"] = None if r["gap_to_residual"] is None else ahead_from(r["gap_to_residual"])
    return rows


def phase_summary(rows: list[dict], variants: list[str]) -> dict:
    """Per variant: ``summarize`` of the depth-scaling report plus the final stream growth (mean over seeds)."""
    summary = summarize(rows, variants, [DEPTH])
    out = {}
    for v, by_depth in summary.items():
        entry = by_depth[str(DEPTH)]
        growths = [r["final_stream_growth"] for r in rows if r["wiring"] == v and r["final_stream_growth"] is not None]
        entry["final_stream_growth_mean"] = sum(growths) / len(growths) if growths else None
        entry["ahead_of_residual_from_per_seed"] = [r["ahead_of_residual_from"] for r in sorted(
            (r for r in rows if r["wiring"] == v), key=lambda r: r["seed"])]
        entry["description"] = VARIANTS[v][1]
        out[v] = entry
    return out


def by_depth(summary: dict) -> dict:
    """A phase summary in the depth-scaling report's shape, ``variant -> {depth: entry}``, for its plots."""
    return {v: {str(DEPTH): e} for v, e in summary.items()}


def pick_long(short: dict, wanted: int = LONG_PICKED) -> list[str]:
    """The long phase's ANCRe variants: as released and the ``wanted - 1`` other ANCRe variants
    with the lowest mean short-phase loss (call it once every short run is done, so that the
    choice does not change as runs finish)."""
    ranked = sorted((v for v in short if v.startswith("ancre") and v != "ancre"), key=lambda v: short[v]["final_val_loss_mean"])
    return ["ancre", *ranked[: wanted - 1]]


def sign_tests(phases: dict[str, list[dict]]) -> dict:
    """Sign tests (:func:`sign_test`) of every variant but residual against residual, pairing runs
    of one phase with the same seed (the same initialisation seed and data order); ``phases``:
    phase name -> its rows. ``{variant: {phase: test, ..., "pooled": test}}``: per phase over its
    seeds, and ``pooled`` over every phase's pairs together (the short and the long run of a seed
    are separate runs) for a variant with pairs in more than one phase. Wins: the variant's final
    loss is below residual's."""
    out: dict[str, dict] = {}
    pooled: dict[str, list[float]] = {}
    for phase, rows in phases.items():
        ref = {r["seed"]: r["final_val_loss"] for r in rows if r["wiring"] == "residual"}
        for v in dict.fromkeys(r["wiring"] for r in rows if r["wiring"] != "residual"):
            mine = {r["seed"]: r["final_val_loss"] for r in rows if r["wiring"] == v}
            diffs = [mine[seed] - ref[seed] for seed in sorted(set(mine) & set(ref))]
            if diffs:
                out.setdefault(v, {})[phase] = sign_test(diffs)
                pooled.setdefault(v, []).extend(diffs)
    for v, tests in out.items():
        if len(tests) > 1:
            tests["pooled"] = sign_test(pooled[v])
    return out


def adjust_p_values(summaries: dict[str, dict], signs: dict) -> dict:
    """Benjamini-Hochberg adjusted p-values (``p_bh`` beside every ``p``, in place) over two
    families, each every p-value of one kind that ``table.md`` shows: ``t_tests``, Welch's and
    paired by seed against residual of every variant in every phase (``summaries``: phase name ->
    :func:`phase_summary`), and ``sign_tests``, every test of :func:`sign_tests` (a family of its
    own, since it asks the t-tests' questions again of the same runs). Returns each family's size
    (the tests with a p)."""
    t_tests = [e.get(k) for summary in summaries.values() for e in summary.values()
               for k in ("minus_residual_welch", "minus_residual_paired")]
    return {"method": "Benjamini-Hochberg", "t_tests": add_benjamini_hochberg(t_tests),
            "sign_tests": add_benjamini_hochberg([t for tests in signs.values() for t in tests.values()])}


# --------------------------------------------------------------------------- figures and tables

def plot_short_losses(rows: list[dict], summary: dict, path: Path) -> None:
    """Final validation loss per variant (sorted), every seed a point, the mean a bar; residual's mean a line."""
    order = sorted(summary, key=lambda v: summary[v]["final_val_loss_mean"])
    col = colors(order)  # one fixed colour per wiring (_figures.WIRING_COLORS)
    fig = new_figure(8.5, 0.32 * len(order) + 1.6)
    ax = fig.subplots()
    for y, v in enumerate(order):
        ax.barh(y, summary[v]["final_val_loss_mean"], color=col[v], alpha=0.35)
        xs = [r["final_val_loss"] for r in rows if r["wiring"] == v]
        ax.plot(xs, [y] * len(xs), "o", color=col[v], markersize=4)
    if "residual" in summary:
        ax.axvline(summary["residual"]["final_val_loss_mean"], color="black", linestyle=":", linewidth=1)
    losses = [r["final_val_loss"] for r in rows]
    ax.set_xlim(min(losses) - 0.03, max(losses) + 0.03)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final validation loss (nats/byte); points: seeds, bar: mean, dotted: residual")
    ax.set_title(f"{DEPTH} blocks, {rows[0]['final_step']} steps", fontsize=9)
    fig.savefig(path)


def plot_stream(rows: list[dict], variants: list[str], path: Path) -> None:
    """Left: the output's RMS over the embedding's during training (mean over seeds); right: the
    profile after every block at the end (seed 0 or the lowest)."""
    col = colors(variants)  # one fixed colour per wiring, whichever wirings these are
    fig = new_figure(12, 4.6)
    axes = fig.subplots(1, 2)
    for v in variants:
        mine = sorted((r for r in rows if r["wiring"] == v and r["stream_growth"]), key=lambda r: r["seed"])
        if not mine:
            continue
        steps = [s for s, _ in mine[0]["stream_growth"]]
        mean = [sum(dict(r["stream_growth"]).get(s, float("nan")) for r in mine) / len(mine) for s in steps]
        axes[0].plot(steps, mean, color=col[v], label=v, linewidth=1.3)
        axes[1].plot(range(len(mine[0]["stream_profile"])), mine[0]["stream_profile"], color=col[v], label=v, linewidth=1.3)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("RMS of the output / RMS of the embedding")
    axes[0].set_title("stream growth during training (mean over seeds)", fontsize=9)
    axes[1].set_xlabel("layers run (exit k)")
    axes[1].set_ylabel("RMS after k layers / RMS of the embedding")
    axes[1].set_title("at the end, after every layer (lowest seed)", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_gap(rows: list[dict], variants: list[str], path: Path) -> None:
    """Validation loss minus the same seed's residual run against step, per variant: every seed a
    thin line, the mean over seeds thick; below zero the variant is ahead."""
    col = colors(variants)  # one fixed colour per wiring, whichever wirings these are
    fig = new_figure(8.5, 4.6)
    ax = fig.subplots()
    for v in variants:
        mine = [r for r in rows if r["wiring"] == v and r["gap_to_residual"]]
        if not mine:
            continue
        for r in mine:
            ax.plot(*zip(*r["gap_to_residual"]), color=col[v], linewidth=0.7, alpha=0.45)
        ax.plot(*zip(*mean_curve([r["gap_to_residual"] for r in mine])), color=col[v], linewidth=1.8, label=v)
    ax.axhline(0.0, color="black", linewidth=0.9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss minus the same seed's residual run")
    ax.set_title(f"{DEPTH} blocks: below 0 ahead of residual (thin: seeds, thick: mean)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def phase_table(title: str, summary: dict) -> list[str]:
    """Markdown rows of one phase, ranked by mean final validation loss."""
    lines = [f"{title}:", "",
             "| rank | variant | what changes | seeds | final val loss (mean +- std) | min..max | minus residual | "
             "minus residual +- se (Welch t, p, BH) | paired by seed: minus residual +- se (t, p, BH) | "
             "steps to residual's loss (fraction, per seed) | ahead of its residual twin from step (per seed) | "
             "stream growth at the end | wall per run (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rank, (v, e) in enumerate(sorted(summary.items(), key=lambda item: item[1]["final_val_loss_mean"]), 1):
        fractions = ", ".join("never" if f is None else f"{f:.2f}" for f in e["fraction_of_residual_steps_per_seed"])
        ahead = "-" if v == "residual" else ", ".join("never" if a is None else f"{a:.0f}" for a in e["ahead_of_residual_from_per_seed"])
        lines.append(
            f"| {rank} | {v} | {e['description']} | {len(e['seeds'])} | {e['final_val_loss_mean']:.4f} +- "
            f"{e['final_val_loss_std']:.4f} | {e['final_val_loss_min']:.4f}..{e['final_val_loss_max']:.4f} | "
            f"{fmt(e['minus_residual'], '+.4f')} | {fmt_t(e['minus_residual_welch'])} | {fmt_t(e['minus_residual_paired'])} | "
            f"{fractions} | {ahead} | "
            f"{fmt(e['final_stream_growth_mean'], '.3g')}x | {e['wall_s_mean'] / 60:.1f} |"
        )
    return lines + [""]


def sign_table(signs: dict, phases: dict[str, str]) -> list[str]:
    """Markdown rows of the sign tests (:func:`sign_tests`); ``phases``: phase name -> its column title."""
    lines = ["Sign tests against residual. A sign test counts the pairs of runs with the same seed (the same "
             "initialisation seed and data order) in which the variant's final loss is below residual's (wins/n, "
             "ties left out) and gives the two-sided exact binomial p of that count if either side were equally "
             "likely; it counts signs only, not the sizes of the gaps. Pooled: both phases' pairs together (two "
             "budgets: a variant has to win at both to reach a small p). BH: over every p-value of this table, a "
             "family of its own.", "",
             "| variant | " + " | ".join(phases.values()) + " | pooled over both phases |",
             "|---|" + "---|" * (len(phases) + 1)]
    for v, tests in signs.items():
        lines.append(f"| {v} | " + " | ".join(fmt_sign(tests.get(ph)) for ph in phases) + f" | {fmt_sign(tests.get('pooled'))} |")
    return lines + [""]


def report(args, records: RunRecords, short_specs: list[RunSpec], long_specs: list[RunSpec], long_variants: list[str] | None) -> dict:
    """Read the finished runs' records and write the figures, ``results.json`` and ``table.md``."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(s.meta["wiring"] for s in short_specs))
    short_rows, long_rows = phase_rows(records, short_specs), phase_rows(records, long_specs)
    short = phase_summary(short_rows, variants)
    long = phase_summary(long_rows, list(dict.fromkeys(s.meta["wiring"] for s in long_specs)))
    signs = sign_tests({"short": short_rows, "long": long_rows})
    families = adjust_p_values({"short": short, "long": long}, signs)
    figures = []
    lines = [f"p: two-sided, uncorrected. BH: the Benjamini-Hochberg adjusted p (false discovery rate) over one "
             f"family, every t-test p-value in this file ({families['t_tests']}: both phases); the sign tests at the "
             f"end are a family of their own ({families['sign_tests']}).", ""]
    if short_rows:
        figures += [out / "short_losses.png", out / "short_curves.png", out / "stream_growth.png"]
        plot_short_losses(short_rows, short, figures[0])
        plot_curves_deepest(short_rows, by_depth(short), DEPTH, figures[1])
        plot_stream(short_rows, variants, figures[2])
        figures += plot_gates_deepest(short_rows, [v for v in variants if v.startswith("ancre")], DEPTH, out / "gates.png")
        lines += phase_table(f"Short phase ({short_rows[0]['final_step']} steps, {DEPTH} blocks of width 64)", short)
    if long_rows:
        long_names = list(long)
        figures += [out / "long_curves.png", out / "long_gap.png", out / "long_stream_growth.png"]
        plot_curves_deepest(long_rows, by_depth(long), DEPTH, figures[-3])
        plot_gap(long_rows, long_names, figures[-2])
        plot_stream(long_rows, long_names, figures[-1])
        figures += plot_gates_deepest(long_rows, [v for v in long_names if v.startswith("ancre")], DEPTH, out / "long_gates.png")
        lines += phase_table(f"Long phase ({long_rows[0]['final_step']} steps)", long)
    if signs:
        lines += sign_table(signs, {phase: f"{phase} ({rows[0]['final_step']} steps)"
                                    for phase, rows in (("short", short_rows), ("long", long_rows)) if rows})
    all_rows = short_rows + long_rows
    head = run_record(args.runs_dir, {r["name"]: r for r in all_rows}, len(short_specs) + len(long_specs), records)
    results = {
        **head,
        "config": str(CONFIG.relative_to(EXPERIMENTS.parent)),
        "base_overrides": BASE,
        "variants": {v: {"overrides": a, "description": d} for v, (a, d) in VARIANTS.items()},
        "long_variants": long_variants,
        "short": short,
        "long": long,
        "sign_tests": signs,
        "p_value_families": families,
        "runs": [{**{k: v for k, v in r.items() if k not in ("val_loss_by_wall_s", "gates_matrix")}, "gates_png": r["gates_png"] and portable(r["gates_png"])}
                 for r in all_rows],
    }
    write_report(out, results, "\n".join(lines) + "\n", figures)
    return results


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None):
    """Command-line options."""
    p = sweep_parser(f"ANCRe's ingredients one at a time at {DEPTH} blocks (width 64, Wikipedia bytes)", "ancre_ablation", 2,
                     f"end-to-end check: {', '.join(QUICK_VARIANTS)}, 4 steps each phase, seed 0", "--trainer.max_steps=300")
    p.add_argument("--phase", choices=["short", "long", "both"], default="both", help="which phase to run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="short-phase variants")
    p.add_argument("--long-variants", nargs="+", default=None,
                   help=f"ANCRe variants of the long phase (default: as released + the {LONG_PICKED - 1} best others of the short phase)")
    p.add_argument("--long-references", nargs="*", default=LONG_REFERENCES,
                   help="wirings of the long phase beside residual and the ANCRe variants (none: give the flag alone)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Launch the missing runs of the chosen phases (unless ``--report-only``), then write the report."""
    args = parse_args(argv)
    extra, short_cfg, long_cfg = list(args.override), dict(SHORT), dict(LONG)
    if args.quick:
        extra = QUICK + extra
        short_cfg.update(steps=4, val_every=2, seeds=[0])
        long_cfg.update(steps=6, val_every=3, seeds=[0], third_seed_variants=[])
        if args.variants == list(VARIANTS):
            args.variants = QUICK_VARIANTS
    resolve_folders(args, "ancre_ablation", "ancre_ablation")
    records = RunRecords(args.out / "runs", record_body)
    short_specs = [spec("short", v, s, short_cfg["steps"], short_cfg["val_every"], extra) for s in short_cfg["seeds"] for v in args.variants]
    if args.phase in ("short", "both"):
        launch_unless_report_only(args, short_specs, records)
    long_variants = args.long_variants
    if long_variants is None and all(records.has(s.name) for s in short_specs):
        long_variants = pick_long(phase_summary(phase_rows(records, short_specs), args.variants))
        if args.quick:
            long_variants = long_variants[:1]
    long_specs = []
    if long_variants:
        long_names = list(dict.fromkeys(["residual", *args.long_references, *long_variants]))
        seeds = {v: [*long_cfg["seeds"], *([long_cfg["third_seed"]] if v in long_cfg["third_seed_variants"] else [])]
                 for v in long_names}
        long_specs = [spec("long", v, s, long_cfg["steps"], long_cfg["val_every"], extra)
                      for s in sorted({s for ss in seeds.values() for s in ss}) for v in long_names if s in seeds[v]]
        if args.phase in ("long", "both"):
            print(f"long phase: {', '.join(long_names)}", flush=True)
            launch_unless_report_only(args, long_specs, records)
    elif args.phase != "short":
        print("long phase waits for every short run (or name its variants with --long-variants)", flush=True)
    results = report(args, records, short_specs, long_specs, long_variants)
    records.print_written()
    return results


if __name__ == "__main__":
    main()
