"""The papers' LLaMA shapes: every shipped config builds, and its size is GaLore's / the ANCRe paper's.

The ANCRe paper trains LLaMA 60M / 130M / 350M / 1B in GaLore's shapes. With residual wiring and a
32,000-token vocabulary (untied embeddings), our model must have exactly the parameters of
Hugging Face ``LlamaForCausalLM`` built from GaLore's config of the same name: the shape numbers
below are typed from GaLore's configs, independently of the YAML files they check.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml

from ancre_lightning.modules import LLMModule
from conftest import CONFIGS

# GaLore's llama_{name}.json: hidden_size, intermediate_size, num_attention_heads, num_hidden_layers,
# and the parameter count of LlamaForCausalLM with vocab_size 32000, rounded as the names quote it.
GALORE = {
    "60m": (512, 1376, 8, 8, "58.07M"),
    "130m": (768, 2048, 12, 12, "134.11M"),
    "350m": (1024, 2736, 16, 24, "367.97M"),
    "1b": (2048, 5461, 32, 24, "1339.08M"),
}
PAPER_WIRINGS = ("residual", "ancre", "denseformer", "hyper", "mhc", "attnres")
PAPER_CONFIGS = sorted(p.name for p in (CONFIGS / "llm").glob("llama*_*.yaml"))


def model_args(config: str) -> dict:
    return dict(yaml.safe_load((CONFIGS / "llm" / config).read_text())["model"]["init_args"])


def count_on_meta(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_paper_shape_is_shipped_for_every_wiring():
    for shape in GALORE:
        for wiring in PAPER_WIRINGS:
            assert f"llama{shape}_{wiring}.yaml" in PAPER_CONFIGS, (shape, wiring)


@pytest.mark.parametrize("shape", list(GALORE))
def test_residual_shape_has_the_parameters_of_hf_llama(shape):
    transformers = pytest.importorskip("transformers")
    hidden, intermediate, heads, layers, quoted = GALORE[shape]
    hf_config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
        num_hidden_layers=layers, num_key_value_heads=heads, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
        ours = LLMModule(vocab_size=32000, **model_args(f"llama{shape}_residual.yaml"))
    n_hf, n_ours = count_on_meta(hf), count_on_meta(ours)
    assert n_ours == n_hf, (shape, n_ours, n_hf)
    assert f"{n_ours / 1e6:.2f}M" == quoted.replace(",", "")


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_every_paper_config_builds_with_its_own_options(config):
    """Every option of the model and data sections is an argument of its class, and the network
    builds (on the meta device: no memory) with the shape of its name."""
    from ancre_lightning.datamodules import TokenShardsDataModule

    raw = yaml.safe_load((CONFIGS / "llm" / config).read_text())
    shape, wiring = config.removesuffix(".yaml").removeprefix("llama").split("_")
    hidden, intermediate, heads, layers, _ = GALORE[shape]
    args = model_args(config)
    assert (args["dim"], args["mlp_hidden"], args["n_heads"], args["n_layers"]) == (hidden, intermediate, heads, layers)
    assert args["max_seq_len"] == raw["data"]["init_args"]["seq_len"] == 256
    assert "vocab_size" not in args, "the vocabulary comes from the data's tokenizer"
    inspect.signature(TokenShardsDataModule).bind(**raw["data"]["init_args"])
    with torch.device("meta"):
        module = LLMModule(vocab_size=32000, **args)
    assert module.connectivity.name == wiring
    blocks_and_wiring = count_on_meta(module) - 2 * 32000 * hidden
    assert blocks_and_wiring >= layers * (4 * hidden * hidden + 3 * hidden * intermediate)
