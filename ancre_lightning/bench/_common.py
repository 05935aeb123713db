"""Shared by the sub-benchmarks: device, timing, machine description, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserInputError
from ..hardware import usable_cores

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {name!r} asked for but torch sees no GPU; use --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn``: ``inner`` back-to-back calls between two device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / inner


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    reps: int,
    warmup: int = 1,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Time every function ``reps`` times, round-robin, so that slow drifts of the machine (other
    processes, frequency, thermal) hit every variant alike; the order rotates each round.

    ``warmup`` untimed rounds first (compilation, allocator and cache warm-up).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(fns[name], device, inner))
    return times


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and min of a list of timings (seconds), and the relative spread."""
    values = sorted(samples)
    median = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1, q3 = values[0], values[-1]
    return {
        "median_s": median,
        "min_s": values[0],
        "q1_s": q1,
        "q3_s": q3,
        "iqr_rel": (q3 - q1) / median if median > 0 else 0.0,
        "n": len(values),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: the processor, its cores and caches, the software versions,
    and how busy the machine was when the run started (a load average near the core count means
    other processes shared the cores and the timings are noisy)."""
    usable = usable_cores()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "l2_cache": _read("/sys/devices/system/cpu/cpu0/cache/index2/size").strip() or None,
        "l3_cache": _read("/sys/devices/system/cpu/cpu0/cache/index3/size").strip() or None,
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
        "gpu": None,
        "git": _git_revision(),
        "load_average_at_start": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        info["lightning"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes straight into BENCHMARKS.md)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in text)])


def target(name: str, value: float | None, op: str, threshold: float) -> dict[str, Any]:
    """One of the issue's targets: ``value op threshold`` (``>=`` or ``<=``) and whether it holds."""
    ok = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "ok": ok}


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    rows = [(t["name"], t["value"], f"{t['op']} {t['threshold']:g}", t["ok"]) for t in targets]
    return format_table(["target", "measured", "wanted", "met"], rows)


def mib(nbytes: float) -> float:
    return nbytes / 2**20


# --------------------------------------------------------------------------- the benchmark LLM

#: The training-step shape on CPU: 12 blocks x 256, sequence 256, batch 8 (4 heads of 64).
LLM_CPU: dict[str, Any] = {"n_layers": 12, "dim": 256, "n_heads": 4, "mlp_hidden": None, "seq_len": 256,
                           "batch_size": 8, "precision": "32-true"}
#: On GPU: the LLaMA-60M shape of the ANCRe paper (configs/llm/llama60m_*.yaml), bf16 autocast.
LLM_GPU: dict[str, Any] = {"n_layers": 8, "dim": 512, "n_heads": 8, "mlp_hidden": 1376, "seq_len": 256,
                           "batch_size": 64, "precision": "bf16-mixed"}
#: A model small enough for a seconds-long smoke run.
LLM_QUICK: dict[str, Any] = {"n_layers": 2, "dim": 32, "n_heads": 2, "mlp_hidden": None, "seq_len": 16,
                             "batch_size": 2, "precision": "32-true"}
