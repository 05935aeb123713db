"""Depth scaling: every wiring at 4, 8, 16 and 32 blocks, the same tokens, schedule and optimiser.

Where does learned wiring pay off? Every run is ``ancre fit --config
experiments/configs/depth_scaling.yaml`` (a byte-level LLaMA-style model of width 64 on the
Wikipedia leads) with its depth (``n_layers``), wiring and seed, started as a subprocess; runs go to
``--runs-dir`` (default ``experiments/runs/depth_scaling``, git-ignored). The wirings are the
family variants of the benchmark (``ancre_lightning.bench._common.WIRINGS``) plus ANCRe with its
temperature annealed from 1 to 0.01 (the ``GateTemperatureAnnealing`` callback):

    residual, ancre, ancre-anneal, denseformer, acn (blocks); attnres (full), attnres-block
    (4 sub-layers a block), hyper (4 streams), mhc (4 streams) (sub-layers); mudd (blocks)

Seeds 0 and 1 everywhere; then a second pass reads the finished runs and adds seed 2 to both
wirings of every pair whose mean final validation losses at a depth differ by less than two
standard deviations (the larger of the two, over seeds 0 and 1).

Records. The run folders (event files, checkpoints, ``train.log``) are git-ignored and do not
outlive the session. When a run finishes (exit status 0) the driver writes its record to
``<out>/runs/`` (default ``experiments/out/depth_scaling/runs/``), meant to be committed:
``<name>.json`` (spec and meta, command, start and wall time, final validation loss, the ``val/*``
and ``train/*`` curves as ``[step, value, seconds since the start]``, tokens/s, parameter count) and
``<name>_gates.png`` (its last wiring heatmap, shrunk to 900 px at most; the heatmap's numbers go
into the JSON as ``gates_matrix``). Before the record is written
the run's final weights are also evaluated on the whole validation split (64k tokens; training
evaluates its first 16k), ``final_val_loss_full``. A run is finished when its
record exists; a run folder that finished but has no record (e.g. one from before records) gets
its record without running again. The report is read from the records only, so ``--report-only``
works on a fresh clone that has no ``experiments/runs/``. The report (``--out``, default
``experiments/out/depth_scaling``):

- ``results.json``: one record per run (wiring, depth, seed, final validation loss, the step at
  which it reaches residual's final loss at the same depth, wall time, tokens/s, parameter count,
  its curves), the summary per wiring and depth, the depth gains, the pooled sign tests
  (``sign_tests``), the pairs that got a third seed, and the step times measured by ``--measure``
  (when ``step_times.json`` is in ``--out``); every test's ``p`` has its Benjamini-Hochberg
  adjusted ``p_bh`` beside it (``p_value_families``: the size of each family);
- ``loss_vs_depth.png``: final validation loss against depth per wiring (mean, min-max band), and
  the same minus residual's mean;
- ``curves_deepest.png``: validation loss against step at the deepest depth (mean, min-max band);
- ``walltime_deepest.png``: validation loss against wall-clock time at the deepest depth (every run);
- ``gates_deepest.png``, ``gates_deepest_scaled.png``, ``gates_deepest_signed.png``: the learned
  wirings at the end, deepest depth, lowest seed, redrawn from the matrices GateVisualization
  saved (copied into the records as ``gates_matrix``), one figure per kind of matrix with one
  colour scale each: weights of 0 to 1 (residual, ANCRe, ACN), weights that can exceed 1 (AttnRes,
  mHC), signed coefficients (DenseFormer, hyper-connections, MUDD); a record from before the
  matrices were saved shows its saved PNG instead (``experiments/_figures.py``);
- ``table.md``: the leaderboard (loss by depth; whether depth pays off, the change from the
  shallowest to the deepest depth against residual's, with its standard error and Welch's t;
  sign tests against residual pooled over depths and seeds, per depth, and of the depth gain per
  seed; and per depth ranked by loss, each gap to residual with its error and t). Every p-value
  has its Benjamini-Hochberg adjusted value (``BH``) beside it: the t-tests of the whole table
  are one family, the sign tests another.

Finished runs are skipped, so the same command resumes an interrupted sweep (a run that was cut
off starts again from scratch); ``--start-until HOURS`` starts no run after that many hours, so a
session can end with nothing cut off. Records that a change of the code made stale move to
``<out>/superseded/`` (then the driver runs those runs again); the report reads ``<out>/runs/`` only. Across sessions, each on a fresh clone: run the same command, and
commit ``experiments/out/depth_scaling/`` as runs finish (the driver prints the record files it
wrote; it commits nothing itself); the next session skips every committed run::

    .venv/bin/python experiments/depth_scaling.py --jobs 2 --threads 1     # the sweep, ~6 h on 2 idle cores
    .venv/bin/python experiments/depth_scaling.py --report-only           # figures and JSON from finished runs
    .venv/bin/python experiments/depth_scaling.py --quick                 # end-to-end check, 12 tiny runs, ~3 min
    .venv/bin/python experiments/depth_scaling.py --measure               # time a few steps of every run's model
    .venv/bin/python experiments/depth_scaling.py --preset gpu --jobs 1   # LLaMA-60M shape on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runs import (  # noqa: E402
    EXPERIMENTS,
    RunRecords,
    RunSpec,
    add_benjamini_hochberg,
    difference_of_differences,
    fmt_sign,
    fmt_t,
    full_validation,
    interpolate_crossing,
    launch_unless_report_only,
    log_dir,
    machine,
    mean_curve,
    mean_std,
    new_figure,
    paired,
    portable,
    read_scalar_events,
    resolve_folders,
    run_record,
    sign_test,
    sweep_parser,
    validation_curve,
    validation_shift,
    welch,
    write_report,
)
from _figures import colors, gate_panel, wiring_figures  # noqa: E402,F401  (colors: one fixed colour per wiring, also for importers)

PRESETS = {
    "cpu": EXPERIMENTS / "configs" / "depth_scaling.yaml",
    "gpu": EXPERIMENTS / "configs" / "depth_scaling_gpu.yaml",
}
WIRINGS = ["residual", "ancre", "ancre-anneal", "denseformer", "acn", "attnres", "attnres-block", "hyper", "mhc", "mudd"]
DEPTHS = [4, 8, 16, 32]
SEEDS = [0, 1]
THIRD_SEED = 2
#: ancre-anneal: ANCRe (the same model) with tau annealed from 1 to 0.01 over the run (geometric)
ANNEAL = [
    "--trainer.callbacks+=ancre_lightning.callbacks.GateTemperatureAnnealing",
    "--trainer.callbacks.start=1.0",
    "--trainer.callbacks.end=0.01",
    "--trainer.callbacks.schedule=exponential",
]
#: overrides of --quick: a few steps on a small slice of the corpus
QUICK = [
    "--data.init_args.batch_size=2",
    "--data.init_args.max_train_tokens=40000",
    "--data.init_args.max_val_tokens=8000",
    "--trainer.limit_val_batches=2",
    "--model.init_args.warmup_steps=1",
    "--trainer.log_every_n_steps=1",
]
QUICK_DEPTHS = [2, 4]
#: the wirings --quick also runs at its shallower depth (every wiring runs at the deeper one)
QUICK_SHALLOW = ["residual", "ancre"]
#: the per-run cost the step times leave out (interpreter, imports, data, logger), seconds; measured
#: by --quick on the shared machine (see the config's comments)
STARTUP_S = 20.0


#: controls that run only when ``--wirings`` names them (not in the sweep's table): attention
#: residuals with their queries and key gains frozen at zero and one, i.e. the residual network
#: computed through attnres's merge (it must train like residual), and the literal depth average
#: (``weight_sum: one``) that the first sweep ran; ``--wirings attnres-frozen --depths 4 32``
CONTROLS = {
    "attnres-frozen": ("attnres", {"block_size": 1, "learn_queries": False}, "sublayer"),
    "attnres-average": ("attnres", {"block_size": 1, "weight_sum": "one"}, "sublayer"),
}


def family(wiring: str) -> tuple[str, dict, str]:
    """(connectivity, options, granularity) of a wiring: the benchmark's family variants;
    ``ancre-anneal`` is the ``ancre`` model; the :data:`CONTROLS`."""
    from ancre_lightning.bench._common import WIRINGS as FAMILIES

    if wiring in CONTROLS:
        return CONTROLS[wiring]
    base = "ancre" if wiring == "ancre-anneal" else wiring
    if base not in FAMILIES:
        raise SystemExit(f"unknown wiring {wiring!r}; known: {', '.join([*WIRINGS, *CONTROLS])} (or any of {', '.join(FAMILIES)})")
    return FAMILIES[base]


def wiring_args(wiring: str) -> list[str]:
    """The ``ancre fit`` overrides that select a wiring."""
    conn, options, granularity = family(wiring)
    args = [f"--model.init_args.connectivity={conn}",
            f"--model.init_args.connectivity_options={json.dumps(options)}",
            f"--model.init_args.granularity={granularity}"]
    return args + (ANNEAL if wiring == "ancre-anneal" else [])


def run_name(wiring: str, depth: int, seed: int) -> str:
    """Folder name of one run."""
    return f"{wiring}_d{depth:02d}_seed{seed}"


def spec(config: Path, wiring: str, depth: int, seed: int, steps: int | None, val_every: int | None, extra: list[str]) -> RunSpec:
    """One run: the config, its depth, wiring and seed (model init and data order), the budget."""
    args = ["--config", str(config), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            f"--model.init_args.n_layers={depth}", *wiring_args(wiring)]
    if steps is not None:
        args.append(f"--trainer.max_steps={steps}")
    if val_every is not None:
        args.append(f"--trainer.val_check_interval={val_every}")
    return RunSpec(run_name(wiring, depth, seed), [*args, *extra], {"wiring": wiring, "depth": depth, "seed": seed})


def specs(config: Path, wirings: list[str], depths: list[int], seeds: list[int], steps: int | None,
          val_every: int | None, extra: list[str]) -> list[RunSpec]:
    """The first pass: seeds outer (early results cover every wiring), then the deepest depths first
    (the longest runs start first, so two at a time finish together), then the wirings."""
    return [spec(config, w, d, s, steps, val_every, extra)
            for s in seeds for d in sorted(depths, reverse=True) for w in wirings]


# --------------------------------------------------------------------------- reading runs back

def run_config(runs_dir: Path, name: str) -> dict:
    """The run's resolved config (``config.yaml`` that the CLI saves in the log dir)."""
    import yaml

    return yaml.safe_load((log_dir(runs_dir, name) / "config.yaml").read_text(encoding="utf-8"))


