"""Image classification: ViT, MLP-Mixer and ResNet on the ConnectedStack, the ClassifierModule, its configs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from ancre_lightning.cli import build_cli, main
from ancre_lightning.connectivity import ConnectedStack
from ancre_lightning.datamodules import CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule, MNISTDataModule
from ancre_lightning.errors import UserInputError
from ancre_lightning.models import MLPMixer, ResNet, VisionTransformer
from ancre_lightning.modules import ClassifierModule
from conftest import CONFIGS, tiny_run_args

CLASSIFIER_CONFIGS = sorted(p.name for p in (CONFIGS / "classifier").glob("*.yaml"))
CPU_CONFIGS = [c for c in CLASSIFIER_CONFIGS if "_fmnist_" in c]
WIRINGS = ["residual", "ancre", "acn", "denseformer"]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny_net(arch: str, connectivity: str = "residual", **kw) -> nn.Module:
    torch.manual_seed(0)
    if arch == "vit":
        return VisionTransformer(dim=16, depth=3, num_heads=2, patch_size=7, connectivity=connectivity, **kw)
    if arch == "mixer":
        return MLPMixer(dim=16, depth=3, patch_size=7, connectivity=connectivity, **kw)
    return ResNet(stage_depths=(1, 2, 4), stage_widths=(4, 8, 8), stem_width=4, connectivity=connectivity, **kw)


def tiny_module(arch: str = "vit", connectivity: str = "ancre", **kw) -> ClassifierModule:
    L.seed_everything(0, verbose=False)
    sizes = dict(dim=16, depth=3, num_heads=2, patch_size=7, stage_depths=(1, 4), stage_widths=(4, 8), stem_width=4)
    return ClassifierModule(arch=arch, connectivity=connectivity, warmup_steps=2, **{**sizes, **kw})


def randomize(net: nn.Module) -> nn.Module:
    """Non-zero head and gates, so that exits and wiring show up in the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("head") or "gate_logits" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("connectivity", WIRINGS)
@pytest.mark.parametrize("arch", ["vit", "mixer", "resnet"])
def test_networks_share_the_surface_of_the_llm(arch, connectivity):
    net = randomize(tiny_net(arch, connectivity))
    x = torch.randn(3, 1, 28, 28)
    logits = net(x)
    assert logits.shape == (3, 10)
    out, exits = net.forward_features(x, return_exits=True)
    k = 3  # vit, mixer: depth 3; resnet: last stage of 4 blocks = transition + 3 wired blocks
    assert len(exits) == k + 1 and net.connectivity.num_layers == k
    assert all(e.shape == out.shape for e in exits)
    torch.testing.assert_close(net.forward_head(exits[-1]), logits)
    torch.testing.assert_close(net.forward_head(out), logits)


@pytest.mark.parametrize("arch", ["vit", "mixer", "resnet"])
def test_heads_start_at_zero(arch):
    net = tiny_net(arch)
    assert torch.count_nonzero(net.head.weight) == 0 and torch.count_nonzero(net.head.bias) == 0
    assert torch.count_nonzero(net(torch.randn(2, 1, 28, 28))) == 0


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_acn_blocks_have_no_inner_residual_and_the_output_sums_the_blocks(arch):
    net = randomize(tiny_net(arch, "acn"))
    blocks = net.stack.blocks
    assert all(not b.inner_residual for b in blocks)
    x = torch.randn(2, 1, 28, 28)
    h0 = net.patch_embed(x)
    if arch == "vit":
        h0 = h0 + net.pos_embed
    # the ACN paper's forward, written out: u_j = f_j(u_{j-1}), output = h_0 + sum_j u_j
    h, total = h0, h0
    for block in blocks:
        h = block(h)
        total = total + h
    torch.testing.assert_close(net.forward_features(x), total, rtol=1e-5, atol=1e-5)
    # a residual block differs from its plain composition by exactly its input path
    res = tiny_net(arch, "residual")
    assert all(b.inner_residual for b in res.stack.blocks)


