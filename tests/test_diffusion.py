"""Diffusion domain: the DiT on the shared backbone, the LightningModule, the data, configs and sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from ancre_lightning.cli import build_cli, main
from ancre_lightning.connectivity import ConnectedStack
from ancre_lightning.datamodules import DiffusionImageDataModule
from ancre_lightning.datamodules.diffusion_images import fit_images, load_image_set
from ancre_lightning.errors import UserInputError
from ancre_lightning.models import DiT
from ancre_lightning.modules import DiffusionModule
from ancre_lightning.modules.diffusion import SAMPLERS, EMAWarmup, build_sampler
from ancre_lightning.sample import main as sample_main
from conftest import CONFIGS, tiny_run_args

DIFFUSION_CONFIGS = sorted(p.name for p in (CONFIGS / "diffusion").glob("*.yaml"))
TINY_MODEL = [
    "--model.init_args.dim=32",
    "--model.init_args.n_heads=2",
    "--model.init_args.n_layers=2",
    "--model.init_args.compile=false",
    "--model.init_args.sample_steps=2",
]
SMALL_DATA = ["--data.init_args.batch_size=4", "--data.init_args.max_train_samples=64", "--data.init_args.max_val_samples=8"]


def tiny_module(**overrides) -> DiffusionModule:
    args = dict(image_size=16, in_channels=1, patch_size=4, dim=32, n_layers=3, n_heads=2, num_classes=10,
                ema_decay=0.9, sample_steps=3, guidance_scale=2.0)  # fmt: skip
    args.update(overrides)
    return DiffusionModule(**args)


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every zero-initialised weight (adaLN, output layer, gates) a random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("connectivity", ["residual", "ancre", "acn", "denseformer"])
def test_dit_shapes_exits_and_inner_residual(connectivity):
    net = DiT(image_size=16, in_channels=3, patch_size=4, dim=32, n_layers=3, n_heads=2, num_classes=5,
              connectivity=connectivity)  # fmt: skip
    assert isinstance(net.stack, ConnectedStack) and net.connectivity.name == connectivity
    assert all(b.inner_residual == net.connectivity.inner_residual for b in net.stack.blocks)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 4])
    assert torch.count_nonzero(net(x, t, y)) == 0  # adaLN-Zero: the output layer starts at zero
    randomize(net)
    net.eval()
    out = net(x, t, y)
    assert out.shape == (2, 3, 16, 16)
    cond = net.condition(t, y)
    h, exits = net.forward_features(x, cond, return_exits=True)
    assert len(exits) == 4 and h.shape == (2, 16, 32)
    torch.testing.assert_close(net.forward_head(exits[-1], cond), out)


def test_ancre_is_applied_after_each_block_with_the_conditioning():
    """h_{j+1} = u_j + sum_{i<=j} p_ij h_i with u_j = Block_j(h_j, c): the DESIGN.md recurrence."""
    net = DiT(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=4, n_heads=2, num_classes=3,
              connectivity="ancre", connectivity_options={"tau": 0.5})  # fmt: skip
    randomize(net, seed=1)
    net.eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    cond = net.condition(t, y)
    p = net.connectivity.gate_matrix()  # (K, K) row = target j, column = source i
    assert not torch.allclose(p[3, :4], torch.full((4,), 0.25))  # the random logits are not uniform
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(args[1])) for b in net.stack.blocks]
    states = [net.patch_embed(x)]
    for j, block in enumerate(net.stack.blocks):
        u = block(states[j], cond)
        states.append(u + sum(p[j, i] * states[i] for i in range(j + 1)))
    seen.clear()
    got = net.forward_features(x, cond)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, states[-1], rtol=1e-5, atol=1e-5)
    assert len(seen) == 4 and all(c is cond for c in seen)  # the conditioning reaches every block


def test_blocks_without_inner_residual_are_alive_at_init():
    net = DiT(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=3, n_heads=2, connectivity="acn")
    block = net.stack.blocks[0]
    x, cond = torch.randn(2, 16, 16, requires_grad=True), torch.randn(2, 16)
    out = block(x, cond)
    assert out.abs().sum() > 0  # gates act as 1 + g, not g = 0
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and block.modulation[-1].weight.grad.abs().sum() > 0


def test_label_dropout_uses_the_null_class():
    net = DiT(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=1, n_heads=2, num_classes=4, class_dropout=0.999999)
    t, y = torch.tensor([5, 6, 7]), torch.tensor([0, 1, 3])
    null = net.null_labels(3)
    assert null.tolist() == [4, 4, 4] and net.supports_guidance
    net.train()
    torch.testing.assert_close(net.condition(t, y), net.condition(t, null))
    net.eval()
    assert not torch.allclose(net.condition(t, y), net.condition(t, null))
    plain = DiT(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=1, n_heads=2, num_classes=4, class_dropout=0.0)
    with pytest.raises(UserInputError, match="classifier-free guidance"):
        plain.null_labels(2)


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(UserInputError, match="image_size=30 is not divisible by patch_size=4"):
        DiT(image_size=30, patch_size=4)
    net = DiT(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=1, n_heads=2)
    with pytest.raises(UserInputError, match="in_channels / image_size"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([1]))


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_and_loss(prediction_type):
    module = tiny_module(prediction_type=prediction_type)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    noise, t = module.fixed_noise(x0, seed=3)
    target = module.diffusion_target(x0, noise, t)
    if prediction_type == "epsilon":
        assert target is noise
    else:
        a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    noisy = module.noise_scheduler.add_noise(x0, noise, t)
    a = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    loss = module.denoising_loss(module.net, x0, torch.arange(4), noise, t)
    torch.testing.assert_close(loss, target.square().mean())  # the output layer starts at zero


def test_exit_predictions_are_fixed_and_end_with_the_full_network():
    module = tiny_module()
    randomize(module.net)
    module.eval()
    batch = (torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([1, 2, 3]))
    outputs, target = module.exit_predictions(batch)
    outputs2, target2 = module.exit_predictions(batch)
    assert len(outputs) == module.hparams.n_layers + 1
    torch.testing.assert_close(target, target2)
    for a, b in zip(outputs, outputs2):
        torch.testing.assert_close(a, b)
    noise, t = module.fixed_noise(batch[0], module.hparams.eval_seed)
    full = module.net(module.noise_scheduler.add_noise(batch[0], noise, t), t, batch[1])
    torch.testing.assert_close(outputs[-1], full)
    metrics = module.exit_metrics(outputs[1], target)
    assert set(metrics) == {"loss"}
    torch.testing.assert_close(metrics["loss"], F.mse_loss(outputs[1], target))
    assert module.exit_task == "regression" and module.exit_primary_metric == ("loss", False)


def test_ema_warms_up_follows_buffers_and_stays_out_of_the_optimizer():
    module = tiny_module(ema_decay=0.99)
    ema = module.ema.module
    assert not any(p.requires_grad for p in module.ema.parameters())
    assert {id(p) for g in module.parameter_groups() for p in g["params"]}.isdisjoint({id(p) for p in module.ema.parameters()})
    module.update_ema()  # first update: a copy
    w = module.net.patch_embed.proj.weight
    with torch.no_grad():
        w.add_(1.0)
        module.net.connectivity.tau.fill_(0.3)
    before = ema.patch_embed.proj.weight.clone()
    module.update_ema()  # n = 1: decay min(0.99, 2 / 11)
    decay = 2 / 11
    torch.testing.assert_close(ema.patch_embed.proj.weight, decay * before + (1 - decay) * w.detach())
    assert float(ema.connectivity.tau) == pytest.approx(0.3)
    averaged = [torch.zeros(1)]
    EMAWarmup(0.5)(averaged, [torch.ones(1)], torch.tensor(100))  # warmed up: decay 0.5
    assert float(averaged[0]) == pytest.approx(0.5)
    assert module.denoiser is ema


def test_sampling_with_every_sampler_and_guidance():
    module = tiny_module()
    randomize(module.net)
    module.update_ema()
    for name in SAMPLERS:
        images = module.sample(4, sampler=name, num_steps=3, seed=7)
        assert images.shape == (4, 1, 16, 16) and images.abs().max() <= 1
        torch.testing.assert_close(module.sample(4, sampler=name, num_steps=3, seed=7), images)
    assert not torch.allclose(module.sample(4, num_steps=3, seed=7), module.sample(4, num_steps=3, seed=8))
    guided = module.sample(labels=torch.tensor([2, 2]), num_steps=3, guidance_scale=3.0)
    plain = module.sample(labels=torch.tensor([2, 2]), num_steps=3, guidance_scale=1.0)
    assert not torch.allclose(guided, plain)
    with pytest.raises(UserInputError, match=r"unknown sampler 'dmp-solver' \(did you mean 'dpm-solver'\?\)"):
        module.sample(2, sampler="dmp-solver")
    with pytest.raises(UserInputError, match="labels must be in"):
        module.sample(labels=torch.tensor([10]))
    uncond = tiny_module(num_classes=0, guidance_scale=1.0)
    assert uncond.sample(2, num_steps=2).shape == (2, 1, 16, 16)
    with pytest.raises(UserInputError, match="guidance"):
        uncond.sample(2, num_steps=2, guidance_scale=2.0)


def test_samplers_share_the_training_noise_schedule():
    module = tiny_module(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    for name in SAMPLERS:
        sampler = build_sampler(name, module.noise_scheduler)
        assert sampler.config.prediction_type == "v_prediction"
        assert sampler.config.beta_schedule == "squaredcos_cap_v2"
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) >= 900


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sampler": "euler_a"}, "unknown sampler 'euler_a'"),
        ({"prediction_type": "eps"}, "unknown prediction_type 'eps'"),
        ({"image_size": 30, "patch_size": 4}, "not divisible by patch_size"),
        ({"num_classes": 0, "guidance_scale": 2.0}, "set guidance_scale: 1.0"),
        ({"ema_decay": 1.0}, "ema_decay must be in [0, 1)"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_module(**kwargs)


# --------------------------------------------------------------------------- data


def test_fashion_mnist_padded_to_32_in_minus_one_one():
    dm = DiffusionImageDataModule(batch_size=8, val_size=100, max_val_samples=16)
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 1, 32)
    assert dm.class_names[0] == "T-shirt/top"
    dm.setup("fit")
    assert len(dm.train_dataset) == 59_900 and len(dm.val_dataset) == 16 and len(dm.test_dataset) == 10_000
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 32, 32) and labels.shape == (8,) and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1 + 1e-6
    torch.testing.assert_close(images[..., :2, :], torch.full_like(images[..., :2, :], -1.0))  # black border
    raw, _ = load_image_set("fashion-mnist", "test", 28)
    padded, _ = load_image_set("fashion-mnist", "test", 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], raw) and padded.dtype == torch.uint8
    resized = fit_images(raw[:4], 32, "resize")
    assert resized.shape == (4, 1, 32, 32) and resized.dtype == torch.uint8


def test_mnist_and_emoji():
    mnist = DiffusionImageDataModule(dataset="mnist", resize="resize", batch_size=4)
    mnist.setup("fit")
    assert len(mnist.train_dataset) == 59_000 and len(mnist.test_dataset) == 10_000
    train, _ = load_image_set("noto-emoji", "train")
    test, labels = load_image_set("noto-emoji", "test")
    assert train.shape[1:] == (3, 32, 32) and train.shape[0] + test.shape[0] == 3926
    assert 100 < test.shape[0] < 300 and int(labels.abs().sum()) == 0
    assert train.float().std(dim=(0, 2, 3)).min() > 20  # colour images, not grey or blank
    emoji = DiffusionImageDataModule(dataset="noto-emoji", batch_size=16)
    assert (emoji.num_classes, emoji.num_channels) == (0, 3)
    emoji.setup("fit")
    images, _ = next(iter(emoji.train_dataloader()))
    assert images.shape == (16, 3, 32, 32)


def test_bad_data_arguments():
    with pytest.raises(UserInputError, match="unknown dataset 'cifar10'"):
        DiffusionImageDataModule(dataset="cifar10")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="cannot pad the 28x28 fashion-mnist images to image_size=16"):
        DiffusionImageDataModule(image_size=16)


# --------------------------------------------------------------------------- configs and the CLI


def test_diffusion_configs_are_shipped():
    assert {"fmnist_residual.yaml", "fmnist_ancre.yaml", "dit_s2_ancre.yaml", "dit_s2_residual.yaml",
            "dit_b2_ancre.yaml", "dit_b2_residual.yaml", "fmnist_attnres.yaml", "fmnist_hyper.yaml",
            "fmnist_mhc.yaml", "fmnist_mudd.yaml"} <= set(DIFFUSION_CONFIGS)  # fmt: skip


@pytest.mark.parametrize("name,params", [("dit_s2", 32.5e6), ("dit_b2", 129.6e6)])
def test_gpu_configs_have_the_dit_paper_shapes(name, params):
    args = yaml.safe_load((CONFIGS / "diffusion" / f"{name}_ancre.yaml").read_text())["model"]["init_args"]
    keys = ("image_size", "in_channels", "patch_size", "dim", "n_layers", "n_heads", "mlp_ratio", "num_classes")
    with torch.device("meta"):
        net = DiT(**{k: args[k] for k in keys})
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.02)
    assert args["patch_size"] == 2 and args["n_layers"] == 12


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The CPU ANCRe config, trained for 3 steps with a small model; grids every 2 steps."""
    tmp = tmp_path_factory.mktemp("fmnist_ancre")
    cli = build_cli(["fit", "--config", str(CONFIGS / "diffusion" / "fmnist_ancre.yaml"), *tiny_run_args(tmp, 3),
                     *TINY_MODEL, *SMALL_DATA, "--model.init_args.sample_every_n_steps=2",
                     "--model.init_args.sample_grid=1"])  # fmt: skip
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss_ema"])
    from ancre_lightning.callbacks import EarlyExitEvaluation

    (early_exit,) = [c for c in cli.trainer.callbacks if isinstance(c, EarlyExitEvaluation)]
    assert len(early_exit.results["per_exit"]["loss"]) == 3  # K = 2 blocks: 3 exits, denoising loss each
    return Path(cli.trainer.log_dir)


