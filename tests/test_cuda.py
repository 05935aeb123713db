"""CUDA paths: the fused aggregation as Triton kernels, equal to the plain loop on the GPU.

Skipped without a GPU (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from ancre_lightning.connectivity import weighted_sum, weighted_sum_loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_EPS = 2.0**-8


def make_inputs(k: int, dtype: torch.dtype, shape=(4, 64, 512), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(shape, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(k)]
    weights = (torch.randn(k, generator=gen) / k).cuda().requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to("cuda", dtype)
    return sources, weights, grad_out


def forward_backward(fn, sources, weights, grad_out):
    out = fn(sources, weights)
    grads = torch.autograd.grad(out, [*sources, weights], grad_out)
    return out, list(grads[:-1]), grads[-1]


@pytest.mark.parametrize("k", [2, 12, 24])
def test_fused_equals_loop_on_cuda_float32(k):
    sources, weights, grad_out = make_inputs(k, torch.float32, seed=k)
    ref, ref_src, ref_w = forward_backward(weighted_sum_loop, sources, weights, grad_out)
    out, g_src, g_w = forward_backward(lambda s, w: weighted_sum(s, w, "fused"), sources, weights, grad_out)
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(g_src, ref_src):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [3, 12])
def test_fused_bfloat16_on_cuda_rounds_once(k):
    sources, weights, grad_out = make_inputs(k, torch.bfloat16, seed=k)
    out, g_src, g_w = forward_backward(lambda s, w: weighted_sum(s, w, "fused"), sources, weights, grad_out)
    assert out.dtype == torch.bfloat16 and g_w.dtype == torch.float32
    s64 = [s.detach().double() for s in sources]
    w64 = weights.detach().double()
    exact = sum(w64[i] * s64[i] for i in range(k))
    assert ((out.double() - exact).abs() <= BF16_EPS * exact.abs() + 1e-6).all(), "fused: more than one rounding"
    g64 = grad_out.double()
    exact_w = torch.stack([(g64 * s).sum() for s in s64])
    bound_w = torch.stack([(g64 * s).abs().sum() for s in s64])
    assert ((g_w.double() - exact_w).abs() <= 1e-5 * bound_w).all(), "weight gradients must be float32 reductions"


def test_fused_forward_is_one_triton_kernel():
    """The forward merge reads every source once in one Triton kernel; the backward's kernel
    count is printed (the GPU may split the weight-gradient reduction)."""
    from torch._inductor.utils import run_and_get_code

    k = 6
    sources, weights, grad_out = make_inputs(k, torch.float32)

    def run():
        return forward_backward(lambda s, w: weighted_sum(s, w, "fused"), sources, weights, grad_out)

    with torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(run)
    torch._dynamo.reset()
    forward = [c for c in codes if "forward" in c[:300]]
    backward = [c for c in codes if "backward" in c[:300]]
    assert len(forward) == 1 and len(backward) == 1
    n_fwd = len(re.findall(r"async_compile\.triton\(", forward[0]))
    n_bwd = len(re.findall(r"async_compile\.triton\(", backward[0]))
    print(f"triton kernels: forward {n_fwd}, backward {n_bwd}")
    assert n_fwd == 1, f"forward has {n_fwd} kernels"
    assert 1 <= n_bwd <= 3, f"backward has {n_bwd} kernels"


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_llm_trains_on_cuda_with_fused_adamw(compile_mode):
    """``compile: <mode>`` through the Trainer on the GPU, bf16-mixed, fused AdamW, with a
    validation in the middle: finite losses, moving weights; with ``reduce-overhead`` the steps
    replay CUDA graphs (inductor skipped none) and the gates keep learning."""
    import lightning as L
    from torch._dynamo.utils import counters

    from ancre_lightning.callbacks import GateTemperatureAnnealing
    from ancre_lightning.datamodules import TextDataModule
    from ancre_lightning.modules import LLMModule

    L.seed_everything(0, verbose=False)
    torch._dynamo.reset()
    counters.clear()
    module = LLMModule(dim=64, n_layers=4, n_heads=4, max_seq_len=32, connectivity="ancre", warmup_steps=2,
                       compile=compile_mode)
    gates_before = module.connectivity.gate_logits.detach().clone()
    data = TextDataModule(corpus="wikipedia", seq_len=32, batch_size=8, max_train_tokens=16384, max_val_tokens=2048)
    trainer = L.Trainer(max_steps=8, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=2, val_check_interval=4,
                        callbacks=[GateTemperatureAnnealing(start=1.0, end=0.1, schedule="exponential")])
    trainer.fit(module, datamodule=data)
    assert module.trainer.optimizers[0].defaults["fused"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert not torch.equal(module.connectivity.gate_logits.detach().cpu(), gates_before)
    if compile_mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.parametrize("precision,clip,fused", [("bf16-mixed", 0.05, True), ("16-mixed", 0.05, False), ("16-mixed", None, True)])
def test_adamw_choice_and_clipping_under_cuda_amp(precision, clip, fused):
    """Float16 AMP scales the gradients: with clipping the optimiser is the foreach AdamW (Lightning
    unscales, then clips); otherwise, and under bfloat16, the fused one, clipped by the module."""
    import lightning as L
    from test_llm_model import GradNorms, small_module, token_loader

    module, norms, loader = small_module(), GradNorms(), token_loader()
    trainer = L.Trainer(max_steps=2, accelerator="gpu", devices=1, precision=precision, gradient_clip_val=clip,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[norms])
    trainer.fit(module, train_dataloaders=loader)
    assert bool(trainer.optimizers[0].defaults["fused"]) is fused
    if clip:  # a float16 step whose scaled gradients overflowed is skipped by the scaler: not counted
        finite = [n for n in norms.after if math.isfinite(n)]
        assert finite and max(finite) == pytest.approx(clip, rel=1e-2)
