"""The ancre CLI end to end on the LLM: every shipped YAML runs, help and errors are clear."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ancre_lightning.cli import build_cli, main
from conftest import CONFIGS, ROOT, tiny_run_args

LLM_CONFIGS = sorted(p.name for p in (CONFIGS / "llm").glob("*.yaml"))
QUICKSTART_CONFIGS = [c for c in LLM_CONFIGS if c.startswith("quickstart") and c != "quickstart_bpe.yaml"]
PAPER_60M_CONFIGS = [c for c in LLM_CONFIGS if c.startswith("llama60m_")]
SMALL_DATA = [
    "--data.init_args.batch_size=2",
    "--data.init_args.max_train_tokens=40000",
    "--data.init_args.max_val_tokens=8000",
    "--data.init_args.num_workers=0",
    "--model.init_args.compile=false",
]


def test_llm_configs_are_shipped_for_every_connectivity():
    assert "quickstart.yaml" in LLM_CONFIGS
    for name in ("residual", "ancre", "acn", "denseformer", "attnres", "hyper", "mhc", "mudd"):
        assert f"llama60m_{name}.yaml" in LLM_CONFIGS
    for name in ("attnres", "hyper", "mhc", "mudd"):
        assert f"quickstart_{name}.yaml" in LLM_CONFIGS


def tiny_model_args() -> list[str]:
    """A paper-shape config at a width and depth that trains in a second on a CPU."""
    return ["--model.init_args.dim=32", "--model.init_args.n_layers=2", "--model.init_args.n_heads=2",
            "--model.init_args.mlp_hidden=64", "--model.init_args.compile=false"]  # fmt: skip


@pytest.mark.parametrize("config", [*QUICKSTART_CONFIGS, *PAPER_60M_CONFIGS])
def test_every_llm_config_trains_two_steps(config, tmp_path, prepared_bytes):
    """Every quickstart as shipped (on a slice of its data); the 60M paper configs (their wiring,
    optimiser, schedule and prepared-shards data section) at a tiny width over a small prepared folder
    (the other paper shapes differ only in their numbers: tests/test_paper_shapes.py)."""
    if config in PAPER_60M_CONFIGS:
        data = [f"--data.init_args.path={prepared_bytes}", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
                "--trainer.accumulate_grad_batches=1", *tiny_model_args()]  # fmt: skip
    else:
        data = SMALL_DATA
    cli = build_cli(["fit", "--config", str(CONFIGS / "llm" / config), *tiny_run_args(tmp_path), *data])
    assert cli.trainer.global_step == 2
    loss = cli.trainer.callback_metrics["val/loss"]
    assert torch.isfinite(loss)
    expected = config.removesuffix(".yaml").split("_")[-1]
    if expected != "quickstart":
        assert cli.model.connectivity.name == expected
    assert list(Path(tmp_path, "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"


def test_the_bpe_quickstart_trains_two_steps(tmp_path):
    """configs/llm/quickstart_bpe.yaml as shipped, over a folder that ``ancre prepare`` wrote from a
    slice of Wikipedia with a BPE trained on it: the model's vocabulary follows the data's."""
    from ancre_lightning.datamodules.text.prepare import prepare

    folder = tmp_path / "quickstart-bpe"
    prepare(["wikipedia"], folder, "bpe:1024", workers=1, val_fraction=0.05, max_tokens=60_000, bpe_train_bytes=2**20, verbose=False)
    cli = build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart_bpe.yaml"), *tiny_run_args(tmp_path),
                     f"--data.init_args.path={folder}", "--data.init_args.batch_size=2"])  # fmt: skip
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 1024
    assert cli.model.tokenizer.spec == "bpe:1024"
    assert torch.isfinite(cli.trainer.callback_metrics["val/bpb"])


def scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_learning_rates_come_from_the_monitor_for_every_group(tmp_path):
    """One source of learning rates: the config's LearningRateMonitor, which logs every parameter
    group (the gates' own group too); the module no longer logs train/lr for the first group."""
    build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), *SMALL_DATA,
               "--trainer.log_every_n_steps=1"])
    tags = scalar_tags(tmp_path / "logs")
    assert "train/loss" in tags and "train/lr" not in tags
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay", "lr-AdamW/gates"} <= tags, sorted(tags)


def test_every_shipped_training_config_has_a_learning_rate_monitor():
    import yaml

    configs = [*CONFIGS.glob("llm/*.yaml"), *CONFIGS.glob("classifier/*.yaml"), *CONFIGS.glob("diffusion/*.yaml"),
               *(ROOT / "experiments" / "configs").glob("*.yaml")]
    assert len(configs) > 20
    for path in configs:
        callbacks = yaml.safe_load(path.read_text())["trainer"].get("callbacks") or []
        names = [c["class_path"] for c in callbacks]
        assert "lightning.pytorch.callbacks.LearningRateMonitor" in names, path


def test_experiment_llm_config_trains_two_steps(tmp_path):
    """The config of experiments/llm_compare.py works as shipped (the driver adds seeds and paths)."""
    config = ROOT / "experiments" / "configs" / "llm_compare.yaml"
    cli = build_cli(["fit", "--config", str(config), *tiny_run_args(tmp_path), *SMALL_DATA,
                     "--model.init_args.connectivity=ancre"])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.connectivity.name == "ancre"


