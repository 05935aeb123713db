"""FiniteGuard: a NaN or inf stops the run with the step and the tensor named, the checkpoints
saved before stay as they were, and the failing state lands in a separate file.

The runs use a tiny LLaMA-style model on the cached Wikipedia bytes; the non-finite values are
injected at a chosen step (a NaN loss, NaN gate logits, a NaN gradient) or produced for real by a
learning rate so large that the first update overflows.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from ancre_lightning.callbacks import FiniteGuard
from ancre_lightning.cli import build_cli, main
from ancre_lightning.datamodules import TextDataModule
from ancre_lightning.errors import NonFiniteError, UserInputError
from ancre_lightning.modules import LLMModule
from conftest import CONFIGS, tiny_run_args

NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class PoisonedLLM(LLMModule):
    """A tiny LLM that turns its loss, its gate logits or a gradient into NaN at a chosen step."""

    def __init__(self, poison: str = "none", at_step: int = -1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison, self.at_step = poison, at_step
        self._hook = None

    def training_step(self, batch, batch_idx):
        now = self.global_step == self.at_step
        if now and self.poison == "gates":
            with torch.no_grad():
                self.connectivity.gate_logits[-1] = NAN
        if now and self.poison in ("gradient", "gate-gradient"):
            target = self.net.embed.weight if self.poison == "gradient" else self.connectivity.gate_logits
            self._hook = target.register_hook(lambda g: torch.full_like(g, NAN))
        loss = super().training_step(batch, batch_idx)
        return loss * NAN if now and self.poison == "loss" else loss

    def on_after_backward(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def tiny_llm(poison: str = "none", at_step: int = -1, **kwargs) -> PoisonedLLM:
    L.seed_everything(0, verbose=False)
    options = dict(dim=32, n_layers=3, n_heads=2, max_seq_len=16, warmup_steps=2, poison=poison, at_step=at_step)
    return PoisonedLLM(**{**options, **kwargs})


def text_data() -> TextDataModule:
    return TextDataModule(corpus="wikipedia", seq_len=16, batch_size=4, max_train_tokens=4096, max_val_tokens=1024)


def fit(tmp_path: Path, model: L.LightningModule, max_steps: int = 6, guard: FiniteGuard | None = None) -> tuple[L.Trainer, ModelCheckpoint]:
    """Train with a checkpoint after every step (last.ckpt too, and on exceptions)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_on_exception=True)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run", version=0),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[checkpoint, guard or FiniteGuard()],
    )  # fmt: skip
    trainer.fit(model, datamodule=text_data())
    return trainer, checkpoint


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_llm("loss", at_step=3)
    with pytest.raises(NonFiniteError, match=r"at step 3 .*train loss = nan") as info:
        fit(tmp_path, model)
    last = load(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 3 and all_finite(last["state_dict"])  # saved after step 2, never after
    assert all(load(p)["global_step"] <= 3 for p in (tmp_path / "ckpt").glob("*.ckpt"))  # no save on the exception

    failure = tmp_path / "run" / "version_0" / "nonfinite-step3.ckpt"
    assert str(failure) in str(info.value)
    state = load(failure)
    assert state["step"] == 3 and state["nonfinite"] == ["train loss"]
    assert math.isnan(float(state["values"]["train loss"]))
    assert state["state_dict"].keys() == model.state_dict().keys() and all_finite(state["state_dict"])
    assert state["optimizer_states"] and state["batch"]["input_ids"].shape == (4, 16)
    with pytest.raises(UserInputError, match="failing state written by FiniteGuard"):
        from ancre_lightning.modules.base import read_checkpoint

        read_checkpoint(failure)


def test_nan_gate_logits_are_named(tmp_path):
    with pytest.raises(NonFiniteError, match=r"at step 2 .*gate logits net\.stack\.connectivity\.gate_logits \(1 of"):
        fit(tmp_path, tiny_llm("gates", at_step=2))
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2


def test_nan_gradient_stops_before_the_weights_change(tmp_path):
    model = tiny_llm("gradient", at_step=1)
    with pytest.raises(NonFiniteError, match=r"at step 1 .*gradient of net\.embed\.weight") as info:
        fit(tmp_path, model)
    assert "train loss" not in str(info.value)  # the loss itself was finite
    state = load(tmp_path / "run" / "version_0" / "nonfinite-step1.ckpt")
    assert all_finite(state["state_dict"])  # the failing step's update never ran
    assert torch.equal(state["state_dict"]["net.embed.weight"], model.net.embed.weight.detach())


def test_gates_that_turn_nonfinite_in_the_update_never_reach_a_checkpoint(tmp_path):
    model = tiny_llm("gate-gradient", at_step=1)  # NaN gate gradients, and no gradient check to stop them
    with pytest.raises(NonFiniteError, match=r"after the optimizer update of step 1 .*gate logits net\.stack"):
        fit(tmp_path, model, guard=FiniteGuard(check_gradients=False))
    assert not bool(torch.isfinite(model.connectivity.gate_logits).all())  # the update really made them NaN
    last = load(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 1 and all_finite(last["state_dict"])
    assert all(all_finite(load(p)["state_dict"]) for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert (tmp_path / "run" / "version_0" / "nonfinite-step1.ckpt").is_file()


def test_every_n_steps_zero_turns_the_guard_off(tmp_path):
    trainer, _ = fit(tmp_path, tiny_llm("loss", at_step=1), max_steps=3, guard=FiniteGuard(every_n_steps=0))
    assert trainer.global_step == 3
    assert not list(tmp_path.rglob("nonfinite-*.ckpt"))


def test_a_failure_file_is_never_replaced(tmp_path):
    log_dir = tmp_path / "run" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "nonfinite-step3.ckpt").write_bytes(b"earlier")
    with pytest.raises(NonFiniteError, match="nonfinite-step3-1.ckpt"):
        fit(tmp_path, tiny_llm("loss", at_step=3))
    assert (log_dir / "nonfinite-step3.ckpt").read_bytes() == b"earlier"


def test_the_cli_adds_one_guard_unless_the_config_has_one(tmp_path):
    args = ["--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path)]
    cli = build_cli(args, run=False)
    assert sum(isinstance(c, FiniteGuard) for c in cli.trainer.callbacks) == 1
    own = '{"class_path": "ancre_lightning.callbacks.FiniteGuard", "init_args": {"every_n_steps": 2}}'
    cli = build_cli([*args, f"--trainer.callbacks+={own}"], run=False)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, FiniteGuard)]
    assert len(guards) == 1 and guards[0].every_n_steps == 2


def test_ancre_fit_stops_with_one_line_and_the_failing_state(tmp_path, capsys):
    """A real divergence: a huge gate learning rate sends the logits past float32 after one update,
    so the next softmax gives NaN; a validation after every step writes last.ckpt each time."""
    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path, steps=1),
            "--trainer.max_steps=4", "--model.init_args.n_layers=2", "--model.init_args.dim=32",
            "--model.init_args.gate_lr=1e37", "--model.init_args.warmup_steps=1", "--data.init_args.batch_size=2", "--data.init_args.seq_len=32",
            "--data.init_args.max_train_tokens=40000", "--data.init_args.max_val_tokens=8000"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ancre: error: ") == 1 and "Traceback" not in err
    line = err[err.index("ancre: error: "):].strip()
    assert "\n" not in line and line.startswith("ancre: error: non-finite values at step 1 ") and "train loss = nan" in line
    failures = list(Path(tmp_path, "logs").rglob("nonfinite-step1.ckpt"))
    assert len(failures) == 1 and str(failures[0]) in line
    last = next(Path(tmp_path, "logs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1  # from before the NaN

    with pytest.raises(SystemExit) as exit_info:  # the failure file is no checkpoint to resume from
        main([*args, f"--ckpt_path={failures[0]}"])
    assert exit_info.value.code == 2
    assert "resume from last.ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_ranks_stop_together(tmp_path):
    """Two gloo processes: both see the NaN (one collective decision), both stop, no hang."""
    import os
    import subprocess
    import sys

    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--config", str(CONFIGS / "trainer" / "ddp_cpu.yaml"),
            *tiny_run_args(tmp_path, steps=1), "--trainer.max_steps=4", "--model.init_args.n_layers=2",
            "--model.init_args.dim=32", "--model.init_args.gate_lr=1e37", "--model.init_args.warmup_steps=1",
            "--data.init_args.batch_size=2", "--data.init_args.seq_len=32", "--data.init_args.max_train_tokens=40000",
            "--data.init_args.max_val_tokens=8000"]  # fmt: skip
    ancre = Path(sys.executable).with_name("ancre")
    result = subprocess.run([str(ancre), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("ancre: error: non-finite values at step 1 ") == 2  # one line per process
    assert len(list(Path(tmp_path, "logs").rglob("nonfinite-step1.ckpt"))) == 1
    last = next(Path(tmp_path, "logs").rglob("last.ckpt"))
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 1


class NaNValidationLLM(LLMModule):
    """Finite training, but a validation loss that is NaN."""

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(NAN))


def test_nan_validation_metric_warns_and_training_goes_on(tmp_path):
    L.seed_everything(0, verbose=False)
    model = NaNValidationLLM(dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, limit_val_batches=1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[FiniteGuard()],
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"FiniteGuard: val/loss = nan in the validation after step 2") as record:
        trainer.fit(model, datamodule=text_data())
    assert trainer.global_step == 4
    assert sum("FiniteGuard" in str(w.message) for w in record) == 2  # after step 2 and after step 4