def test_resnet_wires_each_stage_and_keeps_the_transitions_residual():
    net = tiny_net("resnet", "acn")
    stacks = {name: m for name, m in net.named_modules() if isinstance(m, ConnectedStack)}
    assert list(stacks) == ["stages.1.stack", "stages.2.stack"]  # stage 0 has one block: no wiring
    assert [s.connectivity.num_layers for s in stacks.values()] == [1, 3]
    assert all(stage.transition.inner_residual for stage in net.stages)
    assert all(not b.inner_residual for s in stacks.values() for b in s.blocks)
    assert net.stages[0].stack is None
    # exits are the last stage's states: (B, 8, 7, 7) for 28x28 inputs
    _, exits = net.forward_features(torch.randn(2, 1, 28, 28), return_exits=True)
    assert [tuple(e.shape) for e in exits] == [(2, 8, 7, 7)] * 4
    bottleneck = ResNet(block="bottleneck", stage_depths=(2, 2), stage_widths=(4, 8), stem_width=8, in_chans=3)
    assert bottleneck(torch.randn(2, 3, 33, 17)).shape == (2, 10)  # any image size
    assert bottleneck.head.in_features == 32
    strided = ResNet(stage_depths=(1, 2), stage_widths=(4, 8), stem_width=4, stem_stride=2)
    assert strided.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 8, 7, 7)


def test_networks_reject_images_that_do_not_fit():
    with pytest.raises(UserInputError, match=r"not a multiple of patch_size=5.*e\.g\. 4"):
        VisionTransformer(img_size=28, patch_size=5)
    with pytest.raises(UserInputError, match="divisible by num_heads"):
        VisionTransformer(dim=30, num_heads=4)
    with pytest.raises(UserInputError, match="not a multiple"):
        MLPMixer(img_size=32, patch_size=7)
    net = tiny_net("vit")
    with pytest.raises(UserInputError, match=r"1-channel images but got 3 channels.*in_chans 3"):
        net(torch.randn(2, 3, 28, 28))
    with pytest.raises(UserInputError, match=r"28x28 images but got 32x32.*img_size 32"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(UserInputError, match="in_chans 3"):
        tiny_net("mixer")(torch.randn(2, 3, 28, 28))
    with pytest.raises(UserInputError, match="in_chans 1"):
        ResNet(in_chans=3, stage_depths=(2,), stage_widths=(4,), stem_width=4)(torch.randn(2, 1, 8, 8))
    with pytest.raises(UserInputError, match="last stage needs at least 2 blocks"):
        ResNet(stage_depths=(2, 1), stage_widths=(4, 8))
    with pytest.raises(UserInputError, match="same length"):
        ResNet(stage_depths=(2, 2), stage_widths=(4,))
    with pytest.raises(UserInputError, match="unknown connectivity"):
        tiny_net("vit", "resnet")


def test_drop_path_is_only_on_residual_branches(caplog):
    net = VisionTransformer(dim=16, depth=3, num_heads=2, patch_size=7, drop_path_rate=0.2)
    rates = [b.drop_path2.drop_prob if hasattr(b.drop_path2, "drop_prob") else 0.0 for b in net.stack.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    acn = VisionTransformer(dim=16, depth=3, num_heads=2, patch_size=7, drop_path_rate=0.2, connectivity="acn")
    assert all(isinstance(b.drop_path2, nn.Identity) for b in acn.stack.blocks)
    assert "ignored" in caplog.text


# --------------------------------------------------------------------------- module


def test_every_init_argument_is_typed_and_documented():
    """LightningCLI builds --help from these; an untyped argument would vanish from it."""
    for cls in (ClassifierModule, FashionMNISTDataModule, MNISTDataModule, CIFAR10DataModule, ImageFolderDataModule):
        doc = inspect.getdoc(cls)
        assert doc and "Args:" in doc, cls
        args_block = doc.split("Args:", 1)[1]
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self":
                continue
            assert param.annotation is not inspect.Parameter.empty, f"{cls.__name__}.{name} is untyped"
            assert re.search(rf"^\s+{name}: \S", args_block, re.M), f"{cls.__name__}.{name} is not documented"


@pytest.mark.parametrize("arch", ["vit", "mixer", "resnet"])
def test_exit_predictions_give_k_plus_one_logits_and_the_last_is_the_network(arch):
    module = tiny_module(arch)
    randomize(module.net)
    images, labels = torch.randn(5, 1, 28, 28), torch.randint(0, 10, (5,))
    outputs, target = module.exit_predictions((images, labels))
    assert len(outputs) == 4 and all(o.shape == (5, 10) for o in outputs)
    assert target is labels
    torch.testing.assert_close(outputs[-1], module(images))
    metrics = module.exit_metrics(outputs[0], target)
    assert set(metrics) == {"loss", "accuracy", "top5_accuracy"}
    assert 0 <= metrics["accuracy"] <= metrics["top5_accuracy"] <= 1
    assert module.exit_primary_metric == ("accuracy", True) and module.exit_task == "classification"


def test_gates_of_every_stage_get_their_own_undecayed_group():
    module = tiny_module("resnet", "ancre", stage_depths=(3, 3))
    assert list(module.connectivities()) == ["stages.0.stack", "stages.1.stack"]
    groups = {g["name"]: g for g in module.parameter_groups()}
    gates = groups["gates"]["params"]
    assert len(gates) == 2 and groups["gates"]["weight_decay"] == 0.0
    assert all(p.dtype == torch.float32 for p in gates)
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert all(id(p) not in decayed for p in gates)
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])