@pytest.mark.parametrize("trainer_config", ["cpu.yaml", "gpu.yaml"])
def test_single_process_trainer_configs(trainer_config, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--config", str(CONFIGS / "trainer" / trainer_config)]
    if trainer_config == "gpu.yaml" and not torch.cuda.is_available():
        args.append("--trainer.accelerator=cpu")  # same precision (bf16-mixed) and the rest of the config
    cli = build_cli([*args, *tiny_run_args(tmp_path), *SMALL_DATA])
    assert cli.trainer.global_step == 2
    if trainer_config == "gpu.yaml":
        assert cli.trainer.precision == "bf16-mixed"
        assert cli.model.connectivity.gate_logits.dtype == torch.float32


@pytest.mark.parametrize("connectivity", ["ancre", "denseformer"])
def test_bf16_true_keeps_the_wiring_in_float32(connectivity, tmp_path):
    """``precision: bf16-true`` stores the network in bfloat16 but the gates stay float32 (a
    bfloat16 DenseFormer used to fail in its first merge) and keep learning."""
    cli = build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), *SMALL_DATA,
                     f"--model.init_args.connectivity={connectivity}", "--model.init_args.connectivity_options={}",
                     "--trainer.precision=bf16-true"])
    assert cli.trainer.global_step == 2
    gates = cli.model.gate_parameters()
    assert gates and all(p.dtype == torch.float32 for p in gates)
    assert cli.model.net.stack.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    fresh = type(cli.model)(**{k: v for k, v in cli.model.hparams.items() if not k.startswith("_")})
    assert not all(torch.equal(p.detach().cpu(), q) for p, q in zip(gates, fresh.gate_parameters())), "gates did not learn"


def run_ancre(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ancre = Path(sys.executable).with_name("ancre")
    return subprocess.run([str(ancre), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("trainer_config", ["ddp_cpu.yaml", "ddp_gpu.yaml"])
def test_ddp_trainer_configs_run_two_processes(trainer_config, tmp_path):
    """Real DDP: two processes launched by the CLI (ddp re-launches the command, so a subprocess)."""
    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--config", str(CONFIGS / "trainer" / trainer_config)]
    if trainer_config == "ddp_gpu.yaml" and not torch.cuda.is_available():
        args += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true"]
    result = run_ancre([*args, *tiny_run_args(tmp_path), *SMALL_DATA], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr + result.stdout
    assert list(Path(tmp_path, "logs").rglob("last.ckpt"))


def test_compiled_model_trains_and_keeps_checkpoint_keys_clean(tmp_path):
    cli = build_cli(
        ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), *SMALL_DATA,
         "--model.init_args.compile=true", "--model.init_args.n_layers=2"]
    )
    assert cli.trainer.global_step == 2
    ckpt = torch.load(next(Path(tmp_path, "logs").rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and not any("_orig_mod" in k for k in ckpt["state_dict"])
    assert "net.stack.connectivity.gate_logits" in ckpt["state_dict"]


def test_validation_loss_falls_on_real_text(tmp_path):
    """A tiny ANCRe model learns byte statistics of Wikipedia: validation loss drops far below ln(257)."""
    cli = build_cli(
        ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path, steps=60),
         "--model.init_args.dim=64", "--model.init_args.n_layers=2", "--model.init_args.warmup_steps=10",
         "--data.init_args.seq_len=64", "--data.init_args.max_train_tokens=200000",
         "--data.init_args.max_val_tokens=20000", "--trainer.limit_val_batches=8"]
    )
    val_loss = float(cli.trainer.callback_metrics["val/loss"])
    assert val_loss < 3.3, f"validation loss {val_loss:.3f} did not fall from {torch.log(torch.tensor(257.0)):.3f}"


def test_help_is_built_from_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--model.help", "LLMModule"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "how the layers are wired" in text and "--model.connectivity_options" in text


def test_print_config_shows_the_resolved_config(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--print_config"])
    text = capsys.readouterr().out
    assert "connectivity: ancre" in text and "class_path: ancre_lightning.modules.LLMModule" in text


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.init_args.connectivity=ancer", "unknown connectivity 'ancer' (did you mean 'ancre'?)"),
        ("--model.init_args.connectivity_options={tau: 0}", "tau must be > 0"),
        ("--model.init_args.connectivity_options={temperature: 0.1}", "unknown option(s) ['temperature']"),
        ("--data.init_args.seq_len=300", "longer than the model allows (model max_seq_len=128)"),
        ("--data.init_args.path=/no/such/corpus.txt", "/no/such/corpus.txt"),
    ],
)
def test_bad_input_gives_one_clear_message(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_misspelt_config_key_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--model.init_args.n_layer=3"])
    assert exit_info.value.code != 0
    assert "n_layer" in capsys.readouterr().err


def test_console_script_is_installed():
    result = run_ancre(["--help"], cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "fit" in result.stdout


def test_a_run_prints_no_known_noise(tmp_path, capfd):
    """The start of a run: the parameter table without a FLOPs column of zeros, no "Total FLOPs: 0",
    no deprecation warning of the installed versions, and no note that the summary was replaced."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), *SMALL_DATA,
                   "--trainer.enable_model_summary=true"])  # fmt: skip
    out, err = capfd.readouterr()
    assert "trainable parameters" in out and "CausalLM" in out
    assert "FLOPs" not in out + err and "Total Flops" not in out + err
    assert "Trainer already configured with model summary" not in out + err
    assert not [w for w in caught if "LeafSpec" in str(w.message)], [str(w.message) for w in caught]
    build_cli(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *tiny_run_args(tmp_path), *SMALL_DATA])
    assert "trainable parameters" not in capfd.readouterr().out  # off, as in Lightning, with enable_model_summary=false
