"""DDP on two CPU processes (gloo): one step equals one step on one process with the global batch,
validation and test metrics are synchronised, frozen gates do not trip DDP's unused-parameter
check, every process draws its own random numbers, and every domain trains through the CLI.

The two ranks are real processes started the way ``torchrun`` starts them (``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` in the environment, so Lightning launches nothing itself); each
runs :func:`worker` in this file (``python tests/test_ddp.py worker OUT SCENARIOS``), runs the
scenarios in one process group and saves its records to ``OUT/rank<r>.pt``. The single-process
references are computed in the test process. One launch serves the default tests, a second the
slow-marked frozen-gate cases.

What "equal" means:

- LLM and classifier: same initial weights, rank r gets the r-th half of the global batch. DDP
  averages the two ranks' gradients, and both modules average their loss over equal-sized halves
  (tokens, images), so the mean of the two half-batch gradients is the full-batch gradient up to
  the order of float32 sums. The test measures that reordering error directly (full batch against
  the two halves summed by hand, no DDP) and requires DDP to be within it.
- Diffusion: ``DiffusionModule.training_step`` draws noise and timesteps on each rank (each rank
  has its own stream, see :func:`test_every_rank_draws_its_own_random_numbers`), so a DDP step
  equals a one-process step only in distribution. The equivalence is checked with the noise and
  timesteps of every image fixed in the batch (:class:`PinnedNoiseDiffusion`, which computes the
  module's own ``denoising_loss``): with the same per-image noise, two ranks of B equal one
  process of 2B to float tolerance.
- ResNet classifiers are not covered: their BatchNorm normalises with per-process batch
  statistics (B images, not 2B) unless ``trainer.sync_batchnorm`` is set (GPUs only).
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ancre_lightning.datamodules.text.tokenizers import ByteTokenizer
from ancre_lightning.modules import ClassifierModule, DiffusionModule, LLMModule
from conftest import CONFIGS, tiny_run_args

WORLD = 2  # processes
B = 2  # samples per rank and step
T = 16  # LLM sequence length
IMG = 8  # image side (classifier and diffusion)
LR = 1e-3
U32 = 2.0**-24  # unit roundoff of float32
DOMAINS = ("llm", "classifier", "diffusion")
TENSOR = dict[str, Tensor]


# --------------------------------------------------------------------------- modules and data


class PinnedNoiseDiffusion(DiffusionModule):
    """``DiffusionModule`` whose training noise and timesteps come with the batch (keys ``noise``
    and ``timesteps``), so that the same image gets the same noise on any number of processes.
    The loss is the module's own :meth:`DiffusionModule.denoising_loss`."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.denoising_loss(self.net, batch["images"], batch["labels"], batch["noise"], batch["timesteps"])
        self.log("train/loss", loss, sync_dist=True)
        return loss


