"""TokenShardsDataModule: windows over prepared shards, rank and worker sharding, exact resume.

The prepared folders are written here with the shard format's own writer (``write_shard``,
``write_index``) from real text: lead sections of the bundled Wikipedia corpus, tokenised to
bytes. Shards are small (a few hundred tokens) so that many windows span two shards, and one
shard is empty.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DistributedSampler

from ancre_lightning.datamodules import TokenShardsDataModule
from ancre_lightning.datamodules.fetch import fetch
from ancre_lightning.datamodules.resumable import FeistelPermutation, ResumableBatchLoader, ResumableBatchSampler
from ancre_lightning.datamodules.text.bundled import PackedTokenDataset, _wikipedia_documents
from ancre_lightning.datamodules.text.shard_format import token_dtype, write_index, write_shard
from ancre_lightning.datamodules.text.tokenizers import ByteTokenizer
from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import LLMModule
from test_resume import RECORDS, Preempted, Recorder, StopAt, assert_same_checkpoints

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SHARD_TOKENS = 700  # small shards: many windows cross a shard boundary


def write_prepared(folder: Path, splits: dict[str, np.ndarray], shard_tokens: int = SHARD_TOKENS) -> Path:
    """A prepared folder as ``ancre prepare`` writes it: shards per split, the tokenizer, index.json
    last. The second shard of every split is empty (a reader must skip it)."""
    tokenizer = ByteTokenizer()
    dtype = token_dtype(tokenizer.vocab_size)
    entries = {}
    for split, tokens in splits.items():
        pieces = [tokens[lo : lo + shard_tokens] for lo in range(0, len(tokens), shard_tokens)]
        pieces.insert(1, tokens[:0])
        shards = []
        for i, piece in enumerate(pieces):
            name = f"{split}/{i:05d}.bin"
            write_shard(folder / name, piece, dtype)
            shards.append({"file": name, "tokens": int(piece.size)})
        entries[split] = {"tokens": int(tokens.size), "documents": int((tokens == tokenizer.eos_id).sum()),
                          "bytes": int((tokens != tokenizer.eos_id).sum()), "shards": shards}  # fmt: skip
    write_index(folder, {"format": 1, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                         "tokenizer": tokenizer.save(folder), "fingerprint": "test", "splits": entries})  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def wiki_tokens() -> dict[str, np.ndarray]:
    """Byte tokens of real Wikipedia lead sections: 40 articles for validation, 160 for training."""
    docs = _wikipedia_documents(fetch("wikipedia"))[:200]
    encoded = ByteTokenizer().encode_batch([text for _, text in docs], add_eos=True)
    return {"val": np.concatenate(encoded[:40]), "train": np.concatenate(encoded[40:])}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, wiki_tokens) -> Path:
    """A prepared folder of the Wikipedia tokens (shards of SHARD_TOKENS, one empty)."""
    return write_prepared(tmp_path_factory.mktemp("prepared"), wiki_tokens)


def batches_of(loader, n: int, first_epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of ``loader``, across epochs, calling ``set_epoch`` before every
    epoch as Lightning's fit loop does."""
    out, epoch = [], first_epoch
    while len(out) < n:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        epoch += 1
    return out


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    """Both lists hold exactly equal batches, in the same order."""
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for key in ("input_ids", "labels"):
            assert torch.equal(x[key], y[key]), f"batch {i}: {key} differs"


