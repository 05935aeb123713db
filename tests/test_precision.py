"""Every wiring trains under every precision Lightning offers on a CPU: 64-true (the whole model,
wiring included, in float64), 32-true, bf16-mixed and bf16-true (the wiring's parameters stay
float32 in the last two). That a float64 model computes its wiring in float64 is checked against
float64 reference loops: tests/test_families.py and tests/test_rewire_transformers.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ancre_lightning.connectivity import CONNECTIVITIES
from ancre_lightning.modules import LLMModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PRECISIONS = ["64-true", "32-true", "bf16-mixed", "bf16-true"]
#: the dtype of the blocks' parameters and of the wiring's under each precision
PARAM_DTYPES = {
    "64-true": (torch.float64, torch.float64),
    "32-true": (torch.float32, torch.float32),
    "bf16-mixed": (torch.float32, torch.float32),
    "bf16-true": (torch.bfloat16, torch.float32),
}
OPTIONS = {"hyper": {"streams": 2, "dynamic": True}, "mhc": {"streams": 2}, "attnres": {"block_size": 2}}


def token_batches(n: int = 3, batch: int = 2, seq: int = 16) -> DataLoader:
    """A few batches of token ids (this checks dtypes and that training moves, not what is learned)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (n * batch, seq + 1), generator=gen)
    rows = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
    return DataLoader(rows, batch_size=batch)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("connectivity", list(CONNECTIVITIES))
def test_every_wiring_trains_under_every_precision(connectivity, precision):
    torch.manual_seed(0)
    granularity = "sublayer" if connectivity in ("hyper", "mhc", "attnres") else "block"
    module = LLMModule(vocab_size=257, dim=16, n_layers=2, n_heads=2, mlp_hidden=32, max_seq_len=16,
                       connectivity=connectivity, connectivity_options=OPTIONS.get(connectivity),
                       granularity=granularity, warmup_steps=1, lr=1e-2)  # fmt: skip
    wiring = [p for p in module.connectivity.parameters() if p.requires_grad]
    before = [p.detach().clone().double() for p in wiring]
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=token_batches())
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    blocks_dtype, wiring_dtype = PARAM_DTYPES[precision]
    assert module.net.embed.weight.dtype == blocks_dtype
    assert all(p.dtype == wiring_dtype for p in module.connectivity.parameters())
    moved = [not torch.equal(p.detach().double(), b) for p, b in zip(wiring, before)]
    assert all(moved), f"wiring parameters that did not train: {[i for i, m in enumerate(moved) if not m]}"

