"""Activation checkpointing: every layer of the stack (and the multi-stream wirings' per-token maps)
is recomputed in backward while the wiring's state stays as it was, so outputs and gradients equal the plain model's (float64, dropout on: the
recomputation replays the random numbers); backward keeps much less; BatchNorm models are refused;
exact resume and torch.compile still work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ancre_lightning
from ancre_lightning.connectivity import CONNECTIVITIES, ConnectedStack
from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import ClassifierModule, DiffusionModule, LLMModule
from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

OPTIONS = {"hyper": {"streams": 2, "dynamic": True}, "mhc": {"streams": 2}, "attnres": {"block_size": 2}}
BRANCH_ONLY = ("acn", "fixed", "attnres", "hyper", "mhc")


def llm(connectivity: str, checkpointing: bool, granularity: str = "block", dropout: float = 0.1, dim: int = 16) -> LLMModule:
    torch.manual_seed(0)
    module = LLMModule(vocab_size=257, dim=dim, n_layers=3, n_heads=2, mlp_hidden=4 * dim, max_seq_len=16, dropout=dropout,
                       connectivity=connectivity, connectivity_options=OPTIONS.get(connectivity), granularity=granularity,
                       activation_checkpointing=checkpointing)  # fmt: skip
    return module.double()


def loss_and_grads(module: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.train()
    torch.manual_seed(123)  # the dropout masks of this step
    loss = loss_fn(module)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_step(plain: nn.Module, checkpointed: nn.Module, loss_fn) -> None:
    """Same loss and the same gradient for every parameter, to float64 rounding (the recomputed
    forward repeats the same operations on the same inputs, with the same dropout masks)."""
    loss_a, grads_a = loss_and_grads(plain, loss_fn)
    loss_b, grads_b = loss_and_grads(checkpointed, loss_fn)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-12)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def token_loss(module: LLMModule) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (2, 17), generator=gen)
    return module.next_token_loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})


@pytest.mark.parametrize("connectivity", list(CONNECTIVITIES))
def test_llm_gradients_equal_the_plain_models_for_every_wiring(connectivity):
    granularity = "sublayer" if connectivity in BRANCH_ONLY else "block"
    plain, checkpointed = llm(connectivity, False, granularity), llm(connectivity, True, granularity)
    assert checkpointed.net.stack.activation_checkpointing and not plain.net.stack.activation_checkpointing
    assert_same_step(plain, checkpointed, token_loss)


def test_vit_mixer_and_dit_gradients_equal_the_plain_models():
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    for arch in ("vit", "mixer"):
        make = lambda on: ClassifierModule(arch=arch, num_classes=4, in_chans=1, img_size=16, patch_size=4, dim=16, depth=3,
                                           num_heads=2, connectivity="mhc", connectivity_options={"streams": 2},
                                           granularity="sublayer", drop_path_rate=0.1, activation_checkpointing=on)  # fmt: skip
        torch.manual_seed(0)
        plain = make(False).double()
        torch.manual_seed(0)
        checkpointed = make(True).double()
        assert_same_step(plain, checkpointed, lambda m: nn.functional.cross_entropy(m(images), labels))

    def dit(on):
        torch.manual_seed(0)
        return DiffusionModule(image_size=8, in_channels=1, patch_size=2, dim=16, n_layers=3, n_heads=2, num_classes=4,
                               connectivity="ancre", sample_every_n_steps=0, activation_checkpointing=on).double()  # fmt: skip

    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    timesteps = torch.tensor([1, 10, 100, 500])
    pixels = images[:, :, :8, :8]
    assert_same_step(dit(False), dit(True), lambda m: m.denoising_loss(m.net, pixels, labels, noise, timesteps))


def saved_bytes(module: LLMModule) -> int:
    """Bytes of the tensors that backward keeps from one forward (what the autograd graph saves)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss(module)
    return total


