"""What the experiment drivers share: launching ``ancre fit`` runs, resuming, and reading them back.

A run is one ``ancre fit`` subprocess (``python -m ancre_lightning.cli fit ...``) whose TensorBoard
logger writes to ``<runs_dir>/<name>/run/``; its console output goes to ``<runs_dir>/<name>/train.log``.
When it exits with status 0 the driver writes ``<runs_dir>/<name>/DONE.json`` (command, wall time);
a run with that file is finished and is skipped next time, a run folder without it is removed and
started again, so an interrupted sweep can simply be launched again.

The run folders hold event files and checkpoints and are git-ignored, so they do not outlive the
machine. A driver whose sweep must resume across sessions on fresh clones passes a
:class:`RunRecords` to :func:`launch`: when a run finishes, a small record (``<name>.json``, built by
the driver from the run folder, and ``<name>_gates.png``, its last wiring heatmap, shrunk) goes to a
folder meant to be committed, the record (not ``DONE.json``) says that the run is finished, and the
report is read back from the records alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ancre_lightning.atomic import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = Path(__file__).resolve().parent
RUN_VERSION = "run"  # the TensorBoard logger's version folder inside every run folder
#: the logger's version folder of a run's final evaluation on the whole validation split
FULL_VALIDATION_VERSION = "full_val"


@dataclass
class RunSpec:
    """One training run.

    Attributes:
        name: folder name under the runs directory (unique in a sweep).
        args: the ``ancre`` arguments after ``fit`` (configs and overrides), without the logger's
            ``save_dir``/``name``/``version``, which :func:`launch` adds.
        meta: anything the report needs about the run (connectivity, seed, ...).
    """

    name: str
    args: list[str]
    meta: dict = field(default_factory=dict)


def run_dir(runs_dir: Path, name: str) -> Path:
    """The folder of one run."""
    return Path(runs_dir) / name


def log_dir(runs_dir: Path, name: str) -> Path:
    """The TensorBoard log dir of one run (event files, ``config.yaml``, checkpoints, gate PNGs)."""
    return run_dir(runs_dir, name) / RUN_VERSION


def is_done(runs_dir: Path, name: str) -> bool:
    """True when the run finished successfully (its ``DONE.json`` exists)."""
    return (run_dir(runs_dir, name) / "DONE.json").is_file()


def portable(text: str) -> str:
    """``text`` with the repository's absolute path written as ``.`` (records are committed and
    read on other clones)."""
    return str(text).replace(str(ROOT), ".")


class RunRecords:
    """Finished runs as small files meant to be committed: ``<folder>/<name>.json`` and, when the
    run saved a wiring heatmap, ``<folder>/<name>_gates.png`` (no checkpoints, no event files);
    the numbers of that heatmap, when the run saved them (:func:`final_gate_matrix`), go into the
    JSON as ``gates_matrix`` (GateVisualization's dict: coefficients, token spread, row names).

    ``build(runs_dir, spec, done)`` reads a finished run's folder (``done``: its ``DONE.json``) and
    returns what the report needs (curves, final loss, ...); :meth:`write` adds the spec, the
    command and the timings of ``DONE.json``. A run counts as finished when its JSON exists; the
    JSON is written last, so an interrupted write leaves the run unfinished. ``written`` lists the
    files this process wrote (for the session to commit).
    """

    def __init__(self, folder: Path, build: Callable[[Path, RunSpec, dict], dict], png_max_px: int = 900) -> None:
        self.folder = Path(folder)
        self.build = build
        self.png_max_px = png_max_px
        self.written: list[Path] = []

    def json_path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def png_path(self, name: str) -> Path:
        return self.folder / f"{name}_gates.png"

    def has(self, name: str) -> bool:
        """True when the run's record exists (the run finished)."""
        return self.json_path(name).is_file()

    def load(self, name: str) -> dict:
        """The run's record; ``gates_png`` (when there is one) as a path next to it."""
        record = json.loads(self.json_path(name).read_text(encoding="utf-8"))
        if record.get("gates_png"):
            record["gates_png"] = str(self.folder / record["gates_png"])
        return record

    def print_written(self) -> bool:
        """Name the record files this process wrote and say to commit them; False if none."""
        if self.written:
            print(f"new record files ({len(self.written)}; commit them so that a fresh clone resumes from here, "
                  f"e.g. git add {portable(self.folder)}):\n" + "\n".join(f"  {portable(p)}" for p in self.written), flush=True)
        return bool(self.written)

    def write(self, runs_dir: Path, spec: RunSpec, done: dict) -> dict:
        """Build the record of a finished run from its folder and write it (the PNG first)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "name": spec.name,
            "meta": spec.meta,
            "args": [portable(a) for a in spec.args],
            "command": [portable(a) for a in done["command"]],
            "started_unix": done["started_unix"],
            "wall_s": done["wall_s"],
            "finished": done.get("finished"),
            "threads": done.get("threads"),
            "jobs": done.get("jobs"),
            **self.build(runs_dir, spec, done),
            "gates_png": None,
            "gates_matrix": None,
        }
        png = final_gate_png(runs_dir, spec.name)
        if png is not None:
            small_png(png, self.png_path(spec.name), self.png_max_px)
            record["gates_png"] = self.png_path(spec.name).name
            self.written.append(self.png_path(spec.name))
        matrix = final_gate_matrix(runs_dir, spec.name)
        if matrix is not None:  # the numbers of that heatmap, for the reports to draw again
            record["gates_matrix"] = json.loads(matrix.read_text(encoding="utf-8"))
        atomic_write_bytes(self.json_path(spec.name), record_json(record).encode("utf-8"))
        self.written.append(self.json_path(spec.name))
        return record


def record_json(record: dict) -> str:
    """The JSON text of a record: indented by 1, with each row of the ``gates_matrix`` matrices on
    one line (a 64 x 65 matrix takes 64 lines, not 4,160)."""
    matrix = record.get("gates_matrix")
    if not matrix:
        return json.dumps(record, indent=1) + "\n"
    from ancre_lightning.callbacks.visualization import matrix_json

    text = json.dumps({**record, "gates_matrix": "@gates_matrix@"}, indent=1)
    return text.replace('"@gates_matrix@"', matrix_json(matrix, indent=" ").rstrip("\n"), 1) + "\n"


def small_png(src: Path, dst: Path, max_px: int = 900) -> None:
    """Copy a PNG, shrunk to at most ``max_px`` on its longer side and stored with a 256-colour
    palette (a heatmap loses nothing visible; the file is a few tens of kB)."""
    from PIL import Image

    with Image.open(src) as image:
        image = image.convert("RGB")
        image.thumbnail((max_px, max_px), Image.LANCZOS)
        image.quantize(256).save(dst, optimize=True)


def command(spec: RunSpec, runs_dir: Path) -> list[str]:
    """The full command line of a run: ``python -m ancre_lightning.cli fit <args> <logger paths>``."""
    return [
        sys.executable, "-m", "ancre_lightning.cli", "fit", *spec.args,
        f"--trainer.logger.init_args.save_dir={Path(runs_dir).resolve()}",
        f"--trainer.logger.init_args.name={spec.name}",
        f"--trainer.logger.init_args.version={RUN_VERSION}",
        f"--trainer.default_root_dir={run_dir(runs_dir, spec.name).resolve()}",
        "--trainer.enable_progress_bar=false",
    ]


def full_validation(runs_dir: Path, spec: RunSpec, threads: int = 1) -> float:
    """The validation loss of a finished run's final weights over its whole validation split (every
    batch, where training evaluated the first ``limit_val_batches``): ``ancre validate`` with the
    run's own arguments and its ``last.ckpt``, logged to ``<runs_dir>/<name>/full_val/``. Computed
    once; later calls read the logged value back."""
    folder = run_dir(runs_dir, spec.name) / FULL_VALIDATION_VERSION
    if not list(folder.glob("events.out.tfevents.*")):
        ckpt = last_checkpoint(runs_dir, spec.name)
        if ckpt is None:
            raise FileNotFoundError(f"{spec.name}: no last.ckpt to evaluate on the whole validation split")
        cmd = [sys.executable, "-m", "ancre_lightning.cli", "validate", *spec.args, f"--ckpt_path={ckpt.resolve()}",
               "--trainer.limit_val_batches=1.0",
               f"--trainer.logger.init_args.save_dir={Path(runs_dir).resolve()}",
               f"--trainer.logger.init_args.name={spec.name}",
               f"--trainer.logger.init_args.version={FULL_VALIDATION_VERSION}",
               "--trainer.enable_progress_bar=false"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        with open(run_dir(runs_dir, spec.name) / "full_val.log", "w", encoding="utf-8") as log:
            rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"{spec.name}: the whole-split validation exited with {rc}; see its full_val.log")
    values = read_scalar_events(folder).get("val/loss")
    if not values:
        raise ValueError(f"{spec.name}: no val/loss in {folder}")
    return values[-1][1]


def launch(specs: list[RunSpec], runs_dir: Path, jobs: int = 2, threads: int | None = None, poll_s: float = 2.0,
           records: RunRecords | None = None, start_until: float | None = None) -> dict[str, int]:
    """Run every unfinished spec, ``jobs`` at a time; returns exit status by run name.

    ``start_until`` (a Unix time): no run starts after it; the runs already going finish (for a
    session that must end: what is left waits for the next launch).

    Each run gets ``OMP_NUM_THREADS=threads`` (default: the CPU count divided by ``jobs``, at
    least 1). Finished runs are skipped; an unfinished run folder is removed first. Without
    ``records`` a run is finished when its ``DONE.json`` exists; with ``records`` when its record
    exists, and a finished run writes its record (status -1 if that fails); a run folder with
    ``DONE.json`` but no record (e.g. from before records) gets its record and is not run again.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    if records is not None:
        for s in specs:
            if not records.has(s.name) and is_done(runs_dir, s.name):
                try:
                    records.write(runs_dir, s, done_info(runs_dir, s.name))
                    print(f"recorded {s.name} from its finished run folder", flush=True)
                except Exception as err:  # noqa: BLE001 - the run is simply run again
                    print(f"could not record {s.name} from its run folder ({err!r}); running it again", flush=True)
    finished = records.has if records is not None else (lambda name: is_done(runs_dir, name))
    todo = [s for s in specs if not finished(s.name)]
    skipped = len(specs) - len(todo)
    if skipped:
        print(f"skipping {skipped} finished run(s)", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    running: dict[str, tuple[subprocess.Popen, float, list[str], object]] = {}
    status: dict[str, int] = {}
    queue = list(todo)
    while queue or running:
        if queue and start_until is not None and time.time() > start_until:
            print(f"not starting the {len(queue)} run(s) left: past --start-until; launch again to run them", flush=True)
            queue = []
        while queue and len(running) < max(1, jobs):
            spec = queue.pop(0)
            folder = run_dir(runs_dir, spec.name)
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted run starts again from scratch
            folder.mkdir(parents=True)
            cmd = command(spec, runs_dir)
            log = open(folder / "train.log", "w", encoding="utf-8")
            print(f"start {spec.name} ({threads} thread(s))", flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[spec.name] = (proc, time.time(), cmd, log, spec)
        for name, (proc, start, cmd, log, spec) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            wall = time.time() - start
            status[name] = rc
            del running[name]
            if rc == 0:
                done = {"command": cmd, "wall_s": wall, "started_unix": start, "threads": threads, "jobs": jobs,
                        "meta": spec.meta, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
                (run_dir(runs_dir, name) / "DONE.json").write_text(json.dumps(done, indent=1) + "\n", encoding="utf-8")
                print(f"done  {name} in {wall / 60:.1f} min", flush=True)
                if records is not None:
                    try:
                        records.write(runs_dir, spec, done)
                    except Exception as err:  # noqa: BLE001 - reported; the next launch retries from the folder
                        status[name] = -1
                        print(f"FAILED to record {name}: {err!r}", flush=True)
            else:
                tail = (run_dir(runs_dir, name) / "train.log").read_text(encoding="utf-8", errors="replace")[-2000:]
                print(f"FAILED {name} (exit {rc}) after {wall / 60:.1f} min; end of its log:\n{tail}", flush=True)
        if running:
            time.sleep(poll_s)
    return status


def sweep_parser(description: str, name: str, default_jobs: int, quick_help: str, override_example: str) -> argparse.ArgumentParser:
    """The options every sweep driver has: where runs and the report go, parallelism, report-only,
    the quick check and extra ``ancre`` overrides. ``name`` picks the default folders
    ``experiments/runs/<name>`` (``<name>_quick`` with ``--quick``) and ``experiments/out/<driver>``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs-dir", type=Path, default=None,
                   help=f"where the runs go, resumable (default experiments/runs/{name}; with --quick experiments/runs/{name}_quick)")
    p.add_argument("--out", type=Path, default=None,
                   help="figures and JSON (default experiments/out/<driver>; with --quick <runs-dir>/report)")
    p.add_argument("--jobs", type=int, default=default_jobs, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="threads per run (default: CPUs / jobs)")
    p.add_argument("--report-only", action="store_true", help="only re-read finished runs and write the report")
    p.add_argument("--rebuild-records", action="store_true",
                   help="first write again the records of the finished run folders on this machine (after a change "
                        "of what records hold); with --report-only nothing is run")
    p.add_argument("--start-until", type=float, default=None, metavar="HOURS",
                   help="start no run after this many hours from now (the runs going then finish; a later launch "
                        "runs the rest)")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--override", action="append", default=[], metavar="--KEY=VALUE",
                   help=f"extra ancre override for every run, e.g. --override={override_example}")
    return p


def resolve_folders(args: argparse.Namespace, name: str, out_name: str) -> None:
    """Fill in ``args.runs_dir`` and ``args.out`` where the command line left them out."""
    args.runs_dir = args.runs_dir or EXPERIMENTS / "runs" / (f"{name}_quick" if args.quick else name)
    args.out = args.out or (args.runs_dir / "report" if args.quick else EXPERIMENTS / "out" / out_name)


def rebuild_records(specs: list[RunSpec], runs_dir: Path, records: RunRecords) -> list[str]:
    """Write again, with the code as it is now, the record of every spec whose finished run folder
    (``DONE.json``) is still on this machine; the others keep their records. For a change of what a
    record holds (a new field, a new tag) while a sweep's run folders are at hand. Returns the names."""
    done = [s for s in specs if is_done(runs_dir, s.name)]
    for s in done:
        records.write(runs_dir, s, done_info(runs_dir, s.name))
    return [s.name for s in done]


def launch_unless_report_only(args: argparse.Namespace, specs: list[RunSpec], records: RunRecords | None = None) -> None:
    """Run the sweep's unfinished runs (skipped with ``--report-only``) and name the failed ones;
    with ``--rebuild-records``, first rewrite the records of the finished run folders at hand."""
    if getattr(args, "rebuild_records", False) and records is not None:
        rebuilt = rebuild_records(specs, args.runs_dir, records)
        print(f"rebuilt {len(rebuilt)} record(s) from their run folders", flush=True)
    if args.report_only:
        return
    if getattr(args, "start_until", None) is not None and not hasattr(args, "start_until_unix"):
        args.start_until_unix = time.time() + 3600 * args.start_until  # one deadline for every pass
    status = launch(specs, args.runs_dir, args.jobs, args.threads, records=records,
                    start_until=getattr(args, "start_until_unix", None))
    failed = [n for n, rc in status.items() if rc != 0]
    if failed:
        print(f"failed runs: {failed} (their logs: <runs-dir>/<name>/train.log)", flush=True)


def run_record(runs_dir: Path, runs: dict, expected_runs: int, records: RunRecords | None = None) -> dict:
    """The head of a report's ``results.json``: where the runs are, how many finished, their commands
    (from the runs' records with ``records``, else from their ``DONE.json``)."""
    if not runs:
        where = runs_dir if records is None else records.folder
        raise SystemExit(f"no finished runs under {where}; run without --report-only first")
    head = {"runs_dir": portable(runs_dir), "expected_runs": expected_runs, "finished_runs": len(runs)}
    if records is not None:
        head["records_dir"] = portable(records.folder)
    commands = {name: (records.load(name) if records is not None else done_info(runs_dir, name))["command"] for name in runs}
    return {**head, "commands": {name: cmd[3:] for name, cmd in commands.items()}}


def write_report(out: Path, results: dict, table_md: str, figures: list[Path]) -> None:
    """Write ``results.json`` (with the machine) and ``table.md`` to ``out``; print the table and the files."""
    results = {**results, "machine": machine()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "table.md").write_text(table_md, encoding="utf-8")
    print(table_md)
    print("wrote " + ", ".join(str(p) for p in [*figures, out / "results.json"]))


def read_scalar_events(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of a run's TensorBoard event files with the time it was written:
    tag -> [(step, value, unix wall time)] sorted by step (a step logged twice keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(Path(folder).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1, "histograms": 1, "tensors": 1})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                out.setdefault(tag, {})[int(ev.step)] = (float(ev.value), float(ev.wall_time))
    return {tag: [(step, v, t) for step, (v, t) in sorted(values.items())] for tag, values in out.items()}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard event files: tag -> [(step, value)] sorted by step
    (a step logged twice keeps its last value)."""
    return {tag: [(step, v) for step, v, _ in points] for tag, points in read_scalar_events(folder).items()}


def validation_shift(scalars: dict[str, list[tuple]]) -> int:
    """What to add to a run's validation steps to count optimizer steps taken: 1 for runs logged
    while validation metrics sat at Lightning's own step (global_step - 1), 0 for runs logged since
    they sit at global_step.

    Told apart by the callbacks' scalars (``stream/*``, ``early_exit/*``), which have always been
    logged at global_step at the same validations; a run without them is judged by its last
    validation step (step 3999 of a 4000-step run is the old convention, 4000 the new one).
    """
    val = [p[0] for tag, points in scalars.items() if tag.startswith("val/") for p in points]
    if not val:
        return 0
    last = max(val)
    reference = {p[0] for tag, points in scalars.items() if tag.startswith(("stream/", "early_exit/")) for p in points}
    if reference:
        return 0 if last in reference else 1

    def zeros(n: int) -> int:
        return len(str(n)) - len(str(n).rstrip("0")) if n else 0

    return 1 if zeros(last + 1) > zeros(last) else 0


def validation_curve(points: list[tuple], shift: int = 1) -> list[tuple]:
    """A validation metric's points with the step moved to the number of optimizer steps taken
    (``shift`` from :func:`validation_shift`)."""
    return [(p[0] + shift, *p[1:]) for p in points]


def final_gate_png(runs_dir: Path, name: str) -> Path | None:
    """The last wiring heatmap that GateVisualization saved for a run (``<log_dir>/gates/wiring_step*.png``
    of the single stack, the highest step); None if there is none."""
    found = sorted(log_dir(runs_dir, name).glob("gates/wiring_step*.png"))
    return found[-1] if found else None


def final_gate_matrix(runs_dir: Path, name: str) -> Path | None:
    """The numbers of the last wiring heatmap GateVisualization saved for a run
    (``<log_dir>/gates/wiring_step*.json`` beside :func:`final_gate_png`, the highest step); None
    if there is none (runs from before the callback wrote them)."""
    found = sorted(log_dir(runs_dir, name).glob("gates/wiring_step*.json"))
    return found[-1] if found else None


def done_info(runs_dir: Path, name: str) -> dict:
    """The run's ``DONE.json`` (command, wall time, meta)."""
    return json.loads((run_dir(runs_dir, name) / "DONE.json").read_text(encoding="utf-8"))


def last_checkpoint(runs_dir: Path, name: str) -> Path | None:
    """The run's ``last.ckpt`` (None if there is none)."""
    found = sorted(log_dir(runs_dir, name).rglob("last*.ckpt"))
    return found[-1] if found else None


def ancre_coefficients(ckpt: Path) -> dict[str, list[list[float]]]:
    """The learned ANCRe wiring of a checkpoint, stack name -> (K, K+1) ``coefficients()``.

    Rebuilds each stack's ANCRe connectivity from the checkpoint's hyper-parameters
    (``connectivity_options``) and its saved ``gate_logits`` and ``tau``, and asks it for
    ``coefficients()``: the same matrix the GateVisualization callback draws.
    """
    import torch

    from ancre_lightning.connectivity import build_connectivity

    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values: no code runs
    weights = state["state_dict"]
    options = dict((state.get("hyper_parameters") or {}).get("connectivity_options") or {})
    out: dict[str, list[list[float]]] = {}
    for key, logits in weights.items():
        if not key.endswith("connectivity.gate_logits"):
            continue
        prefix = key[: -len("gate_logits")]
        n = logits.numel()
        k = int((math.isqrt(8 * n + 1) - 1) // 2)  # n = K (K + 1) / 2
        conn = build_connectivity("ancre", k, **options)
        conn.gate_logits.data.copy_(logits.float())
        if prefix + "tau" in weights:
            conn.tau.copy_(weights[prefix + "tau"])
        stack = prefix.removesuffix(".connectivity.").removeprefix("net.") or "stack"
        out[stack] = conn.coefficients().detach().tolist()
    return out


def draw_heatmap(ax, matrix: list[list[float]], title: str) -> object:
    """One (K, K+1) wiring matrix into a matplotlib axis, values in the cells; returns the image."""
    import numpy as np

    c = np.asarray(matrix, dtype=float)
    image = ax.imshow(c, cmap="viridis", vmin=0.0, vmax=max(1.0, float(c.max())))
    k = c.shape[0]
    if k <= 16:
        for j in range(k):
            for i in range(c.shape[1]):
                if c[j, i] >= 0.005:
                    ax.text(i, j, f"{c[j, i]:.2f}", ha="center", va="center", fontsize=6 if k > 8 else 7,
                            color="white" if c[j, i] < 0.6 else "black")
    ax.set_xticks(range(c.shape[1]))
    ax.set_yticks(range(k))
    ax.set_xlabel("source i (i = j+1: own output)", fontsize=7)
    ax.set_ylabel("merge after block j", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    return image


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def interpolate_crossing(points: list[tuple[int, float]], level: float) -> float | None:
    """The first step at which a decreasing-ish curve ``[(step, value)]`` reaches ``value <= level``,
    linearly interpolated between the two logged points around the crossing (None: never)."""
    prev = None
    for step, value in points:
        if value <= level:
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - level) / (v0 - value) if v0 != value else float(step)
        prev = (step, value)
    return None


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over seeds at the steps every curve has."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    tables = [dict(c) for c in curves]
    return [(s, sum(t[s] for t in tables) / len(tables)) for s in common]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def two_sided_p(t: float | None, df: float | None) -> float | None:
    """Two-sided p-value of Student's ``t`` with ``df`` degrees of freedom (None if either is None)."""
    if t is None or df is None or not df > 0:
        return None
    from scipy.stats import t as student

    return float(2 * student.sf(abs(t), df))


def welch(a: list[float], b: list[float]) -> dict | None:
    """Difference of the means of two samples, ``mean(a) - mean(b)``, with its standard error
    ``sqrt(var_a / n_a + var_b / n_b)`` (sample variances), Welch's ``t`` (the difference over that
    error; None when it is 0), the Welch-Satterthwaite degrees of freedom and the two-sided ``p``.
    None unless both samples have at least two values."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1)) if va + vb > 0 else None
    t = (ma - mb) / se if se > 0 else None
    return {"diff": ma - mb, "se": se, "t": t, "df": df, "p": two_sided_p(t, df)}


def paired(a: dict, b: dict) -> dict | None:
    """The mean of the per-seed differences ``a[s] - b[s]`` over the seeds both have (``{seed:
    value}``), its standard error ``sd / sqrt(n)``, the paired ``t``, ``df = n - 1``, the two-sided
    ``p`` and ``n``. Runs with the same seed see the same batches in the same order, so what a
    seed does to every wiring alike cancels. None unless two seeds are shared."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    mean, sd = mean_std([a[s] - b[s] for s in seeds])
    se = sd / math.sqrt(len(seeds))
    t = mean / se if se > 0 else None
    return {"diff": mean, "se": se, "t": t, "df": len(seeds) - 1, "p": two_sided_p(t, len(seeds) - 1), "n": len(seeds)}


def difference_of_differences(first: dict | None, second: dict | None) -> dict | None:
    """``first["diff"] - second["diff"]`` for two independent :func:`welch` results, its standard
    error (the errors added in quadrature), ``t``, and where both carry degrees of freedom the
    Welch-Satterthwaite ``df`` of the sum and the two-sided ``p``; None if either is None."""
    if first is None or second is None:
        return None
    se = math.sqrt(first["se"] ** 2 + second["se"] ** 2)
    diff = first["diff"] - second["diff"]
    t = diff / se if se > 0 else None
    v1, v2, df1, df2 = first["se"] ** 2, second["se"] ** 2, first.get("df"), second.get("df")
    df = (v1 + v2) ** 2 / (v1 * v1 / df1 + v2 * v2 / df2) if df1 and df2 and v1 + v2 > 0 else None
    return {"diff": diff, "se": se, "t": t, "df": df, "p": two_sided_p(t, df)}


def benjamini_hochberg(pvalues: list[float | None]) -> list[float | None]:
    """Benjamini-Hochberg adjusted p-values, in the order given: with the ``m`` p-values that are
    not None sorted, ``p_(k)`` becomes ``min over j >= k of m p_(j) / j``, capped at 1 (the step-up
    procedure: a test whose adjusted p is at most ``q`` is rejected at false discovery rate ``q``).
    None (a test that has no p) passes through as None and does not count in ``m``. The adjusted
    values keep the order of the raw ones and are never below them."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p))
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    smallest = 1.0
    for rank in range(m, 0, -1):
        p, i = present[rank - 1]
        smallest = min(smallest, p * m / rank)
        out[i] = smallest
    return out


def add_benjamini_hochberg(family: list[dict | None], key: str = "p", adjusted: str = "p_bh") -> int:
    """Add ``adjusted`` (Benjamini-Hochberg, :func:`benjamini_hochberg`) to every stats dict of one
    family of tests in place, from its ``key``; None entries are skipped, a dict listed twice counts
    once, a dict without a p gets ``adjusted`` None. Returns the family's size ``m`` (the tests with
    a p). Which tests form the family is the caller's choice: the drivers take every p-value that
    one table of their report shows."""
    unique = list({id(s): s for s in family if s is not None}.values())
    for stats, q in zip(unique, benjamini_hochberg([s.get(key) for s in unique])):
        stats[adjusted] = q
    return sum(s.get(key) is not None for s in unique)


def sign_test(differences: list[float]) -> dict:
    """The sign test of paired differences (a wiring's loss minus residual's with the same seed):
    ``wins`` counts the differences below 0 (the wiring's loss is lower), ``losses`` those above 0,
    ``ties`` the zeros, which are left out; ``n = wins + losses``. ``p``: two-sided exact binomial
    test of ``wins`` out of ``n`` against 1/2 (``scipy.stats.binomtest``), None when ``n`` is 0.
    It counts only signs, so one large gap weighs no more than a small one."""
    wins = sum(d < 0 for d in differences)
    losses = sum(d > 0 for d in differences)
    n = wins + losses
    p = None
    if n > 0:
        from scipy.stats import binomtest

        p = float(binomtest(wins, n, 0.5, alternative="two-sided").pvalue)
    return {"n": n, "wins": wins, "losses": losses, "ties": len(differences) - n, "p": p}


def fmt_p(p: float | None, name: str = "p") -> str:
    """``p 0.03`` (two significant digits), ``p < 0.001``, or empty for None; ``name`` replaces ``p``."""
    return "" if p is None else f"{name} {p:.2g}" if p >= 0.001 else f"{name} < 0.001"


def fmt_t(stats: dict | None) -> str:
    """``-0.0123 +- 0.0045 (t -2.7, p 0.03, BH 0.21)`` for a :func:`welch`, :func:`paired` or
    :func:`difference_of_differences` result (no ``p`` where it has none; ``BH``, the
    Benjamini-Hochberg adjusted p of :func:`add_benjamini_hochberg`, where it has one), ``-`` for None."""
    if stats is None:
        return "-"
    t = "-" if stats["t"] is None else f"{stats['t']:+.1f}"
    p = "".join(f", {s}" for s in (fmt_p(stats.get("p")), fmt_p(stats.get("p_bh"), "BH")) if s)
    return f"{stats['diff']:+.4f} +- {stats['se']:.4f} (t {t}{p})"


def fmt_sign(stats: dict | None) -> str:
    """``7/8 (p 0.07, BH 0.21)`` for a :func:`sign_test` result: wins (the wiring's loss lower) of
    the ``n`` pairs that are not ties (``+1 tie`` when there are), p and, where added, the
    Benjamini-Hochberg adjusted p; ``-`` for None or no pairs."""
    if stats is None or not stats["n"] + stats["ties"]:
        return "-"
    ties = f" +{stats['ties']} tie{'s' if stats['ties'] > 1 else ''}" if stats["ties"] else ""
    p = "".join(f", {s}" for s in (fmt_p(stats.get("p")), fmt_p(stats.get("p_bh"), "BH")) if s)
    return f"{stats['wins']}/{stats['n']}{ties} ({p.removeprefix(', ')})" if p else f"{stats['wins']}/{stats['n']}{ties}"


def machine() -> dict:
    """Where the report was made: CPU count and model, Python, torch and Lightning versions."""
    import lightning
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": sys.version.split()[0], "torch": torch.__version__,
            "lightning": lightning.__version__, "platform": platform.platform()}