class WithUnusedExitHead(LLMModule):
    """An LLM with an extra exit head that never enters the loss: the case DDP must reject when
    ``find_unused_parameters`` is False (the control that shows the check is live)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net.unused_exit_head = nn.Linear(self.hparams.dim, self.hparams.vocab_size)


def build(domain: str, cls: type | None = None, **overrides: Any) -> L.LightningModule:
    """A tiny float32 module without dropout, the same weights in every process (seeded, then
    :func:`perturb`)."""
    torch.manual_seed(0)
    if domain == "llm":
        kwargs = dict(vocab_size=257, dim=32, n_layers=3, n_heads=2, max_seq_len=T, connectivity="ancre", dropout=0.0,
                      lr=LR, warmup_steps=0)  # fmt: skip
        cls = cls or LLMModule
    elif domain == "classifier":
        kwargs = dict(arch="vit", num_classes=10, in_chans=1, img_size=IMG, patch_size=4, dim=16, depth=3, num_heads=2,
                      connectivity="ancre", lr=LR, warmup_steps=0)  # fmt: skip
        cls = cls or ClassifierModule
    elif domain == "diffusion":
        kwargs = dict(image_size=IMG, in_channels=1, patch_size=4, dim=16, n_layers=3, n_heads=2, num_classes=10,
                      class_dropout=0.0, connectivity="ancre", ema_decay=None, guidance_scale=1.0, lr=LR)  # fmt: skip
        cls = cls or PinnedNoiseDiffusion
    else:
        raise ValueError(domain)
    kwargs.update(overrides)
    module = cls(**kwargs)
    perturb(module)
    return module


def perturb(module: L.LightningModule) -> None:
    """Move the trainable weights off their special starting points: gate logits off zero (a soft,
    non-uniform wiring: logits / tau ~ 0.5) and zero-initialised weights (adaLN-Zero, output
    layers, biases) off zero, so that every parameter gets a generic, non-zero gradient."""
    gen = torch.Generator().manual_seed(1)
    gates = {id(p) for p in module.gate_parameters()}
    with torch.no_grad():
        for p in module.net.parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if id(p) in gates:
                p.add_(0.005 * noise)
            elif not p.any():
                p.add_(0.05 * noise)


def data(domain: str, n: int, seed: int = 2) -> dict[str, Tensor] | tuple[Tensor, Tensor]:
    """``n`` samples of the domain's batch format, the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    if domain == "llm":
        tokens = torch.randint(0, 257, (n, T + 1), generator=gen)  # (n, T+1)
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    images = torch.randn(n, 1, IMG, IMG, generator=gen)  # (n, 1, IMG, IMG)
    labels = torch.randint(0, 10, (n,), generator=gen)  # (n,)
    if domain == "classifier":
        return images, labels
    noise = torch.randn(n, 1, IMG, IMG, generator=gen)
    timesteps = torch.randint(0, 1000, (n,), generator=gen)
    return {"images": images.tanh(), "labels": labels, "noise": noise, "timesteps": timesteps}


def rows(batch: Any, index: slice) -> Any:
    return {k: v[index] for k, v in batch.items()} if isinstance(batch, dict) else tuple(v[index] for v in batch)


class Rows(Dataset):
    """The samples of a batch (dict or tuple of tensors), one per item."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __len__(self) -> int:
        first = next(iter(self.batch.values())) if isinstance(self.batch, dict) else self.batch[0]
        return first.shape[0]

    def __getitem__(self, i: int) -> Any:
        if isinstance(self.batch, dict):
            return {k: v[i] for k, v in self.batch.items()}
        return tuple(v[i] for v in self.batch)


def loader(batch: Any, batch_size: int) -> DataLoader:
    return DataLoader(Rows(batch), batch_size=batch_size, shuffle=False)


def make_trainer(devices: int, steps: int = 1, callbacks: list[Callback] = (), root: Path | None = None, **kwargs: Any) -> L.Trainer:
    """float32 on CPU; with 2 devices DDP over gloo with ``find_unused_parameters=False``. Every
    rank reads the loader it is given (no DistributedSampler), so the tests choose the shards."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = "auto"
    if devices > 1:
        strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=False, timeout=timedelta(seconds=120))
    options = dict(accelerator="cpu", devices=devices, strategy=strategy, precision="32-true", max_steps=steps,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=root, callbacks=list(callbacks))  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


