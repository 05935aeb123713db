"""Incremental decoding with a key/value cache and ``ancre generate``.

Every wiring mixes the layers' states over depth position by position, so caching keys and values
along the sequence must give the logits of recomputing the whole prefix: checked for every wiring
at both granularities in float64, and through the CLI on a checkpoint trained here on Wikipedia.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ancre_lightning.cli import main as ancre_main
from ancre_lightning.datamodules.text.tokenizers import ByteTokenizer
from ancre_lightning.generate import generate, generate_tokens, load_llm_checkpoint, next_token, prompt_token_ids
from ancre_lightning.models import CausalLM

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: (connectivity, options): every wiring of the registry
WIRINGS = [
    ("residual", {}),
    ("ancre", {}),
    ("acn", {}),
    ("denseformer", {}),
    ("fixed", {"edges": ["0:2", "1:2"]}),
    ("attnres", {}),
    ("attnres", {"block_size": 2}),
    ("hyper", {"streams": 3, "dynamic": True}),
    ("mhc", {"streams": 3}),
    ("mudd", {}),
]


def float64_model(connectivity: str, options: dict, granularity: str, max_seq_len: int = 12) -> CausalLM:
    """A tiny float64 decoder whose every parameter (wiring included) is moved off its
    initialisation, so that zero-initialised per-token parts (queries, projections) do something."""
    torch.manual_seed(0)
    net = CausalLM(
        50, dim=16, n_layers=2, n_heads=2, max_seq_len=max_seq_len, connectivity=connectivity,
        connectivity_options=options, granularity=granularity,
    ).double()  # fmt: skip
    net.stack.connectivity.float()  # the wiring stays float32, as in training (DESIGN.md: gates are float32)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return net.eval()


#: Float64 rounding, for every wiring: the wiring's float32 parameters are read in float64 next to
#: float64 states (its computations run in float32 or better, the better of the two), so a product
#: over T positions and the same product over one position differ only in float64 rounding. A wrong
#: position, mask or cache slot changes the logits (of order 1) by more than 1e-2.
WIRING_TOLERANCE = 1e-10


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("connectivity,options", WIRINGS, ids=[f"{c}{o.get('block_size', '')}" for c, o in WIRINGS])
def test_cached_decoding_equals_recomputing_the_prefix(connectivity, options, granularity):
    """Greedy tokens are the same, and every step's logits agree to float64 rounding, including
    across the window slide (prompt 5 + 14 new tokens > max_seq_len 12)."""
    net = float64_model(connectivity, options, granularity)
    prompt = [3, 17, 5, 42, 8]
    cached = generate_tokens(net, prompt, 14, temperature=0, use_cache=True, keep_logits=True)
    plain = generate_tokens(net, prompt, 14, temperature=0, use_cache=False, keep_logits=True)
    assert cached.tokens == plain.tokens and len(cached.tokens) == 14
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=WIRING_TOLERANCE)
    assert len(set(cached.tokens)) > 1, "a degenerate model would make the comparison meaningless"


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("connectivity,options", [("ancre", {}), ("mhc", {"streams": 2})])
def test_a_prefill_then_chunks_equal_the_full_forward(connectivity, options, granularity):
    """Several new tokens at once after cached ones (the mask is causal within the new tokens)."""
    net = float64_model(connectivity, options, granularity)
    ids = torch.randint(0, 50, (2, 12))
    full = net(ids)  # (2, 12, V)
    cache = net.new_cache(batch_size=2)
    with torch.no_grad():
        parts = [net(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full.detach(), rtol=0, atol=WIRING_TOLERANCE)


def test_the_training_forward_is_unchanged_by_the_cache_code():
    """Without a cache the forward is the plain one: the hidden states of ``features_only`` feed the
    same head bit for bit, and the training loss is the float32 cross-entropy of the logits."""
    net = float64_model("ancre", {}, "block").float().train()
    ids = torch.randint(0, 50, (2, 12))
    logits = net(ids)
    assert torch.equal(net.forward_head(net(ids, features_only=True)), logits)
    assert torch.equal(logits, net.forward_head(net.forward_features(ids)))


def test_generation_leaves_the_wiring_statistics_and_mode_as_they_were():
    net = float64_model("attnres", {}, "sublayer").train()
    net(torch.randint(0, 50, (2, 12)))
    before = net.connectivity.coefficients().clone()
    generate_tokens(net, [1, 2, 3], 4, temperature=0)
    assert torch.equal(net.connectivity.coefficients(), before) and net.training


def test_sampling_is_reproducible_with_a_seed_and_top_k_restricts_it():
    net = float64_model("residual", {}, "block")
    a = generate_tokens(net, [1, 2], 8, temperature=1.5, seed=7).tokens
    assert a == generate_tokens(net, [1, 2], 8, temperature=1.5, seed=7).tokens
    assert a != generate_tokens(net, [1, 2], 8, temperature=1.5, seed=8).tokens
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert {next_token(logits, 10.0, top_k=2, generator=gen) for _ in range(200)} == {1, 2}
    assert next_token(logits, 0.0) == 1


def test_generation_stops_at_end_of_document():
    net = float64_model("residual", {}, "block")
    first = generate_tokens(net, [1, 2], 1, temperature=0).tokens[0]
    result = generate_tokens(net, [1, 2], 10, temperature=0, eos_id=first)
    assert result.tokens == [] and result.stopped_at_eos


# --------------------------------------------------------------------------- the command


def test_bad_checkpoints_are_one_line(tmp_path, capsys):
    """Missing, not a checkpoint, and a malicious pickle: one `ancre: error:` line each, exit 2,
    and the pickle's code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": Payload()}, evil)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    for path, message in [
        (tmp_path / "missing.ckpt", "does not exist"),
        (text, "is not a PyTorch checkpoint"),
        (evil, "not a checkpoint that can be loaded safely"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            ancre_main(["generate", "--ckpt_path", str(path), "--prompt", "x"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and err.startswith("ancre: error:") and message in err
        assert len(err.splitlines()) == 1, err
    assert not marker.exists()


def test_a_checkpoint_of_another_domain_is_refused(tmp_path, capsys):
    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(2)},
                "hyper_parameters": {"_class_path": "ancre_lightning.modules.ClassifierModule", "num_classes": 10}}, path)  # fmt: skip
    with pytest.raises(SystemExit):
        ancre_main(["generate", "--ckpt_path", str(path), "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert "is not an LLM checkpoint" in err and "ClassifierModule" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("option", ["--temperature=-1", "--top_k=0", "--max_new_tokens=-3", "--bogus=1"])
def test_bad_options_are_one_line(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ancre_main(["generate", "--ckpt_path", str(tmp_path / "x.ckpt"), "--prompt", "x", option])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("ancre: error:") and len(err.splitlines()) == 1


WIKI_PREFIX = "The city is located on the banks of the river"


def train_quickstart(tmp, *overrides: str) -> Path:
    """Train the byte-level quickstart config through `ancre fit` into ``tmp``; its last.ckpt."""
    ancre_main([
        "fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), *overrides,
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
    ])  # fmt: skip
    return next((tmp / "logs").rglob("last.ckpt"))


@pytest.fixture(scope="module")
def trained_quickstart(tmp_path_factory):
    """The quickstart, smaller (4 x 96, batch 8, 400 steps, one validation): about 25 s on one core."""
    return train_quickstart(
        tmp_path_factory.mktemp("quickstart"),
        "--model.init_args.dim=96", "--model.init_args.n_layers=4", "--model.init_args.warmup_steps=20",
        "--data.init_args.batch_size=8", "--data.init_args.max_train_tokens=400000",
        "--data.init_args.max_val_tokens=8192", "--trainer.max_steps=400", "--trainer.val_check_interval=400",
        "--trainer.limit_val_batches=2",
    )  # fmt: skip


def byte_loss(module, tokenizer, prompt: str, continuation: str) -> float:
    """Mean next-byte loss (nats) of ``continuation`` after ``prompt`` under ``module``: of its
    bytes in the last window of ``max_seq_len`` predictions when the text is longer."""
    ids = torch.tensor([prompt_token_ids(tokenizer, prompt + continuation)])  # (1, N)
    first = max(0, ids.shape[1] - 1 - module.net.max_seq_len)  # the window ids[first:]
    window = ids[:, first:]
    start = max(len(prompt_token_ids(tokenizer, prompt)), first + 1) - first  # first continuation byte in it
    with torch.no_grad():
        logits = module.net(window[:, :-1])  # (1, W-1, V)
    return float(F.cross_entropy(logits[0, start - 1 :], window[0, start:]))


def check_continues_english(ckpt: Path, capsys, max_new_tokens: int, min_words: int, max_loss_ratio: float) -> str:
    """Greedy `ancre generate` from ``ckpt`` after a Wikipedia sentence prefix; the continuation must
    be mostly letters and spaces, hold ``min_words`` distinct words (not one word repeated), and be
    far more likely under the trained model than under the same model untrained (per-byte loss
    below ``max_loss_ratio`` times the untrained one, which is near ln 257 = 5.55)."""
    capsys.readouterr()  # what training printed
    ancre_main(["generate", "--ckpt_path", str(ckpt), "--prompt", WIKI_PREFIX,
                "--max_new_tokens", str(max_new_tokens), "--temperature", "0", "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(WIKI_PREFIX)
    continuation = out[len(WIKI_PREFIX) :].rstrip("\n")
    assert len(continuation) >= max_new_tokens // 2, continuation
    letters = sum(c.isalpha() or c == " " for c in continuation) / len(continuation)
    assert letters > 0.8, f"not mostly letters and spaces: {continuation!r}"
    assert len(set(continuation.split())) >= min_words, f"too few distinct words: {continuation!r}"
    module, tokenizer = load_llm_checkpoint(str(ckpt))
    assert isinstance(tokenizer, ByteTokenizer)
    trained = byte_loss(module, tokenizer, WIKI_PREFIX, continuation)
    torch.manual_seed(0)
    fresh = type(module)(**{k: v for k, v in module.hparams.items() if not k.startswith("_")}).eval()
    untrained = byte_loss(fresh, tokenizer, WIKI_PREFIX, continuation)
    assert untrained > math.log(257) - 0.5 and trained < max_loss_ratio * untrained, (continuation, trained, untrained)
    # greedy is deterministic, and decoding without the cache writes the same text
    assert generate(module, tokenizer, WIKI_PREFIX, max_new_tokens, temperature=0, use_cache=False) == continuation
    return continuation


def test_the_trained_quickstart_continues_a_wikipedia_sentence(trained_quickstart, capsys):
    check_continues_english(trained_quickstart, capsys, max_new_tokens=80, min_words=3, max_loss_ratio=0.5)


@pytest.mark.slow
def test_the_full_quickstart_continues_a_wikipedia_sentence(tmp_path, capsys):
    """The shipped quickstart as `make demo` trains it (600 steps, about 4 minutes on 2 cores);
    200 new bytes, so the 128-byte window slides."""
    check_continues_english(train_quickstart(tmp_path), capsys, max_new_tokens=200, min_words=6, max_loss_ratio=0.3)


def test_the_checkpoint_carries_its_tokenizer(trained_quickstart):
    ckpt = torch.load(trained_quickstart, map_location="cpu", weights_only=True)
    assert ckpt["tokenizer"] == ByteTokenizer().to_state()


def test_an_old_checkpoint_without_tokenizer_is_byte_level(trained_quickstart, tmp_path):
    ckpt = torch.load(trained_quickstart, map_location="cpu", weights_only=True)
    del ckpt["tokenizer"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    module, tokenizer = load_llm_checkpoint(str(old))
    assert isinstance(tokenizer, ByteTokenizer)
    assert generate(module, tokenizer, "The", 5, temperature=0)


def test_a_bpe_checkpoint_generates_with_its_own_tokenizer(tmp_path, capsys):
    """A checkpoint whose tokenizer is a trained byte-level BPE (multi-byte tokens): `ancre generate`
    rebuilds it from the checkpoint alone (weights_only) and decodes with it."""
    from ancre_lightning.datamodules.text.tokenizers import train_bpe
    from ancre_lightning.modules import LLMModule

    texts = ["the river flows through the city and the valley"] * 20 + ["a bridge crosses the river"] * 20
    tokenizer = train_bpe(texts, 300, cache_dir=tmp_path)
    assert max(tokenizer.token_byte_lengths()) > 1
    torch.manual_seed(0)
    module = LLMModule(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=32)
    module.set_tokenizer(tokenizer)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "bpe.ckpt")
    loaded, loaded_tokenizer = load_llm_checkpoint(str(tmp_path / "bpe.ckpt"))
    assert loaded_tokenizer.to_state() == tokenizer.to_state()
    ancre_main(["generate", "--ckpt_path", str(tmp_path / "bpe.ckpt"), "--prompt", "the river",
                "--max_new_tokens", "10", "--temperature", "1", "--seed", "3", "--device", "cpu"])  # fmt: skip
    first = capsys.readouterr().out
    ancre_main(["generate", "--ckpt_path", str(tmp_path / "bpe.ckpt"), "--prompt", "the river",
                "--max_new_tokens", "10", "--temperature", "1", "--seed", "3", "--device", "cpu"])  # fmt: skip
    assert first.startswith("the river") and capsys.readouterr().out == first  # the same seed, the same text