def fake_trainer(world_size: int, rank: int) -> SimpleNamespace:
    """What a data module reads of its trainer to shard over ranks."""
    return SimpleNamespace(world_size=world_size, global_rank=rank)


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seq_len", [16, 37])
def test_windows_equal_the_stream_across_shard_boundaries(prepared, wiki_tokens, seq_len):
    """Every window read from the shards equals the window of the concatenated stream, including
    those that span two shards (and the empty shard)."""
    dm = TokenShardsDataModule(str(prepared), seq_len=seq_len, batch_size=4)
    dm.setup("fit")
    stream = PackedTokenDataset(wiki_tokens["train"], seq_len)
    windows = dm.train_dataset
    assert len(windows) == len(stream) == (wiki_tokens["train"].size - 1) // seq_len
    every = np.arange(len(windows))
    batch = windows[every]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (len(windows), seq_len)
    expected = [stream[i] for i in every]
    assert torch.equal(batch["input_ids"], torch.stack([e["input_ids"] for e in expected]))
    assert torch.equal(batch["labels"], torch.stack([e["labels"] for e in expected]))
    crossing = [i for i in every if (i * seq_len) // SHARD_TOKENS != (i * seq_len + seq_len) // SHARD_TOKENS]
    assert len(crossing) > 10
    one = windows[int(crossing[0])]
    assert torch.equal(one["input_ids"], stream[int(crossing[0])]["input_ids"])


def test_vocabulary_and_tokenizer_come_from_the_folder(prepared):
    """vocab_size and eos_id are known right after construction; the tokenizer decodes real text."""
    dm = TokenShardsDataModule(str(prepared), seq_len=64, batch_size=2)
    assert (dm.vocab_size, dm.eos_id, dm.seq_len, dm.batch_size) == (257, 256, 64, 2)
    assert dm.train_dataset is None  # nothing opened yet
    assert isinstance(dm.tokenizer, ByteTokenizer) and dm.index["splits"]["train"]["shards"]
    assert dm.meta == {}
    dm.setup("fit")
    text = dm.tokenizer.decode(dm.train_dataset[0]["input_ids"])
    assert len(text) > 20 and text.isprintable()


def test_nothing_of_the_corpus_is_mapped_or_pickled(prepared):
    """Windows are read with positional reads: after reading every window no shard is mapped into
    the process (its resident memory does not take in the corpus), and a worker process started
    by pickling receives file names, not data, and reads the same windows."""
    dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4)
    dm.setup("fit")
    windows = dm.train_dataset
    everything = windows[np.arange(len(windows))]
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(prepared) not in maps.read_text()
    assert any(fd is not None for fd in windows._fds)
    payload = pickle.dumps(windows)
    assert len(payload) < 10_000
    copy = pickle.loads(payload)
    assert all(fd is None for fd in copy._fds)
    assert torch.equal(copy[np.arange(len(windows))]["labels"], everything["labels"])
    windows.close()
    assert torch.equal(windows[np.arange(3)]["input_ids"], everything["input_ids"][:3])  # reopens


def test_shard_cut_short_while_training(tmp_path, wiki_tokens):
    """A shard truncated after the check (another process rewriting the folder) is one clear error."""
    folder = write_prepared(tmp_path, wiki_tokens)
    dm = TokenShardsDataModule(str(folder), seq_len=32, batch_size=4)
    dm.setup("fit")
    last = folder / dm.index["splits"]["train"]["shards"][-1]["file"]
    last.write_bytes(last.read_bytes()[:1100])
    with pytest.raises(UserInputError, match="changed while it was being read"):
        dm.train_dataset[np.arange(len(dm.train_dataset))]


# ----------------------------------------------------------------------------- the order


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection(size):
    order = FeistelPermutation(size, key=1234)(np.arange(size))
    assert np.array_equal(np.sort(order), np.arange(size))


def test_permutation_depends_on_the_key_only():
    positions = np.arange(10_000)
    a = FeistelPermutation(10_000, key=7)(positions)
    assert np.array_equal(a, FeistelPermutation(10_000, key=7)(positions))
    assert not np.array_equal(a, FeistelPermutation(10_000, key=8)(positions))
    assert not np.array_equal(a, positions)
    assert np.array_equal(FeistelPermutation(10_000, key=7)(positions[5000:5016]), a[5000:5016])  # any position, directly
    # a shuffle, not a rotation: neighbours in the order are far apart in the data
    assert np.median(np.abs(np.diff(a))) > 1000


