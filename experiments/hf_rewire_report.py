"""How far each wiring moves a Hugging Face Llama at the start, and what it costs in generation.

``ancre_lightning.rewire`` wires the decoder stack of a transformers causal LM in place. This
script builds one random ``LlamaForCausalLM`` of a pretrained-like shape (by default 6 layers of
width 256, 4 heads, SwiGLU hidden 688, vocabulary 4096, float32, seed 0; it runs in seconds on
a CPU) and measures, against the unwired model:

(a) the logits right after rewiring, on one fixed batch of token ids: the largest absolute
    difference and the relative difference (that over the largest absolute logit of the unwired
    model), for every wiring with its default options at block granularity, and for the options
    meant to start at the residual network, at block and at sub-layer granularity:

    - ancre ``init=predecessor`` at the largest ``init_weight`` allowed (the open interval
      (0, 1): the largest float below 1), with ``inner_residual=False`` as ancre.py says the
      residual start needs (``h_{j+1} = f_j(h_j) + h_j``), and with the default inner residual
      for comparison (``h_{j+1} = u_j + h_j``: the state counted twice);
    - mhc ``init=residual`` (its default), denseformer, hyper (static) and mudd with their defaults.

    Wirings that run blocks without their inner residual (acn, fixed, attnres, hyper, mhc, and
    ancre with ``inner_residual=False``) see at block granularity the branch
    ``mlp(attention(h))`` of each block, without the residual add between attention and MLP
    (rewiring.py), so only at sub-layer granularity can they start as the original network.

(b) greedy generation speed (tokens/s, median of ``--runs`` runs after one warm-up, one intra-op
    thread) with and without the KV cache, one prompt of 32 tokens and 64 new tokens, for the
    unwired model and for residual, ancre, mhc and hyper (defaults, block granularity); the
    cached and uncached runs must pick the same tokens.

Writes ``--out`` (default ``experiments/out/hf_rewire/report.json``) and prints both tables::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/hf_rewire_report.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import ancre_lightning
from ancre_lightning.connectivity import CONNECTIVITIES

OUT = Path(__file__).resolve().parent / "out" / "hf_rewire" / "report.json"
#: the largest init_weight ANCRe accepts: its range is the open interval (0, 1)
LARGEST_INIT_WEIGHT = math.nextafter(1.0, 0.0)
#: (wiring, options, what the start is meant to be) for the options meant to start at the residual network
RESIDUAL_STARTS: list[tuple[str, dict[str, Any], str]] = [
    ("ancre", {"init": "predecessor", "init_weight": LARGEST_INIT_WEIGHT, "inner_residual": False},
     "h_{j+1} = f_j(h_j) + ~1 * h_j"),
    ("ancre", {"init": "predecessor", "init_weight": LARGEST_INIT_WEIGHT},
     "h_{j+1} = u_j + ~1 * h_j (inner residual kept: not a residual start)"),
    ("mhc", {"init": "residual"}, "residual up to O(a P) terms"),
    ("denseformer", {}, "identity weights"),
    ("hyper", {}, "static, every stream the residual state"),
    ("mudd", {}, "W2 = 0, one-hot static weights"),
]  # fmt: skip
SPEED_WIRINGS = ["residual", "ancre", "mhc", "hyper"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help="the JSON report (default: %(default)s)")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--intermediate", type=int, default=688, help="SwiGLU hidden size (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and of every wiring (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="sequences in the batch of part (a) (default: %(default)s)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence in part (a) (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in part (b) (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated in part (b) (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timed generation runs, the median is reported (default: %(default)s)")
    p.add_argument("--skip-speed", action="store_true", help="measure part (a) only")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=max(256, args.seq, args.prompt_tokens + args.new_tokens),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def rewired(base: torch.nn.Module, wiring: str, granularity: str, options: dict[str, Any], seed: int) -> torch.nn.Module:
    """A copy of ``base`` rewired; the wiring's own random start (mhc's P, mudd's W1) from ``seed``."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    return ancre_lightning.rewire(model, wiring, granularity=granularity, **options).eval()


