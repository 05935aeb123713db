"""FSDP on two CPU processes over gloo (``ancre_lightning.fsdp.ShardedStrategy``, PyTorch's
FSDP2): one step equals the DDP step and the one-process step with the doubled batch, for every
domain, the per-token and multi-stream families and a rewired timm model; a run with every
callback saves sharded checkpoints and resumes exactly (4 steps + 4 resumed == 8 straight); the
CLI trains with ``configs/trainer/fsdp_cpu.yaml`` and resumes from its sharded ``last.ckpt``.

The ranks are real processes started as ``torchrun`` would (see ``tests/test_ddp.py``, whose
modules, data, references and launcher this file reuses); each runs its ``worker`` with this file's :func:`scenarios`.

What "equal" means: FSDP reduce-scatters each layer's gradient (a sum over the two ranks, then
halved) where DDP all-reduces it; the sums are the same two terms. Each rank's own arithmetic
may round differently (the gathered weights sit in other buffers, and CPU kernels pick their
summation order by alignment), so FSDP's gradients equal DDP's and the one-process gradient up to
the float32 reordering error that ``test_ddp`` measures by hand (about 1e-6 relative to the
largest entry for the gates' gradients, 1e-7 for the layers'); a wrong reduction is of order 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader

from conftest import CONFIGS, tiny_run_args
from test_ddp import (
    B, STEP_CASES, U32, WORLD, adam_first_step, build, data, launch, loader, make_trainer, max_abs, one_thread,
    per_rank, rel_error, rows, Rows, single_process_step, summed_grads, worker,
)  # fmt: skip

LR = 1e-3
#: a rewired timm ViT (its ``blocks`` container wired by ANCRe), besides the built-in networks
TIMM = ("classifier", dict(timm_model="vit_tiny_patch16_224",
                           timm_options={"patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2}))  # fmt: skip
CASES = {**STEP_CASES, "classifier-timm": TIMM}
RESUME_STEPS = 8

__all__ = ["one_thread"]  # a fixture used below


def full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient, on every rank."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class FullCapture(Callback):
    """Like ``test_ddp.Capture``, with sharded weights and gradients gathered whole."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["init"] = {n: full(p) for n, p in pl_module.named_parameters()}
        self.record["sharded"] = sorted(n for n, p in pl_module.named_parameters() if type(p.data).__name__ == "DTensor")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if "grads" not in self.record:
            self.record["grads"] = {n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["after"] = {n: full(p) for n, p in pl_module.named_parameters()}
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def sharded_strategy():
    from ancre_lightning.fsdp import ShardedStrategy

    return ShardedStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120))


# --------------------------------------------------------------------------- scenarios (per rank)


def scenario_fsdp_step(case: str, rank: int, out: Path) -> dict:
    domain, overrides = CASES[case]
    capture = FullCapture()
    half = rows(data(domain, WORLD * B), slice(rank * B, (rank + 1) * B))
    make_trainer(WORLD, 1, [capture], out, strategy=sharded_strategy()).fit(build(domain, **overrides), loader(half, B))
    return capture.record


