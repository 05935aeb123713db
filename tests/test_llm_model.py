"""The LLaMA-style decoder and the LLM module: wiring, exits, optimiser groups, schedule."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ancre_lightning.errors import UserInputError
from ancre_lightning.models import CausalLM
from ancre_lightning.modules import LLMModule
from ancre_lightning.modules.schedule import WarmupCosine


def tiny(connectivity="ancre", **kw):
    torch.manual_seed(0)
    return CausalLM(257, dim=32, n_layers=3, n_heads=4, max_seq_len=16, connectivity=connectivity, **kw)


@pytest.mark.parametrize("connectivity", ["residual", "ancre", "acn", "denseformer"])
def test_forward_shapes_and_exits(connectivity):
    model = tiny(connectivity)
    ids = torch.randint(0, 257, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 257)
    out, exits = model.forward_features(ids, return_exits=True)
    assert len(exits) == 4 and torch.allclose(model.forward_head(exits[-1]), logits, atol=1e-6)
    assert torch.equal(exits[-1], out)


def test_blocks_drop_inner_residual_exactly_when_the_wiring_says():
    assert all(b.inner_residual for b in tiny("ancre").stack.blocks)
    assert not any(b.inner_residual for b in tiny("acn").stack.blocks)


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny("ancre").eval()
    ids = torch.randint(0, 257, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 257
    torch.testing.assert_close(model(ids)[0, :10], model(changed)[0, :10])


def test_too_long_sequence_is_explained():
    with pytest.raises(UserInputError, match="sequence length 17 is longer than the model allows"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_gates_are_float32_and_out_of_weight_decay():
    module = LLMModule(dim=32, n_layers=3, n_heads=4, max_seq_len=16, connectivity="ancre", gate_lr=0.05, weight_decay=0.1)
    groups = {g["name"]: g for g in module.parameter_groups()}
    gates = groups["gates"]
    assert gates["weight_decay"] == 0.0 and gates["lr"] == 0.05
    assert [p is module.connectivity.gate_logits for p in gates["params"]] == [True]
    assert module.connectivity.gate_logits.dtype == torch.float32
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"])
    assert groups["decay"]["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in groups["decay"]["params"])
    n_grouped = sum(len(g["params"]) for g in groups.values())
    assert n_grouped == sum(1 for p in module.parameters() if p.requires_grad)
    assert LLMModule(connectivity="residual", dim=32, n_layers=2, n_heads=4).parameter_groups()[-1]["name"] != "gates"


def small_module(**kw) -> LLMModule:
    torch.manual_seed(0)
    return LLMModule(dim=32, n_layers=3, n_heads=4, max_seq_len=16, connectivity="ancre", gate_lr=0.05, **kw)


def test_fused_adamw_keeps_the_groups_and_makes_the_foreach_update():
    """The default optimiser is torch's fused AdamW over the module's own groups (decay, no decay,
    gates with their learning rate); three steps move the weights as the foreach AdamW does."""
    fused, foreach = small_module(), small_module(fused_optimizer=False)
    opt_fused, opt_foreach = fused.build_optimizer(), foreach.build_optimizer()
    assert opt_fused.defaults["fused"] and not opt_foreach.defaults["fused"]
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt_fused.param_groups] == [
        ("decay", 1e-3, 0.1), ("no_decay", 1e-3, 0.0), ("gates", 0.05, 0.0)]
    ids = torch.randint(0, 257, (2, 16))
    for _ in range(3):
        for module, opt in ((fused, opt_fused), (foreach, opt_foreach)):
            module.lm_loss(module(ids), ids).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(fused.named_parameters(), foreach.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(fused.connectivity.gate_logits, small_module().connectivity.gate_logits)


def token_loader() -> DataLoader:
    """Two batches of 4 random byte sequences of 16 tokens, as TextDataModule yields them."""
    ids = torch.randint(0, 257, (8, 17))
    return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4)


class GradNorms(Callback):
    """Total gradient norm before clipping (Lightning clips after this hook) and after the step."""

    def __init__(self) -> None:
        self.before, self.after = [], []

    @staticmethod
    def norm(module) -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self.norm(pl_module))  # gradients are zeroed at the start of the next step


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_clips_gradients_under_bf16_autocast(precision):
    """Lightning refuses to clip for a fused optimizer under any mixed precision; under bfloat16
    there is no gradient scaler, so the module clips itself, to the configured norm."""
    module, norms = small_module(), GradNorms()
    loader = token_loader()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision=precision, gradient_clip_val=0.05, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[norms])
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.optimizers[0].defaults["fused"]
    assert min(norms.before) > 0.1, "the test needs gradients larger than the clip norm"
    assert max(norms.after) == pytest.approx(0.05, rel=1e-3)


def test_cuda_graph_modes_mark_a_new_step_at_every_batch(monkeypatch):
    """With ``compile: reduce-overhead`` every training and validation batch starts a new CUDA-graph
    step (so replay may reuse the previous step's output memory); without it nothing is marked."""
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    loader = token_loader()
    for compile_mode, expected in (("reduce-overhead", 2 + 2), (False, 0)):
        module = small_module(compile=compile_mode)
        monkeypatch.setattr(module.net, "compile", lambda **kw: None)  # the hooks are under test, not inductor
        calls.clear()
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=2,
                  val_check_interval=2).fit(module, train_dataloaders=loader, val_dataloaders=loader)
        assert len(calls) == expected, (compile_mode, len(calls))


def test_compile_option_takes_a_torch_compile_mode(monkeypatch):
    assert small_module().compile_mode is None and small_module(compile=True).compile_mode == "default"
    module = small_module(compile="reduce-overhead")
    seen = {}
    monkeypatch.setattr(module.net, "compile", lambda **kw: seen.update(kw))
    module.configure_model()
    assert seen == {"mode": "reduce-overhead"}
    with pytest.raises(UserInputError, match="reduce-overhead"):
        small_module(compile="fast")


def test_gate_logits_receive_gradient_through_the_lm_loss():
    module = LLMModule(dim=32, n_layers=3, n_heads=4, max_seq_len=16, connectivity="ancre")
    ids = torch.randint(0, 257, (2, 16))
    module.lm_loss(module(ids), ids).backward()
    assert module.connectivity.gate_logits.grad.abs().sum() > 0


def test_warmup_cosine_schedule():
    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
