"""``framework``: tokens/s of ``ancre fit`` against a bare PyTorch loop, same model, data and steps.

``ancre fit`` here is the real command path, :func:`ancre_lightning.cli.build_cli` with
``fit`` arguments (LightningCLI -> Trainer -> LLMModule + TextDataModule over the Wikipedia
corpus), with the trainer defaults a user gets when giving no trainer options: the TensorBoard
logger (``train/loss`` and ``train/tokens_per_s`` logged every 50 steps), the progress
bar (refreshed every step), the model summary and end-of-epoch checkpointing. Validation is off
(``limit_val_batches=0``): this is training throughput. The only addition is a callback that reads
the clock at the end of every batch.

The bare loop builds the same LLMModule (same seed), the same TextDataModule and its train
DataLoader, the same AdamW parameter groups and warm-up/cosine schedule, and runs forward, float32
cross-entropy, backward, optimiser and scheduler steps, zero_grad: what the Trainer runs, without
the Trainer.

Both runs skip ``warmup_steps`` steps (set-up, first-step allocations) and time the next ``steps``
full step cycles, data loading included: from the end of step ``warmup_steps`` to the end of the
last step. Runs alternate (bare, fit, bare, fit, ...) for ``rounds`` rounds; tokens/s is the
median over rounds, and the target is the ratio of the two medians. On a 2-core CPU one run's
tokens/s varies by several per cent from run to run (either loop), so the table also lists each
round's fit/bare ratio (paired with the bare run just before it) and their median.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import Callback

from ._common import (
    LLM_QUICK,
    MODEL_KEYS,
    autocast,
    format_table,
    llm_shape,
    store_as,
    synchronize,
    target,
    targets_table,
)

NAME = "framework"
FULL: dict[str, Any] = {"warmup_steps": 3, "steps": 15, "rounds": 5, "data_path": None, "cache_dir": None, "connectivity": "ancre"}
QUICK: dict[str, Any] = {**LLM_QUICK, "warmup_steps": 1, "steps": 2, "rounds": 1, "data_path": None, "cache_dir": None,
                         "connectivity": "ancre"}
SEED = 1234


class StepClock(Callback):
    """Reads the clock (after a device synchronisation) at the end of every training batch."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.stamps.append(time.perf_counter())


def _model_args(shape: dict[str, Any], connectivity: str) -> dict[str, Any]:
    args = {
        "vocab_size": 257,
        "dim": shape["dim"],
        "n_layers": shape["n_layers"],
        "n_heads": shape["n_heads"],
        "max_seq_len": shape["seq_len"],
        "connectivity": connectivity,
    }
    if shape["mlp_hidden"] is not None:
        args["mlp_hidden"] = shape["mlp_hidden"]
    return args


def _data_args(shape: dict[str, Any], data_path: str | None, cache_dir: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"seq_len": shape["seq_len"], "batch_size": shape["batch_size"], "num_workers": 0}
    if data_path is not None:
        args["path"] = data_path
    if cache_dir is not None:
        args["cache_dir"] = cache_dir
    return args


def _throughput(stamps: list[float], warmup_steps: int, steps: int, tokens_per_step: int) -> float:
    if len(stamps) < warmup_steps + steps:
        raise RuntimeError(f"expected {warmup_steps + steps} timed steps, got {len(stamps)}")
    elapsed = stamps[warmup_steps + steps - 1] - stamps[warmup_steps - 1]
    return steps * tokens_per_step / elapsed