def generator_states() -> Callback:
    """The CLI's :class:`~ancre_lightning.checkpointing.ResumeStateCallback` without its config part:
    the random generators of every rank saved in the checkpoint and put back on resume."""
    from ancre_lightning.checkpointing import ResumeStateCallback

    class GeneratorStates(ResumeStateCallback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            pass

        def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
            pass

    return GeneratorStates(parser=None, config=None)


class StopAfter(Callback):
    """Ends the fit after optimizer step ``step`` (its checkpoint written), as a preempted job
    would, while the schedule keeps the run's full length."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def own_loader(batch: Any) -> DataLoader:
    """``test_ddp.loader`` with a generator of its own: a plain DataLoader draws its workers' base
    seed from the global generator each time an iterator starts (each validation), which would
    shift the training stream of a run that validated in between against one that resumed."""
    return DataLoader(Rows(batch), batch_size=B, shuffle=False, generator=torch.Generator().manual_seed(0))


def resume_callbacks(out: Path) -> list[Callback]:
    from ancre_lightning.callbacks import EarlyExitEvaluation, FiniteGuard, GateVisualization, StreamGrowth
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [
        ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=2, save_top_k=0),
        GateVisualization(every_n_steps=2), EarlyExitEvaluation(max_batches=1, save_files=False),
        FiniteGuard(every_n_steps=1), StreamGrowth(), generator_states(),
    ]  # fmt: skip


def scenario_resume(rank: int, out: Path) -> dict:
    """mHC at sub-layer granularity (two streams, per-token maps): 8 steps straight, and 4 steps,
    then 4 more resumed from the sharded last.ckpt, with validation every 2 steps and every
    callback that reads the wiring."""
    overrides = dict(connectivity="mhc", connectivity_options={"streams": 2}, granularity="sublayer", dropout=0.1)
    train = rows(data("llm", WORLD * 4 * B, seed=4), slice(rank * 4 * B, (rank + 1) * 4 * B))  # 4 batches: an epoch
    val = rows(data("llm", WORLD * B, seed=5), slice(rank * B, (rank + 1) * B))
    records = {}
    for name, stops in (("straight", [RESUME_STEPS]), ("resumed", [RESUME_STEPS // 2, RESUME_STEPS])):
        root = out / name
        ckpt = None
        for steps in stops:
            L.seed_everything(3, verbose=False)
            capture = FullCapture()
            callbacks = [capture, *resume_callbacks(root), StopAfter(steps)]
            trainer = make_trainer(WORLD, RESUME_STEPS, callbacks, root, strategy=sharded_strategy(),
                                   limit_val_batches=1, val_check_interval=2, enable_checkpointing=True,
                                   logger=L.pytorch.loggers.TensorBoardLogger(root))  # fmt: skip
            trainer.fit(build("llm", **overrides), own_loader(train), own_loader(val), ckpt_path=ckpt)
            ckpt = root / "checkpoints" / "last.ckpt"
        records[name] = {**capture.record, "global_step": trainer.global_step, "scalars": logged_scalars(root),
                         "checkpoint": sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else None,
                         "checkpoint_path": str(ckpt),
                         "pictures": sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))}  # fmt: skip
    return records


def scenario_interrupted_save(rank: int, out: Path) -> dict:
    """A sharded save killed half-way: the last.ckpt of step 2 stays as it was (not half
    overwritten), the next save clears what the failed one left, and the run resumes from it."""
    import hashlib

    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import model_parallel

    train = rows(data("llm", WORLD * 4 * B, seed=4), slice(rank * 4 * B, (rank + 1) * 4 * B))
    folder = out / "checkpoints"

    def fit(steps: int, ckpt: Path | None) -> None:
        L.seed_everything(3, verbose=False)
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=2, save_top_k=0)
        trainer = make_trainer(WORLD, 8, [checkpoint, StopAfter(steps)], out, strategy=sharded_strategy(), enable_checkpointing=True)
        trainer.fit(build("llm"), own_loader(train), ckpt_path=ckpt)

    def digests() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "last.ckpt").iterdir())}

    fit(2, None)
    before = digests()
    original = model_parallel._distributed_checkpoint_save

    def dies_half_way(state: dict, path: Path) -> None:
        (Path(path) / f"__{rank}_0.distcp").write_bytes(b"half a shard")
        raise OSError("disk full (simulated)")

    model_parallel._distributed_checkpoint_save = dies_half_way
    try:
        fit(4, folder / "last.ckpt")
        raised = None
    except OSError as exc:
        raised = str(exc)
    finally:
        model_parallel._distributed_checkpoint_save = original
    dist.barrier()
    after_failure, left = digests(), sorted(p.name for p in folder.iterdir())
    fit(4, folder / "last.ckpt")
    return {"raised": raised, "before": before, "after_failure": after_failure, "left_after_failure": left,
            "left_at_the_end": sorted(p.name for p in folder.iterdir()), "final": sorted(digests())}


def logged_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar written to the TensorBoard event files under ``root``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def scenarios() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for case in CASES:
        table[f"fsdp-step-{case}"] = lambda rank, out, c=case: scenario_fsdp_step(c, rank, out)
    for case in CASES:
        table[f"ddp-step-{case}"] = lambda rank, out, c=case: _ddp_step(c, rank, out)
    table["resume"] = scenario_resume
    table["interrupted-save"] = scenario_interrupted_save
    return table


def _ddp_step(case: str, rank: int, out: Path) -> dict:
    domain, overrides = CASES[case]
    capture = FullCapture()
    half = rows(data(domain, WORLD * B), slice(rank * B, (rank + 1) * B))
    make_trainer(WORLD, 1, [capture], out).fit(build(domain, **overrides), loader(half, B))
    return capture.record


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Every scenario on two real processes, once for the whole module."""
    import time

    start = time.perf_counter()
    results = launch(tmp_path_factory.mktemp("fsdp"), list(scenarios()), script=Path(__file__))
    timings = {k: round(v, 1) for k, v in results[0].items() if k.endswith(":seconds")}
    print(f"\nFSDP workers: {time.perf_counter() - start:.1f} s in all, per scenario (rank 0): {timings}")
    return results


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_one_fsdp_step_equals_the_ddp_step_and_one_process(case, ranks, one_thread):
    domain, overrides = CASES[case]
    f0, f1 = per_rank(ranks, f"fsdp-step-{case}")
    d0, _ = per_rank(ranks, f"ddp-step-{case}")
    ref = single_process_step(domain, **overrides)
    wiring = build(domain, **overrides)
    gate_ids = {id(p) for p in wiring.gate_parameters()}
    gate_names = {n for n, p in wiring.named_parameters() if id(p) in gate_ids}
    # the layers' weights are sharded, the wiring's kept whole on every rank
    assert f0["sharded"] and not gate_names & set(f0["sharded"])
    assert set(f0["sharded"]) | gate_names >= {n for n, p in wiring.named_parameters() if "blocks" in n}
    assert max_abs(f0["init"], ref["init"]) == 0.0 and max_abs(f1["init"], ref["init"]) == 0.0
    assert f0["grads"].keys() == ref["grads"].keys() == d0["grads"].keys()
    assert all(torch.equal(f0["after"][k], f1["after"][k]) for k in f0["after"])
    # FSDP against DDP: the same two-term sums, rounded once more at most
    fsdp_vs_ddp = rel_error(f0["grads"], d0["grads"])
    full = data(domain, WORLD * B)
    halves = [rows(full, slice(r * B, (r + 1) * B)) for r in range(WORLD)]
    reorder = rel_error(summed_grads(domain, halves, **overrides), summed_grads(domain, [full], **overrides))
    fsdp_vs_one = rel_error(f0["grads"], ref["grads"])
    print(f"\n{case}: FSDP vs DDP gradients {fsdp_vs_ddp:.3g}, FSDP vs one process {fsdp_vs_one:.3g} "
          f"(reordering by hand {reorder:.3g}, float32 unit roundoff {U32:.3g})")  # fmt: skip
    # float32 noise of the size that summing the same terms in another order makes (gate gradients
    # are small differences of large terms, so their error relative to their largest entry is the
    # largest): each of FSDP, DDP and the one process rounds its own way, so allow a few times the
    # measured reordering; a wrong reduction (a missing or doubled rank, an unreduced wiring
    # gradient) is of order 1, far above
    assert reorder < 1e-3
    assert fsdp_vs_ddp <= 4 * reorder + 8 * U32
    assert fsdp_vs_one <= 4 * reorder + 8 * U32
    assert gate_names and all(f0["grads"][k].abs().max() > 0 for k in gate_names if ref["grads"][k].abs().max() > 0)
    # the weights after the first AdamW step, element by element within what the gradients imply
    for k, p0 in ref["init"].items():
        bound = LR * (adam_first_step(f0["grads"][k]) - adam_first_step(ref["grads"][k])).abs() + 8 * U32 * (p0.abs() + LR)
        assert ((f0["after"][k] - ref["after"][k]).abs() <= bound).all(), k
    assert f0["metrics"]["train/loss"] == pytest.approx(ref["metrics"]["train/loss"], rel=1e-6)


def test_sharded_checkpoints_resume_exactly_with_every_callback(ranks):
    r0, r1 = per_rank(ranks, "resume")
    straight, resumed = r0["straight"], r0["resumed"]
    assert straight["global_step"] == resumed["global_step"] == RESUME_STEPS
    # a sharded checkpoint: one file per rank and the metadata
    assert resumed["checkpoint"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    for k, value in straight["after"].items():
        assert torch.equal(resumed["after"][k], value), k  # bitwise: same data, same dropout, same updates
        assert torch.equal(r1["resumed"]["after"][k], value), k
    assert resumed["metrics"]["val/loss"] == straight["metrics"]["val/loss"]
    # the callbacks ran on the sharded model: early exits and stream growth at every validation
    # (steps 2, 4, 6, 8; the resumed run's logs hold both of its parts), the gate pictures drawn
    tags = straight["scalars"]
    exits = [t for t in tags if t.startswith("early_exit/")]
    streams = [t for t in tags if t.startswith("stream/")]
    assert exits and streams, sorted(tags)
    for tag in exits + streams + ["val/loss"]:
        assert [s for s, _ in tags[tag]] == [2, 4, 6, 8], (tag, tags[tag])
        assert sorted(resumed["scalars"][tag]) == sorted(tags[tag]), tag  # the same values, resumed or not
    assert any("gates" in p for p in straight["pictures"]), straight["pictures"]


def test_a_sharded_save_that_dies_keeps_the_previous_checkpoint(ranks):
    for r in per_rank(ranks, "interrupted-save"):
        assert r["raised"] == "disk full (simulated)"
        assert r["after_failure"] == r["before"]  # every file of step 2's checkpoint untouched
        assert r["left_after_failure"] == ["last.ckpt", "last.ckpt.saving"]
        assert r["left_at_the_end"] == ["last.ckpt"]  # the next save cleared the half-written folder
        assert r["final"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


def test_a_sharded_checkpoint_is_read_for_its_metadata(tmp_path):
    """``--ckpt_path`` checks and ``last`` read a sharded folder's ``meta.pt`` alone."""
    from ancre_lightning.modules.base import read_checkpoint

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"global_step": 4, "hyper_parameters": {"connectivity": "mhc"}}, folder / "meta.pt")
    assert read_checkpoint(folder)["global_step"] == 4
    assert "state_dict" not in read_checkpoint(folder)


def test_a_sharded_checkpoint_is_read_whole_where_weights_are_needed(ranks, tmp_path):
    """``ancre generate`` and ``ancre sample`` read a sharded folder's shards into one state_dict
    in one process: the trained weights exactly, every key of the module; a ``.metadata`` that
    names anything but the checkpoint's own records is refused before it can run code."""
    import pickle
    import shutil

    from ancre_lightning.errors import UserInputError
    from ancre_lightning.modules import LLMModule
    from ancre_lightning.modules.base import read_checkpoint

    resumed = per_rank(ranks, "resume")[0]["resumed"]
    folder = Path(resumed["checkpoint_path"])
    ckpt = read_checkpoint(folder, need_weights=True)
    assert ckpt["global_step"] == RESUME_STEPS
    for name, value in resumed["after"].items():
        assert torch.equal(ckpt["state_dict"][name], value), name  # the weights at the end of training
    module = LLMModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if not str(k).startswith("_")})
    module.load_state_dict(ckpt["state_dict"])  # strict: nothing missing, nothing left over

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "crafted.ckpt"
    shutil.copytree(folder, crafted)
    (crafted / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserInputError, match="cannot be read safely.*GLOBAL posix.system"):
        read_checkpoint(crafted, need_weights=True)
    assert not marker.exists()


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_the_llm_trains_and_resumes_through_the_cli_with_fsdp_cpu(tmp_path):
    """``ancre fit --config configs/llm/quickstart.yaml --config configs/trainer/fsdp_cpu.yaml``:
    two steps and a sharded checkpoint, then ``--ckpt_path last`` to step 4."""
    ancre = Path(sys.executable).with_name("ancre")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--config", str(CONFIGS / "trainer" / "fsdp_cpu.yaml"),
            "--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=40000",
            "--data.init_args.max_val_tokens=8000", "--data.init_args.num_workers=0"]  # fmt: skip
    for steps, extra in ((2, []), (4, ["--ckpt_path", "last"])):
        result = subprocess.run([str(ancre), *base, *tiny_run_args(tmp_path, steps), *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    last = next(Path(tmp_path, "logs").rglob("last.ckpt"))
    assert last.is_dir() and (last / "meta.pt").is_file()
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=True)["global_step"] == 4


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]), sys.argv[3].split(","), scenarios())
