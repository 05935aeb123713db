"""The gate callbacks: temperature schedule and resume, sparsity, TensorBoard figures, early exits.

Training runs use a tiny LLaMA-style model on the real Wikipedia byte data (cached locally) and
real TensorBoard event files, read back with TensorBoard's own event reader.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ancre_lightning.callbacks import (
    EarlyExitEvaluation,
    GateSparsity,
    GateTemperatureAnnealing,
    GateVisualization,
    StreamGrowth,
    annealed_temperature,
    confidence_exit,
    cutoff_layer,
    row_entropy,
    shortcut_penalty,
)
from ancre_lightning.cli import build_cli
from ancre_lightning.connectivity import ConnectedStack, build_connectivity
from ancre_lightning.datamodules import TextDataModule
from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import ConnectivityModule, LLMModule
from conftest import CONFIGS

CALLBACKS = [GateTemperatureAnnealing, GateSparsity, GateVisualization, EarlyExitEvaluation, StreamGrowth]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------- helpers


def tiny_llm(connectivity: str = "ancre", seed: int = 0, **kwargs) -> LLMModule:
    L.seed_everything(seed, verbose=False)
    return LLMModule(dim=32, n_layers=3, n_heads=2, max_seq_len=16, connectivity=connectivity, warmup_steps=2, **kwargs)


def text_data() -> TextDataModule:
    return TextDataModule(corpus="wikipedia", seq_len=16, batch_size=4, max_train_tokens=4096, max_val_tokens=1024)


def trainer(max_steps: int, callbacks: list[Callback], logger=False, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=max_steps,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def shortcut_mass(module: ConnectivityModule) -> float:
    return sum(float(c.coefficients()[c.shortcut_mask()].abs().sum()) for c in module.connectivities().values())


def read_events(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


class TauRecorder(Callback):
    """Records the temperature each training step's forward uses (runs after the annealing callback)."""

    def __init__(self) -> None:
        self.taus: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.taus[trainer.global_step] = float(pl_module.connectivity.temperature)