_PARAMS: dict[tuple, int] = {}


def parameter_count(model_init_args: dict) -> int:
    """Trainable parameters of the LLM a config builds (cached by its arguments)."""
    key = json.dumps(model_init_args, sort_keys=True, default=str)
    if key not in _PARAMS:
        from ancre_lightning.modules import LLMModule

        args = {k: v for k, v in model_init_args.items() if k != "compile"}
        _PARAMS[key] = sum(p.numel() for p in LLMModule(**args).parameters() if p.requires_grad)
    return _PARAMS[key]


def _curve(points: list[tuple[int, float, float]], start: float) -> list[list]:
    """``[(step, value, unix time)]`` as ``[[step, value, seconds since the run started]]``, rounded
    (records are committed: a few kB a run)."""
    return [[step, float(f"{v:.6g}"), round(t - start, 2)] for step, v, t in points]


#: training tokens/s in a run's event files, newest convention first: the ThroughputMonitor that
#: ``ancre fit`` adds (all devices, then one device: the sweeps run on one), then the module's own
#: ``train/tokens_per_s`` of runs before it
THROUGHPUT_TAGS = ("train/items_per_sec", "train/device/items_per_sec", "train/tokens_per_s")


def throughput_tag(events: dict) -> str:
    """The tag of the training tokens/s in ``events`` (the first of :data:`THROUGHPUT_TAGS` present)."""
    return next((tag for tag in THROUGHPUT_TAGS if tag in events), THROUGHPUT_TAGS[0])


