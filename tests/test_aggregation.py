"""The fused weighted aggregation: equal to the plain loop, one kernel each way, no recompiles.

Correctness only: speed is measured by ``python -m ancre_lightning.bench aggregation``.
"""

from __future__ import annotations

import re

import pytest
import torch

from ancre_lightning.connectivity import weighted_sum, weighted_sum_loop
from ancre_lightning.modules import LLMModule

BF16_EPS = 2.0**-8  # relative spacing of bfloat16 (8 significant bits)


def make_inputs(k: int, dtype: torch.dtype, shape=(2, 8, 64), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sources = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(k)]
    weights = (torch.randn(k, generator=gen) / k).requires_grad_()  # float32, as the gates are
    grad_out = torch.randn(shape, generator=gen).to(dtype)
    return sources, weights, grad_out


def forward_backward(fn, sources, weights, grad_out):
    out = fn(sources, weights)
    grads = torch.autograd.grad(out, [*sources, weights], grad_out)
    return out, list(grads[:-1]), grads[-1]


@pytest.mark.parametrize("k", [2, 5, 13])
def test_fused_equals_loop_float32_forward_and_backward(k):
    sources, weights, grad_out = make_inputs(k, torch.float32)
    ref, ref_src, ref_w = forward_backward(weighted_sum_loop, sources, weights, grad_out)
    out, g_src, g_w = forward_backward(lambda s, w: weighted_sum(s, w, "fused"), sources, weights, grad_out)
    assert out.dtype == torch.float32 and g_w.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(g_src, ref_src):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [3, 13])
def test_fused_equals_loop_bfloat16_within_rounding(k):
    """bf16 states, float32 weights: both results are bf16 and within bf16 rounding of the exact
    sum; the fused kernel accumulates in float32 and rounds once, the loop rounds at every step."""
    sources, weights, grad_out = make_inputs(k, torch.bfloat16, seed=k)
    ref, ref_src, ref_w = forward_backward(weighted_sum_loop, sources, weights, grad_out)
    out, g_src, g_w = forward_backward(lambda s, w: weighted_sum(s, w, "fused"), sources, weights, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g_src) and g_w.dtype == torch.float32

    s64 = [s.detach().double() for s in sources]
    w64 = weights.detach().double()
    exact = sum(w64[i] * s64[i] for i in range(k))
    scale = sum(w64[i].abs() * s64[i].abs() for i in range(k))  # bound on every partial sum
    assert ((out.double() - exact).abs() <= BF16_EPS * exact.abs() + 1e-6).all(), "fused: more than one rounding"
    assert ((ref.double() - exact).abs() <= k * BF16_EPS * scale + 1e-6).all()
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=float((k + 1) * BF16_EPS * scale.max()))

    for g, r in zip(g_src, ref_src):  # w_i * g: one rounding either way
        torch.testing.assert_close(g, r, rtol=BF16_EPS, atol=1e-6)
    g64 = grad_out.double()
    exact_w = torch.stack([(g64 * s).sum() for s in s64])
    bound_w = torch.stack([(g64 * s).abs().sum() for s in s64])
    # float32 reductions, never rounded to bf16: the gates' gradients keep float32 precision
    assert ((g_w.double() - exact_w).abs() <= 1e-5 * bound_w).all(), "fused weight gradients are float32 reductions"
    assert ((ref_w.double() - exact_w).abs() <= 4 * BF16_EPS * bound_w).all()


def test_fused_forward_and_backward_are_one_kernel_each():
    """Forward: one kernel reading the k sources and the weights; backward: one kernel reading the
    incoming gradient, the sources and the weights, writing every source gradient and reducing
    every weight gradient in the same pass."""
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
    assert len(forward) == 1 and len(backward) == 1, "expected one forward and one backward graph"
    fwd_src = re.findall(r"^\w+ = async_compile.cpp\w*\(\[(.*?)\]", forward[0], re.M)
    bwd_src = re.findall(r"^\w+ = async_compile.cpp\w*\(\[(.*?)\]", backward[0], re.M)
    assert len(fwd_src) == 1, f"forward has {len(fwd_src)} kernels"
    assert len(bwd_src) == 1, f"backward has {len(bwd_src)} kernels"
    fwd_args, bwd_args = fwd_src[0].split(","), bwd_src[0].split(",")
    assert sum("const" in a for a in fwd_args) == k + 1  # k sources + the weights, each read once
    assert sum("const" not in a for a in fwd_args) == 1  # one output
    assert sum("const" in a for a in bwd_args) == k + 2  # incoming gradient, weights, k sources
    # k source gradients, the k weight-gradient scalars and the (k,) weight gradient
    assert sum("const" not in a for a in bwd_args) == 2 * k + 1