class StopAt(Callback):
    """Ends fit after ``step`` optimiser steps, as an interrupted run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# --------------------------------------------------------------------------- documented surface


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_every_init_argument_is_typed_and_documented(callback):
    """LightningCLI builds --help from these; an untyped argument would vanish from it."""
    doc = inspect.getdoc(callback)
    assert doc and "Args:" in doc
    args_block = doc.split("Args:", 1)[1]
    for name, param in inspect.signature(callback.__init__).parameters.items():
        if name == "self":
            continue
        assert param.annotation is not inspect.Parameter.empty, f"{callback.__name__}.{name} is untyped"
        assert re.search(rf"^\s+{name}: \S", args_block, re.M), f"{callback.__name__}.{name} is not documented"


def test_bad_arguments_raise_user_errors_that_say_what_to_do():
    with pytest.raises(UserInputError, match="must be > 0"):
        GateTemperatureAnnealing(start=0.0)
    with pytest.raises(UserInputError, match="schedule must be one of"):
        GateTemperatureAnnealing(schedule="step")
    with pytest.raises(UserInputError, match="weight must be >= 0"):
        GateSparsity(weight=-1.0)
    with pytest.raises(UserInputError, match="penalty must be one of"):
        GateSparsity(penalty="l0")
    with pytest.raises(UserInputError, match="every_n_steps"):
        GateVisualization(every_n_steps=0)
    with pytest.raises(UserInputError, match="max_batches"):
        EarlyExitEvaluation(max_batches=0)
    residual = tiny_llm("residual")
    with pytest.raises(UserInputError, match="only ancre has one"):
        GateTemperatureAnnealing().setup(None, residual, "fit")
    with pytest.raises(UserInputError, match="lower warmup_steps or raise steps / max_steps"):
        GateTemperatureAnnealing(warmup_steps=10).setup(trainer(10, []), tiny_llm(), "fit")
    with pytest.raises(UserInputError, match="nothing to make sparse"):
        GateSparsity().setup(None, residual, "fit")
    with pytest.raises(UserInputError, match="ConnectivityModule"):
        GateVisualization().setup(None, nn.Module(), "fit")


# --------------------------------------------------------------------------- temperature annealing


def test_schedule_values_at_given_steps():
    def tau(step, schedule, warmup=0):
        return annealed_temperature(step, start=1.0, end=0.01, total_steps=100, schedule=schedule, warmup_steps=warmup)

    for schedule in ("linear", "cosine", "exponential"):
        assert tau(0, schedule) == pytest.approx(1.0)
        assert tau(100, schedule) == pytest.approx(0.01)
        assert tau(250, schedule) == pytest.approx(0.01)  # kept after the end
    assert tau(50, "linear") == pytest.approx(0.505)
    assert tau(25, "linear") == pytest.approx(1.0 - 0.99 * 0.25)
    assert tau(50, "cosine") == pytest.approx(0.505)
    assert tau(25, "cosine") == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert tau(50, "exponential") == pytest.approx(0.1)  # geometric midpoint of 1 and 0.01
    assert tau(25, "exponential") == pytest.approx(10 ** -0.5)
    assert tau(37, "constant") == 1.0
    # warm-up: held at start, then the schedule runs over the remaining steps
    assert tau(19, "linear", warmup=20) == 1.0
    assert tau(20, "linear", warmup=20) == pytest.approx(1.0)
    assert tau(60, "linear", warmup=20) == pytest.approx(0.505)
    assert tau(100, "linear", warmup=20) == pytest.approx(0.01)


def test_annealing_writes_the_buffer_in_place_and_logs_tau():
    model, data = tiny_llm(), text_data()
    buffer = model.connectivity.temperature
    recorder = TauRecorder()
    anneal = GateTemperatureAnnealing(start=1.0, end=0.01, schedule="linear")
    t = trainer(4, [anneal, recorder])
    t.fit(model, data)
    assert model.connectivity.temperature is buffer  # same tensor: a compiled graph sees the change
    assert anneal.total_steps == 4  # default: the trainer's max_steps
    assert recorder.taus == pytest.approx({s: 1.0 - 0.99 * s / 4 for s in range(4)})
    assert float(buffer) == pytest.approx(0.01)  # after the last step: tau(max_steps) = end
    assert float(t.callback_metrics["gates/tau"]) == pytest.approx(recorder.taus[3])


class MovesModule(Callback):
    """Replaces every tensor of the module after the callbacks' setup, as ``.to("cuda")`` does on a GPU."""

    def on_fit_start(self, trainer, pl_module):
        self.before = pl_module.connectivity.temperature
        pl_module._apply(lambda t: t.clone())


def test_annealing_follows_the_buffer_when_the_module_moves():
    model, recorder, mover = tiny_llm(), TauRecorder(), MovesModule()
    trainer(2, [mover, GateTemperatureAnnealing(start=1.0, end=0.01, schedule="linear"), recorder],
            limit_val_batches=0).fit(model, text_data())
    assert model.connectivity.temperature is not mover.before  # a new buffer object
    assert recorder.taus == pytest.approx({0: 1.0, 1: 0.505})
    assert float(model.connectivity.temperature) == pytest.approx(0.01)


