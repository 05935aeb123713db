"""Exact resume: N steps, stop, ``--ckpt_path last``, N more steps == 2N steps straight.

For each domain a tiny model trains 2N steps in one run, and again as a run stopped after the
checkpoint of step N (an exception, as a pre-empted job would stop) and resumed with
``ancre fit --ckpt_path last``. Every step must see the same batch, learning rate, gate
temperature and loss, and the final checkpoints must hold the same weights, gate logits, EMA,
optimizer and scheduler state (CPU, deterministic mode, 1e-6). Randomness is switched on where
a domain has it (dropout, diffusion noise and label dropout, flips and Mixup) so that the random
generators must be restored too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from ancre_lightning.checkpointing import CONFIG_KEY, AtomicCheckpointIO, find_last_checkpoint
from ancre_lightning.cli import build_cli, main
from conftest import CONFIGS

#: What the Recorder saw, by tag: one dict per training step.
RECORDS: dict[str, list[dict[str, Any]]] = {}


class Preempted(RuntimeError):
    """Raised by :class:`StopAt` to end a run the way a killed job ends (no clean shutdown save)."""


class Recorder(Callback):
    """Records, for every training step, the batch (a hash), learning rates, gate temperatures, loss.

    Args:
        tag: key of :data:`RECORDS` to append to.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        RECORDS[tag] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        tensors = batch.values() if isinstance(batch, dict) else batch
        digest = hashlib.sha1()
        for t in tensors:
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        taus = [float(c.temperature) for c in pl_module.connectivities().values() if c.temperature is not None]
        RECORDS[self.tag].append({
            "step": trainer.global_step,
            "batch": digest.hexdigest(),
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "tau": taus,
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RECORDS[self.tag][-1]["loss"] = float(outputs["loss"])


class StopAt(Callback):
    """Raises :class:`Preempted` before the step after ``step`` (its checkpoint is written by then).

    Args:
        step: the last optimizer step of the run.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise Preempted(f"stopped after step {self.step}")


class RandomValidation(Callback):
    """Draws from the global generators during validation (as sampling with global noise would)."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.rand(3)
        np.random.rand(3)


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """``--trainer.deterministic=true`` switches torch's deterministic algorithms on process-wide."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _callbacks_config(path: Path, extra: list[dict]) -> Path:
    """A config that replaces trainer.callbacks: a checkpoint every step, plus ``extra``. (A list of
    the same length as the domain config's is merged item by item, so every option is spelt out.)"""
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0, "monitor": None,
                       "filename": None, "mode": "min", "auto_insert_metric_name": True}},
        *extra,
    ]  # fmt: skip
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def _recorder(tag: str) -> dict:
    return {"class_path": f"{__name__}.Recorder", "init_args": {"tag": tag}}


def run_split_and_straight(
    tmp_path: Path, base: list[str], n: int, extra_callbacks: list[dict] | None = None
) -> tuple[Path, Path, Any]:
    """Train 2n steps straight and n + n with a stop and ``--ckpt_path last``; return both last.ckpt
    paths and the resumed CLI."""
    extra = list(extra_callbacks or [])
    common = [*base, f"--trainer.max_steps={2 * n}", "--trainer.deterministic=true",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]  # fmt: skip
    straight_cfg = _callbacks_config(tmp_path / "straight.yaml", [*extra, _recorder("straight")])
    cli = build_cli(["fit", *common, "--config", str(straight_cfg), "--trainer.logger.init_args.name=straight"])
    assert cli.trainer.global_step == 2 * n

    part1_cfg = _callbacks_config(tmp_path / "part1.yaml", [*extra, _recorder("part1"), {
        "class_path": f"{__name__}.StopAt", "init_args": {"step": n}}])  # fmt: skip
    with pytest.raises(Preempted):
        build_cli(["fit", *common, "--config", str(part1_cfg), "--trainer.logger.init_args.name=resumed"])
    assert [r["step"] for r in RECORDS["part1"]] == list(range(n + 1))  # the stop came before step n+1 trained
    RECORDS["part1"].pop()

    part2_cfg = _callbacks_config(tmp_path / "part2.yaml", [*extra, _recorder("part2")])
    resumed = build_cli(["fit", *common, "--config", str(part2_cfg), "--trainer.logger.init_args.name=resumed",
                         "--ckpt_path", "last"])  # fmt: skip
    assert resumed.trainer.global_step == 2 * n
    straight_ckpt = tmp_path / "logs" / "straight" / "version_0" / "checkpoints" / "last.ckpt"
    resumed_ckpt = tmp_path / "logs" / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    # the resumed run logged into the stopped run's version folder: no version_1
    assert Path(resumed.trainer.log_dir) == tmp_path / "logs" / "resumed" / "version_0"
    assert not (tmp_path / "logs" / "resumed" / "version_1").exists()
    return straight_ckpt, resumed_ckpt, resumed