def run_summary(runs_dir: Path, s: RunSpec, done: dict) -> dict:
    """What the report needs of a finished run, read from its folder (the body of its record):
    the final validation loss, the validation, training and stream curves (``val/*``, ``train/*``
    and ``stream/*`` scalars, ``[step, value, seconds since the start]``; validation steps count optimizer steps),
    the final weights' loss over the whole validation split (``final_val_loss_full``; records written
    before it existed lack it), tokens a step, median tokens/s and the parameter count."""
    events = read_scalar_events(log_dir(runs_dir, s.name))
    shift = validation_shift(events)
    curves = {tag: _curve(validation_curve(points, shift) if tag.startswith("val/") else points, done["started_unix"])
              for tag, points in events.items() if tag.startswith(("val/", "train/", "stream/"))}
    val = curves.get("val/loss", [])
    if not val:
        raise ValueError(f"{s.name}: no val/loss in its event files")
    config = run_config(runs_dir, s.name)
    data = config["data"]["init_args"]
    throughput = [v for _, v, _ in events.get(throughput_tag(events), [])]
    return {
        "final_step": val[-1][0],
        "final_val_loss": val[-1][1],
        "final_val_loss_full": full_validation(runs_dir, s),
        "tokens_per_step": data["batch_size"] * data["seq_len"],
        "tokens_per_s": statistics.median(throughput) if throughput else None,  # training steps only
        "parameters": parameter_count(config["model"]["init_args"]),
        "curves": curves,
    }


def records_for(out: Path) -> RunRecords:
    """The committed records of a sweep whose report goes to ``out``: ``<out>/runs/``."""
    return RunRecords(Path(out) / "runs", run_summary)


def collect(records: RunRecords, run_specs: list[RunSpec]) -> list[dict]:
    """One row per finished run (one with a record): final validation loss, curves against step and
    wall time, throughput, parameters, and its last wiring heatmap. Reads the records only."""
    rows = []
    for s in run_specs:
        if not records.has(s.name):
            continue
        rec = records.load(s.name)
        val = rec["curves"]["val/loss"]
        rows.append({
            "name": s.name,
            **rec["meta"],
            "final_step": rec["final_step"],
            "final_val_loss": rec["final_val_loss"],
            "final_val_loss_full": rec.get("final_val_loss_full"),
            "wall_s": rec["wall_s"],
            "tokens_per_step": rec["tokens_per_step"],
            "tokens_per_s": rec["tokens_per_s"],
            "tokens_per_s_wall": rec["final_step"] * rec["tokens_per_step"] / rec["wall_s"],  # start-up and validation too
            "parameters": rec["parameters"],
            "val_loss": [(step, v) for step, v, _ in val],
            "val_loss_by_wall_s": [(t, v) for _, v, t in val],
            "gates_png": rec.get("gates_png"),
            # the final wiring's numbers: GateVisualization's (newer records), else the ANCRe
            # coefficients the ablation reads from the checkpoint (one stack), else None
            "gates_matrix": rec.get("gates_matrix") or next(iter((rec.get("coefficients") or {}).values()), None),
        })
    add_steps_to_residual(rows)
    return rows


def add_steps_to_residual(records: list[dict]) -> None:
    """Per run, the step at which its validation curve first reaches residual's final loss at the
    same depth (interpolated between evaluations; None: never): against the mean over residual's
    seeds (``steps_to_residual_loss``) and against the same seed's residual run
    (``steps_to_residual_loss_same_seed``); as fractions of residual's steps too."""
    for depth in sorted({r["depth"] for r in records}):
        residual = [r for r in records if r["depth"] == depth and r["wiring"] == "residual"]
        level = mean_std([r["final_val_loss"] for r in residual])[0] if residual else None
        twins = {r["seed"]: r for r in residual}
        for r in records:
            if r["depth"] != depth:
                continue
            r["residual_final_val_loss_mean"] = level
            r["steps_to_residual_loss"] = None if level is None else interpolate_crossing(r["val_loss"], level)
            r["fraction_of_residual_steps"] = (None if r["steps_to_residual_loss"] is None
                                               else r["steps_to_residual_loss"] / residual[0]["final_step"])
            twin = twins.get(r["seed"])
            r["steps_to_residual_loss_same_seed"] = (None if twin is None
                                                     else interpolate_crossing(r["val_loss"], twin["final_val_loss"]))


def losses_by_seed(records: list[dict], wiring: str, depth: int) -> dict[int, float]:
    """``{seed: final validation loss}`` of one wiring at one depth."""
    return {r["seed"]: r["final_val_loss"] for r in records if r["wiring"] == wiring and r["depth"] == depth}


def final_losses(records: list[dict], wiring: str, depth: int) -> list[float]:
    """The final validation losses of one wiring at one depth, one per finished seed."""
    return list(losses_by_seed(records, wiring, depth).values())


def summarize(records: list[dict], wirings: list[str], depths: list[int]) -> dict:
    """Per wiring and depth: final loss over seeds (mean, std, min, max), the gap to residual's
    mean (with its standard error, Welch's t and p against residual's seeds once both have two; and
    paired by seed, each run against residual's run with the same seed, once two seeds are shared),
    steps to residual's loss per seed, wall time, throughput, parameters."""
    out: dict[str, dict] = {}
    for w in wirings:
        for d in depths:
            mine = [r for r in records if r["wiring"] == w and r["depth"] == d]
            if not mine:
                continue
            losses = [r["final_val_loss"] for r in mine]
            mean, std = mean_std(losses)
            ref = next((r["residual_final_val_loss_mean"] for r in mine if r["residual_final_val_loss_mean"] is not None), None)
            rates = [r["tokens_per_s"] for r in mine if r["tokens_per_s"]]
            out.setdefault(w, {})[str(d)] = {
                "seeds": sorted(r["seed"] for r in mine),
                "final_val_loss_mean": mean,
                "final_val_loss_std": std,
                "final_val_loss_min": min(losses),
                "final_val_loss_max": max(losses),
                "minus_residual": None if ref is None else mean - ref,
                "minus_residual_welch": None if w == "residual" else welch(losses, final_losses(records, "residual", d)),
                "minus_residual_paired": None if w == "residual" else paired(losses_by_seed(records, w, d),
                                                                             losses_by_seed(records, "residual", d)),
                "fraction_of_residual_steps_per_seed": [r["fraction_of_residual_steps"] for r in sorted(mine, key=lambda r: r["seed"])],
                "wall_s_mean": sum(r["wall_s"] for r in mine) / len(mine),
                "tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
                "parameters": mine[0]["parameters"],
                "mean_curve": mean_curve([r["val_loss"] for r in mine]),
            }
    return out