def parameters(module: nn.Module) -> TENSOR:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Capture(Callback):
    """Records the weights at the start, the gradients the optimizer steps with (all-reduced under
    DDP), the weights after training and the logged metrics."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["init"] = parameters(pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if "grads" not in self.record:
            self.record["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["after"] = parameters(pl_module)
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}


class RandomDraws(Callback):
    """What the global random generators give each process once training starts."""

    def __init__(self) -> None:
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record = {"torch": torch.rand(4), "numpy": np.random.rand(4), "python": [random.random() for _ in range(4)]}


# --------------------------------------------------------------------------- scenarios (per rank)

# Runs with frozen or gradient-free wiring: none may trip DDP's unused-parameter check.
FROZEN = {
    "llm-ancre-constant": ("llm", dict(connectivity_options={"parameterization": "constant"})),
    "llm-ancre-outgoing": ("llm", dict(connectivity_options={"normalization": "outgoing"})),
    "llm-fixed": ("llm", dict(connectivity="fixed", connectivity_options={"edges": ["0:2"]})),
    "llm-acn": ("llm", dict(connectivity="acn")),
    "llm-denseformer": ("llm", dict(connectivity="denseformer", connectivity_options={"dilation": 2, "period": 2})),
    "classifier-resnet-ancre-constant": ("classifier", dict(arch="resnet", stage_depths=(2, 3), stage_widths=(4, 8),
                                          stem_width=4, connectivity_options={"parameterization": "constant"})),
    "diffusion-unconditional-ancre-constant": ("diffusion", dict(num_classes=0, ema_decay=0.9,
                                                connectivity_options={"parameterization": "constant"})),
}  # fmt: skip
# The 2025-26 families (per-token weights, several streams) take the same step test as the domains.
FAMILY_STEPS = {
    "llm-attnres": ("llm", dict(connectivity="attnres", connectivity_options={"block_size": 2}, granularity="sublayer")),
    "llm-hyper": ("llm", dict(connectivity="hyper", connectivity_options={"streams": 2, "dynamic": True},
                              granularity="sublayer")),
    "llm-mhc": ("llm", dict(connectivity="mhc", connectivity_options={"streams": 2}, granularity="sublayer")),
    "llm-mudd": ("llm", dict(connectivity="mudd")),
}  # fmt: skip
#: every case of the step test: a domain (with ANCRe) or a family on the LLM
STEP_CASES = {**{d: (d, {}) for d in DOMAINS}, **FAMILY_STEPS}
#: the frozen cases of the default run; the others run with ``-m slow`` (a second launch)
FROZEN_DEFAULT = ("llm-ancre-constant", "llm-fixed")
# val shards: rank 0 gets two batches, rank 1 one, so a plain mean of the ranks' means is wrong
VAL_SHARDS = (slice(0, 2 * B), slice(2 * B, 3 * B))


def scenario_step(case: str, rank: int, out: Path) -> dict:
    domain, overrides = STEP_CASES[case]
    capture = Capture()
    half = rows(data(domain, WORLD * B), slice(rank * B, (rank + 1) * B))
    make_trainer(WORLD, 1, [capture], out).fit(build(domain, **overrides), loader(half, B))
    return capture.record


def evaluate(trainer: L.Trainer, module: L.LightningModule, batches: Any) -> dict[str, float]:
    """The logged metrics of validation and test on the given samples."""
    metrics = trainer.validate(module, loader(batches, B), verbose=False)[0]
    metrics.update(trainer.test(module, loader(batches, B), verbose=False)[0])
    return {k: float(v) for k, v in metrics.items()}


def metric_module(domain: str) -> L.LightningModule:
    """The module whose evaluation metrics are checked (diffusion: with an EMA, for ``val/loss_ema``)."""
    return build(domain, ema_decay=0.9) if domain == "diffusion" else build(domain)


def scenario_metrics(domain: str, rank: int, out: Path) -> dict:
    shard = rows(data(domain, 3 * B, seed=3), VAL_SHARDS[rank])
    trainer = make_trainer(WORLD, root=out, limit_val_batches=None, limit_test_batches=None)
    return evaluate(trainer, metric_module(domain), shard)


def scenario_frozen(name: str, rank: int, out: Path) -> dict:
    from ancre_lightning.callbacks import EarlyExitEvaluation

    domain, overrides = FROZEN[name]
    module = build(domain, **overrides)
    train = rows(data(domain, WORLD * 3 * B, seed=4), slice(rank * 3 * B, (rank + 1) * 3 * B))
    val = rows(data(domain, WORLD * B, seed=5), slice(rank * B, (rank + 1) * B))
    callbacks = [EarlyExitEvaluation(max_batches=1, save_files=False)]
    trainer = make_trainer(WORLD, 3, callbacks, out, limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, loader(train, B), loader(val, B))
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    return {"global_step": trainer.global_step, "after": parameters(module), "frozen": frozen}


def scenario_unused_head(rank: int, out: Path) -> dict:
    module = build("llm", cls=WithUnusedExitHead)
    train = rows(data("llm", WORLD * 3 * B, seed=4), slice(rank * 3 * B, (rank + 1) * 3 * B))
    try:
        make_trainer(WORLD, 3, [], out).fit(module, loader(train, B))
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


def scenario_rng(rank: int, out: Path) -> dict:
    L.seed_everything(7, verbose=False)
    draws = RandomDraws()
    shard = rows(data("llm", WORLD * B), slice(rank * B, (rank + 1) * B))
    make_trainer(WORLD, 1, [draws], out).fit(build("llm"), loader(shard, B))
    return draws.record


def scenarios() -> dict[str, Any]:
    table: dict[str, Any] = {}
    for case in STEP_CASES:
        table[f"step-{case}"] = lambda rank, out, c=case: scenario_step(c, rank, out)
    for domain in DOMAINS:
        table[f"metrics-{domain}"] = lambda rank, out, d=domain: scenario_metrics(d, rank, out)
    for name in FROZEN:
        table[f"frozen-{name}"] = lambda rank, out, n=name: scenario_frozen(n, rank, out)
    table["rng"] = scenario_rng
    table["unused-head"] = scenario_unused_head  # last: a failed DDP reduction leaves the group unusable
    return table


def worker(out: Path, names: list[str], table: dict[str, Any] | None = None) -> None:
    """One rank: run the scenarios (of ``table``, default this file's) in order and save
    ``{name: record}`` to ``out/rank<r>.pt``."""
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)
    table = scenarios() if table is None else table
    results: dict[str, Any] = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = table[name](rank, out)
        except Exception:  # recorded and reported by the test; the other rank may hang until the timeout
            results[name] = {"exception": traceback.format_exc()}
        results[name + ":seconds"] = time.perf_counter() - start
        torch.save(results, out / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, names: list[str], timeout: float = 480, script: Path = Path(__file__)) -> list[dict]:
    """Start WORLD worker processes of ``script`` (its ``worker``) as torchrun would and return each
    rank's records."""
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
    procs = []
    for rank in range(WORLD):
        env = {**base, "LOCAL_RANK": str(rank), "RANK": str(rank)}
        log = open(out / f"rank{rank}.log", "w")
        cmd = [sys.executable, str(script.resolve()), "worker", str(out), ",".join(names)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD))
    assert all(p.returncode == 0 for p, _ in procs), f"a worker failed or hung:\n{logs}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, result in enumerate(results):
        missing = [n for n in names if n not in result]
        assert not missing, f"rank {rank}: missing {missing}\n{logs}"
    return results


