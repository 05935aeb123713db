"""FLOPs and MFU: the modules count the FLOPs of a step on a meta-device copy of their network
(checked against the analytic 6N + attention count), and ``ancre_lightning.callbacks.ThroughputMonitor``
logs samples, tokens and FLOPs per second, and MFU where the device's peak is given."""

from __future__ import annotations

import csv
import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ancre_lightning.callbacks import ThroughputMonitor
from ancre_lightning.callbacks.throughput import batch_samples, batch_tokens
from ancre_lightning.modules import ClassifierModule, DiffusionModule, LLMModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def token_batch(b: int, t: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 257, (b, t + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


@pytest.mark.parametrize("dim,layers,seq", [(64, 2, 32), (128, 4, 128)])
def test_llm_flops_are_6n_plus_attention(dim, layers, seq):
    """A training step of the residual LLM: 6 FLOPs per matrix parameter and token (forward 2,
    backward 4), plus attention's two T x T products per layer (4 T D FLOPs per token forward, 12
    with backward; counted over the full square, as the fused attention kernel computes it), within
    5 % (the count skips norms and elementwise operations, the formula skips nothing it counts)."""
    module = LLMModule(vocab_size=257, dim=dim, n_layers=layers, n_heads=2, max_seq_len=seq, connectivity="residual")
    b = 2
    matrices = sum(m.weight.numel() for m in module.net.modules() if isinstance(m, nn.Linear))  # blocks and head
    tokens = b * seq
    analytic = 6 * matrices * tokens + 12 * layers * seq * dim * tokens
    counted = module.count_flops(token_batch(b, seq))
    assert abs(counted / analytic - 1) < 0.05
    forward = module.count_flops(token_batch(b, seq), train=False)
    assert forward == pytest.approx(counted / 3, rel=0.01)  # backward is twice the forward


def test_counting_draws_no_random_numbers_and_caches_by_shape():
    module = LLMModule(vocab_size=257, dim=32, n_layers=2, n_heads=2, max_seq_len=16, connectivity="mhc",
                       granularity="sublayer", connectivity_options={"streams": 2})  # fmt: skip
    state = torch.random.get_rng_state()
    first = module.count_flops(token_batch(2, 16))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first > 0 and module.count_flops(token_batch(2, 16)) == first
    assert module.count_flops(token_batch(4, 16)) == pytest.approx(2 * first, rel=0.01)  # twice the sequences


def test_image_modules_count_their_flops():
    vit = ClassifierModule(arch="vit", num_classes=4, in_chans=1, img_size=16, patch_size=4, dim=16, depth=2, num_heads=2)
    images = (torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))
    assert vit.count_flops(images) > 0
    dit = DiffusionModule(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=2, n_heads=2, num_classes=4,
                          sample_every_n_steps=0)  # fmt: skip
    assert dit.count_flops((torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))) > 0


def test_batch_sizes_of_every_domain():
    tokens = token_batch(3, 8)
    assert batch_samples(tokens) == 3 and batch_tokens(tokens) == 24
    images = (torch.zeros(5, 1, 8, 8), torch.zeros(5))
    assert batch_samples(images) == 5 and batch_tokens(images) == 5
    assert batch_samples({"images": torch.zeros(6, 3, 8, 8)}) == 6


def run_with_monitor(tmp_path, monitor: ThroughputMonitor) -> list[dict[str, str]]:
    torch.manual_seed(0)
    module = LLMModule(vocab_size=257, dim=32, n_layers=2, n_heads=2, max_seq_len=16, connectivity="ancre")
    data = DataLoader([{k: v[0] for k, v in token_batch(1, 16).items()} for _ in range(12)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, log_every_n_steps=1, callbacks=[monitor],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=data)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_monitor_logs_flops_and_mfu_with_a_given_peak(tmp_path):
    rows = run_with_monitor(tmp_path, ThroughputMonitor(peak_tflops=1.0, window_size=2))
    flops = [float(r["train/device/flops_per_sec"]) for r in rows if r.get("train/device/flops_per_sec")]
    mfu = [float(r["train/device/mfu"]) for r in rows if r.get("train/device/mfu")]
    tokens = [float(r["train/device/items_per_sec"]) for r in rows if r.get("train/device/items_per_sec")]
    assert flops and mfu and tokens
    assert mfu[-1] == pytest.approx(flops[-1] / 1e12)  # MFU = FLOP/s over the given peak
    assert all(t > 0 for t in tokens)


def test_monitor_on_a_cpu_says_once_that_there_is_no_mfu(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        rows = run_with_monitor(tmp_path, ThroughputMonitor(window_size=2))
    said = [r.message for r in caplog.records if "no known peak FLOP/s" in r.message]
    assert len(said) == 1 and "peak_tflops" in said[0]
    assert any(r.get("train/device/flops_per_sec") for r in rows)
    assert not any(r.get("train/device/mfu") for r in rows)


def test_ancre_fit_adds_the_monitor_once(tmp_path):
    """Every ``ancre fit`` of this project's modules gets the monitor (the modules log no
    hand-written rate any more); a config that names one keeps its own."""
    from ancre_lightning.cli import build_cli
    from conftest import ROOT, tiny_run_args

    quick = [*tiny_run_args(tmp_path), "--model.init_args.n_layers=1", "--data.init_args.max_train_tokens=20000",
             "--data.init_args.max_val_tokens=4000", "--data.init_args.batch_size=2"]
    cli = build_cli(["fit", "--config", str(ROOT / "configs/llm/quickstart.yaml"), *quick, "--trainer.max_steps=1"])
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ThroughputMonitor)]
    assert len(monitors) == 1 and isinstance(monitors[0], ThroughputMonitor)
    assert "train/tokens_per_s" not in cli.trainer.logged_metrics
    own = ["--trainer.callbacks+=ancre_lightning.callbacks.ThroughputMonitor", "--trainer.callbacks.peak_tflops=2.0"]
    cli = build_cli(["fit", "--config", str(ROOT / "configs/llm/quickstart.yaml"), *quick, "--trainer.max_steps=1", *own])
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ThroughputMonitor)]
    assert [m.peak_tflops for m in monitors] == [2.0]