def depth_gains(records: list[dict], wirings: list[str], depths: list[int]) -> dict:
    """Does depth pay off? Per wiring, the change of its mean final loss from the shallowest to the
    deepest of ``depths`` (negative: the deeper network is better) with its standard error, and
    that change minus residual's (negative: depth pays off more than for residual) with the errors
    of both added in quadrature; and the same paired by seed (per seed, the wiring's change minus
    residual's change with that seed). A wiring needs two seeds at both depths; residual's own row
    has no comparison."""
    shallow, deep = min(depths), max(depths)

    def changes(w: str) -> dict[int, float]:
        return changes_by_seed(records, w, shallow, deep)

    base = welch(final_losses(records, "residual", deep), final_losses(records, "residual", shallow))
    out = {}
    for w in wirings:
        gain = welch(final_losses(records, w, deep), final_losses(records, w, shallow))
        if gain is not None:
            out[w] = {"from": shallow, "to": deep, "gain": gain,
                      "minus_residual": None if w == "residual" else difference_of_differences(gain, base),
                      "minus_residual_paired": None if w == "residual" else paired(changes(w), changes("residual"))}
    return out


def changes_by_seed(records: list[dict], wiring: str, shallow: int, deep: int) -> dict[int, float]:
    """``{seed: final loss at deep - final loss at shallow}`` of one wiring, over the seeds it has at both."""
    a, b = losses_by_seed(records, wiring, deep), losses_by_seed(records, wiring, shallow)
    return {s: a[s] - b[s] for s in set(a) & set(b)}


def sign_tests(records: list[dict], wirings: list[str], depths: list[int]) -> dict:
    """Pooled sign tests (:func:`sign_test`) of every wiring but residual against residual, pairing
    runs with the same seed (the same initialisation seed and data order):

    - ``vs_residual``: over every (depth, seed) of ``depths`` where both have a run, the wiring's
      final loss minus residual's (wins: the wiring's loss is lower);
    - ``vs_residual_by_depth``: the same at each depth alone (``{depth: test}``);
    - ``depth_gain_vs_residual``: per seed, the wiring's change from the shallowest to the deepest
      of ``depths`` minus residual's change with that seed (wins: depth pays off more than for
      residual); None without such a seed.

    A wiring that shares no seed with residual at any depth is left out."""
    shallow, deep = min(depths), max(depths)
    ref_changes = changes_by_seed(records, "residual", shallow, deep)
    out = {}
    for w in wirings:
        if w == "residual":
            continue
        by_depth, pooled = {}, []
        for d in depths:
            mine, ref = losses_by_seed(records, w, d), losses_by_seed(records, "residual", d)
            diffs = [mine[s] - ref[s] for s in sorted(set(mine) & set(ref))]
            if diffs:
                by_depth[str(d)] = sign_test(diffs)
                pooled += diffs
        if not pooled:
            continue
        mine = changes_by_seed(records, w, shallow, deep)
        gain = [mine[s] - ref_changes[s] for s in sorted(set(mine) & set(ref_changes))] if deep > shallow else []
        out[w] = {"vs_residual": sign_test(pooled), "vs_residual_by_depth": by_depth,
                  "depth_gain_vs_residual": sign_test(gain) if gain else None}
    return out


def adjust_p_values(summary: dict, gains: dict, signs: dict) -> dict:
    """Benjamini-Hochberg adjusted p-values (``p_bh`` beside every ``p``, in place) over two
    families, each every p-value of one kind that ``table.md`` shows:

    - ``t_tests``: the t-tests, Welch's and paired by seed, of every wiring against residual at
      every depth (:func:`summarize`), and of the depth gains (:func:`depth_gains`: the change from
      the shallowest to the deepest depth, and that change minus residual's, unpaired and paired);
    - ``sign_tests``: every test of :func:`sign_tests` (pooled, per depth, depth gain); a family of
      its own, since it asks the t-tests' questions again of the same runs.

    Returns each family's size (the tests with a p)."""
    t_tests = [e.get(k) for by_depth in summary.values() for e in by_depth.values()
               for k in ("minus_residual_welch", "minus_residual_paired")]
    t_tests += [g.get(k) for g in gains.values() for k in ("gain", "minus_residual", "minus_residual_paired")]
    signs_family = [t for s in signs.values()
                    for t in (s["vs_residual"], *s["vs_residual_by_depth"].values(), s["depth_gain_vs_residual"])]
    return {"method": "Benjamini-Hochberg", "t_tests": add_benjamini_hochberg(t_tests),
            "sign_tests": add_benjamini_hochberg(signs_family)}


# --------------------------------------------------------------------------- the third seed

def close_pairs(records: list[dict], wirings: list[str], depths: list[int], seeds: list[int]) -> list[dict]:
    """Pairs of wirings whose mean final validation losses at a depth are less than two standard
    deviations apart (the larger sample std of the two). Only the first-pass ``seeds`` count, so
    the answer does not change once third seeds finish; a wiring counts at a depth once all of
    ``seeds`` finished there (and at least two)."""
    if len(seeds) < 2:
        return []
    pairs = []
    for d in depths:
        stats = {}
        for w in wirings:
            losses = {r["seed"]: r["final_val_loss"] for r in records if r["wiring"] == w and r["depth"] == d}
            if all(s in losses for s in seeds):
                stats[w] = mean_std([losses[s] for s in seeds])
        for a, b in itertools.combinations([w for w in wirings if w in stats], 2):
            gap = abs(stats[a][0] - stats[b][0])
            two_std = 2 * max(stats[a][1], stats[b][1])
            if gap < two_std:
                pairs.append({"depth": d, "wirings": [a, b], "gap": gap, "two_std": two_std})
    return pairs


def third_seed_specs(pairs: list[dict], config: Path, wirings: list[str], seed: int, steps: int | None,
                     val_every: int | None, extra: list[str]) -> list[RunSpec]:
    """The second pass: ``seed`` for both wirings of every close pair (each wiring and depth once)."""
    wanted = {(w, p["depth"]) for p in pairs for w in p["wirings"]}
    return [spec(config, w, d, seed, steps, val_every, extra)
            for d in sorted({d for _, d in wanted}, reverse=True) for w in wirings if (w, d) in wanted]