def assert_same_steps(n: int, atol: float = 1e-6) -> None:
    """Batches, learning rates, temperatures and losses of n + n steps equal those of 2n steps."""
    straight, resumed = RECORDS["straight"], RECORDS["part1"] + RECORDS["part2"]
    assert [r["step"] for r in straight] == list(range(2 * n))
    assert [r["step"] for r in resumed] == list(range(2 * n))
    assert [r["batch"] for r in resumed] == [r["batch"] for r in straight], "data order differs after resume"
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(torch.tensor(b["lr"]), torch.tensor(a["lr"]), rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.tensor(b["tau"]), torch.tensor(a["tau"]), rtol=0, atol=1e-9)
        assert abs(b["loss"] - a["loss"]) <= atol, f"step {a['step']}: loss {b['loss']} != {a['loss']}"


def assert_same_checkpoints(path_a: Path, path_b: Path, atol: float = 1e-6) -> dict:
    """Weights (gates, buffers, EMA), optimizer, scheduler and annealing state agree within ``atol``."""
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(opt_b["state"][index][name], value, rtol=0, atol=atol)
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    data_a = a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert data_a == b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return a


LLM_BASE = [
    "--config", str(CONFIGS / "llm" / "quickstart.yaml"),
    "--model.init_args.dim=32", "--model.init_args.n_layers=3", "--model.init_args.n_heads=2",
    "--model.init_args.dropout=0.1", "--model.init_args.warmup_steps=2", "--model.init_args.compile=false",
    "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=20000",
    "--data.init_args.max_val_tokens=2000", "--data.init_args.num_workers=0",
    "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
]  # fmt: skip


def test_llm_resume_equals_straight_run(tmp_path):
    """LLM with dropout and annealed tau: 4 + 4 steps == 8 steps; the validation right after the
    stop draws random numbers, and the resumed run does not repeat it."""
    annealing = {"class_path": "ancre_lightning.callbacks.GateTemperatureAnnealing",
                 "init_args": {"start": 1.0, "end": 0.05, "schedule": "cosine"}}  # fmt: skip
    random_validation = {"class_path": f"{__name__}.RandomValidation"}
    straight, resumed, cli = run_split_and_straight(tmp_path, LLM_BASE, n=4, extra_callbacks=[annealing, random_validation])
    assert_same_steps(4)
    taus = [r["tau"][0] for r in RECORDS["straight"]]
    assert taus[0] == pytest.approx(1.0) and taus[-1] < taus[4] < taus[0]  # the schedule really moved
    ckpt = assert_same_checkpoints(straight, resumed)
    assert "net.stack.connectivity.gate_logits" in ckpt["state_dict"]
    assert "net.stack.connectivity.tau" in ckpt["state_dict"]  # the annealed temperature buffer
    b = torch.load(resumed, map_location="cpu", weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("GateTemperatureAnnealing")]
    assert ckpt["callbacks"][key] == b["callbacks"][key]
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] == 0 and loader["samples_consumed"] == 8 * 2  # mid-epoch: 8 batches of 2
    assert cli.trainer.strategy.checkpoint_io.__class__ is AtomicCheckpointIO