def logit_differences(base: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        reference = base(ids).logits  # (B, T, V)
    scale = float(reference.abs().max())
    cases = [(w, {}, "block", "default") for w in CONNECTIVITIES]
    cases += [(w, o, g, f"residual start: {why}") for w, o, why in RESIDUAL_STARTS for g in ("block", "sublayer")]
    rows = []
    for wiring, options, granularity, note in cases:
        model = rewired(base, wiring, granularity, options, args.seed)
        with torch.no_grad():
            diff = float((model(ids).logits - reference).abs().max())
        rows.append({"wiring": wiring, "options": {k: v for k, v in options.items()}, "granularity": granularity,
                     "note": note, "max_abs_diff": diff, "relative_diff": diff / scale, "max_abs_logit": scale})  # fmt: skip
    return rows


def generation_speed(base: torch.nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed + 2))
    models = {"unwired": base} | {w: rewired(base, w, "block", {}, args.seed) for w in SPEED_WIRINGS}
    rows = []
    for name, model in models.items():
        sequences = {}
        for use_cache in (True, False):
            def generate() -> torch.Tensor:
                with torch.no_grad():
                    return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, use_cache=use_cache,
                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)  # fmt: skip

            generate()  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                out = generate()
                times.append(time.perf_counter() - start)
            assert out.shape[1] == args.prompt_tokens + args.new_tokens
            sequences[use_cache] = out
            median = statistics.median(times)
            rows.append({"model": name, "use_cache": use_cache, "tokens_per_s": args.new_tokens / median,
                         "median_s": median, "runs_s": times})  # fmt: skip
        for row in rows[-2:]:
            row["same_tokens_with_and_without_cache"] = bool(torch.equal(sequences[True], sequences[False]))
    return rows


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'1-2^-53' if v == LARGEST_INIT_WEIGHT else v}" for k, v in options.items()) or "defaults"


def tables(report: dict[str, Any]) -> str:
    lines = ["(a) logits right after rewiring vs the unwired model "
             f"(max |logit| {report['logits'][0]['max_abs_logit']:.4g})", "",
             "| wiring | options | granularity | max abs diff | relative diff |", "|---|---|---|---|---|"]  # fmt: skip
    for r in report["logits"]:
        lines.append(f"| {r['wiring']} | {_options_text(r['options'])} | {r['granularity']} | "
                     f"{r['max_abs_diff']:.3g} | {r['relative_diff']:.3g} |")  # fmt: skip
    if report.get("generation"):
        lines += ["", f"(b) greedy generation, prompt {report['setup']['prompt_tokens']} tokens, {report['setup']['new_tokens']} new, "
                  f"1 thread, median of {report['setup']['runs']} (tokens/s)", "",
                  "| model | KV cache | no cache | cache speed-up | same tokens |", "|---|---|---|---|---|"]  # fmt: skip
        by = {(r["model"], r["use_cache"]): r for r in report["generation"]}
        for name in dict.fromkeys(r["model"] for r in report["generation"]):
            on, off = by[name, True], by[name, False]
            lines.append(f"| {name} | {on['tokens_per_s']:.1f} | {off['tokens_per_s']:.1f} | "
                         f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x | {on['same_tokens_with_and_without_cache']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    torch.set_num_threads(1)
    start = time.perf_counter()
    base = build_model(args)
    report: dict[str, Any] = {
        "setup": {"model": "LlamaForCausalLM (random)", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float32", "seed": args.seed,
                  "parameters": sum(p.numel() for p in base.parameters()), "batch": [args.batch, args.seq],
                  "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
                  "threads": torch.get_num_threads()},
        "logits": logit_differences(base, args),
    }  # fmt: skip
    if not args.skip_speed:
        report["generation"] = generation_speed(base, args)
    report["seconds"] = time.perf_counter() - start
    report["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                         "platform": platform.platform(), "cpus": os.cpu_count(),
                         "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(tables(report))
    print(f"\nwrote {args.out} in {report['seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main()