# --------------------------------------------------------------------------- figures and tables

def off_scale(gaps: dict[str, list[float]], factor: float = 3.0, floor: float = 0.05) -> tuple[float, list[str]]:
    """The y range (+-limit) of a "minus residual" panel and the wirings left off it: every wiring
    whose largest gap is within ``factor`` times the median of the wirings' largest gaps (and at
    least ``floor``) sets the range; the others would squash it into a line and are named instead."""
    largest = {w: max(abs(g) for g in gs) for w, gs in gaps.items() if gs}
    if not largest:
        return floor, []
    ordered = sorted(largest.values())
    cut = max(floor, factor * ordered[len(ordered) // 2])
    kept = [v for v in largest.values() if v <= cut]
    return max(floor, max(kept, default=floor)) * 1.15, sorted(w for w, v in largest.items() if v > cut)


def plot_loss_vs_depth(summary: dict, depths: list[int], path: Path) -> None:
    """Final validation loss against depth per wiring (mean, min-max band); right: minus
    residual's mean, on a scale that keeps the wirings near residual readable (the ones far off
    it are named in the title)."""
    col = colors(list(summary))
    fig = new_figure(12, 4.6)
    axes = fig.subplots(1, 2)
    ref = summary.get("residual", {})
    gaps = {}
    for w, by_depth in summary.items():
        ds = [d for d in depths if str(d) in by_depth]
        mean = [by_depth[str(d)]["final_val_loss_mean"] for d in ds]
        lo = [by_depth[str(d)]["final_val_loss_min"] for d in ds]
        hi = [by_depth[str(d)]["final_val_loss_max"] for d in ds]
        axes[0].plot(ds, mean, "o-", color=col[w], label=w, linewidth=1.4, markersize=3)
        axes[0].fill_between(ds, lo, hi, color=col[w], alpha=0.15, linewidth=0)
        rd = [d for d in ds if str(d) in ref]
        if rd:
            base = [ref[str(d)]["final_val_loss_mean"] for d in rd]
            gaps[w] = [by_depth[str(d)]["final_val_loss_mean"] - b for d, b in zip(rd, base)]
            axes[1].plot(rd, gaps[w], "o-", color=col[w], label=w, linewidth=1.4, markersize=3)
            axes[1].fill_between(rd, [by_depth[str(d)]["final_val_loss_min"] - b for d, b in zip(rd, base)],
                                 [by_depth[str(d)]["final_val_loss_max"] - b for d, b in zip(rd, base)],
                                 color=col[w], alpha=0.15, linewidth=0)
    limit, left_off = off_scale(gaps)
    axes[1].set_ylim(-limit, limit)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (blocks)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("final validation loss (nats/byte)")
    axes[0].set_title("mean over seeds, band = min..max", fontsize=9)
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].set_ylabel("minus residual's mean at the same depth")
    off = "; off scale: " + ", ".join(f"{w} ({min(gaps[w]):+.2f}..{max(gaps[w]):+.2f})" for w in left_off) if left_off else ""
    axes[1].set_title(f"below 0: better than residual{off}", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_curves_deepest(records: list[dict], summary: dict, depth: int, path: Path) -> None:
    """Validation loss against step at one depth: mean over seeds and min-max band per wiring."""
    col = colors(list(summary))
    fig = new_figure(11, 4.4)
    axes = fig.subplots(1, 2)
    for ax, zoom in zip(axes, (False, True)):
        for w, by_depth in summary.items():
            entry = by_depth.get(str(depth))
            if entry is None:
                continue
            curves = [dict(r["val_loss"]) for r in records if r["wiring"] == w and r["depth"] == depth]
            steps = [s for s, _ in entry["mean_curve"]]
            ax.plot(steps, [v for _, v in entry["mean_curve"]], color=col[w], label=w, linewidth=1.4)
            ax.fill_between(steps, [min(c[s] for c in curves) for s in steps], [max(c[s] for c in curves) for s in steps],
                            color=col[w], alpha=0.15, linewidth=0)
        ref = summary.get("residual", {}).get(str(depth))
        if ref is not None:
            ax.axhline(ref["final_val_loss_mean"], color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        if zoom:
            points = [(s, v) for by_depth in summary.values() if str(depth) in by_depth for s, v in by_depth[str(depth)]["mean_curve"]]
            if points:
                last = max(s for s, _ in points)
                tail = [v for s, v in points if s >= last / 2]
                ax.set_xlim(last / 2, last * 1.01)
                ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
            ax.set_title("second half (dotted: residual's final loss)", fontsize=9)
        else:
            ax.set_title(f"{depth} blocks: mean over seeds, band = min..max", fontsize=9)
            ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_walltime_deepest(records: list[dict], depth: int, path: Path) -> None:
    """Validation loss against wall-clock minutes since the run started, every run at one depth."""
    mine = [r for r in records if r["depth"] == depth]
    col = colors(sorted({r["wiring"] for r in mine}, key=lambda w: WIRINGS.index(w) if w in WIRINGS else 99))
    fig = new_figure(7.5, 4.6)
    ax = fig.subplots()
    labelled = set()
    for r in sorted(mine, key=lambda r: (r["wiring"], r["seed"])):
        t = [s / 60 for s, _ in r["val_loss_by_wall_s"]]
        ax.plot(t, [v for _, v in r["val_loss_by_wall_s"]], color=col[r["wiring"]], linewidth=1.1, alpha=0.85,
                label=None if r["wiring"] in labelled else r["wiring"])
        labelled.add(r["wiring"])
    ax.set_xlabel("wall-clock minutes since the run started (validation included)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"{depth} blocks: every run (one line per seed); wall times depend on the machine's load", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)


def plot_gates_deepest(records: list[dict], wirings: list[str], depth: int, path: Path) -> list[Path]:
    """The final wiring of every wiring at one depth (lowest seed), each panel drawn from its
    numbers (``gates_matrix``; a record without them shows its saved PNG instead), one figure per
    kind of matrix, each on one colour scale with one colour bar (:func:`_figures.wiring_figures`):
    ``path`` for weights of 0 to 1, ``<stem>_scaled`` for weights that can exceed 1,
    ``<stem>_signed`` for signed coefficients. Returns the files written ([] if no run has either)."""
    chosen = []
    for w in wirings:
        mine = [r for r in records if r["wiring"] == w and r["depth"] == depth]
        drawn = [r for r in mine if r.get("gates_matrix")] or [r for r in mine if r.get("gates_png") and Path(r["gates_png"]).is_file()]
        if drawn:
            chosen.append(min(drawn, key=lambda r: r["seed"]))
    if not chosen:
        return []
    steps = {r["final_step"] for r in chosen}
    panels = [gate_panel(r["wiring"], f"{r['wiring']}, seed {r['seed']}" + ("" if len(steps) == 1 else f", step {r['final_step']}"),
                         r.get("gates_matrix"), r.get("gates_png"), depth) for r in chosen]
    at = f", step {next(iter(steps))}" if len(steps) == 1 else ""
    return wiring_figures(panels, path, f"Learned wirings at {depth} blocks{at}, lowest seed")


def fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def table(summary: dict, depths: list[int], pairs: list[dict], gains: dict | None = None, signs: dict | None = None,
          families: dict | None = None) -> str:
    """Markdown: final loss by wiring and depth, whether depth pays off (``gains``, from
    :func:`depth_gains`), the pooled sign tests (``signs``, from :func:`sign_tests`), then a
    leaderboard per depth. ``families`` (from :func:`adjust_p_values`) says how many p-values each
    Benjamini-Hochberg family holds; the ``BH`` values themselves are the stats' ``p_bh``."""
    present = [d for d in depths if any(str(d) in by_depth for by_depth in summary.values())]
    lines = ["Final validation loss (nats/byte), mean +- std over seeds (n):", "",
             "| wiring | " + " | ".join(f"{d} blocks" for d in present) + " | deepest minus shallowest |",
             "|---|" + "---|" * (len(present) + 1)]
    for w, by_depth in summary.items():
        cells = [f"{by_depth[str(d)]['final_val_loss_mean']:.4f} +- {by_depth[str(d)]['final_val_loss_std']:.4f} ({len(by_depth[str(d)]['seeds'])})"
                 if str(d) in by_depth else "-" for d in present]
        ends = [d for d in present if str(d) in by_depth]
        gain = (by_depth[str(ends[-1])]["final_val_loss_mean"] - by_depth[str(ends[0])]["final_val_loss_mean"]) if len(ends) > 1 else None
        lines.append(f"| {w} | " + " | ".join(cells) + f" | {fmt(gain, '+.4f')} |")
    if families:
        lines += ["", f"p: two-sided, uncorrected. BH: the Benjamini-Hochberg adjusted p (false discovery rate) over "
                  f"one family, every t-test p-value in this file ({families['t_tests']}: the depth-gain table and "
                  f"every leaderboard); the sign tests are a family of their own ({families['sign_tests']})."]
    if gains:
        first = next(iter(gains.values()))
        lines += ["", f"Does depth pay off? The change of the final loss from {first['from']} to {first['to']} blocks "
                  "(mean difference +- its standard error, Welch's t and two-sided p), and that change minus "
                  "residual's (below 0: depth pays off more than for residual), unpaired and paired by seed "
                  "(per seed, the wiring's change minus residual's with the same seed; t with n - 1 degrees "
                  "of freedom):", "",
                  f"| wiring | {first['from']} -> {first['to']} blocks | minus residual's change | "
                  "minus residual's change, paired by seed (n) |", "|---|---|---|---|"]
        for w, g in sorted(gains.items(), key=lambda item: item[1]["gain"]["diff"]):
            pair = g.get("minus_residual_paired")
            n = "" if pair is None else f" ({pair['n']})"
            lines.append(f"| {w} | {fmt_t(g['gain'])} | {fmt_t(g['minus_residual'])} | {fmt_t(pair)}{n} |")
    if signs:
        shallow, deep = min(depths), max(depths)
        lines += ["", "Sign tests against residual, pooled over depths and seeds. A sign test counts the pairs of "
                  "runs with the same seed (the same initialisation seed and data order) in which the wiring's final "
                  "loss is below residual's (wins/n, ties left out) and gives the two-sided exact binomial p of that "
                  "count if either side were equally likely; it counts signs only, not the sizes of the gaps. The "
                  f"last column counts the seeds whose change from {shallow} to {deep} blocks is below residual's "
                  "change with the same seed (depth pays off more). BH: over every p-value of this table, a family "
                  "of its own.", "",
                  "| wiring | all depths | " + " | ".join(f"{d} blocks" for d in present)
                  + f" | {shallow} -> {deep} blocks minus residual's change |", "|---|---|" + "---|" * (len(present) + 1)]
        for w, s in signs.items():
            cells = [fmt_sign(s["vs_residual_by_depth"].get(str(d))) for d in present]
            lines.append(f"| {w} | {fmt_sign(s['vs_residual'])} | " + " | ".join(cells)
                         + f" | {fmt_sign(s['depth_gain_vs_residual'])} |")
    for d in present:
        rows = sorted(((w, by_depth[str(d)]) for w, by_depth in summary.items() if str(d) in by_depth),
                      key=lambda item: item[1]["final_val_loss_mean"])
        lines += ["", f"Leaderboard at {d} blocks:", "",
                  "| rank | wiring | seeds | final val loss (mean +- std) | min..max | minus residual | "
                  "minus residual +- se (Welch t, p, BH) | paired by seed: minus residual +- se (t, p, BH) | "
                  "steps to residual's loss (fraction, per seed) | wall per run (min) | tokens/s | parameters |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for rank, (w, e) in enumerate(rows, 1):
            fractions = ", ".join("never" if f is None else f"{f:.2f}" for f in e["fraction_of_residual_steps_per_seed"])
            lines.append(
                f"| {rank} | {w} | {len(e['seeds'])} | {e['final_val_loss_mean']:.4f} +- {e['final_val_loss_std']:.4f} | "
                f"{e['final_val_loss_min']:.4f}..{e['final_val_loss_max']:.4f} | {fmt(e['minus_residual'], '+.4f')} | "
                f"{fmt_t(e['minus_residual_welch'])} | {fmt_t(e['minus_residual_paired'])} | {fractions} | {e['wall_s_mean'] / 60:.1f} | {fmt(e['tokens_per_s_mean'], '.0f')} | {e['parameters']:,} |"
            )
    if pairs:
        lines += ["", "Pairs within two standard deviations after the first seeds (both got a third seed):", ""]
        lines += [f"- {p['depth']} blocks: {p['wirings'][0]} and {p['wirings'][1]} (gap {p['gap']:.4f} < {p['two_std']:.4f})" for p in pairs]
    return "\n".join(lines) + "\n"


def report(runs_dir: Path, out: Path, config: Path, all_specs: list[RunSpec], wirings: list[str], depths: list[int],
           pairs: list[dict]) -> dict:
    """Read the finished runs' records (``<out>/runs/``, not the run folders) and write the figures,
    ``results.json`` and ``table.md``."""
    run_records = records_for(out)
    records = collect(run_records, all_specs)
    head = run_record(runs_dir, {r["name"]: r for r in records}, len(all_specs), run_records)
    summary = summarize(records, wirings, depths)
    gains = depth_gains(records, wirings, depths)
    signs = sign_tests(records, wirings, depths)
    families = adjust_p_values(summary, gains, signs)
    out.mkdir(parents=True, exist_ok=True)
    deepest = max(r["depth"] for r in records)
    figures = [out / "loss_vs_depth.png", out / "curves_deepest.png", out / "walltime_deepest.png"]
    plot_loss_vs_depth(summary, depths, figures[0])
    plot_curves_deepest(records, summary, deepest, figures[1])
    plot_walltime_deepest(records, deepest, figures[2])
    figures += plot_gates_deepest(records, wirings, deepest, out / "gates_deepest.png")
    measured = out / "step_times.json"
    results = {
        **head,
        "config": str(config.relative_to(EXPERIMENTS.parent)),
        "wirings": wirings,
        "depths": depths,
        "deepest": deepest,
        "third_seed_pairs": pairs,
        "summary": summary,
        "depth_gains": gains,
        "sign_tests": signs,
        "p_value_families": families,
        "step_times": json.loads(measured.read_text(encoding="utf-8")) if measured.is_file() else None,
        "runs": [{**{k: v for k, v in r.items() if k != "gates_matrix"}, "gates_png": r["gates_png"] and portable(r["gates_png"])}
                 for r in records],  # the matrices stay in the records
    }
    write_report(out, results, table(summary, depths, pairs, gains, signs, families), figures)
    return results


# --------------------------------------------------------------------------- measuring step times

def model_args(config: Path, wiring: str, depth: int) -> dict:
    """The LLMModule arguments of one run of the sweep (the config's, with its depth and wiring)."""
    import yaml

    init = dict(yaml.safe_load(config.read_text(encoding="utf-8"))["model"]["init_args"])
    conn, options, granularity = family(wiring)
    init.update(n_layers=depth, connectivity=conn, connectivity_options=options, granularity=granularity, compile=False)
    return init


def measure(config: Path, wirings: list[str], depths: list[int], reps: int, threads: int) -> dict:
    """Seconds per training step (forward, loss, backward, AdamW) of every wiring at every depth,
    on random bytes of the config's batch shape, ``threads`` intra-op threads, round-robin over
    the wirings of a depth (``interleaved_times``) after one warm-up step; median and min of
    ``reps``. ancre-anneal is timed as ancre (the same model)."""
    import torch
    import yaml

    from ancre_lightning.bench._common import interleaved_times, random_batch, summarize as timing, train_step_fn
    from ancre_lightning.modules import LLMModule

    torch.set_num_threads(threads)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))["data"]["init_args"]
    shape = {"batch_size": data["batch_size"], "seq_len": data["seq_len"]}
    cpu = torch.device("cpu")
    batch = random_batch(shape, cpu)
    out: dict[str, dict] = {}
    for depth in sorted(depths):
        fns = {}
        for w in wirings:
            if w == "ancre-anneal" and "ancre" in wirings:
                continue
            torch.manual_seed(0)
            module = LLMModule(**model_args(config, w, depth))
            fns[w] = train_step_fn(module, module.build_optimizer(), batch, cpu, "32-true")
        start = time.time()
        times = interleaved_times(fns, cpu, reps, warmup=1)
        for w in wirings:
            t = timing(times["ancre" if w == "ancre-anneal" and "ancre" in wirings else w])
            out.setdefault(w, {})[str(depth)] = {"median_s": t["median_s"], "min_s": t["min_s"], "n": t["n"]}
        print(f"depth {depth}: " + ", ".join(f"{w} {out[w][str(depth)]['median_s']:.3f}" for w in wirings)
              + f" s/step (median of {reps}; {time.time() - start:.0f} s)", flush=True)
    return out


def estimate(step_s: dict, config: Path, steps: int | None, val_every: int | None, seeds: int, jobs: int,
             startup_s: float = STARTUP_S, key: str = "median_s") -> dict:
    """Hours of the sweep from measured step times: per run steps x step time, plus its evaluations
    (``limit_val_batches`` forward passes each, counted as a third of a step) and ``startup_s``;
    ``seeds`` runs of every wiring and depth, ``jobs`` at a time on as many cores (ideal packing)."""
    import yaml

    trainer = yaml.safe_load(config.read_text(encoding="utf-8"))["trainer"]
    steps = steps or trainer["max_steps"]
    val_every = val_every or trainer["val_check_interval"]
    evals = steps // val_every
    eval_batches = evals * trainer["limit_val_batches"]
    run_s = {f"{w}_d{d}": steps * t[key] + eval_batches * t[key] / 3 + startup_s for w, by_depth in step_s.items() for d, t in by_depth.items()}
    total = seeds * sum(run_s.values()) / max(1, jobs)
    # the steps that fill `hours` with 3 seeds everywhere (the worst case of the third-seed pass)
    per_step = sum(t[key] for by_depth in step_s.values() for t in by_depth.values())
    fixed = sum(eval_batches * t[key] / 3 + startup_s for by_depth in step_s.values() for t in by_depth.values())
    return {"steps": steps, "val_every": val_every, "seeds": seeds, "jobs": jobs, "startup_s": startup_s, "timing": key,
            "hours": total / 3600, "run_s": run_s,
            "steps_for_6h_with_3_seeds": int((6 * 3600 * max(1, jobs) / 3 - fixed) / per_step)}


# --------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = sweep_parser("every wiring at 4, 8, 16 and 32 blocks on the Wikipedia byte corpus", "depth_scaling", 2,
                     "end-to-end check: every wiring at 4 blocks, residual and ancre at 2 too, 4 steps, seed 0", "--trainer.max_steps=300")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: width 64 (experiments/configs/depth_scaling.yaml); gpu: the LLaMA-60M shape "
                        "(depth_scaling_gpu.yaml; runs go to experiments/runs/depth_scaling_gpu)")
    p.add_argument("--wirings", nargs="+", default=WIRINGS, help="wirings to compare")
    p.add_argument("--depths", nargs="+", type=int, default=None, help=f"depths in blocks (default {DEPTHS})")
    p.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="first-pass seeds (model init and data order)")
    p.add_argument("--third-seed", type=int, default=THIRD_SEED,
                   help="seed the second pass adds to close pairs; -1: no second pass")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's max_steps)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default: the config's)")
    p.add_argument("--measure", action="store_true",
                   help="time a few training steps of every wiring and depth, write <out>/step_times.{json,md} and the "
                        "estimate of the sweep's hours; trains nothing (with --report-only: only the estimate again, "
                        "from the saved times, e.g. for another --steps)")
    p.add_argument("--measure-reps", type=int, default=3, help="timed steps per model with --measure (after one warm-up)")
    return p.parse_args(argv)