@pytest.mark.parametrize("connectivity", list(CONNECTIVITIES))
def test_backward_keeps_less_than_half(connectivity):
    """What autograd saves for backward from one forward falls below half of the plain model's, at
    width 64: the layers keep only their inputs; what remains is the wiring's own state (history,
    per-token weights, stream maps and Sinkhorn rounds), kept by design. Measured: residual 0.12,
    ancre 0.15, attnres 0.26, mudd 0.27, hyper 0.40, mhc 0.42. (Peak step memory at the benchmark
    shape: ``python -m ancre_lightning.bench memory``.)"""
    granularity = "sublayer" if connectivity in BRANCH_ONLY else "block"
    plain = llm(connectivity, False, granularity, dropout=0.0, dim=64)
    checkpointed = llm(connectivity, True, granularity, dropout=0.0, dim=64)
    assert saved_bytes(checkpointed) < 0.5 * saved_bytes(plain)


def test_a_batchnorm_model_is_refused_in_one_line():
    with pytest.raises(UserInputError, match="BatchNorm2d, whose running statistics would be updated twice") as err:
        ClassifierModule(arch="resnet", num_classes=4, in_chans=1, img_size=16, activation_checkpointing=True)
    assert "\n" not in str(err.value)


def test_rewire_recomputes_the_blocks_of_a_model_it_wires():
    """``rewire(..., activation_checkpointing=True)`` on a transformers Llama (a model that loops over
    its blocks) and on a timm ViT (a model that calls its container once): same gradients."""
    transformers = pytest.importorskip("transformers")
    import timm

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=32, attention_dropout=0.1)  # fmt: skip
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def wired_llama(on):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        return ancre_lightning.rewire(model, "hyper", granularity="sublayer", streams=2, activation_checkpointing=on).double()

    assert_same_step(wired_llama(False), wired_llama(True), lambda m: m(input_ids=ids, labels=ids).loss)

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def wired_vit(on):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                  embed_dim=32, num_heads=2, num_classes=3, drop_path_rate=0.1)  # fmt: skip
        return ancre_lightning.rewire(model, "ancre", activation_checkpointing=on).double()

    assert_same_step(wired_vit(False), wired_vit(True), lambda m: m(images).square().mean())


def test_rewire_refuses_checkpointing_a_batchnorm_model():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(UserInputError, match="BatchNorm"):
        ancre_lightning.rewire(model, "ancre", activation_checkpointing=True)
    assert not any(isinstance(m, ConnectedStack) for m in model.modules())  # nothing was changed


def test_exact_resume_with_activation_checkpointing(tmp_path):
    """4 + 4 steps == 8 steps with dropout and checkpointing on (the recomputation draws nothing new)."""
    from test_resume import LLM_BASE, assert_same_checkpoints, assert_same_steps, run_split_and_straight

    base = [*LLM_BASE, "--model.init_args.activation_checkpointing=true"]
    straight, resumed, cli = run_split_and_straight(tmp_path, base, n=2)
    assert cli.model.net.stack.activation_checkpointing
    assert_same_steps(2)
    assert_same_checkpoints(straight, resumed)


@pytest.mark.parametrize("connectivity", ["ancre", "mhc"])
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_with_activation_checkpointing_matches_eager(backend, connectivity):
    """torch.compile traces the recomputed layers: the compiled step's loss and gradients equal the
    eager checkpointed step's (float32: inductor's kernels fuse and reorder operations, ~1e-7
    relative; 1e-4 catches a wrong recomputation, which moves them by 1e-2)."""
    def make():
        torch.manual_seed(0)
        return LLMModule(vocab_size=257, dim=16, n_layers=2, n_heads=2, mlp_hidden=32, max_seq_len=16,
                         connectivity=connectivity, connectivity_options=OPTIONS.get(connectivity),
                         activation_checkpointing=True)  # fmt: skip

    eager, compiled = make(), make()
    compiled.net.compile(backend=backend)
    loss_a, grads_a = loss_and_grads(eager, token_loss)
    loss_b, grads_b = loss_and_grads(compiled, token_loss)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("connectivity,options", [("hyper", {"streams": 2, "dynamic": True}), ("mhc", {"streams": 2})])