def test_learned_position_table_is_not_decayed():
    learned = tiny_module("vit", pos_embed="learned")
    groups = {g["name"]: {id(p) for p in g["params"]} for g in learned.parameter_groups()}
    assert id(learned.net.pos_embed) in groups["no_decay"] and id(learned.net.pos_embed) not in groups["decay"]
    assert id(learned.net.patch_embed.proj.weight) in groups["decay"]
    assert tiny_module("vit").net.no_weight_decay() == set()  # sin-cos positions are a buffer


def test_training_step_with_mixup_and_cutmix_uses_soft_targets():
    module = tiny_module("mixer", mixup_alpha=0.8, cutmix_alpha=1.0)
    module.log = lambda *a, **k: None  # not attached to a trainer
    module._trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": 1.0}])], world_size=1)
    loss = module.training_step((torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(UserInputError, match="even batch size"):
        module.training_step((torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))), 0)


def fake_attach(module: ClassifierModule, **data) -> None:
    defaults = dict(num_classes=10, num_channels=1, image_size=28, batch_size=8)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(**{**defaults, **data}))


def test_setup_says_how_to_match_the_model_to_the_data():
    module = tiny_module("vit")
    fake_attach(module)
    module.setup("fit")  # matches
    for data, message in (
        (dict(num_classes=100), r"100 classes.*num_classes 100"),
        (dict(num_channels=3), r"3-channel.*in_chans 3"),
        (dict(image_size=32), r"32x32.*img_size 32"),
    ):
        fake_attach(module, **data)
        with pytest.raises(UserInputError, match=message):
            module.setup("fit")
    resnet = tiny_module("resnet")
    fake_attach(resnet, image_size=32)
    resnet.setup("fit")  # a ResNet takes any size
    mixup = tiny_module("resnet", mixup_alpha=0.2)
    fake_attach(mixup, batch_size=7)
    with pytest.raises(UserInputError, match="even --data.init_args.batch_size"):
        mixup.setup("fit")
    with pytest.raises(UserInputError, match="unknown arch"):
        ClassifierModule(arch="convnext")


# --------------------------------------------------------------------------- configs and CLI


def test_configs_cover_every_model_and_wiring():
    for arch in ("vit", "mixer", "resnet"):
        for wiring in ("residual", "ancre", "acn"):
            assert f"{arch}_fmnist_{wiring}.yaml" in CLASSIFIER_CONFIGS
    for name in ("vit_s16", "mixer_cifar10"):
        for wiring in ("residual", "acn"):
            assert f"{name}_{wiring}.yaml" in CLASSIFIER_CONFIGS
    for wiring in ("attnres", "hyper", "mhc", "mudd"):
        assert f"vit_fmnist_{wiring}.yaml" in CLASSIFIER_CONFIGS