def measure_main(args: argparse.Namespace, config: Path) -> dict:
    """``--measure``: step times, the estimate, written to ``<out>/step_times.json`` and ``.md``."""
    from ancre_lightning.bench._common import load_average

    saved = args.out / "step_times.json"
    if args.report_only:  # the estimate again (another budget) from the saved times, nothing timed
        old = json.loads(saved.read_text(encoding="utf-8"))
        threads, load, step_s = old["threads"], old["load_average_at_start"], old["step_s"]
        args.measure_reps, date = old["reps"], old["date"]
    else:
        threads = args.threads or 1
        load = load_average()
        date = time.strftime("%Y-%m-%d %H:%M:%S %z")
        step_s = measure(config, args.wirings, args.depths, args.measure_reps, threads)
    two = estimate(step_s, config, args.steps, args.val_every, len(args.seeds), args.jobs)
    three = estimate(step_s, config, args.steps, args.val_every, len(args.seeds) + 1, args.jobs)
    fastest = estimate(step_s, config, args.steps, args.val_every, len(args.seeds) + 1, args.jobs, key="min_s")
    result = {"config": str(config.relative_to(EXPERIMENTS.parent)), "threads": threads, "reps": args.measure_reps,
              "load_average_at_start": load, "machine": machine(), "date": date,
              "step_s": step_s, "estimate_first_pass": two, "estimate_all_third_seeds": three,
              "estimate_all_third_seeds_min_times": fastest}
    lines = [f"Seconds per training step, median of {args.measure_reps} (min), {threads} thread(s), {date}, load average "
             f"at start {load}:", "", "| wiring | " + " | ".join(f"{d} blocks" for d in sorted(args.depths)) + " |",
             "|---|" + "---|" * len(args.depths)]
    for w, by_depth in step_s.items():
        lines.append(f"| {w} | " + " | ".join(f"{by_depth[str(d)]['median_s']:.3f} ({by_depth[str(d)]['min_s']:.3f})"
                                             for d in sorted(args.depths)) + " |")
    lines += ["", f"Estimate at {two['steps']} steps, validation every {two['val_every']}, {args.jobs} jobs, "
              f"{STARTUP_S:.0f} s start-up a run: {two['hours']:.1f} h with {two['seeds']} seeds, {three['hours']:.1f} h if "
              f"every wiring and depth gets a third seed ({fastest['hours']:.1f} h from the min times). Steps that fill "
              f"6 h with 3 seeds everywhere: {three['steps_for_6h_with_3_seeds']} (median times), "
              f"{fastest['steps_for_6h_with_3_seeds']} (min times)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_times.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.out / "step_times.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {args.out / 'step_times.json'}, {args.out / 'step_times.md'}")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Launch the missing runs (unless ``--report-only``): the first pass, then the third seeds of
    close pairs; then write the report. ``--measure`` only times steps."""
    args = parse_args(argv)
    config = PRESETS[args.preset]
    extra = list(args.override)
    if args.quick:
        extra = QUICK + extra
        args.steps = args.steps or 4
        args.val_every = args.val_every or 2
        args.depths = args.depths or QUICK_DEPTHS
        if args.seeds == SEEDS:
            args.seeds = [0]
        args.measure_reps = min(args.measure_reps, 1)
    args.depths = args.depths or DEPTHS
    name = "depth_scaling" if args.preset == "cpu" else f"depth_scaling_{args.preset}"
    resolve_folders(args, name, name)
    if args.measure:
        return measure_main(args, config)
    first = specs(config, args.wirings, args.depths, args.seeds, args.steps, args.val_every, extra)
    if args.quick:  # a couple of minutes: every wiring at the deepest depth, two at the others
        first = [s for s in first if s.meta["depth"] == max(args.depths) or s.meta["wiring"] in QUICK_SHALLOW]
    records = records_for(args.out)
    launch_unless_report_only(args, first, records)
    pairs = []
    if args.third_seed >= 0 and args.third_seed not in args.seeds:
        pairs = close_pairs(collect(records, first), args.wirings, args.depths, args.seeds)
        second = third_seed_specs(pairs, config, args.wirings, args.third_seed, args.steps, args.val_every, extra)
        if second:
            print(f"third seed for {len(second)} run(s): " + ", ".join(s.name for s in second), flush=True)
        launch_unless_report_only(args, second, records)
        first = first + second
        # third seeds that ran for pairs that are no longer close (records re-run since) still count
        planned = {s.name for s in first}
        first = first + [s for s in specs(config, args.wirings, args.depths, [args.third_seed], args.steps, args.val_every, extra)
                         if s.name not in planned and records.has(s.name)]
    results = report(args.runs_dir, args.out, config, first, args.wirings, args.depths, pairs)
    if not records.print_written() and not args.report_only:
        print("no new record files", flush=True)
    return results


if __name__ == "__main__":
    main()