def test_recompute_maps_alone_keeps_the_gradients_and_saves_less(connectivity, options):
    """The multi-stream wirings' ``recompute_maps`` option (without layer checkpointing): the same
    float64 loss and gradients, and backward keeps less (the normalised streams and, for mHC, the
    Sinkhorn rounds are recomputed)."""
    def make(recompute):
        torch.manual_seed(0)
        return LLMModule(vocab_size=257, dim=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=16, dropout=0.1,
                         connectivity=connectivity, connectivity_options={**options, "recompute_maps": recompute},
                         granularity="sublayer").double()  # fmt: skip

    plain, recomputed = make(False), make(True)
    assert recomputed.connectivity.recompute_maps and not recomputed.net.stack.activation_checkpointing
    assert_same_step(plain, recomputed, token_loss)
    assert saved_bytes(make(True)) < saved_bytes(make(False))


STREAM_WIRINGS = [("hyper", {"streams": 2}), ("hyper", {"streams": 3, "dynamic": True}), ("mhc", {"streams": 3})]
STREAM_IDS = ["hyper-static", "hyper-dynamic", "mhc"]


def stream_llm(connectivity: str, options: dict, granularity: str = "sublayer", checkpointing: bool = False,
               dropout: float = 0.0, dim: int = 16) -> LLMModule:  # fmt: skip
    torch.manual_seed(0)
    return LLMModule(vocab_size=257, dim=dim, n_layers=3, n_heads=2, mlp_hidden=2 * dim, max_seq_len=16, dropout=dropout,
                     connectivity=connectivity, connectivity_options=options, granularity=granularity,
                     activation_checkpointing=checkpointing).double()  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("connectivity,options", STREAM_WIRINGS, ids=STREAM_IDS)
def test_recompute_streams_keeps_the_gradients_bit_for_bit(connectivity, options, granularity, checkpointing):
    """``recompute_streams`` (the streams kept only at the start of each group of layers, the others
    recomputed in backward from it, the maps and the layers' outputs): the same float64 loss and
    gradients as the plain path, bit for bit (the recompute repeats the same operations on the same
    values), alone and under activation checkpointing, for groups of 2 and of sqrt(layers); and
    backward keeps less than with ``recompute_maps`` alone."""
    plain = stream_llm(connectivity, options, granularity, checkpointing)
    _, grads = loss_and_grads(plain, token_loss)
    for group in (2, True):
        recomputed = stream_llm(connectivity, {**options, "recompute_streams": group}, granularity, checkpointing)
        assert recomputed.connectivity.recompute_streams == (2 if group == 2 else 3 if granularity == "sublayer" else 2)
        _, regrads = loss_and_grads(recomputed, token_loss)
        assert regrads.keys() == grads.keys() and grads
        for name, g in grads.items():
            assert torch.equal(regrads[name], g), name
    assert_same_step(plain, recomputed, token_loss)  # and the loss, through the shared helper
    maps_only = stream_llm(connectivity, {**options, "recompute_maps": True}, granularity, checkpointing)
    streams_too = stream_llm(connectivity, {**options, "recompute_streams": 2}, granularity, checkpointing)
    assert saved_bytes(streams_too) < saved_bytes(maps_only)


def test_recompute_streams_under_other_saved_tensor_hooks_and_a_second_backward():
    """Inside an offload to CPU or a checkpoint around the whole model (other saved-tensor hooks,
    which get every tensor but the recomputed streams), and with a backward run twice over one graph
    (the recomputed states are made again once dropped): the plain path's gradients, with dropout on."""
    options = {"streams": 2, "recompute_streams": 2}
    _, grads = loss_and_grads(stream_llm("mhc", {"streams": 2}, dropout=0.1), token_loss)

    def offloaded(m):
        with torch.autograd.graph.save_on_cpu():
            return token_loss(m)

    for loss_fn in (offloaded, lambda m: torch.utils.checkpoint.checkpoint(token_loss, m, use_reentrant=False)):
        _, regrads = loss_and_grads(stream_llm("mhc", options, dropout=0.1), loss_fn)
        assert all(torch.equal(regrads[n], g) for n, g in grads.items())

    def twice(m):
        loss = token_loss(m)
        loss.backward(retain_graph=True)
        return loss

    _, plain2 = loss_and_grads(stream_llm("mhc", {"streams": 2}, dropout=0.1), twice)
    _, regrads2 = loss_and_grads(stream_llm("mhc", options, dropout=0.1), twice)
    assert all(torch.equal(regrads2[n], g) for n, g in plain2.items())