@pytest.mark.parametrize("world_size,batch_size,windows", [(1, 4, 48), (2, 4, 48), (3, 2, 48), (2, 3, 50)])
def test_an_epoch_over_all_ranks_visits_every_window_once(world_size, batch_size, windows):
    """The union over ranks of an epoch's windows is every window exactly once (when the epoch
    divides into whole steps; otherwise fewer than world_size x batch_size are left for later)."""
    data = np.zeros(windows)
    seen = []
    lengths = set()
    for rank in range(world_size):
        sampler = ResumableBatchSampler(data, batch_size, seed=3, num_replicas=world_size, rank=rank)
        sampler.set_epoch(0)
        batches = list(sampler)
        lengths.add(len(batches))
        assert len(batches) == len(sampler) and all(b.shape == (batch_size,) for b in batches)
        seen.extend(np.concatenate(batches).tolist())
    assert len(lengths) == 1  # every rank runs the same number of steps
    step = world_size * batch_size
    assert len(seen) == len(set(seen)) == windows // step * step
    if windows % step == 0:
        assert sorted(seen) == list(range(windows))


def test_ranks_of_the_data_module_share_an_epoch(prepared):
    """Two ranks of the data module (as a 2-process DDP run builds them) cover the epoch without
    overlap, and Lightning keeps the sampler (a DistributedSampler) instead of replacing it."""
    per_rank = []
    for rank in range(2):
        dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4)
        dm.trainer = fake_trainer(2, rank)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, rank)
        per_rank.append(torch.cat([b["input_ids"] for b in batches_of(loader, len(loader))]))
    windows = len(dm.train_dataset)
    rows = torch.cat(per_rank)
    assert rows.shape[0] == windows // 8 * 8
    all_rows = dm.train_dataset[np.arange(windows)]["input_ids"]
    assert len({tuple(r.tolist()) for r in all_rows}) == windows  # every window of this text is unique...
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # ...so none was seen twice


class RowsSeen(Callback):
    """Appends the input rows of every training batch to ``OUT/rank<r>.txt`` (one line each).

    Args:
        out: the folder of the files.
    """

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        with open(Path(self.out) / f"rank{trainer.global_rank}.txt", "a") as f:
            f.writelines(" ".join(map(str, row.tolist())) + "\n" for row in batch["input_ids"])


@pytest.mark.slow
def test_ddp_ranks_share_an_epoch(prepared, tmp_path):
    """A real two-process DDP fit (CPU, gloo): Lightning keeps the sampler, and over one epoch the
    two ranks train on every window exactly once."""
    model = LLMModule(vocab_size=257, dim=32, n_layers=2, n_heads=2, max_seq_len=16, warmup_steps=2)
    data = TokenShardsDataModule(str(prepared), seq_len=16, batch_size=4, max_train_tokens=4 * 2 * 4 * 16 + 1, max_val_tokens=200)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=2, callbacks=[RowsSeen(str(tmp_path))])  # fmt: skip
    trainer.fit(model, datamodule=data)
    rows = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert [len(r) for r in rows] == [16, 16]
    data.setup("fit")
    every = {" ".join(map(str, row.tolist())) for row in data.train_dataset[np.arange(32)]["input_ids"]}
    assert len(every) == 32 and sorted(rows[0] + rows[1]) == sorted(every)


def test_workers_give_the_same_batches(prepared):
    """With two worker processes the batches, and their order, are those of the main process."""
    loaders = []
    for workers in (0, 2):
        dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4, num_workers=workers)
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
    assert_same_batches(batches_of(loaders[0], 12), batches_of(loaders[1], 12))


# ----------------------------------------------------------------------------- resume