MODEL_KEYS = ("n_layers", "dim", "n_heads", "mlp_hidden", "seq_len", "batch_size", "precision")
#: The wirings a benchmark row can name: (connectivity, options, granularity). The 2025-26 families
#: run at sub-layer granularity as their papers do (residual is the same function at both), except
#: MUDD, which wires blocks; ``attnres-block`` groups 4 sub-layers (2 blocks) per block.
WIRINGS: dict[str, tuple[str, dict[str, Any], str]] = {
    "residual": ("residual", {}, "block"),
    "ancre": ("ancre", {}, "block"),
    "acn": ("acn", {}, "block"),
    "denseformer": ("denseformer", {}, "block"),
    "attnres": ("attnres", {"block_size": 1}, "sublayer"),
    "attnres-block": ("attnres", {"block_size": 4}, "sublayer"),
    "hyper": ("hyper", {"streams": 4}, "sublayer"),
    "hyper-dynamic": ("hyper", {"streams": 4, "dynamic": True}, "sublayer"),
    "mhc": ("mhc", {"streams": 4}, "sublayer"),
    "mudd": ("mudd", {}, "block"),
    # on request (not in the default rows): the per-token stream maps recomputed in backward, and
    # with them the streams inside groups of layers (kept only at each group's start)
    "hyper-dynamic-recompute": ("hyper", {"streams": 4, "dynamic": True, "recompute_maps": True}, "sublayer"),
    "mhc-recompute": ("mhc", {"streams": 4, "recompute_maps": True}, "sublayer"),
    "hyper-dynamic-recompute-streams": ("hyper", {"streams": 4, "dynamic": True, "recompute_streams": True}, "sublayer"),
    "mhc-recompute-streams": ("mhc", {"streams": 4, "recompute_streams": True}, "sublayer"),
}
CONNECTIVITIES = tuple(name for name in WIRINGS if "-recompute" not in name)
#: The peers from Hugging Face transformers, rows beside the wirings: ``hf-llama`` is
#: ``LlamaForCausalLM`` of the benchmark shape as transformers runs it (the yardstick of the stack's
#: own cost), ``hf-llama-rewired`` the same model rewired with ``residual`` (what ``rewire`` adds).
HF_PEERS = ("hf-llama", "hf-llama-rewired")


def transformers_available() -> bool:
    """Whether the optional transformers (>= 5) is installed, for the HF-Llama rows."""
    try:
        from ..rewiring_transformers import require_transformers

        require_transformers()
        return True
    except Exception:
        return False


def default_connectivities() -> tuple[str, ...]:
    """Every wiring, and the HF-Llama peer when transformers is installed."""
    return CONNECTIVITIES + (("hf-llama",) if transformers_available() else ())
#: eager: the model runs eagerly, every merge is our fused kernel; compile: the whole inner network
#: compiled in place (the ``compile: true`` path); compile-graphs: the same with CUDA graphs
#: (``compile: reduce-overhead``; on a CPU the same as compile); eager-loop: eager with the plain
#: loop merge.
MODES = ("eager", "compile", "compile-graphs", "eager-loop")
_COMPILE_OPTION = {"eager": False, "eager-loop": False, "compile": True, "compile-graphs": "reduce-overhead"}


def llm_shape(device: torch.device) -> dict[str, Any]:
    return dict(LLM_GPU if device.type == "cuda" else LLM_CPU)


PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def autocast(device: torch.device, precision: str):
    """The autocast context of a Lightning precision setting: ``32-true``, ``bf16-mixed``, or
    ``bf16-true`` (no autocast: the network itself is stored in bfloat16, see :func:`store_as`)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("32-true", "32", "bf16-true"):
        return torch.autocast(device.type, enabled=False)
    raise UserInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def store_as(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Convert ``module`` as Lightning's ``precision`` does: bfloat16 weights and states for
    ``bf16-true`` (the wiring stays float32), unchanged otherwise."""
    return module.to(torch.bfloat16) if precision == "bf16-true" else module