def test_annealing_continues_exactly_after_a_resume(tmp_path):
    """8 steps in one go == 4 steps, a checkpoint, and a resume (even with max_steps raised on resume)."""
    kwargs = dict(start=2.0, end=0.02, schedule="cosine", warmup_steps=2)

    straight = TauRecorder()
    trainer(8, [GateTemperatureAnnealing(**kwargs), straight], limit_val_batches=0).fit(tiny_llm(), text_data())

    first = TauRecorder()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4, save_top_k=0)
    trainer(8, [GateTemperatureAnnealing(**kwargs), first, StopAt(4), checkpoint], enable_checkpointing=True,
            limit_val_batches=0).fit(
        tiny_llm(), text_data()
    )
    assert sorted(first.taus) == [0, 1, 2, 3]
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert saved["state_dict"]["net.stack.connectivity.tau"] == pytest.approx(annealed_temperature(4, total_steps=8, **kwargs))

    second = TauRecorder()
    resumed = GateTemperatureAnnealing(**kwargs)
    trainer(10, [resumed, second], limit_val_batches=0).fit(tiny_llm(seed=1), text_data(), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.total_steps == 8  # the schedule's length comes from the checkpoint, not the new max_steps
    assert sorted(second.taus) == list(range(4, 10))
    combined = {**first.taus, **second.taus}
    assert {s: combined[s] for s in range(8)} == straight.taus  # exact, step for step
    assert combined[8] == combined[9] == pytest.approx(0.02)


# --------------------------------------------------------------------------- sparsity


def test_penalty_gradient_is_added_to_the_gate_gradients():
    model = tiny_llm()
    conn = model.connectivity
    with torch.no_grad():
        conn.gate_logits.normal_(0, 0.01)
    conn.gate_logits.grad = torch.ones_like(conn.gate_logits)
    stats = GateSparsity(weight=0.5, penalty="l2").add_penalty_gradients(model)

    logits = conn.gate_logits.detach().clone().requires_grad_(True)
    k, tau = conn.num_layers, conn.temperature
    full = torch.full((k, k), float("-inf")).index_put(tuple(torch.tril_indices(k, k)), logits)
    p = torch.softmax(full / tau, dim=1)  # (K, K): row j over sources i <= j
    penalty = 0.5 * (p.tril(-1) ** 2).sum()  # shortcuts: i < j
    (expected,) = torch.autograd.grad(penalty, logits)
    assert torch.allclose(conn.gate_logits.grad, 1.0 + expected, atol=1e-6)
    assert float(stats["gates/sparsity_penalty"]) == pytest.approx(penalty.item(), rel=1e-5)
    assert float(stats["gates/shortcut_mass"]) == pytest.approx(float(p.tril(-1).sum()), rel=1e-5)
    assert float(stats["gates/active_shortcuts"]) == 3  # K=3: (1,0), (2,0), (2,1)
    for kind in ("l1", "entropy"):
        assert torch.isfinite(shortcut_penalty(conn, kind))


def test_row_entropy_is_the_softmax_entropy_for_ancre():
    conn = build_connectivity("ancre", 4, tau=1.0)  # uniform rows at initialisation
    assert torch.allclose(row_entropy(conn.coefficients()), torch.log(torch.arange(1.0, 5.0)), atol=1e-6)
    assert torch.equal(row_entropy(build_connectivity("residual", 4).coefficients()), torch.zeros(4))


def test_sparsity_run_ends_with_less_shortcut_mass():
    """The same short run, with and without the penalty (tau 0.1 so the gates neither freeze nor saturate)."""

    def run(callbacks):
        model = tiny_llm(gate_lr=0.02, connectivity_options={"tau": 0.1})
        trainer(6, callbacks, limit_val_batches=0).fit(model, text_data())
        return model

    plain = run([])
    sparse = run([GateSparsity(weight=1.0)])
    assert shortcut_mass(plain) > 0.5  # the shortcuts are still in use without the penalty
    assert shortcut_mass(sparse) < 0.9 * shortcut_mass(plain)
    for model in (plain, sparse):  # ANCRe rows stay normalised: the mass moved onto the main path
        gates = model.connectivity.coefficients().tril()  # (K, K+1): columns i <= j, the softmax row
        assert torch.allclose(gates.sum(dim=1), torch.ones(3), atol=1e-5)


# --------------------------------------------------------------------------- figures in TensorBoard


def test_heatmap_and_exit_figures_are_in_the_tensorboard_event_file(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    callbacks = [
        GateTemperatureAnnealing(start=1.0, end=0.05),
        GateSparsity(weight=0.1),
        GateVisualization(every_n_steps=2),
        EarlyExitEvaluation(max_batches=2),
    ]
    t = trainer(4, callbacks, logger=logger, val_check_interval=2)
    t.fit(tiny_llm(), text_data())

    events = read_events(logger.log_dir)
    tags = events.Tags()
    for tag in ("gates/wiring", "early_exit/metric_vs_depth", "early_exit/confidence_sweep"):
        assert tag in tags["images"], tags["images"]
    assert [e.step for e in events.Images("gates/wiring")] == [0, 2, 4]
    image = events.Images("gates/wiring")[-1]
    assert image.width > 100 and image.height > 100 and image.encoded_image_string.startswith(b"\x89PNG")
    assert [e.step for e in events.Images("early_exit/metric_vs_depth")] == [2, 4]
    # one step convention: validation after 2 optimiser steps is logged at step 2, like the pictures
    assert [e.step for e in events.Scalars("val/loss")] == [2, 4]
    assert [e.step for e in events.Scalars("early_exit/loss_exit3")] == [2, 4]
    assert "step" not in events.Tags()["scalars"]
    assert "gates/logits" in tags["histograms"]
    scalars = set(tags["scalars"])
    assert {"gates/tau", "gates/sparsity_penalty", "gates/active_shortcuts", "gates/shortcut_mass"} <= scalars
    assert {f"gates/entropy/row_{j}" for j in range(3)} <= scalars
    assert {f"early_exit/loss_exit{k}" for k in range(4)} | {"early_exit/ppl_exit3", "early_exit/cutoff_layer"} <= scalars
    assert any(t.startswith("early_exit/confidence_sweep") for t in tags["tensors"])  # the markdown table

    log_dir = Path(logger.log_dir)
    assert sorted(p.name for p in (log_dir / "gates").glob("*.png")) == [
        "wiring_step0000000.png", "wiring_step0000002.png", "wiring_step0000004.png"]
    assert (log_dir / "gates" / "wiring_step0000004.png").read_bytes().startswith(b"\x89PNG")
    assert (log_dir / "early_exit" / "step0000004_metric_vs_depth.png").is_file()
    assert "| exit (blocks) |" in (log_dir / "early_exit" / "step0000004_tables.md").read_text()


# --------------------------------------------------------------------------- early exits



def test_full_depth_exit_perplexity_matches_val_ppl(tmp_path):
    """Perplexity is exp of the mean loss over all tokens (Jensen: a mean of per-batch perplexities
    is larger), so on the same validation batches the full-depth exit reports ``val/ppl``."""
    model, data = tiny_llm("ancre"), text_data()
    with torch.no_grad():  # confident random logits: losses far from log(V) that differ between batches
        model.net.head.weight.mul_(20)
    evaluation = EarlyExitEvaluation(max_batches=3)
    t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  limit_val_batches=3, callbacks=[evaluation], default_root_dir=tmp_path)
    t.validate(model, data)
    results = evaluation.results
    val_ppl = float(t.callback_metrics["val/ppl"])
    assert results["per_exit"]["ppl"][-1] == pytest.approx(val_ppl, rel=1e-5)
    for loss, ppl in zip(results["per_exit"]["loss"], results["per_exit"]["ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-6)
    for row in results["sweep"]:
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-6)

def test_acn_last_exit_metric_equals_the_full_network(tmp_path):
    model, data = tiny_llm("acn"), text_data()
    evaluation = EarlyExitEvaluation(max_batches=2)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=3, callbacks=[evaluation], default_root_dir=tmp_path).validate(model, data)

    total, count = 0.0, 0  # the full network, through the module's own forward
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == 2:
                break
            n = batch["labels"].numel()
            loss = float(model.lm_loss(model(batch["input_ids"]), batch["labels"]))
            total, count = total + loss * n, count + n
    results = evaluation.results
    losses = results["per_exit"]["loss"]
    assert len(losses) == 4 and results["num_blocks"] == 3
    assert losses[-1] == pytest.approx(total / count, rel=1e-6)
    assert results["per_exit"]["ppl"][-1] == pytest.approx(math.exp(total / count), rel=1e-6)  # exp of the mean loss
    # threshold 0: nothing is confident, every token runs the full network
    assert results["sweep"][0]["threshold"] == 0.0 and results["sweep"][0]["mean_depth"] == 3.0
    assert results["sweep"][0]["loss"] == pytest.approx(losses[-1], rel=1e-6)
    assert results["sweep"][-1]["speedup"] == pytest.approx(3.0)  # log(V): every token leaves at exit 1


def test_cutoff_layer_rule_on_a_constructed_case():
    accuracy = [0.10, 0.50, 0.88, 0.895, 0.90]
    assert cutoff_layer(accuracy, 0.01, higher_is_better=True, mode="absolute") == 3  # 0.895 >= 0.89
    assert cutoff_layer(accuracy, 0.03, higher_is_better=True, mode="absolute") == 2
    assert cutoff_layer(accuracy, 0.0, higher_is_better=True, mode="absolute") == 4  # only the full network
    assert cutoff_layer(accuracy, 0.5, higher_is_better=True, mode="relative") == 1  # margin 0.45
    loss = [5.0, 3.2, 3.02, 3.0]
    assert cutoff_layer(loss, 0.01, higher_is_better=False) == 2  # relative: within 0.03 of 3.0
    assert cutoff_layer(loss, 0.1, higher_is_better=False, mode="absolute") == 2
    assert cutoff_layer([2.0, 3.0], 0.0, higher_is_better=False) == 0  # better than the full network counts


def test_confidence_exit_takes_the_first_confident_exit():
    entropies = torch.tensor([[0.1, 0.1, 3.0, 3.0],   # exit 0 (never taken with min_exit=1)
                              [0.2, 2.0, 3.0, 3.0],   # exit 1
                              [0.2, 0.5, 3.0, 0.4],   # exit 2
                              [2.0, 2.0, 2.0, 2.0]])  # exit 3: the last
    assert confidence_exit(entropies, 1.0).tolist() == [1, 2, 3, 2]
    assert confidence_exit(entropies, 1.0, min_exit=0).tolist() == [0, 0, 3, 2]
    assert confidence_exit(entropies, 0.0).tolist() == [3, 3, 3, 3]


# --------------------------------------------------------------------------- several stacks


class TwoStageNet(nn.Module):
    """A toy classifier with one stack per stage, like a ResNet: embed -> stage1 -> stage2 -> norm -> head."""

    def __init__(self, features: int = 8, dim: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.stage1 = ConnectedStack([self.block(dim) for _ in range(2)], build_connectivity("ancre", 2, tau=0.1))
        self.stage2 = ConnectedStack([self.block(dim) for _ in range(3)], build_connectivity("denseformer", 3))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    @staticmethod
    def block(dim: int) -> nn.Module:
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())

            def forward(self, x):
                return x + self.mlp(x)

        return Block()

    def forward_features(self, x, return_exits=False):
        h, first = self.stage1(self.embed(x), return_exits=True)
        h, second = self.stage2(h, return_exits=True)
        return (h, first + second[1:]) if return_exits else h

    def forward_head(self, h):
        return self.head(self.norm(h))


class TwoStageClassifier(ConnectivityModule):
    """A classifier module on the shared surface: exits of both stages, accuracy decides the cutoff."""

    exit_task = "classification"
    exit_primary_metric = ("accuracy", True)

    def __init__(self) -> None:
        super().__init__(lr=3e-3, warmup_steps=1)
        self.net = TwoStageNet()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net.forward_head(self.net.forward_features(x)), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net.forward_head(self.net.forward_features(x)), y))

    def exit_predictions(self, batch):
        x, y = batch
        _, exits = self.net.forward_features(x, return_exits=True)
        return [self.exit_head(h) for h in exits], y