def test_resume_mid_epoch_equals_straight(prepared):
    """Batches 0..7 straight == batches 0..3, state_dict, a new module + load_state_dict, 4..7;
    an epoch is 5 batches, so the resumed part also crosses into the next epoch."""

    def loader():
        dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4, seed=11, max_train_tokens=20 * 32 + 1)
        dm.setup("fit")
        return dm.train_dataloader()

    straight = batches_of(loader(), 8)
    first = loader()
    part1 = batches_of(first, 4)
    state = first.state_dict()
    assert state["samples_consumed"] == 16 and state["epoch"] == 0
    second = loader()
    second.load_state_dict(state)
    part2 = batches_of(second, 4)
    assert_same_batches(part1 + part2, straight)
    assert not torch.equal(straight[0]["input_ids"], straight[5]["input_ids"])


def test_resume_skips_without_visiting(tmp_path):
    """The order is never materialised: resuming half-way through an epoch of 10**12 windows
    yields its next batch at once, and it is the batch at that position of the permutation."""

    class Huge:
        def __len__(self) -> int:
            return 10**12

        def __getitem__(self, indices: np.ndarray) -> np.ndarray:
            return indices

    data = Huge()
    loader = ResumableBatchLoader(data, ResumableBatchSampler(data, batch_size=4, seed=5))
    consumed = 5 * 10**11
    loader.load_state_dict({"seed": 5, "epoch": 2, "samples_consumed": consumed, "dataset_size": 10**12, "shuffle": True})
    loader.sampler.set_epoch(2)
    batch = next(iter(loader))
    assert torch.equal(batch, torch.from_numpy(FeistelPermutation(10**12, 5 + 2)(np.arange(consumed, consumed + 4))))
    assert loader.state_dict()["samples_consumed"] == consumed + 4


def _fit(folder: Path, root: Path, tag: str, max_steps: int, stop_at: int | None = None, ckpt_path: str | None = None):
    """A tiny LLMModule on the prepared folder; a checkpoint (last.ckpt) after every step."""
    L.seed_everything(0)
    model = LLMModule(vocab_size=257, dim=32, n_layers=2, n_heads=2, max_seq_len=16, warmup_steps=2)
    data = TokenShardsDataModule(str(folder), seq_len=16, batch_size=4, seed=7,
                                 max_train_tokens=6 * 4 * 16 + 1, max_val_tokens=200)  # fmt: skip
    callbacks = [ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=0, monitor=None),
                 Recorder(tag), *([StopAt(stop_at)] if stop_at is not None else [])]  # fmt: skip
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=2, default_root_dir=root)  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_trainer_resume_equals_straight(prepared, tmp_path):
    """A Lightning fit stopped after step 4 and resumed from its checkpoint trains on the same
    batches as 8 steps straight (an epoch is 6 steps, so both cross an epoch and a validation)
    and ends with exactly the same weights and optimiser state."""
    straight = _fit(prepared, tmp_path / "straight", "straight", max_steps=8)
    assert straight.global_step == 8 and straight.current_epoch == 2  # max_steps ended epoch 1 after 2 steps
    with pytest.raises(Preempted):
        _fit(prepared, tmp_path / "resumed", "part1", max_steps=8, stop_at=4)
    RECORDS["part1"].pop()  # the step that was about to start when the run stopped
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    _fit(prepared, tmp_path / "resumed", "part2", max_steps=8, ckpt_path=str(last))
    batches = [r["batch"] for r in RECORDS["straight"]]
    assert len(set(batches)) == 8
    assert [r["batch"] for r in RECORDS["part1"] + RECORDS["part2"]] == batches
    assert_same_checkpoints(tmp_path / "straight" / "checkpoints" / "last.ckpt", last, atol=0)


# ----------------------------------------------------------------------------- validation