def per_rank(ranks: list[dict], name: str) -> list[dict]:
    """Every rank's record of one scenario; a scenario that raised fails the test that reads it."""
    for rank, result in enumerate(ranks):
        record = result[name]
        assert not (isinstance(record, dict) and "exception" in record), f"rank {rank}, {name}:\n{record['exception']}"
    return [result[name] for result in ranks]


def launch_and_time(tmp_path_factory, names: list[str]) -> list[dict]:
    start = time.perf_counter()
    results = launch(tmp_path_factory.mktemp("ddp"), names)
    timings = {k: round(v, 1) for k, v in results[0].items() if k.endswith(":seconds")}
    print(f"\nDDP workers: {time.perf_counter() - start:.1f} s in all, per scenario (rank 0): {timings}")
    return results


SLOW_SCENARIOS = [f"frozen-{name}" for name in FROZEN if name not in FROZEN_DEFAULT]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The default run's scenarios on two real DDP processes, once for the whole module."""
    return launch_and_time(tmp_path_factory, [n for n in scenarios() if n not in SLOW_SCENARIOS])


@pytest.fixture(scope="module")
def ranks_slow(tmp_path_factory) -> list[dict]:
    """The slow-marked scenarios, in a second launch."""
    return launch_and_time(tmp_path_factory, SLOW_SCENARIOS)