def test_recompute_streams_option_values():
    """``true``: groups of about sqrt(layers); a number: layers per group; ``false``/0: off; anything
    else is refused in one line. No state of its own: the same state_dict keys."""
    from ancre_lightning.connectivity import build_connectivity

    assert build_connectivity("mhc", 24, dim=8, recompute_streams=True).recompute_streams == 5
    assert build_connectivity("hyper", 24, dim=8, recompute_streams=4).recompute_streams == 4
    assert build_connectivity("hyper", 24, dim=8).recompute_streams == 0
    with pytest.raises(UserInputError, match="recompute_streams must be"):
        build_connectivity("mhc", 4, dim=8, recompute_streams=-1)
    plain, recomputed = (build_connectivity("mhc", 4, dim=8, recompute_streams=g) for g in (False, 2))
    assert plain.state_dict().keys() == recomputed.state_dict().keys()


def test_recompute_streams_recomputes_the_maps_where_the_streams_are_kept(monkeypatch):
    """Where the streams are not recomputed (under torch.compile, or where saved-tensor hooks are
    disabled), ``recompute_streams`` still recomputes the maps: backward keeps what it keeps with
    ``recompute_maps``."""
    from ancre_lightning.connectivity import streams

    maps_only = saved_bytes(stream_llm("mhc", {"streams": 2, "recompute_maps": True}))
    assert saved_bytes(stream_llm("mhc", {"streams": 2, "recompute_streams": 2})) < maps_only
    monkeypatch.setattr(streams, "_saved_tensors_hooks_enabled", lambda: False)
    assert saved_bytes(stream_llm("mhc", {"streams": 2, "recompute_streams": 2})) == maps_only


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_model_with_recompute_streams_matches_eager(checkpointing):
    """torch.compile (aot_eager) of a model with ``recompute_streams``, with and without activation
    checkpointing: the compiled step's loss and gradients equal the eager step's (where the streams
    are recomputed; under compile the compiler decides what backward keeps)."""
    def make():
        torch.manual_seed(0)
        return LLMModule(vocab_size=257, dim=16, n_layers=2, n_heads=2, mlp_hidden=32, max_seq_len=16, connectivity="mhc",
                         connectivity_options={"streams": 2, "recompute_streams": 2}, granularity="sublayer",
                         activation_checkpointing=checkpointing)  # fmt: skip

    eager, compiled = make(), make()
    compiled.net.compile(backend="aot_eager")
    loss_a, grads_a = loss_and_grads(eager, token_loss)
    loss_b, grads_b = loss_and_grads(compiled, token_loss)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_resumes_with_other_recompute_options():
    """recompute_maps and recompute_streams change what backward keeps, not the function: a
    checkpoint written with one value fits a model with another; a real option still refuses."""
    from ancre_lightning.modules import LLMModule
    from ancre_lightning.modules.base import checkpoint_mismatch

    written = {"hyper_parameters": {"connectivity": "mhc", "connectivity_options": {"streams": 2}}}
    for options in ({"streams": 2, "recompute_streams": True}, {"streams": 2, "recompute_maps": True}):
        assert checkpoint_mismatch(written, LLMModule, {"connectivity": "mhc", "connectivity_options": options}, None) is None
    problem = checkpoint_mismatch(written, LLMModule, {"connectivity": "mhc", "connectivity_options": {"streams": 4}}, None)
    assert problem is not None and "streams: checkpoint 2, model 4" in problem