def blobs(n: int, seed: int) -> DataLoader:
    """Four Gaussian blobs in 8 dimensions: a classification task a toy network learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2
    x = centres[y] + torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def test_several_stacks_get_their_stack_name_in_every_tag(tmp_path):
    model = TwoStageClassifier()
    assert list(model.connectivities()) == ["stage1", "stage2"]
    logger = TensorBoardLogger(tmp_path, name="toy")
    evaluation = EarlyExitEvaluation(max_batches=2)
    callbacks = [GateTemperatureAnnealing(start=1.0, end=0.1), GateSparsity(weight=0.01),
                 GateVisualization(every_n_steps=3), evaluation]
    trainer(6, callbacks, logger=logger, val_check_interval=3).fit(model, blobs(256, 1), blobs(64, 2))

    tags = read_events(logger.log_dir).Tags()
    assert {"gates/stage1/wiring", "gates/stage2/wiring", "early_exit/metric_vs_depth"} <= set(tags["images"])
    assert {"gates/stage1/logits", "gates/stage2/logits"} <= set(tags["histograms"])
    scalars = set(tags["scalars"])
    for stage in ("stage1", "stage2"):
        assert {f"gates/{stage}/active_shortcuts", f"gates/{stage}/shortcut_mass", f"gates/{stage}/entropy/row_1"} <= scalars
    assert "gates/tau" in scalars and "gates/sparsity_penalty" in scalars
    assert not any(re.fullmatch(r"gates/(wiring|active_shortcuts|entropy/row_\d)", t) for t in scalars | set(tags["images"]))
    pngs = {p.name for p in (Path(logger.log_dir) / "gates").glob("*.png")}
    assert {"stage1_wiring_step0000006.png", "stage2_wiring_step0000006.png"} <= pngs
    assert float(model.connectivities()["stage1"].temperature) == pytest.approx(0.1)
    results = evaluation.results
    assert results["primary"] == "accuracy" and results["num_blocks"] == 5
    assert 0 <= results["cutoff_layer"] <= 5 and len(results["sweep"]) == 11
    assert results["sweep"][-1]["mean_depth"] == 1.0  # threshold log(4): every example leaves at exit 1


# --------------------------------------------------------------------------- shipped config


def test_quickstart_config_runs_with_its_callbacks(tmp_path):
    cli = build_cli([
        "fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"),
        "--model.init_args.dim=32", "--model.init_args.n_layers=3", "--model.init_args.n_heads=2",
        "--model.init_args.max_seq_len=16", "--data.init_args.seq_len=16", "--data.init_args.batch_size=4",
        "--data.init_args.max_train_tokens=4096", "--data.init_args.max_val_tokens=1024",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert {GateVisualization, EarlyExitEvaluation, StreamGrowth} <= set(kinds)
    assert kinds.count(StreamGrowth) == 1  # added by `ancre fit`, once
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "gates" / "wiring_step0000003.png").is_file()
    assert (log_dir / "early_exit" / "step0000003_metric_vs_depth.png").is_file()
    events = read_events(log_dir)
    assert [e.step for e in events.Images("gates/wiring")] == [0, 3]  # start and end of training
    assert [e.step for e in events.Images("early_exit/metric_vs_depth")] == [3]
    assert [e.step for e in events.Images("stream/rms_vs_depth")] == [3]
    assert (log_dir / "stream" / "rms_vs_depth.png").read_bytes().startswith(b"\x89PNG")
    assert [h["step"] for h in json.loads((log_dir / "stream" / "rms.json").read_text())] == [3]


# --------------------------------------------------------------------------- stream growth


def ancre_stream_reference(lm: LLMModule, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0 = embedding; h_{j+1} = u_j + sum_{i<=j} softmax_i(c_j / tau) h_i, u_j = Block_j(h_j) (the paper's loop)."""
    net, conn = lm.net, lm.net.connectivity
    t = input_ids.shape[-1]
    flat, tau = conn.gate_logits.detach(), float(conn.tau)
    hs = [net.embed(input_ids)]
    for j, block in enumerate(net.stack.blocks):
        u = block(hs[j], net.rope_cos[:t], net.rope_sin[:t])
        p = torch.softmax(flat[j * (j + 1) // 2 : (j + 1) * (j + 2) // 2] / tau, 0)  # row j: sources 0..j
        hs.append(u + sum(p[i] * hs[i] for i in range(j + 1)))
    return hs


def test_stream_growth_logs_the_rms_of_the_papers_states(tmp_path):
    """After training, the logged RMS after every block equals the RMS of the states of the paper's
    loop on the same validation batches; the growth scalar is the last over the first."""
    logger = TensorBoardLogger(tmp_path, name="run")
    model, data = tiny_llm("ancre", connectivity_options={"tau": 0.5}), text_data()
    growth = StreamGrowth(max_batches=2)
    t = trainer(4, [growth], logger=logger, val_check_interval=2)
    t.fit(model, data)
    model.eval()
    with torch.no_grad():
        batches = [b["input_ids"] for _, b in zip(range(2), data.val_dataloader())]
        squares = [torch.stack([h.square().mean() for h in ancre_stream_reference(model, ids)]) for ids in batches]
    expected = torch.stack(squares).mean(0).sqrt()  # (K+1,): the batches have the same size
    events = read_events(logger.log_dir)
    for k in range(4):
        logged = events.Scalars(f"stream/rms_exit{k}")
        assert [e.step for e in logged] == [2, 4]
        assert logged[-1].value == pytest.approx(float(expected[k]), rel=1e-4)
    assert events.Scalars("stream/growth")[-1].value == pytest.approx(float(expected[-1] / expected[0]), rel=1e-4)
    assert [h["step"] for h in growth.history] == [2, 4]
    assert expected[-1] > expected[0]  # ANCRe's stream grows: each merge adds a convex mix of the history


def test_stream_growth_history_survives_a_resume(tmp_path):
    growth = StreamGrowth()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer(2, [growth, ckpt], val_check_interval=1, enable_checkpointing=True, default_root_dir=tmp_path).fit(
        tiny_llm("residual"), text_data())
    assert not (tmp_path / "stream").exists()  # no logger: no files
    assert [h["step"] for h in growth.history] == [1, 2]
    resumed = StreamGrowth()
    trainer(3, [resumed, ModelCheckpoint(dirpath=tmp_path, save_top_k=0)], val_check_interval=1,
            enable_checkpointing=True, default_root_dir=tmp_path).fit(tiny_llm("residual"), text_data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [h["step"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == growth.history


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_cli_help_shows_the_documented_arguments(callback, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--trainer.callbacks.help", f"ancre_lightning.callbacks.{callback.__name__}"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in inspect.signature(callback.__init__).parameters:
        if name != "self":
            assert f"--trainer.callbacks.{name}" in text


# --------------------------------------------------------------------------- torch.compile


class GraphCounter(Callback):
    def __init__(self) -> None:
        self.graphs: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from torch._dynamo.utils import counters

        self.graphs.append(counters["stats"]["unique_graphs"])


@pytest.mark.slow
def test_annealing_does_not_recompile_a_compiled_network():
    torch._dynamo.reset()
    counter = GraphCounter()
    model = tiny_llm(compile=True)
    trainer(4, [GateTemperatureAnnealing(start=1.0, end=0.01), counter], limit_val_batches=0).fit(model, text_data())
    assert counter.graphs[1:] == [counter.graphs[1]] * 3  # compiled once in step 0, never again as tau changes
    assert float(model.connectivity.temperature) == pytest.approx(0.01)


# --------------------------------------------------------------------------- DDP


class SameOnEveryRank(Callback):
    """After training, the gate logits (and the tau buffer) must be bit-identical on every rank."""

    def on_train_end(self, trainer, pl_module):
        gates = torch.cat([p.detach().flatten() for p in pl_module.gate_parameters()])
        tau = pl_module.connectivity.temperature.detach().reshape(1)
        gathered = pl_module.all_gather(torch.cat([gates, tau]))  # (world, P+1)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1]), "gates or tau differ between ranks"


@pytest.mark.slow
def test_ddp_penalties_identical_and_files_written_by_rank_zero(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="ddp", version=0)
    callbacks = [GateTemperatureAnnealing(start=1.0, end=0.05), GateSparsity(weight=1.0),
                 GateVisualization(every_n_steps=2), EarlyExitEvaluation(max_batches=2), SameOnEveryRank()]
    t = trainer(4, callbacks, logger=logger, val_check_interval=2, strategy="ddp_spawn", devices=2)
    t.fit(tiny_llm(), text_data())
    log_dir = tmp_path / "ddp" / "version_0"
    assert sorted(p.name for p in (log_dir / "gates").glob("*.png")) == [
        "wiring_step0000000.png", "wiring_step0000002.png", "wiring_step0000004.png"]
    tags = read_events(log_dir).Tags()
    assert {"gates/wiring", "early_exit/metric_vs_depth"} <= set(tags["images"])
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # rank 1 wrote nothing