def test_exhausted_recompile_limit_falls_back_to_the_loop():
    k = 7
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(k, generator=gen)
    with torch._dynamo.config.patch(recompile_limit=1):
        for shape in [(4, 16), (3, 16), (5, 8)]:  # one compiled entry, then the limit
            sources = [torch.randn(shape, generator=gen) for _ in range(k)]
            torch.testing.assert_close(weighted_sum(sources, weights, "fused"), weighted_sum_loop(sources, weights))


def test_auto_fuses_large_states_only(monkeypatch):
    """The default, ``auto``: the compiled kernel from AUTO_FUSED_MIN_NUMEL elements on, the loop below."""
    from ancre_lightning.connectivity import aggregation

    compiled = []
    real = aggregation.compiled_for_arity

    def record(n, *args):
        compiled.append(n)
        return real(n, *args)

    monkeypatch.setattr(aggregation, "compiled_for_arity", record)
    monkeypatch.setattr(aggregation, "AUTO_FUSED_MIN_NUMEL", 64)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, generator=gen)
    small = [torch.randn(4, 8, generator=gen) for _ in range(3)]  # 32 elements
    large = [torch.randn(8, 8, generator=gen) for _ in range(3)]  # 64 elements
    torch.testing.assert_close(weighted_sum(small, weights), weighted_sum_loop(small, weights))
    assert compiled == []
    torch.testing.assert_close(weighted_sum(large, weights), weighted_sum_loop(large, weights))
    assert compiled == [3]
    assert aggregation.resolve_aggregation("loop", large[0]) == "loop"
    assert aggregation.resolve_aggregation("fused", small[0]) == "fused"


def test_every_model_and_module_defaults_to_the_shared_default():
    import inspect

    from ancre_lightning.connectivity import ConnectedStack
    from ancre_lightning.connectivity.aggregation import DEFAULT_AGGREGATION
    from ancre_lightning.models import DiT, MLPMixer, ResNet, VisionTransformer
    from ancre_lightning.models.llama import CausalLM
    from ancre_lightning.modules import ClassifierModule, DiffusionModule

    assert DEFAULT_AGGREGATION == "auto"
    for cls in (ConnectedStack, CausalLM, DiT, MLPMixer, ResNet, VisionTransformer, LLMModule, ClassifierModule, DiffusionModule):
        assert inspect.signature(cls).parameters["aggregation"].default == DEFAULT_AGGREGATION, cls


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="loop"):
        weighted_sum([torch.ones(2), torch.ones(2)], torch.ones(2), impl="unrolled")


def tiny_llm(**kwargs) -> LLMModule:
    torch.manual_seed(0)
    module = LLMModule(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connectivity="ancre",
                       connectivity_options={"tau": 1.0}, **kwargs)
    with torch.no_grad():  # gates away from uniform, so that tau matters
        module.connectivity.gate_logits.copy_(torch.randn(module.connectivity.gate_logits.shape))
    return module


def train_pass(module: LLMModule, ids: torch.Tensor) -> torch.Tensor:
    logits = module(ids)
    module.lm_loss(logits, ids).backward()
    return logits.detach()


def test_whole_model_compile_keeps_keys_clean_and_never_recompiles_when_tau_changes():
    """``compile: true`` compiles the inner network in place; tau is a buffer changed in place
    (as the annealing callback does), so the compiled graph reads the new value: no recompile."""
    module = tiny_llm(compile=True, aggregation="fused")
    plain_keys = set(tiny_llm().state_dict())
    module.configure_model()
    assert set(module.state_dict()) == plain_keys
    assert not any("_orig_mod" in key for key in module.state_dict())
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    before = train_pass(module, ids)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tau in (0.3, 0.01):
            module.connectivity.tau.fill_(tau)
            after = train_pass(module, ids)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch.allclose(before, after), "the new tau did not reach the compiled graph"


def test_eager_fused_merges_never_recompile_when_tau_changes():
    module = tiny_llm(aggregation="fused")
    ids = torch.randint(0, 257, (2, 8), generator=torch.Generator().manual_seed(1))
    train_pass(module, ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        module.connectivity.tau.fill_(0.05)
        train_pass(module, ids)


def test_mixed_dtypes_follow_the_loop_promotion():
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(4, 16, generator=gen).to(torch.bfloat16), torch.randn(4, 16, generator=gen)]
    weights = torch.randn(2, generator=gen)
    out, ref = weighted_sum(sources, weights, "fused"), weighted_sum_loop(sources, weights)
    assert out.dtype == ref.dtype == torch.float32
    # the loop rounds the bf16 product w_0 * s_0 to bf16 before promoting; the fused sum does not
    first = (weights[0] * sources[0].float()).abs().max()
    torch.testing.assert_close(out, ref, rtol=0, atol=float(BF16_EPS * first))