def image_folder(root: Path, classes: int = 3, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("config", CLASSIFIER_CONFIGS)
def test_every_config_builds_its_model_and_data(config, tmp_path):
    extra = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"]  # the GPU configs, on this machine
    if config.startswith("vit_s16"):
        extra += [f"--data.init_args.root={image_folder(tmp_path / 'images')}", "--model.init_args.num_classes=3"]
    cli = build_cli(["--config", str(CONFIGS / "classifier" / config), *extra], run=False)
    wiring = config.removesuffix(".yaml").split("_")[-1]
    assert all(c.name == wiring for c in cli.model.connectivities().values())
    data = cli.datamodule
    hp = cli.model.hparams
    assert (hp.num_classes, hp.in_chans) == (data.num_classes, data.num_channels)
    if hp.arch != "resnet":
        assert hp.img_size == data.image_size
    callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "EarlyExitEvaluation" in callbacks and "ModelCheckpoint" in callbacks


@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_cpu_configs_train_two_steps_with_early_exit_evaluation(config, tmp_path):
    # limit_val_batches=1 would parse as the float 1.0 (= every batch), so 2
    args = [*tiny_run_args(tmp_path), "--trainer.limit_val_batches=2", "--data.init_args.batch_size=16",
            "--data.init_args.max_train_samples=64"]  # fmt: skip
    cli = build_cli(["fit", "--config", str(CONFIGS / "classifier" / config), *args])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and 0 <= metrics["val/acc1"] <= 1
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyExitEvaluation")
    results = evaluation.results
    assert results is not None and results["primary"] == "accuracy"
    assert len(results["per_exit"]["accuracy"]) == cli.model.net.connectivity.num_layers + 1
    assert 0 <= results["cutoff_layer"] <= results["num_blocks"]
    assert "early_exit/cutoff_layer" in metrics or list(Path(tmp_path, "logs").rglob("events.out.tfevents.*"))


def test_short_names_resolve_and_bad_input_is_one_line(tmp_path, capsys):
    cli = build_cli(["--model", "ClassifierModule", "--data", "FashionMNISTDataModule", "--model.init_args.arch=resnet",
                     "--model.init_args.stage_depths=[1, 2]", "--model.init_args.stage_widths=[4, 8]"], run=False)  # fmt: skip
    assert isinstance(cli.model, ClassifierModule) and isinstance(cli.datamodule, FashionMNISTDataModule)
    cases = [
        (["--data.init_args.root", str(tmp_path / "missing")], "does not exist"),
        (["--model.init_args.patch_size", "5"], "not a multiple of patch_size=5"),
    ]
    base = ["fit", "--model", "ClassifierModule", "--data", "ImageFolderDataModule", "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    for extra, message in cases:
        if "--data.init_args.root" not in extra:
            extra = [*extra, "--data.init_args.root", str(image_folder(tmp_path / "imgs"))]
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    main([*base, "--data.init_args.root", str(tmp_path / "imgs"), "--data.init_args.image_size=28",
          "--data.init_args.num_workers=0", "--model.init_args.in_chans=3", "--model.init_args.num_classes=3",
          "--model.init_args.dim=16", "--model.init_args.num_heads=2", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("config", ["vit_s16_acn.yaml", "mixer_cifar10_residual.yaml"])
def test_paper_shape_configs_train_a_step_on_cpu(config, tmp_path, monkeypatch):
    """The GPU configs, on CPU in float32, with a tiny local folder (ViT-S/16) or a fake CIFAR-10 load."""
    args = [*tiny_run_args(tmp_path, steps=1), "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            "--data.init_args.batch_size=4", "--data.init_args.num_workers=0"]  # fmt: skip
    if config.startswith("vit_s16"):
        args += [f"--data.init_args.root={image_folder(tmp_path / 'images', size=230)}", "--model.init_args.num_classes=3"]
    else:
        rng = np.random.default_rng(0)
        fake = {
            "train_images": rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, 64),
            "test_images": rng.integers(0, 256, (16, 3, 32, 32), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, 16),
        }
        args += ["--data.init_args.val_size=16"]
        monkeypatch.setattr(CIFAR10DataModule, "prepare_data", lambda self: None)
        monkeypatch.setattr(CIFAR10DataModule, "load_arrays", lambda self: fake)
    cli = build_cli(["fit", "--config", str(CONFIGS / "classifier" / config), *args])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


@pytest.mark.slow
def test_a_small_resnet_learns_fashion_mnist(tmp_path):
    """Three hundred steps on 9,600 images: clearly above chance (a learning check, not the quality bar)."""
    cli = build_cli([
        "fit", "--config", str(CONFIGS / "classifier" / "resnet_fmnist_residual.yaml"), *tiny_run_args(tmp_path, 300),
        "--trainer.limit_val_batches=10", "--data.init_args.batch_size=32", "--data.init_args.max_train_samples=9600",
        "--model.init_args.warmup_steps=30",
    ])  # fmt: skip
    assert cli.trainer.callback_metrics["val/acc1"] > 0.6  # chance is 0.1