def test_cpu_config_trains_logs_grids_and_checkpoints_the_ema(trained_run):
    grids = sorted(p.name for p in (trained_run / "samples").glob("*.png"))
    assert grids == ["step000002.png", "step000003.png"]  # every 2 steps and at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run), size_guidance={"images": 0}).Reload()
    assert "samples" in events.Tags()["images"]
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(ckpt["state_dict"]["ema.n_averaged"]) == 3
    restored = DiffusionModule.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", map_location="cpu")
    for key, value in ckpt["state_dict"].items():
        if key.startswith("ema."):
            torch.testing.assert_close(restored.state_dict()[key], value)
    assert not torch.equal(restored.ema.module.final.linear.weight, restored.net.final.linear.weight)


# fmnist_ancre.yaml trains in the fixture above; DiT-B/2 differs from DiT-S/2 only in the width and
# heads that the tiny overrides replace, so its configs are parsed and instantiated, not trained.
TRAINED_CONFIGS = [c for c in DIFFUSION_CONFIGS if c != "fmnist_ancre.yaml" and not c.startswith("dit_b2")]


@pytest.mark.parametrize("config", [c for c in DIFFUSION_CONFIGS if c.startswith("dit_b2")])
def test_dit_b2_configs_instantiate(config):
    cli = build_cli(["--config", str(CONFIGS / "diffusion" / config), *TINY_MODEL], run=False)
    assert isinstance(cli.model, DiffusionModule) and isinstance(cli.datamodule, DiffusionImageDataModule)
    assert cli.model.connectivity.name == config.removesuffix(".yaml").split("_")[-1]


