"""``memory``: peak memory of one LLM training step per connectivity, against residual.

The model is built and stepped once (the optimiser state exists, gradients are freed), then one
more step is measured: the peak of the bytes allocated above what was live before it (activations
saved for backward, gradients, temporaries). On GPU this is ``torch.cuda.max_memory_allocated``;
on CPU the allocations and frees that the PyTorch profiler records (``profile_memory``) are
replayed in order. Static memory (parameters and AdamW state) is listed apart: it is the same for
every connectivity up to the few gate scalars. Modes as in ``step``: ``eager`` (fused merges) by
default, ``compile`` on request. Each wiring is measured without and with activation checkpointing
(every layer recomputed in backward; target: at most half the plain model's peak).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._common import (
    CONNECTIVITIES,
    LLM_QUICK,
    MODEL_KEYS,
    build_llm,
    format_table,
    llm_shape,
    mib,
    optimizer_state_bytes,
    random_batch,
    synchronize,
    target,
    targets_table,
    tensor_bytes,
    train_step_fn,
)

NAME = "memory"
#: Eager only by default (each compiled variant costs a whole-model compilation, about a minute on
#: 2 CPU cores); ``--set 'memory.modes=["eager","compile"]'`` adds the compiled models.
FULL: dict[str, Any] = {"connectivities": CONNECTIVITIES, "modes": ("eager",), "checkpointing": (False, True)}
QUICK: dict[str, Any] = {**LLM_QUICK, "connectivities": ("residual", "ancre"), "modes": ("eager",), "checkpointing": (False, True)}
#: Activation checkpointing's target: a wiring's checkpointed step peaks at most at this fraction of
#: the same wiring's plain step.
CHECKPOINTING_LIMIT = 0.5


#: The CPU measurement reads torch's private profiler results; when they change, say so instead of a wrong number.
PRIVATE_API_CHANGED = (
    "bench memory on CPU reads torch's private profiler API (profile().profiler.kineto_results.events(), "
    "with name(), device_type(), start_ns() and nbytes() per event), which torch {torch} does not provide "
    "as expected ({error}). Measure on a GPU (torch.cuda.max_memory_allocated), or use a torch version "
    "this project was tested with and report the change."
)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated when it started."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # torch's private profiler API: every memory event, in order, with its signed size
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
        sizes = [e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())]
    except (AttributeError, TypeError) as exc:
        raise RuntimeError(PRIVATE_API_CHANGED.format(torch=torch.__version__, error=f"{type(exc).__name__}: {exc}")) from exc
    if not sizes:
        raise RuntimeError(PRIVATE_API_CHANGED.format(torch=torch.__version__, error="no [memory] events recorded"))
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return peak


def run(
    device: torch.device,
    connectivities: Sequence[str] = FULL["connectivities"],
    modes: Sequence[str] = FULL["modes"],
    checkpointing: Sequence[bool] = FULL["checkpointing"],
    **shape_overrides: Any,
) -> dict[str, Any]:
    shape = {**llm_shape(device), **{k: v for k, v in shape_overrides.items() if k in MODEL_KEYS}}
    batch = random_batch(shape, device)
    state_dtype = "bfloat16" if shape["precision"] == "bf16-true" else "float32"  # the residual stream's
    one_state = shape["batch_size"] * shape["seq_len"] * shape["dim"] * getattr(torch, state_dtype).itemsize
    rows, targets = [], []
    for mode in modes:
        base = None
        plain: dict[str, int] = {}
        for recompute in checkpointing:
            for conn in connectivities:
                module, optimizer = build_llm(conn, mode, shape, device, activation_checkpointing=recompute)
                step = train_step_fn(module, optimizer, batch, device, shape["precision"])
                step()  # compiles; creates the AdamW state
                step()
                peak = peak_bytes(step, device)
                if conn == "residual" and not recompute:
                    base = peak
                if not recompute:
                    plain[conn] = peak
                rows.append({
                    "connectivity": conn,
                    "mode": mode,
                    "activation_checkpointing": recompute,
                    "peak_step_bytes": peak,
                    "peak_step_mib": mib(peak),
                    "static_mib": mib(tensor_bytes(module.net.parameters()) + optimizer_state_bytes(optimizer)),
                    "ratio_vs_residual": None if base is None else peak / base,
                    "extra_states_vs_residual": None if base is None else (peak - base) / one_state,
                    "ratio_vs_plain": peak / plain[conn] if recompute and conn in plain else None,
                })
                if recompute and conn in plain:
                    targets.append(target(f"{conn} checkpointed peak vs its plain step, {mode}", peak / plain[conn], "<=",
                                          CHECKPOINTING_LIMIT))  # fmt: skip
                del module, optimizer, step
                gc.collect()
    return {
        "settings": {**shape, "connectivities": list(connectivities), "modes": list(modes), "device": str(device),
                     "checkpointing": list(checkpointing), "state_mib": mib(one_state), "state_dtype": state_dtype},
        "rows": rows,
        "targets": targets,
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (
        f"peak memory of one LLM training step above the live parameters and optimiser state, "
        f"{s['n_layers']} blocks x {s['dim']}, sequence {s['seq_len']}, batch {s['batch_size']}, {s['precision']} "
        f"on {s['device']} (one (B, T, D) {s.get('state_dtype', 'float32')} state = {s['state_mib']:.1f} MiB)\n"
    )
    rows = [
        (r["connectivity"], r["mode"], "on" if r.get("activation_checkpointing") else "off", r["peak_step_mib"],
         r["ratio_vs_residual"], r.get("ratio_vs_plain"), r["extra_states_vs_residual"], r["static_mib"])
        for r in result["rows"]
    ]  # fmt: skip
    columns = ["connectivity", "mode", "checkpointing", "peak MiB", "x residual", "x plain", "extra states", "params+AdamW MiB"]
    out = head + "\n" + format_table(columns, rows)
    if result.get("targets"):
        out += "\n\n" + targets_table(result["targets"])
    return out


# --------------------------------------------------------------------------- large vocabularies

#: The large-vocabulary measurement: the LLaMA-60M shape (8 x 512, SwiGLU 1376, sequence 256) at
#: V = 32,000, batch 8, float32, one training step with the loss in one piece and in chunks.
LARGE_VOCAB: dict[str, Any] = {"vocab_size": 32000, "n_layers": 8, "dim": 512, "n_heads": 8, "mlp_hidden": 1376,
                               "seq_len": 256, "batch_size": 8, "loss_chunk_tokens": (0, 1024)}


def large_vocabulary(device: torch.device, **options: Any) -> dict[str, Any]:
    """Peak memory of one LLMModule training step (forward, loss, backward, AdamW) at a large
    vocabulary, for each ``loss_chunk_tokens`` (0: one cross-entropy over float32 logits of the
    whole batch; N: :func:`~ancre_lightning.modules.llm.chunked_cross_entropy` in chunks of N
    tokens), measured as :func:`peak_bytes` does, above the live parameters and optimiser state.
    Options: the keys of :data:`LARGE_VOCAB`."""
    from ..modules import LLMModule

    s = {**LARGE_VOCAB, **options}
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, s["vocab_size"], (s["batch_size"], s["seq_len"] + 1), generator=gen)
    batch = {"input_ids": window[:, :-1].contiguous().to(device), "labels": window[:, 1:].contiguous().to(device)}
    logits_bytes = s["batch_size"] * s["seq_len"] * s["vocab_size"] * 4  # one float32 (B, T, V) tensor
    rows = []
    for chunk in s["loss_chunk_tokens"]:
        torch.manual_seed(0)
        module = LLMModule(
            vocab_size=s["vocab_size"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
            mlp_hidden=s["mlp_hidden"], max_seq_len=s["seq_len"], connectivity="residual", loss_chunk_tokens=chunk,
        ).to(device)  # fmt: skip
        optimizer = module.build_optimizer()

        def step() -> float:
            loss = module.next_token_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        step()  # creates the AdamW state
        loss = step()
        peak = peak_bytes(step, device)
        rows.append({
            "loss_chunk_tokens": chunk, "peak_step_bytes": peak, "peak_step_mib": mib(peak), "loss": loss,
            "static_mib": mib(tensor_bytes(module.net.parameters()) + optimizer_state_bytes(optimizer)),
        })  # fmt: skip
        del module, optimizer, step
        gc.collect()
    base = rows[0]["peak_step_bytes"]
    for r in rows:
        r["ratio_vs_first"] = r["peak_step_bytes"] / base
    return {"settings": {**s, "loss_chunk_tokens": list(s["loss_chunk_tokens"]), "device": str(device),
                         "logits_mib": mib(logits_bytes)}, "rows": rows}  # fmt: skip


def large_vocabulary_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`large_vocabulary`."""
    s = result["settings"]
    head = (
        f"peak memory of one LLM training step above the live parameters and optimiser state, V = {s['vocab_size']:,}, "
        f"{s['n_layers']} blocks x {s['dim']}, sequence {s['seq_len']}, batch {s['batch_size']}, float32 on {s['device']} "
        f"(one (B, T, V) float32 logits tensor = {s['logits_mib']:.0f} MiB)\n"
    )
    rows = [
        ("off (one cross-entropy)" if r["loss_chunk_tokens"] == 0 else f"{r['loss_chunk_tokens']} tokens",
         r["peak_step_mib"], r["ratio_vs_first"], r["loss"], r["static_mib"])
        for r in result["rows"]
    ]  # fmt: skip
    return head + "\n" + format_table(["loss chunks", "peak MiB", "x first", "loss", "params+AdamW MiB"], rows)


if __name__ == "__main__":  # python -m ancre_lightning.bench.memory [KEY=VALUE ...]: the large-vocabulary table
    import json
    import sys

    from ._common import resolve_device

    overrides = {k: json.loads(v) for k, _, v in (a.partition("=") for a in sys.argv[1:] if a.partition("=")[0] != "device")}
    device_arg = next((a.partition("=")[2] for a in sys.argv[1:] if a.startswith("device=")), "auto")
    print(large_vocabulary_table(large_vocabulary(resolve_device(device_arg), **overrides)))