def build_llm(
    connectivity: str, mode: str, shape: Mapping[str, Any], device: torch.device, seed: int = 0,
    fused_optimizer: bool = True, activation_checkpointing: bool = False,
):
    """An :class:`~ancre_lightning.modules.LLMModule` at the benchmark shape and its AdamW (the
    module's own, :meth:`~ancre_lightning.modules.ConnectivityModule.build_optimizer`). The
    compiled modes go through ``configure_model()``, the path of ``compile: true`` (or
    ``reduce-overhead``): ``net.compile()`` in place."""
    from ..modules import LLMModule

    if mode not in MODES:
        raise UserInputError(f"mode must be one of {MODES}, got {mode!r}")
    if connectivity in HF_PEERS:
        return _build_hf_llama(connectivity == "hf-llama-rewired", mode, shape, device, seed, fused_optimizer,
                               activation_checkpointing)  # fmt: skip
    if connectivity not in WIRINGS:
        raise UserInputError(f"unknown wiring {connectivity!r}; the benchmark knows {', '.join((*WIRINGS, *HF_PEERS))}")
    name, options, granularity = WIRINGS[connectivity]
    torch.manual_seed(seed)
    module = LLMModule(
        vocab_size=257,
        dim=shape["dim"],
        n_layers=shape["n_layers"],
        n_heads=shape["n_heads"],
        mlp_hidden=shape["mlp_hidden"],
        max_seq_len=shape["seq_len"],
        connectivity=name,
        connectivity_options=options,
        granularity=granularity,
        aggregation="loop" if mode == "eager-loop" else "fused",
        compile=_COMPILE_OPTION[mode],
        fused_optimizer=fused_optimizer,
        activation_checkpointing=activation_checkpointing,
    ).to(device)
    store_as(module, shape["precision"])
    module.configure_model()
    return module, module.build_optimizer()


def _build_hf_llama(rewired: bool, mode: str, shape: Mapping[str, Any], device: torch.device, seed: int,
                    fused_optimizer: bool, activation_checkpointing: bool):  # fmt: skip
    """``LlamaForCausalLM`` of the benchmark shape (the built-in model's: SwiGLU hidden, RMSNorm
    epsilon 1e-5, rotary base 10000, untied head) inside an LLMModule, so that it is stepped, compiled
    and optimised exactly as the wirings are; without ``rewired`` its decoder stack is transformers'
    own ModuleList again."""
    from ..models.llama import default_mlp_hidden
    from ..modules import LLMModule
    from ..rewiring import RewiredBlocks

    if activation_checkpointing and not rewired:
        raise UserInputError("the plain hf-llama row has no wired stack to recompute; use hf-llama-rewired")
    dim = shape["dim"]
    config = {
        "model_type": "llama", "vocab_size": 257, "hidden_size": dim, "num_hidden_layers": shape["n_layers"],
        "intermediate_size": shape["mlp_hidden"] or default_mlp_hidden(dim),
        "num_attention_heads": shape["n_heads"], "num_key_value_heads": shape["n_heads"],
        "max_position_embeddings": shape["seq_len"], "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }  # fmt: skip
    torch.manual_seed(seed)
    module = LLMModule(vocab_size=257, hf_config=config, connectivity="residual", compile=_COMPILE_OPTION[mode],
                       fused_optimizer=fused_optimizer, activation_checkpointing=activation_checkpointing)  # fmt: skip
    if not rewired:
        base = module.net.model.model
        stack = base.layers
        assert isinstance(stack, RewiredBlocks)
        base.layers = torch.nn.ModuleList(stack._plain())  # transformers' own loop over its own blocks
    module.to(device)
    store_as(module, shape["precision"])
    module.configure_model()
    return module, module.build_optimizer()


def random_batch(shape: Mapping[str, Any], device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    window = torch.randint(0, 257, (shape["batch_size"], shape["seq_len"] + 1), generator=gen)
    return window[:, :-1].contiguous().to(device), window[:, 1:].contiguous().to(device)


def train_step_fn(module, optimizer, batch, device: torch.device, precision: str) -> Callable[[], float]:
    """One optimiser step as LLMModule trains: forward, float32 cross-entropy, backward, AdamW."""
    net = module.net
    net.train()
    input_ids, labels = batch

    def step() -> None:
        module.mark_cuda_graph_step()  # as the trainer does at every batch (CUDA graphs only)
        with autocast(device, precision):
            logits = net(input_ids)  # (B, T, V)
            loss = module.lm_loss(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v for v in state.values() if isinstance(v, torch.Tensor)) for state in optimizer.state.values())
