"""LLMModule training a Hugging Face transformers causal LM (``hf_config``, ``hf_weights``): the
network is the transformers model, its early exits are the plain model's own per-layer states,
saved weights load, the shipped config trains, resumes exactly and generates, and bad input gets
one clear line. (rewire on transformers models itself: tests/test_rewire_transformers.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import LLMModule

transformers = pytest.importorskip("transformers")

from ancre_lightning.cli import build_cli  # noqa: E402
from ancre_lightning.generate import generate_tokens, load_llm_checkpoint  # noqa: E402
from ancre_lightning.models.hf_causal_lm import HFCausalLM  # noqa: E402
from conftest import CONFIGS, tiny_run_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
HF_CONFIG = CONFIGS / "llm" / "hf_llama_quickstart_ancre.yaml"
SMALL_DATA = ["--data.init_args.batch_size=2", "--data.init_args.seq_len=32", "--data.init_args.max_train_tokens=20000",
              "--data.init_args.max_val_tokens=4000", "--data.init_args.num_workers=0"]  # fmt: skip


def plain_model(settings: dict) -> torch.nn.Module:
    settings = dict(settings)
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), vocab_size=257, **settings)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("settings", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_residual_exits_are_the_plain_models_states_and_logits(settings):
    """With the residual wiring, exit k is what the unwired transformers model computes after k
    layers (its own ``output_hidden_states``) and the head on the last exit gives its logits; in
    float64, where only summation order could differ."""
    torch.manual_seed(0)
    module = LLMModule(vocab_size=257, hf_config=settings, connectivity="residual").double().eval()
    assert isinstance(module.net, HFCausalLM)
    plain = plain_model(settings).double().eval()
    plain.load_state_dict(module.net.model.state_dict())  # residual adds no key
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        out = plain(input_ids=ids, output_hidden_states=True)
        _, exits = module.net.forward_features(ids, return_exits=True)
        logits = module(ids)
    assert len(exits) == 4
    for k in range(3):  # hidden_states[3] is after the final norm
        torch.testing.assert_close(exits[k], out.hidden_states[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(module.net.forward_head(exits[-1]), out.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-12)


def test_ancre_exits_reach_the_head_like_the_output():
    """With ANCRe, the last exit through the head is the model's logits, and the exits differ from
    one another (the wiring, not one state repeated)."""
    torch.manual_seed(0)
    module = LLMModule(vocab_size=257, hf_config=LLAMA, connectivity="ancre").double().eval()
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        _, exits = module.net.forward_features(ids, return_exits=True)
        torch.testing.assert_close(module.net.forward_head(exits[-1]), module(ids), rtol=0, atol=1e-12)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(exits, exits[1:]))


def test_saved_transformers_weights_load_before_rewiring(tmp_path):
    """A folder written by ``save_pretrained`` (config.json, model.safetensors without the tied
    head) is a config and weights: residual reproduces the saved model's logits, ANCRe keeps its
    block weights and adds only the wiring."""
    torch.manual_seed(0)
    saved = plain_model({**LLAMA, "tie_word_embeddings": True}).eval()
    saved.save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")
    ids = torch.randint(0, 257, (1, 10))
    residual = LLMModule(vocab_size=257, hf_config=str(tmp_path), hf_weights=weights, connectivity="residual").eval()
    with torch.no_grad():
        assert torch.equal(residual(ids), saved(input_ids=ids).logits)  # same operations in the same order
    ancre = LLMModule(vocab_size=257, hf_config=str(tmp_path / "config.json"), hf_weights=weights, connectivity="ancre")
    own = ancre.net.model.state_dict()
    for key, value in saved.state_dict().items():
        assert torch.equal(own[key], value), key
    assert {k for k in own if k not in saved.state_dict()} == {"model.layers.connectivity.gate_logits", "model.layers.connectivity.tau"}


def test_config_vocabulary_and_positions_come_from_the_transformers_config():
    module = LLMModule(vocab_size=257, hf_config={**LLAMA, "vocab_size": 300})
    assert module.hparams.vocab_size == 300 and module.net.vocab_size == 300
    assert module.max_seq_len == 64
    assert LLMModule(vocab_size=257, hf_config=GPT2).max_seq_len == 64


@pytest.mark.parametrize("hf_config,message", [
    ({"hidden_size": 32}, "has no model_type"),
    ({"model_type": "no_such_model"}, "no model_type 'no_such_model'"),
    ("missing/config.json", "is not a local config.json"),
])  # fmt: skip
def test_bad_hf_config_is_one_clear_line(hf_config, message):
    with pytest.raises(UserInputError, match=message) as err:
        LLMModule(vocab_size=257, hf_config=hf_config)
    assert "\n" not in str(err.value)


def test_a_config_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{model_type: llama")
    with pytest.raises(UserInputError, match="could not be read as JSON"):
        LLMModule(vocab_size=257, hf_config=str(tmp_path))


def test_weights_without_a_config_are_refused():
    with pytest.raises(UserInputError, match="set hf_config too"):
        LLMModule(vocab_size=257, hf_weights="model.safetensors")


def test_without_transformers_the_hf_paths_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(UserInputError, match=r"needs the optional package transformers: pip install 'ancre-lightning\[hf\]'"):
        LLMModule(vocab_size=257, hf_config=LLAMA)


def test_the_shipped_hf_quickstart_trains_and_generates(tmp_path):
    """configs/llm/hf_llama_quickstart_ancre.yaml as shipped (two steps on a slice of its data):
    every callback of the quickstart runs (gate pictures, early exits), and ``ancre generate``'s
    decoding of the checkpoint gives the same greedy tokens and logits with and without the cache."""
    cli = build_cli(["fit", "--config", str(HF_CONFIG), *tiny_run_args(tmp_path), *SMALL_DATA])
    assert cli.trainer.global_step == 2
    assert isinstance(cli.model.net, HFCausalLM) and cli.model.connectivity.name == "ancre"
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("gates/wiring_step*.png")) and list(log_dir.glob("early_exit/*_tables.md"))
    module, tokenizer = load_llm_checkpoint(str(next(log_dir.rglob("last.ckpt"))))
    prompt = [tokenizer.eos_id, *tokenizer.encode("The river")]
    cached = generate_tokens(module, prompt, 12, temperature=0, keep_logits=True)
    uncached = generate_tokens(module, prompt, 12, temperature=0, use_cache=False, keep_logits=True)
    assert cached.tokens == uncached.tokens and len(cached.tokens) == 12
    # float32 over a few dozen ops: the cached path attends to stored keys instead of recomputed
    # ones, which changes summation order only (rounding ~1e-7 relative on logits of order 1-10)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-4)


def test_data_longer_than_the_config_allows_is_refused(tmp_path):
    with pytest.raises(UserInputError, match=r"seq_len=256 .* raise max_position_embeddings"):
        build_cli(["fit", "--config", str(HF_CONFIG), *tiny_run_args(tmp_path), *SMALL_DATA[:-4],
                   "--data.init_args.seq_len=256", "--data.init_args.max_train_tokens=20000"])  # fmt: skip


def test_config_json_path_in_yaml(tmp_path):
    """hf_config may name a local config.json; the config.json's bookkeeping keys are ignored."""
    (tmp_path / "config.json").write_text(json.dumps({**GPT2, "architectures": ["GPT2LMHeadModel"], "transformers_version": "5.0"}))
    module = LLMModule(vocab_size=257, hf_config=str(tmp_path / "config.json"), connectivity="hyper",
                       granularity="sublayer", connectivity_options={"streams": 2})  # fmt: skip
    assert module.connectivity.num_layers == 6  # 3 GPT-2 blocks, attention and MLP each
    loss = module.lm_loss(module(torch.randint(0, 257, (2, 8))), torch.randint(0, 257, (2, 8)))
    loss.backward()
    assert all(p.grad is not None for p in module.connectivity.parameters() if p.requires_grad)


def test_the_hf_rewire_report_script_runs_as_typed(tmp_path):
    """``python experiments/hf_rewire_report.py`` (the README's command) at a tiny size: the JSON
    names every wiring, residual is exactly the unwired model, and cached generation matches."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(CONFIGS.parent / "experiments" / "hf_rewire_report.py"), "--out", str(out), "--layers", "2",
           "--hidden", "32", "--heads", "2", "--intermediate", "64", "--vocab", "64", "--seq", "8",
           "--prompt-tokens", "4", "--new-tokens", "4", "--runs", "1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    wirings = {r["wiring"] for r in report["logits"]}
    assert {"residual", "ancre", "denseformer", "hyper", "mhc", "mudd"} <= wirings
    residual = next(r for r in report["logits"] if r["wiring"] == "residual")
    assert residual["max_abs_diff"] == 0.0
    assert report["generation"] and all(row["same_tokens_with_and_without_cache"] for row in report["generation"])