@pytest.mark.parametrize("config", TRAINED_CONFIGS)
def test_every_diffusion_config_trains_two_steps(config, tmp_path):
    cli = build_cli(["fit", "--config", str(CONFIGS / "diffusion" / config), *tiny_run_args(tmp_path), *TINY_MODEL,
                     *SMALL_DATA, "--trainer.accelerator=cpu", "--trainer.precision=32-true"])  # fmt: skip
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.connectivity.name == config.removesuffix(".yaml").split("_")[-1]


def test_bf16_true_trains_and_draws_its_sample_grid(tmp_path):
    """Under ``precision: bf16-true`` the network is bfloat16; the sample grid, drawn outside the
    trainer's forward (float32 noise), used to fail at the patch embedding."""
    cli = build_cli(["fit", "--config", str(CONFIGS / "diffusion" / "fmnist_ancre.yaml"), *tiny_run_args(tmp_path),
                     *TINY_MODEL, *SMALL_DATA, "--trainer.precision=bf16-true",
                     "--model.init_args.sample_every_n_steps=2"])  # fmt: skip
    assert cli.trainer.global_step == 2
    assert cli.model.net.patch_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in cli.model.gate_parameters())
    grids = list(Path(cli.trainer.log_dir).glob("samples/step*.png"))
    assert [g.name for g in grids] == ["step000002.png"]


