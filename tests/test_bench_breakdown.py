"""``bench step --set step.breakdown=true``: the classes of a profiled step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ancre_lightning.bench.breakdown import CLASSES, breakdown_rows, classify, profile_step, split_times
from ancre_lightning.bench.step import breakdown_table


@pytest.mark.parametrize(
    "name, expected",
    [
        ("aten::mm", "matmul"),
        ("aten::addmm", "matmul"),
        ("ampere_sgemm_128x64_tn", "matmul"),
        ("sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
        ("aten::_fused_adamw_", "optimizer"),  # "fused" in the name, but the optimiser's
        ("aten::_foreach_mul_", "optimizer"),
        ("## Call CompiledFxGraph f25hahvvppofzu5lzdxy6jpbqnvu2vz3m ##", "fused kernels"),
        ("graph_1_cpp_fused_add_div_exp_mul_0", "fused kernels"),
        ("triton_per_fused_add_mean_mul_pow_rsqrt_0", "fused kernels"),
        ("aten::mul", "other"),
        ("aten::copy_", "other"),
    ],
)
def test_classify(name, expected):
    assert classify(name) == expected


def test_split_times_sums_per_class():
    split = split_times([("aten::mm", 1.0), ("aten::bmm", 0.5), ("aten::mul", 0.25), ("triton_poi_fused_0", 2.0)])
    assert list(split) == list(CLASSES)
    assert split == {"matmul": 1.5, "attention": 0.0, "fused kernels": 2.0, "optimizer": 0.0, "other": 0.25}


def test_profile_step_sees_every_class_of_a_real_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([w], fused=True)
    x = torch.randn(2, 4, 32, 64)

    def step():
        h = x @ w  # (2, 4, 32, 64): matmul
        a = F.scaled_dot_product_attention(h, h, h, is_causal=True)  # attention
        (a * 1.5).square().mean().backward()  # elementwise: other
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    split = profile_step(step, torch.device("cpu"), steps=2)
    assert set(split) == set(CLASSES)
    for cls in ("matmul", "attention", "optimizer", "other"):
        assert split[cls] > 0, cls
    assert split["fused kernels"] == 0.0  # nothing here is compiled


def test_rows_give_each_wiring_its_extra_over_residual():
    zero = dict.fromkeys(CLASSES, 0.0)
    split = {
        ("compile", "residual"): {**zero, "matmul": 0.010, "fused kernels": 0.002},
        ("compile", "mhc"): {**zero, "matmul": 0.012, "fused kernels": 0.007},
        ("eager", "mhc"): {**zero, "other": 0.005},  # no residual row in this mode
    }
    rows = {(r["mode"], r["connectivity"]): r for r in breakdown_rows(split)}
    assert rows["compile", "mhc"]["extra_ms"]["matmul"] == pytest.approx(2.0)
    assert rows["compile", "mhc"]["extra_ms"]["fused kernels"] == pytest.approx(5.0)
    assert rows["compile", "mhc"]["total_ms"] == pytest.approx(19.0)
    assert rows["compile", "residual"]["extra_ms"]["matmul"] == pytest.approx(0.0)
    assert rows["eager", "mhc"]["extra_ms"] is None
    table = breakdown_table(list(rows.values()))
    assert "| mhc " in table and "+fused kernels" in table