@pytest.mark.parametrize(
    "connectivity,options",
    [("attnres", "{block_size: 2}"), ("hyper", "{streams: 2, dynamic: true}"), ("mhc", "{streams: 2}"), ("mudd", "{}"),
     ("mhc", "{streams: 2, recompute_streams: 2}")],
)
def test_llm_resume_equals_straight_run_for_the_new_families(tmp_path, connectivity, options):
    """Per-token weights and several streams, at sub-layer granularity: 3 + 3 steps == 6 steps (also
    with mHC's streams recomputed in backward, which adds no state)."""
    wiring = [f"--model.init_args.connectivity={connectivity}", f"--model.init_args.connectivity_options={options}",
              "--model.init_args.granularity=sublayer"]  # fmt: skip
    straight, resumed, cli = run_split_and_straight(tmp_path, [*LLM_BASE, *wiring], n=3)
    assert cli.model.connectivity.name == connectivity
    assert_same_steps(3)
    ckpt = assert_same_checkpoints(straight, resumed)
    assert any(".connectivity." in k for k in ckpt["state_dict"])  # the wiring's parameters travel too


def test_resuming_with_more_steps_says_the_schedules_keep_their_length(tmp_path):
    """A resume with a larger max_steps continues the stored schedules (what makes a resume
    exact), and says so: the learning rate and tau stay at their final values after the old end."""
    annealing = {"class_path": "ancre_lightning.callbacks.GateTemperatureAnnealing",
                 "init_args": {"start": 1.0, "end": 0.05, "schedule": "cosine"}}  # fmt: skip
    config = _callbacks_config(tmp_path / "callbacks.yaml", [annealing])
    common = [*LLM_BASE, "--config", str(config), "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]  # fmt: skip
    build_cli(["fit", *common, "--trainer.max_steps=3"])
    with pytest.warns(UserWarning) as caught:
        cli = build_cli(["fit", *common, "--trainer.max_steps=5", "--ckpt_path", "last"])
    messages = [str(w.message) for w in caught]
    assert any("learning-rate schedule keeps the length it was started with, 3 steps" in m and "step 5" in m
               for m in messages), messages
    assert any("GateTemperatureAnnealing keeps the length" in m and "at step 3" in m for m in messages), messages
    model = cli.model
    assert cli.trainer.global_step == 5
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(model.lr * model.min_lr_ratio)
    assert float(model.connectivity.temperature) == pytest.approx(0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llm_resume_on_cuda_restores_the_cuda_generator(tmp_path):
    """On a GPU dropout draws from the CUDA generator, which the checkpoint carries too (a resume
    without it changes the losses by ~1e-4; 1e-5 leaves room for GPU float reordering)."""
    random_validation = {"class_path": f"{__name__}.RandomValidation"}
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    straight, resumed, _ = run_split_and_straight(tmp_path, [*LLM_BASE, *gpu], n=4, extra_callbacks=[random_validation])
    assert_same_steps(4, atol=1e-5)
    ckpt = assert_same_checkpoints(straight, resumed, atol=1e-5)
    assert "cuda" in ckpt["callbacks"]["ResumeStateCallback"]["rng"][0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_diffusion_resume_equals_straight_run_with_ema(tmp_path, num_workers):
    """DiT with noise, label dropout, flips and EMA over an epoch boundary: 4 + 4 steps == 8 steps,
    with the batches (and their flips) built in the main process or in 2 DataLoader workers."""
    base = ["--config", str(CONFIGS / "diffusion" / "fmnist_ancre.yaml"),
            "--model.init_args.dim=32", "--model.init_args.n_heads=2", "--model.init_args.n_layers=2",
            "--model.init_args.compile=false", "--model.init_args.sample_every_n_steps=0",
            "--model.init_args.ema_decay=0.9", "--model.init_args.warmup_steps=2",
            "--data.init_args.batch_size=4", "--data.init_args.max_train_samples=12",
            "--data.init_args.max_val_samples=4", "--data.init_args.horizontal_flip=true",
            f"--data.init_args.num_workers={num_workers}",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.max_time=null"]  # fmt: skip
    straight, resumed, _ = run_split_and_straight(tmp_path, base, n=4)
    assert_same_steps(4)
    ckpt = assert_same_checkpoints(straight, resumed)  # includes every ema.* tensor
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 8
    assert not torch.equal(ckpt["state_dict"]["ema.module.final.linear.weight"], ckpt["state_dict"]["net.final.linear.weight"])
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["epoch"] == 2 and loader["samples_consumed"] == 8  # 3 batches an epoch: 2 of epoch 2 done


def test_classifier_resume_at_an_epoch_end_equals_straight_run(tmp_path):
    """ResNet with flips, Mixup, dropout and BatchNorm, stopped exactly at an epoch's end: 3 + 3 == 6."""
    base = ["--config", str(CONFIGS / "classifier" / "resnet_fmnist_ancre.yaml"),
            "--model.init_args.stage_depths=[1, 3]", "--model.init_args.stage_widths=[8, 16]",
            "--model.init_args.stem_width=8", "--model.init_args.drop_rate=0.2", "--model.init_args.mixup_alpha=0.4",
            "--model.init_args.warmup_steps=2", "--data.init_args.batch_size=8", "--data.init_args.max_train_samples=24",
            "--data.init_args.val_size=8", "--trainer.limit_val_batches=1", "--trainer.max_epochs=-1"]  # fmt: skip
    straight, resumed, _ = run_split_and_straight(tmp_path, base, n=3)
    assert_same_steps(3)
    ckpt = assert_same_checkpoints(straight, resumed)
    assert any(k.endswith("running_mean") for k in ckpt["state_dict"])  # BatchNorm statistics compared too
    epochs = [RECORDS["straight"][i]["batch"] for i in range(6)]
    assert len(set(epochs)) == 6  # each epoch has its own order and augmentation


def test_checkpoint_stores_the_config_and_resumes_without_config(tmp_path):
    """``ancre fit --ckpt_path path/to/last.ckpt`` with no --config takes the run's config from the checkpoint."""
    args = [*LLM_BASE, "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.init_args.name=run", "--data.init_args.max_train_tokens=4000"]  # fmt: skip
    build_cli(["fit", *args])
    last = tmp_path / "logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # everything added stays weights_only-safe
    stored = yaml.safe_load(ckpt[CONFIG_KEY]["config"])
    assert stored["model"]["init_args"]["dim"] == 32 and stored["data"]["init_args"]["seq_len"] == 32
    assert stored["ckpt_path"] is None
    resumed = build_cli(["fit", "--ckpt_path", str(last), "--trainer.max_steps=4"])
    assert resumed.trainer.global_step == 4
    assert resumed.model.hparams.dim == 32 and resumed.datamodule.seq_len == 32
    assert Path(resumed.trainer.log_dir) == last.parent.parent  # same version folder


def test_ckpt_path_last_without_a_previous_run_is_a_clear_error(tmp_path, capsys):
    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--ckpt_path", "last"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path last: no last.ckpt of this run was found" in err
    assert str(tmp_path / "logs" / "llm-quickstart") in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["fit", "--ckpt_path", "last"])
    assert "needs the run's --config" in capsys.readouterr().err


def test_last_is_the_newest_last_ckpt_of_any_version(tmp_path):
    """Each run used to get a new version folder; ``last`` looks in all of them and takes the newest."""
    folders = []
    for i, mtime in ((0, 100), (1, 300), (2, 200)):
        folder = tmp_path / f"version_{i}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
        (folder / ".ckpt-abc.partial").write_bytes(b"half")  # a write cut short: never chosen
        os.utime(folder / "last.ckpt", (mtime, mtime))
        folders.append(folder)
    assert find_last_checkpoint(folders) == folders[1] / "last.ckpt"
    assert find_last_checkpoint([tmp_path / "nowhere"]) is None


def _loader(n: int = 10, batch_size: int = 2, seed: int = 5, world: int = 1, rank: int = 0):
    from ancre_lightning.datamodules.resumable import ResumableDataLoader, ResumableSampler

    data = list(range(n))
    sampler = ResumableSampler(data, shuffle=True, seed=seed, num_replicas=world, rank=rank)
    return ResumableDataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)


def _take(loader, epochs_and_counts):
    """Batches (as lists) from ``loader``: for each (epoch, count), set the epoch and take count batches."""
    out = []
    for epoch, count in epochs_and_counts:
        loader.sampler.set_epoch(epoch)
        iterator = iter(loader)
        out += [batch.tolist() for _, batch in zip(range(count), iterator)]
    return out


def test_loader_state_continues_the_order_mid_epoch_and_at_an_epoch_end():
    straight = _take(_loader(), [(0, 5), (1, 5), (2, 5)])
    assert straight[:5] != straight[5:10]  # every epoch has its own order
    assert sorted(sum(straight[:5], [])) == list(range(10))
    for stop in (3, 5, 7):  # mid-epoch 0, the end of epoch 0, mid-epoch 1
        first = _loader()
        head = _take(first, [(0, min(stop, 5))] + ([(1, stop - 5)] if stop > 5 else []))
        state = first.state_dict()
        second = _loader(seed=999)  # the seed comes from the checkpoint
        second.load_state_dict(state)
        it = iter(second)  # as Lightning: the resumed pass first, set_epoch of later epochs after
        epoch = second.sampler.pass_epoch
        rest = [b.tolist() for b in it]
        for e in range(epoch + 1, 3):
            rest += _take(second, [(e, 5)])
        assert head + rest == straight, f"stop after {stop} batches"
    assert len(_loader()) == 5  # a whole epoch, also when resumed mid-way (Lightning counts on it)


def test_loader_state_survives_a_change_of_world_size():
    """Two ranks consumed 2 batches of 2 each (8 samples of the epoch's order); one rank continues
    at sample 8 of the same permutation."""
    one = _loader(n=16, world=1)
    order = sum(_take(one, [(0, 8)]), [])
    ranks = [_loader(n=16, world=2, rank=r) for r in range(2)]
    for r in ranks:
        _take(r, [(0, 2)])
    state = ranks[0].state_dict()
    assert state["samples_consumed"] == 8
    resumed = _loader(n=16, world=1)
    resumed.load_state_dict(state)
    assert sum((b.tolist() for b in resumed), []) == order[8:]


def test_rewired_timm_classifier_resume_equals_straight_run(tmp_path):
    """A timm ViT wired by rewire (ANCRe) resumes exactly like the built-in models: 2 + 2 == 4."""
    base = ["--config", str(CONFIGS / "classifier" / "timm_vit_fmnist_ancre.yaml"),
            "--model.init_args.timm_options={patch_size: 7, depth: 2, embed_dim: 32, num_heads: 2, drop_rate: 0.1}",
            "--model.init_args.warmup_steps=2", "--data.init_args.batch_size=8", "--data.init_args.max_train_samples=64",
            "--data.init_args.val_size=8", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"]  # fmt: skip
    straight, resumed, _ = run_split_and_straight(tmp_path, base, n=2)
    assert_same_steps(2)
    ckpt = assert_same_checkpoints(straight, resumed)
    assert "net.model.blocks.connectivity.gate_logits" in ckpt["state_dict"]
    assert "net.model.blocks.0.attn.qkv.weight" in ckpt["state_dict"]


def test_transformers_llama_resume_equals_straight_run(tmp_path):
    """A transformers Llama from ``hf_config``, rewired with ANCRe, with attention dropout (random
    numbers in every step): 2 + 2 steps == 4 steps, and the wiring travels in the checkpoint."""
    pytest.importorskip("transformers")
    base = ["--config", str(CONFIGS / "llm" / "hf_llama_quickstart_ancre.yaml"),
            "--model.init_args.hf_config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
            "num_attention_heads: 2, max_position_embeddings: 32, attention_dropout: 0.1}",
            "--model.init_args.warmup_steps=2", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
            "--data.init_args.max_train_tokens=20000", "--data.init_args.max_val_tokens=2000",
            "--data.init_args.num_workers=0", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]  # fmt: skip
    straight, resumed, cli = run_split_and_straight(tmp_path, base, n=2)
    assert cli.model.net.model.config.attention_dropout == 0.1
    assert_same_steps(2)
    ckpt = assert_same_checkpoints(straight, resumed)
    assert "net.model.model.layers.connectivity.gate_logits" in ckpt["state_dict"]
    assert "net.model.model.layers.0.self_attn.q_proj.weight" in ckpt["state_dict"]