def run_fit(device: torch.device, shape: dict[str, Any], connectivity: str, data: dict[str, Any],
            warmup_steps: int, steps: int) -> float:
    """Tokens/s of ``ancre fit`` (in process)."""
    from ..cli import build_cli

    root = tempfile.mkdtemp(prefix="ancre-bench-fit-")
    try:
        args = ["fit", "--model=ancre_lightning.modules.LLMModule", "--data=ancre_lightning.datamodules.TextDataModule"]
        args += [f"--model.init_args.{k}={v}" for k, v in _model_args(shape, connectivity).items()]
        args += [f"--data.init_args.{k}={v}" for k, v in data.items()]
        args += [
            f"--seed_everything={SEED}",
            f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "--trainer.devices=1",
            f"--trainer.precision={shape['precision']}",
            f"--trainer.max_steps={warmup_steps + steps}",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks=" + json.dumps([{"class_path": f"{__name__}.StepClock"}]),
        ]
        cli = build_cli(args)
        clock = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepClock))
        return _throughput(clock.stamps, warmup_steps, steps, shape["batch_size"] * shape["seq_len"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_bare(device: torch.device, shape: dict[str, Any], connectivity: str, data: dict[str, Any],
             warmup_steps: int, steps: int) -> float:
    """Tokens/s of a plain PyTorch loop over the same model, optimiser, schedule and data loader."""
    from lightning.pytorch import seed_everything

    from ..datamodules import TextDataModule
    from ..modules import LLMModule
    from ..modules.schedule import WarmupCosine

    total = warmup_steps + steps
    seed_everything(SEED, verbose=False)
    module = LLMModule(**_model_args(shape, connectivity))
    datamodule = TextDataModule(**data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    net = store_as(module.net.to(device), shape["precision"])
    net.train()
    optimizer = module.build_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(module.warmup_steps, total, module.min_lr_ratio))
    stamps: list[float] = []
    batches = iter(datamodule.train_dataloader())
    for _ in range(total):
        batch = next(batches)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast(device, shape["precision"]):
            loss = module.lm_loss(net(input_ids), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        stamps.append(time.perf_counter())
    return _throughput(stamps, warmup_steps, steps, shape["batch_size"] * shape["seq_len"])


def run(
    device: torch.device,
    warmup_steps: int = FULL["warmup_steps"],
    steps: int = FULL["steps"],
    rounds: int = FULL["rounds"],
    data_path: str | None = FULL["data_path"],
    cache_dir: str | None = FULL["cache_dir"],
    connectivity: str = FULL["connectivity"],
    **shape_overrides: Any,
) -> dict[str, Any]:
    if warmup_steps < 1 or steps < 1 or rounds < 1:
        raise ValueError("framework benchmark needs warmup_steps >= 1, steps >= 1, rounds >= 1")
    shape = {**llm_shape(device), **{k: v for k, v in shape_overrides.items() if k in MODEL_KEYS}}
    data = _data_args(shape, data_path, cache_dir)
    runs: dict[str, list[float]] = {"bare": [], "fit": []}
    for _ in range(rounds):
        runs["bare"].append(run_bare(device, shape, connectivity, data, warmup_steps, steps))
        runs["fit"].append(run_fit(device, shape, connectivity, data, warmup_steps, steps))
    median = {name: statistics.median(v) for name, v in runs.items()}
    ratio = median["fit"] / median["bare"]
    paired = [f / b for f, b in zip(runs["fit"], runs["bare"])]  # each fit run against the bare run just before it
    rows = [
        {"loop": "bare PyTorch", "tokens_per_s": median["bare"], "runs_tokens_per_s": runs["bare"], "ratio_vs_bare": 1.0},
        {"loop": "ancre fit", "tokens_per_s": median["fit"], "runs_tokens_per_s": runs["fit"], "ratio_vs_bare": ratio,
         "paired_ratios": paired, "paired_ratio_median": statistics.median(paired)},
    ]
    return {
        "settings": {**shape, "connectivity": connectivity, "aggregation": "auto (LLMModule default)",
                     "warmup_steps": warmup_steps, "steps": steps, "rounds": rounds,
                     "data": data_path or "wikipedia", "num_workers": 0, "device": str(device),
                     "trainer": "defaults: TensorBoard logger, progress bar, model summary, checkpointing; no validation"},
        "rows": rows,
        "targets": [target("ancre fit tokens/s over the bare loop's", ratio, ">=", 0.95)],
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (
        f"LLM training throughput, {s['connectivity']}, {s['n_layers']} blocks x {s['dim']}, sequence {s['seq_len']}, "
        f"batch {s['batch_size']}, {s['precision']} on {s['device']}, data {s['data']}; {s['steps']} steps after "
        f"{s['warmup_steps']}, median of {s['rounds']} alternating rounds\nancre fit: {s['trainer']}\n"
    )
    rows = [(r["loop"], r["tokens_per_s"], r["ratio_vs_bare"], ", ".join(f"{v:.0f}" for v in r["runs_tokens_per_s"])) for r in result["rows"]]
    fit = result["rows"][-1]
    spread = (
        f"\nfit / bare per round (paired): {', '.join(f'{v:.3f}' for v in fit['paired_ratios'])}; "
        f"median {fit['paired_ratio_median']:.3f}\n"
    )
    return head + "\n" + format_table(["loop", "tokens/s", "x bare", "per round"], rows) + "\n" + spread + "\n" + targets_table(result["targets"])