def test_own_image_folder_as_documented_in_the_gpu_config(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    data = ["--data", "ImageFolderDataModule", f"--data.root={tmp_path / 'images'}", "--data.image_size=32",
            "--data.channels=3", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.5,0.5,0.5]", "--data.min_crop_scale=1.0",
            "--data.crop_fraction=1.0", "--data.batch_size=2", "--data.num_workers=0", "--data.val_fraction=0.34"]  # fmt: skip
    cli = build_cli(["fit", "--config", str(CONFIGS / "diffusion" / "dit_s2_ancre.yaml"), *tiny_run_args(tmp_path),
                     *TINY_MODEL, *data, "--model.init_args.num_classes=2", "--model.init_args.guidance_scale=1.5",
                     "--trainer.accelerator=cpu", "--trainer.precision=32-true"])  # fmt: skip
    assert cli.trainer.global_step == 2
    images, _ = next(iter(cli.datamodule.train_dataloader()))
    assert images.min() >= -1 - 1e-6 and images.max() <= 1 + 1e-6


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.init_args.num_classes=5", "the data has 10 classes but the model's num_classes is 5"),
        ("--model.init_args.patch_size=5", "image_size=32 is not divisible by patch_size=5"),
        ("--model.init_args.sampler=ddim2", "unknown sampler 'ddim2' (did you mean 'ddim'?)"),
        ("--model.init_args.in_channels=3", "the data has 1-channel images but the model's in_channels is 3"),
        ("--data.init_args.image_size=28", "the data has 28x28 images but the model's image_size is 32"),
    ],
)
def test_bad_input_gives_one_clear_message(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "diffusion" / "fmnist_residual.yaml"), *tiny_run_args(tmp_path),
              *TINY_MODEL, *SMALL_DATA, override])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_the_module_arguments(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "DiffusionModule"])
    text = capsys.readouterr().out
    assert "--model.prediction_type" in text and "classifier-free guidance scale" in text