def test_validation_is_the_whole_split_in_order(prepared, wiki_tokens):
    dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=5)
    dm.setup("validate")
    assert dm.train_dataset is None
    stream = PackedTokenDataset(wiki_tokens["val"], 32)
    rows = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(rows, torch.stack([stream[i]["input_ids"] for i in range(len(stream))]))
    capped = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=5, max_val_tokens=32 * 12 + 1)
    capped.setup("validate")
    capped_rows = torch.cat([b["labels"] for b in capped.val_dataloader()])
    assert torch.equal(capped_rows, torch.stack([stream[i]["labels"] for i in range(12)]))


def test_validation_over_ranks_covers_the_split(prepared):
    """Each rank validates a contiguous share; together they cover every window, and every rank
    runs the same number of batches (the last share wraps round, as Lightning's sampler pads)."""
    dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4, max_val_tokens=32 * 11 + 1)
    dm.setup("validate")
    everything = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    shares = []
    for rank in range(3):
        dm.trainer = fake_trainer(3, rank)
        shares.append([b["input_ids"] for b in dm.val_dataloader()])
    assert len({len(s) for s in shares}) == 1
    rows = torch.cat([torch.cat(s) for s in shares])
    assert rows.shape[0] == 12 and torch.equal(rows[:11], everything) and torch.equal(rows[11], everything[0])


# ----------------------------------------------------------------------------- bad input


def test_folder_without_index(tmp_path):
    with pytest.raises(UserInputError, match="does not exist.*ancre prepare"):
        TokenShardsDataModule(str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    with pytest.raises(UserInputError, match="has no index.json"):
        TokenShardsDataModule(str(tmp_path / "half"))


def test_torn_shard(tmp_path, wiki_tokens):
    folder = write_prepared(tmp_path, wiki_tokens)
    shard = folder / "train" / "00002.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    dm = TokenShardsDataModule(str(folder), seq_len=32, batch_size=4)
    with pytest.raises(UserInputError, match="torn or truncated"):
        dm.setup("fit")


def test_shard_that_disagrees_with_the_index(tmp_path, wiki_tokens):
    folder = write_prepared(tmp_path, wiki_tokens)
    write_shard(folder / "train" / "00002.bin", wiki_tokens["train"][:10], np.uint16)
    with pytest.raises(UserInputError, match="holds 10 tokens but index.json says 700"):
        TokenShardsDataModule(str(folder), seq_len=32, batch_size=4).setup("fit")


def test_split_shorter_than_one_sequence(prepared, tmp_path, wiki_tokens):
    with pytest.raises(UserInputError, match=r"fewer than seq_len \+ 1 = 101.*Lower seq_len, or raise max_train_tokens"):
        TokenShardsDataModule(str(prepared), seq_len=100, max_train_tokens=50).setup("fit")
    folder = write_prepared(tmp_path, {"train": wiki_tokens["train"], "val": wiki_tokens["val"][:20]})
    with pytest.raises(UserInputError, match=r"validation split .* has 20 tokens, fewer than seq_len \+ 1 = 33.*Lower seq_len"):
        TokenShardsDataModule(str(folder), seq_len=32).setup("validate")


def test_fewer_windows_than_a_batch(prepared):
    dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=8, max_train_tokens=32 * 7 + 1)
    dm.setup("fit")
    with pytest.raises(UserInputError, match="gives 7 sequences of seq_len=32, fewer than batch_size=8.*Lower batch_size"):
        dm.train_dataloader()
    dm = TokenShardsDataModule(str(prepared), seq_len=32, batch_size=4, max_train_tokens=32 * 7 + 1)
    dm.trainer = fake_trainer(2, 0)
    dm.setup("fit")
    with pytest.raises(UserInputError, match="fewer than batch_size=4 x 2 ranks"):
        dm.train_dataloader()


@pytest.mark.parametrize("option", [{"seq_len": 0}, {"batch_size": 0}, {"num_workers": -1}, {"max_val_tokens": 1}])
def test_settings_that_cannot_work(prepared, option):
    with pytest.raises(UserInputError, match=next(iter(option))):
        TokenShardsDataModule(str(prepared), **option)
