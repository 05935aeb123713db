"""The LLM module's loss at large vocabularies, bits per byte, the tokenizer in the checkpoint and
the parameter count."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ancre_lightning.callbacks import EarlyExitEvaluation
from ancre_lightning.datamodules.text.tokenizers import ByteTokenizer, Tokenizer
from ancre_lightning.errors import UserInputError
from ancre_lightning.models.llama import RMSNorm
from ancre_lightning.modules import LLMModule
from ancre_lightning.modules.llm import chunked_cross_entropy, resolve_loss_chunk_tokens

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(chunk):
    """float64: value and gradients (states, head, norm) of the chunked loss equal
    ``F.cross_entropy(head(norm(h)), y, reduction="sum")`` to float64 rounding."""
    torch.manual_seed(0)
    n, d, v = 100, 16, 300
    norm, head = RMSNorm(d).double(), torch.nn.Linear(d, v, bias=False).double()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(d, dtype=torch.float64))
    hidden = torch.randn(4, n // 4, d, dtype=torch.float64, requires_grad=True)  # (B, T, D)
    labels = torch.randint(0, v, (4, n // 4))

    def grads(loss):
        params = [hidden, head.weight, norm.weight]
        return [g.clone() for g in torch.autograd.grad(loss, params)]

    plain = F.cross_entropy(head(norm(hidden)).flatten(0, 1), labels.flatten(), reduction="sum")
    chunked = chunked_cross_entropy(hidden, labels, lambda h: head(norm(h)), chunk)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
    for got, want in zip(grads(chunked), grads(plain)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_module_loss_is_the_same_chunked_or_not():
    """float64 LLMModule at a 300-token vocabulary: the chunked next-token loss and the gradient of
    every parameter equal those of the plain cross-entropy of the logits."""
    ids = torch.randint(0, 300, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def run(chunk):
        torch.manual_seed(0)
        module = LLMModule(vocab_size=300, dim=32, n_layers=2, n_heads=2, max_seq_len=16, loss_chunk_tokens=chunk).double()
        loss = module.next_token_loss(batch) if chunk else F.cross_entropy(module(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}

    want, want_grads = run(0)
    got, got_grads = run(5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-14, msg=name)


def test_the_byte_model_keeps_its_plain_loss_bit_for_bit():
    """Vocabulary 257: no chunking by default, and the training loss is exactly the float32
    cross-entropy of the logits that the byte quickstart has always used."""
    assert resolve_loss_chunk_tokens(None, 257) == 0 and resolve_loss_chunk_tokens(None, 4096) == 0
    assert resolve_loss_chunk_tokens(None, 32000) == 1024 and resolve_loss_chunk_tokens(None, 128256) == 256
    torch.manual_seed(0)
    module = LLMModule(dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    assert module.loss_chunk_tokens == 0
    ids = torch.randint(0, 257, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss = module.next_token_loss(batch)
    assert torch.equal(loss, F.cross_entropy(module(batch["input_ids"]).float().flatten(0, 1), batch["labels"].flatten()))


def test_a_model_without_a_vocabulary_size_is_refused():
    """What the CLI links from a data module that has no tokenizer (vocab_size None)."""
    with pytest.raises(UserInputError, match="no tokenizer"):
        LLMModule(vocab_size=None, dim=16, n_layers=1, n_heads=2)


def test_negative_chunk_size_is_refused():
    with pytest.raises(UserInputError, match="loss_chunk_tokens"):
        LLMModule(dim=32, n_layers=1, n_heads=2, loss_chunk_tokens=-1)


# --------------------------------------------------------------------------- bits per byte


class FakeTokenizer(Tokenizer):
    """A tokenizer whose ids stand for a given number of bytes each (only what bits per byte reads)."""

    eos_id = 0

    def __init__(self, lengths: np.ndarray, name: str = "fake") -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.vocab_size = len(self.lengths)
        self.spec = name

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_byte_lengths(self) -> np.ndarray:
        return self.lengths

    def to_state(self) -> dict[str, Any]:
        return {"kind": "fake", "spec": self.spec, "lengths": self.lengths.tobytes()}


def batches(vocab: int, n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 13), generator=gen)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def validate(module: LLMModule, data: list, tmp_path, callbacks=()) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=list(callbacks))  # fmt: skip
    trainer.validate(module, DataLoader(data, batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def summed_loss(module: LLMModule, data: list) -> float:
    """Sum over every label of the next-token loss (nats), by hand."""
    with torch.no_grad():
        return sum(float(F.cross_entropy(module(b["input_ids"]).float().flatten(0, 1), b["labels"].flatten(), reduction="sum"))
                   for b in data)  # fmt: skip


def test_bits_per_byte_of_the_byte_tokenizer(tmp_path):
    """bpb = summed loss / labels that are bytes (EOS covers none) / ln 2, over all batches."""
    torch.manual_seed(0)
    module = LLMModule(dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    data = batches(257)
    for b in data:
        b["labels"][0, :4] = 256  # EOS labels: loss counted, no bytes
    metrics = validate(module, data, tmp_path)
    byte_labels = sum(int((b["labels"] != 256).sum()) for b in data)
    assert byte_labels < sum(b["labels"].numel() for b in data)
    want = summed_loss(module, data) / byte_labels / math.log(2)
    assert metrics["val/bpb"] == pytest.approx(want, rel=1e-5)  # float32 sums of ~70 losses of ~5.5 nats
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-6)  # float32 exp


def test_bits_per_byte_with_multi_byte_tokens_and_per_exit(tmp_path):
    """A tokenizer whose ids cover 0-4 bytes: bpb = summed loss / sum of the labels' byte lengths /
    ln 2; the early-exit table's full-depth bpb is the same number."""
    lengths = np.random.default_rng(0).integers(0, 5, size=300)
    lengths[0] = 0  # EOS
    torch.manual_seed(0)
    module = LLMModule(vocab_size=300, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    assert module.tokenizer is None  # no byte default for a 300-token vocabulary
    module.set_tokenizer(FakeTokenizer(lengths))
    data = batches(300)
    exits = EarlyExitEvaluation(max_batches=8, save_files=False)
    metrics = validate(module, data, tmp_path, [exits])
    nbytes = sum(int(lengths[b["labels"].numpy()].sum()) for b in data)
    want = summed_loss(module, data) / nbytes / math.log(2)
    assert metrics["val/bpb"] == pytest.approx(want, rel=1e-5)  # float32 sums, as above
    per_exit = exits.results["per_exit"]
    assert len(per_exit["bpb"]) == 3 and per_exit["bpb"][-1] == pytest.approx(want, rel=1e-5)
    assert "bpb" in exits.results["sweep"][0]


# --------------------------------------------------------------------------- tokenizer in the checkpoint


class TokenizedData(L.LightningDataModule):
    """Random windows and a tokenizer, as the text data modules expose it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size

    def train_dataloader(self):
        return DataLoader(batches(self.vocab_size, n=2), batch_size=None)


def fit(tmp_path, data, ckpt_path=None, steps=1) -> L.Trainer:
    torch.manual_seed(0)
    module = LLMModule(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=16, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_resuming_on_data_of_another_tokenizer_is_refused(tmp_path):
    fit(tmp_path, TokenizedData(ByteTokenizer()))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(ckpt, weights_only=True)["tokenizer"] == {"kind": "bytes", "spec": "bytes"}
    other = TokenizedData(FakeTokenizer(np.ones(300, dtype=np.int64), "bpe:300"))
    with pytest.raises(UserInputError, match=r"trained with tokenizer bytes, the data was prepared with bpe:300"):
        fit(tmp_path, other, ckpt_path=ckpt, steps=2)
    fit(tmp_path, TokenizedData(ByteTokenizer()), ckpt_path=ckpt, steps=2)  # the same tokenizer resumes


def test_same_name_with_another_vocabulary_is_refused(tmp_path):
    fit(tmp_path, TokenizedData(FakeTokenizer(np.ones(300, dtype=np.int64), "bpe:300")))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    other = TokenizedData(FakeTokenizer(np.full(300, 2, dtype=np.int64), "bpe:300"))
    with pytest.raises(UserInputError, match="another vocabulary under the same name"):
        fit(tmp_path, other, ckpt_path=ckpt, steps=2)


# --------------------------------------------------------------------------- parameter count


def test_parameter_counts_add_up_and_match_the_llama_formula(capsys):
    """Residual wiring at the 60M shape with a 32,000 vocabulary: 58,073,600 parameters, the count of
    Hugging Face's LlamaForCausalLM for GaLore's llama_60m (untied embeddings)."""
    with torch.device("meta"):
        module = LLMModule(vocab_size=32000, dim=512, n_layers=8, n_heads=8, mlp_hidden=1376, connectivity="residual")
    counts = module.parameter_counts()
    per_layer = 4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512
    assert counts == {"embedding": 16_384_000, "head": 16_384_512, "blocks": 8 * per_layer, "wiring": 0, "total": 58_073_600}
    assert module.parameter_count_line() == (
        "LLMModule: 58.07M parameters (embedding 16.38M, head 16.38M, blocks 25.31M, wiring 0)"
    )
    with torch.device("meta"):
        ancre = LLMModule(vocab_size=32000, dim=512, n_layers=8, n_heads=8, mlp_hidden=1376, connectivity="ancre",
                          tie_embeddings=True)  # fmt: skip
    c = ancre.parameter_counts()
    assert c["wiring"] == 36 and c["head"] == 512 and c["total"] == sum(c[k] for k in ("embedding", "head", "blocks", "wiring"))


def test_the_count_is_printed_at_fit_start(tmp_path, capsys):
    fit(tmp_path, TokenizedData(ByteTokenizer()))
    assert "LLMModule: " in capsys.readouterr().out