# --------------------------------------------------------------------------- sampling entry


def test_sample_entry_writes_pngs_and_a_grid(trained_run, tmp_path, capsys):
    out = tmp_path / "samples"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert sample_main(["--ckpt", str(ckpt), "--out", str(out), "--n", "12", "--steps", "2", "--labels", "3,7"]) == 0
    files = sorted(out.glob("0*.png"))
    assert len(files) == 12 and (out / "grid.png").is_file()
    from PIL import Image

    with Image.open(files[0]) as img:
        assert img.size == (32, 32)
    assert "wrote 12 images" in capsys.readouterr().out
    assert sample_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(out)]) == 2
    assert sample_main(["--ckpt", str(ckpt), "--out", str(out), "--sampler", "heun", "--n", "2"]) == 2
    assert "unknown sampler 'heun'" in capsys.readouterr().err


def test_grid_layout_has_one_row_per_class():
    module = tiny_module(sample_grid=2, sample_steps=2)
    images, per_row = module.sample_grid()
    assert images.shape[0] == 20 and per_row == 2
    assert math.isfinite(float(images.sum()))


@pytest.mark.slow
def test_ddp_two_processes_with_sample_grids(tmp_path):
    """Real DDP (the CLI re-launches itself, so a subprocess): grids on rank zero do not hang the other rank."""
    import os
    import subprocess
    import sys

    args = ["fit", "--config", str(CONFIGS / "diffusion" / "fmnist_ancre.yaml"), "--config",
            str(CONFIGS / "trainer" / "ddp_cpu.yaml"), *tiny_run_args(tmp_path, 4), *TINY_MODEL, *SMALL_DATA,
            "--model.init_args.sample_every_n_steps=2", "--model.init_args.sample_grid=1"]  # fmt: skip
    ancre = Path(sys.executable).with_name("ancre")
    result = subprocess.run([str(ancre), *args], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    grids = sorted(p.name for p in Path(tmp_path, "logs").rglob("samples/*.png"))
    assert grids == ["step000002.png", "step000004.png"]
    assert list(Path(tmp_path, "logs").rglob("last.ckpt"))


def test_sample_entry_reads_a_sharded_checkpoint_folder(trained_run, tmp_path):
    """A sharded (FSDP) checkpoint folder, laid out as Lightning's distributed save writes it (the
    module's state_dict in .distcp shards, the rest in meta.pt), samples the same images as the
    single file holding the same weights."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    whole = torch.load(ckpt, map_location="cpu", weights_only=True)
    folder = tmp_path / "sharded.ckpt"
    _save_state_dict({"state_dict": whole["state_dict"]}, storage_writer=FileSystemWriter(folder), no_dist=True)
    torch.save({k: v for k, v in whole.items() if k not in ("state_dict", "optimizer_states")}, folder / "meta.pt")
    args = ["--n", "3", "--steps", "2", "--labels", "3"]
    assert sample_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "from_file"), *args]) == 0
    assert sample_main(["--ckpt", str(folder), "--out", str(tmp_path / "from_shards"), *args]) == 0
    for png in sorted((tmp_path / "from_file").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "from_shards" / png.name).read_bytes(), png.name