# --------------------------------------------------------------------------- references (one process)


def plain_loss(domain: str, module: L.LightningModule, batch: Any) -> Tensor:
    """The domain's training loss written out with torch.nn.functional, independent of the module's
    training_step: mean over tokens, images or pixels."""
    if domain == "llm":
        logits = module.net(batch["input_ids"])  # (b, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    if domain == "classifier":
        images, labels = batch
        return F.cross_entropy(module.net(images), labels, label_smoothing=module.label_smoothing)
    noisy = module.noise_scheduler.add_noise(batch["images"], batch["noise"], batch["timesteps"])
    return F.mse_loss(module.net(noisy, batch["timesteps"], batch["labels"]), batch["noise"])  # epsilon target


def summed_grads(domain: str, parts: list[Any], **overrides: Any) -> TENSOR:
    """Gradient of the mean of the parts' losses, one backward per part (DDP's arithmetic by hand)."""
    module = build(domain, **overrides).train()
    for part in parts:
        (plain_loss(domain, module, part) / len(parts)).backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def single_process_step(domain: str, **overrides: Any) -> dict:
    capture = Capture()
    make_trainer(1, 1, [capture]).fit(build(domain, **overrides), loader(data(domain, WORLD * B), WORLD * B))
    return capture.record


def rel_error(a: TENSOR, b: TENSOR) -> float:
    """Largest |a - b| of any tensor, relative to the largest |b| of that tensor."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


def max_abs(a: TENSOR, b: TENSOR) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def adam_first_step(g: Tensor, eps: float = 1e-8) -> Tensor:
    """The first AdamW update of a weight with gradient g, in units of lr: m_hat / (sqrt(v_hat) + eps)."""
    return g / (g.abs() + eps)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: same kernels, so the per-rank halves match by hand
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", STEP_CASES)
def test_one_step_on_two_processes_equals_one_step_on_one(case, ranks, one_thread):
    domain, overrides = STEP_CASES[case]
    r0, r1 = per_rank(ranks, f"step-{case}")
    ref = single_process_step(domain, **overrides)
    assert max_abs(r0["init"], ref["init"]) == 0.0 and max_abs(r1["init"], ref["init"]) == 0.0

    full = data(domain, WORLD * B)
    halves = [rows(full, slice(r * B, (r + 1) * B)) for r in range(WORLD)]
    by_hand_full = summed_grads(domain, [full], **overrides)
    by_hand_halves = summed_grads(domain, halves, **overrides)
    # the module's own training path (Trainer, training_step, loss averaging) gives the plain gradient
    assert rel_error(ref["grads"], by_hand_full) <= 8 * U32
    # both ranks step with the same, all-reduced gradient, and end with the same weights, gates included
    assert all(torch.equal(r0["grads"][k], r1["grads"][k]) for k in r0["grads"])
    assert all(torch.equal(r0["after"][k], r1["after"][k]) for k in r0["after"])
    # DDP adds nothing to the arithmetic of averaging the two halves by hand
    ddp_vs_halves = rel_error(r0["grads"], by_hand_halves)
    assert ddp_vs_halves <= 8 * U32
    # DDP against one process with 2B: the error of summing the same terms in another order, which
    # the two computations by hand (full batch and halves, no DDP) measure
    reorder = rel_error(by_hand_halves, by_hand_full)
    error = rel_error(r0["grads"], ref["grads"])
    abs_error = max_abs(r0["grads"], ref["grads"])
    print(f"\n{case}: DDP vs one process, gradients: max abs error {abs_error:.3g}, relative {error:.3g} "
          f"(reordering by hand {reorder:.3g}, DDP vs halves by hand {ddp_vs_halves:.3g}, float32 unit "
          f"roundoff {U32:.3g})")  # fmt: skip
    assert reorder < 1e-3  # float32 noise, not a different loss (that would be of order 1)
    assert error <= 2 * reorder + 8 * U32
    wiring = build(domain, **overrides)
    gate_ids = {id(p) for p in wiring.gate_parameters()}
    gate_names = [n for n, p in wiring.named_parameters() if id(p) in gate_ids]
    assert gate_names and all(k in ref["grads"] for k in gate_names)  # DDP reduced every wiring parameter
    assert any(ref["grads"][k].abs().max() > 0 for k in gate_names)  # the gates do learn here

    # weights after the module's AdamW step: the first step moves each weight by lr * g / (|g| + eps),
    # nearly sign(g), so compare it with the bound the two gradients imply, element by element
    params_error = 0.0
    for k, p0 in ref["init"].items():
        if k not in ref["grads"]:
            assert torch.equal(r0["after"][k], ref["after"][k])  # frozen
            continue
        bound = LR * (adam_first_step(r0["grads"][k]) - adam_first_step(ref["grads"][k])).abs() + 8 * U32 * (
            p0.abs() + LR
        )
        diff = (r0["after"][k] - ref["after"][k]).abs()
        assert (diff <= bound).all(), k
        params_error = max(params_error, float(diff.max()))
    print(f"{case}: DDP vs one process, weights after one AdamW step: max abs error {params_error:.3g}")
    # the training loss is logged synchronised: the mean of the ranks' losses, the full-batch loss
    synced = [k for k in r0["metrics"] if k.startswith("train/") and not k.endswith("_per_s")]
    assert "train/loss" in synced and all(r0["metrics"][k] == r1["metrics"][k] for k in synced)
    assert r0["metrics"]["train/loss"] == pytest.approx(ref["metrics"]["train/loss"], rel=1e-6)


@pytest.mark.parametrize("domain", DOMAINS)
def test_validation_and_test_metrics_are_synchronised(domain, ranks):
    """Uneven shards (rank 0 has twice rank 1's samples): the logged value must be the global one,
    the same on every rank, weighted by samples, not the rank's own or a mean of the ranks' means."""
    logged = per_rank(ranks, f"metrics-{domain}")
    assert logged[0] == logged[1]
    batches = data(domain, 3 * B, seed=3)
    local = [evaluate(make_trainer(1, limit_val_batches=None, limit_test_batches=None), metric_module(domain),
                      rows(batches, shard)) for shard in VAL_SHARDS]  # fmt: skip
    weights = [s.stop - s.start for s in VAL_SHARDS]  # samples (LLM: tokens, proportional)
    assert local[0]["val/loss"] != local[1]["val/loss"]  # the shards differ, so a rank-local value would show
    expected = {
        "llm": {"val": {"loss", "ppl", "bpb"}, "test": {"loss", "bpb"}},
        "classifier": {"val": {"loss", "acc1", "acc5"}, "test": {"loss", "acc1", "acc5"}},
        "diffusion": {"val": {"loss", "loss_ema"}, "test": {"loss"}},
    }[domain]
    for split, want_names in expected.items():
        names = {k.split("/", 1)[1] for k in logged[0] if k.startswith(split + "/")}
        assert names == want_names, (split, names)
        for name in names:
            key = f"{split}/{name}"
            if name == "ppl":  # exp of the token-weighted mean log-likelihood
                want = math.exp(sum(w * math.log(m[key]) for w, m in zip(weights, local)) / sum(weights))
            elif name == "bpb":  # total nats / total UTF-8 bytes / ln 2: weighted by the bytes of each shard's labels
                byte_lengths = torch.as_tensor(ByteTokenizer().token_byte_lengths())  # (257,): EOS covers 0 bytes
                nbytes = [int(byte_lengths[batches["labels"][shard]].sum()) for shard in VAL_SHARDS]
                want = sum(b * m[key] for b, m in zip(nbytes, local)) / sum(nbytes)
            else:
                want = sum(w * m[key] for w, m in zip(weights, local)) / sum(weights)
            assert logged[0][key] == pytest.approx(want, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(
    "name", [n if n in FROZEN_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in FROZEN]
)
def test_frozen_gates_do_not_trip_the_unused_parameter_check(name, request):
    """Three steps with validation and early-exit evaluation after each, find_unused_parameters=False:
    DDP raises at the next forward if a trainable parameter got no gradient, so finishing means none."""
    ranks = request.getfixturevalue("ranks" if name in FROZEN_DEFAULT else "ranks_slow")
    r0, r1 = per_rank(ranks, f"frozen-{name}")
    assert r0["global_step"] == r1["global_step"] == 3
    assert all(torch.equal(r0["after"][k], r1["after"][k]) for k in r0["after"])  # frozen gates included
    if "constant" in name:
        assert any("gate_logits" in k for k in r0["frozen"])


def test_a_parameter_without_gradient_does_trip_it(ranks):
    """The control: an exit head that never enters the loss makes the same run fail."""
    for record in per_rank(ranks, "unused-head"):
        error = record["error"]
        assert error is not None, "DDP accepted a parameter that never got a gradient"
        assert "were not used in producing" in error, error


def test_every_rank_draws_its_own_random_numbers(ranks):
    """Same seed_everything on both ranks, yet different noise, dropout and augmentation streams
    (DiT's diffusion noise and timesteps, label dropout, Mixup); the weights still start equal (DDP
    broadcasts rank 0's, and test_one_step... checks the gradients)."""
    a, b = per_rank(ranks, "rng")
    assert not torch.equal(a["torch"], b["torch"])
    assert not np.array_equal(a["numpy"], b["numpy"])
    assert a["python"] != b["python"]


# --------------------------------------------------------------------------- the CLI

CLI_CASES = {
    "llm_hf": ("llm/hf_llama_quickstart_ancre.yaml", [
        "--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=40000", "--data.init_args.max_val_tokens=8000",
        "--data.init_args.num_workers=0"]),
    "classifier": ("classifier/vit_fmnist_ancre.yaml", [
        "--data.init_args.batch_size=8", "--data.init_args.max_train_samples=64", "--trainer.limit_val_batches=2",
        "--model.init_args.dim=16", "--model.init_args.depth=2", "--model.init_args.num_heads=2"]),
    "diffusion": ("diffusion/fmnist_ancre.yaml", [
        "--data.init_args.batch_size=4", "--data.init_args.max_train_samples=64", "--data.init_args.max_val_samples=8",
        "--model.init_args.dim=32", "--model.init_args.n_heads=2", "--model.init_args.n_layers=2",
        "--model.init_args.sample_every_n_steps=0"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("domain", list(CLI_CASES))
def test_domain_trains_through_the_cli_with_ddp_cpu(domain, tmp_path):
    """``ancre fit --config <domain config> --config configs/trainer/ddp_cpu.yaml``: Lightning
    starts the second process itself (so a subprocess); two steps and a checkpoint."""
    config, overrides = CLI_CASES[domain]
    args = ["fit", "--config", str(CONFIGS / config), "--config", str(CONFIGS / "trainer" / "ddp_cpu.yaml"),
            *tiny_run_args(tmp_path, 2), *overrides]  # fmt: skip
    ancre = Path(sys.executable).with_name("ancre")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(ancre), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    ckpt = next(Path(tmp_path, "logs").rglob("last.ckpt"))
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]), sys.argv[3].split(","))
