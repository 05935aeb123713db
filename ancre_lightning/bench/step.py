"""``step``: training-step time of the LLM per connectivity, and the overhead against residual.

Every (connectivity, mode) variant is built once (same seed, same batch), warmed up (the first
step compiles), then timed one step at a time in interleaved rounds: round r runs every variant
once, in an order rotated by r, so that drifts of a shared machine hit all variants alike. The
reported time is the median over rounds; the overhead of a connectivity is its median over the
residual network's median in the same mode, minus one.

A step is what :class:`~ancre_lightning.modules.LLMModule` does per batch without the trainer:
forward, float32 cross-entropy, backward, AdamW step (the module's parameter groups), zero_grad.
Modes: ``eager`` (every merge is our fused kernel), ``compile`` (the inner network compiled in
place, the ``compile: true`` path), ``compile-graphs`` (the same replayed as CUDA graphs, the
``compile: reduce-overhead`` path; run by default on a GPU only, on a CPU it equals ``compile``),
``eager-loop`` (eager with the plain loop merge; not run by default). The optimiser is the
module's own (fused AdamW by default; ``--set step.fused_optimizer=false`` times the foreach one).

With transformers installed, the rows include ``hf-llama``: transformers' ``LlamaForCausalLM`` of the
same shape, stepped, compiled and optimised the same way, so that a regression of the stack against
the field's reference implementation shows in every run (target: residual at least as fast);
``hf-llama-rewired`` (the same model rewired with ``residual``, what ``rewire`` costs) on request.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import torch

from .breakdown import CLASSES, breakdown_rows, profile_step
from ._common import (
    LLM_QUICK,
    MODEL_KEYS,
    build_llm,
    default_connectivities,
    format_table,
    interleaved_times,
    llm_shape,
    random_batch,
    summarize,
    synchronize,
    target,
    targets_table,
    train_step_fn,
)

NAME = "step"
#: ``modes: None`` = eager and compile, plus compile-graphs on a GPU.
#: ``checkpointing: [false, true]`` also times every wiring with activation checkpointing.
#: ``connectivities: None`` = every wiring, and the HF-Llama peer when transformers is installed.
#: ``breakdown: true`` also profiles every variant for ``breakdown_steps`` steps and splits its time
#: into matmul, attention, fused kernels, optimizer and other (``breakdown.py``), with each wiring's
#: extra milliseconds over residual per class.
FULL: dict[str, Any] = {"connectivities": None, "modes": None, "reps": 9, "warmup": 2, "fused_optimizer": True,
                        "checkpointing": (False,), "breakdown": False, "breakdown_steps": 2}
QUICK: dict[str, Any] = {**LLM_QUICK, "connectivities": ("residual", "ancre"), "modes": ("eager",), "reps": 2, "warmup": 1}
#: The step-overhead target per compiled mode (ANCRe: 3 % on CPU, under 1 % on GPU).
COMPILED_MODES = ("compile", "compile-graphs")
#: The compiled step-overhead targets of the 2025-26 families (the mHC paper reports 6.7 % for
#: 4 streams with hand-fused GPU kernels).
FAMILY_LIMITS = {"attnres-block": 0.05, "attnres": 0.10, "hyper": 0.10, "hyper-dynamic": 0.10, "mhc": 0.10}


def run(
    device: torch.device,
    connectivities: Sequence[str] | None = FULL["connectivities"],
    modes: Sequence[str] | None = FULL["modes"],
    reps: int = FULL["reps"],
    warmup: int = FULL["warmup"],
    fused_optimizer: bool = FULL["fused_optimizer"],
    checkpointing: Sequence[bool] = FULL["checkpointing"],
    breakdown: bool = FULL["breakdown"],
    breakdown_steps: int = FULL["breakdown_steps"],
    **shape_overrides: Any,
) -> dict[str, Any]:
    if modes is None:
        modes = ("eager", "compile", "compile-graphs") if device.type == "cuda" else ("eager", "compile")
    if connectivities is None:
        connectivities = default_connectivities()
    shape = {**llm_shape(device), **{k: v for k, v in shape_overrides.items() if k in MODEL_KEYS}}
    batch = random_batch(shape, device)
    tokens = shape["batch_size"] * shape["seq_len"]
    steps, first_step_s, params = {}, {}, {}
    for mode in modes:
        for on in checkpointing:
            for conn in connectivities:
                module, optimizer = build_llm(conn, mode, shape, device, fused_optimizer=fused_optimizer,
                                              activation_checkpointing=on)  # fmt: skip
                step = train_step_fn(module, optimizer, batch, device, shape["precision"])
                synchronize(device)
                start = time.perf_counter()
                step()  # compiles in compile mode (and the fused merges in eager mode)
                synchronize(device)
                first_step_s[mode, conn, on] = time.perf_counter() - start
                steps[mode, conn, on] = step
                params[conn] = sum(p.numel() for p in module.net.parameters())
    gc.collect()
    times = interleaved_times({f"{m}/{c}/{on}": fn for (m, c, on), fn in steps.items()}, device, reps=reps,
                              warmup=max(warmup - 1, 0))  # fmt: skip

    # profiled after the timing, so that the profiler's own cost never reaches the timed rounds
    split = {(m, c): profile_step(fn, device, breakdown_steps) for (m, c, on), fn in steps.items() if not on} if breakdown else {}
    rows = []
    for mode in modes:
        for on in checkpointing:
            base = summarize(times[f"{mode}/residual/{on}"])["median_s"] if "residual" in connectivities else None
            for conn in connectivities:
                stats = summarize(times[f"{mode}/{conn}/{on}"])
                plain = summarize(times[f"{mode}/{conn}/False"])["median_s"] if on and False in checkpointing else None
                rows.append({
                    "connectivity": conn,
                    "mode": mode,
                    "activation_checkpointing": on,
                    **stats,
                    "tokens_per_s": tokens / stats["median_s"],
                    "overhead_vs_residual": None if base is None else stats["median_s"] / base - 1.0,
                    "time_vs_plain": None if plain is None else stats["median_s"] / plain,
                    "first_step_s": first_step_s[mode, conn, on],
                    "parameters": params[conn],
                })
    pick = {(r["mode"], r["connectivity"]): r for r in rows if not r["activation_checkpointing"]}
    limit = 0.01 if device.type == "cuda" else 0.03
    limits = {"ancre": limit, **FAMILY_LIMITS}
    targets = [
        target(f"{conn} step overhead vs residual, {mode}", pick[mode, conn]["overhead_vs_residual"], "<=", bound)
        for conn, bound in limits.items()
        for mode in COMPILED_MODES
        if (mode, conn) in pick and pick[mode, conn]["overhead_vs_residual"] is not None
    ]
    targets += [  # the stack costs nothing over transformers' own Llama of the same shape
        target(f"residual speed vs hf-llama, {mode}", pick[mode, "hf-llama"]["median_s"] / pick[mode, "residual"]["median_s"],
               ">=", 1.0)
        for mode in COMPILED_MODES
        if (mode, "hf-llama") in pick and (mode, "residual") in pick
    ]  # fmt: skip
    return {
        "settings": {**shape, "connectivities": list(connectivities), "modes": list(modes), "reps": reps,
                     "warmup": warmup, "fused_optimizer": fused_optimizer, "tokens_per_step": tokens, "device": str(device),
                     "checkpointing": list(checkpointing)},
        "rows": rows,
        "targets": targets,
        **({"breakdown": breakdown_rows(split)} if breakdown else {}),
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (
        f"LLM training step, {s['n_layers']} blocks x {s['dim']}, sequence {s['seq_len']}, batch {s['batch_size']}, "
        f"{s['precision']} on {s['device']}, {'fused' if s.get('fused_optimizer', True) else 'foreach'} AdamW; "
        f"median of {s['reps']} interleaved rounds\n"
    )
    checkpointing = any(r.get("activation_checkpointing") for r in result["rows"])
    rows = [
        (r["connectivity"], r["mode"], *(("on" if r["activation_checkpointing"] else "off", r["time_vs_plain"]) if checkpointing else ()),
         r["median_s"] * 1e3, r["iqr_rel"], r["tokens_per_s"],
         None if r["overhead_vs_residual"] is None else 100 * r["overhead_vs_residual"], r["first_step_s"])
        for r in result["rows"]
    ]  # fmt: skip
    columns = ["connectivity", "mode", *(("checkpointing", "x plain") if checkpointing else ()), "step ms", "IQR/med",
               "tokens/s", "overhead %", "first step s"]  # fmt: skip
    out = head + "\n" + format_table(columns, rows)
    if result["targets"]:
        out += "\n\n" + targets_table(result["targets"])
    if result.get("breakdown"):
        out += "\n\n" + breakdown_table(result["breakdown"])
    return out


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Milliseconds per step in each class, and (``+``) the extra over residual in the same mode."""
    columns = ["connectivity", "mode", "profiled ms", *(f"{k} ms" for k in CLASSES), *(f"+{k}" for k in CLASSES)]
    body = [
        (r["connectivity"], r["mode"], r["total_ms"], *(r["ms"][k] for k in CLASSES),
         *((r["extra_ms"][k] for k in CLASSES) if r["extra_ms"] is not None and r["connectivity"] != "residual"
           else (None,) * len(CLASSES)))
        for r in rows
    ]  # fmt: skip
    return ("where the step time goes (profiler self time per step, CPU time on a CPU, kernel time on a GPU; "
            "+: extra ms over residual)\n\n" + format_table(columns, body))
