"""rewire(model, connectivity): a timm ViT, a timm ResNet, a diffusers DiT and a plain ModuleList model.

Random initialisation only; nothing is downloaded. The timm ViT and ResNet call their container of
blocks once (``self.blocks(x)``, ``self.layer4(x)``), the DiT and the plain model loop over it
calling each block with extra arguments (timestep and class conditioning; an attention mask).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ancre_lightning
from ancre_lightning.connectivity import CONNECTIVITIES, ConnectedStack
from ancre_lightning.errors import UserInputError
from ancre_lightning.rewiring import RewiredBlocks, load_pretrained, wiring_keys

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
warnings.filterwarnings("ignore", category=FutureWarning)

MODELS = ["timm_vit", "timm_resnet", "dit", "plain"]


class MaskedBlock(nn.Module):
    """A residual block that uses an additive mask the model passes to it (not splittable)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, mask, scale=1.0):
        return x + scale * torch.tanh(self.lin(self.norm(x)) + mask)


class PlainModel(nn.Module):
    """Embedding -> ``for layer in self.layers: x = layer(x, mask, scale=...)`` -> head."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = nn.ModuleList([MaskedBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)  # (B, N, D)
        mask = torch.linspace(-1, 1, h.shape[-1])  # (D,): reaches every block
        for layer in self.layers:
            h = layer(h, mask, scale=0.5)
        return self.head(h)


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "timm_vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                                 num_classes=5, depth=3, embed_dim=32, num_heads=2).eval()  # fmt: skip
    if kind == "timm_resnet":
        import timm

        return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=5).eval()
    if kind == "dit":
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                     sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()  # fmt: skip
    return PlainModel().eval()


def run(kind: str, model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "dit":
        x = torch.randn(2, 4, 8, 8, generator=gen)
        return model(x, timestep=torch.tensor([1, 5]), class_labels=torch.tensor([0, 3])).sample
    if kind == "plain":
        return model(torch.randn(2, 5, 4, generator=gen))
    return model(torch.randn(2, 1, 28, 28, generator=gen))


def randomize_wiring(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RewiredBlocks):
                for p in m.connectivity.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)


# --------------------------------------------------------------------------- the four models
@pytest.mark.parametrize("kind", MODELS)
def test_residual_leaves_every_output_exactly_unchanged(kind):
    model = make(kind)
    before = run(kind, model)
    keys = set(model.state_dict())
    assert ancre_lightning.rewire(model, "residual") is model
    assert torch.equal(run(kind, model), before)
    assert set(model.state_dict()) == keys  # the blocks keep their names; residual adds nothing


@pytest.mark.parametrize("kind", MODELS)
def test_ancre_changes_outputs_and_gradients_reach_the_gates(kind):
    model = make(kind)
    before = run(kind, model)
    ancre_lightning.rewire(model, "ancre")
    stacks = [m for m in model.modules() if isinstance(m, ConnectedStack)]
    assert stacks and all(isinstance(s, RewiredBlocks) for s in stacks)
    out = run(kind, model)
    assert not torch.allclose(out, before, atol=1e-4)
    out.square().mean().backward()
    learned = [s for s in stacks if s.num_layers >= 2]  # a one-layer ANCRe has a single, fixed weight
    assert learned
    for stack in learned:
        grads = [p.grad for p in stack.connectivity.gate_parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    new = wiring_keys(model)
    assert new and new == set(model.state_dict()) - set(make(kind).state_dict())
    assert all(".connectivity." in k for k in new)


@pytest.mark.parametrize("kind", MODELS)
def test_state_dict_saved_after_rewiring_loads_into_a_fresh_rewired_model(kind):
    model = ancre_lightning.rewire(make(kind), "ancre", tau=0.1)
    randomize_wiring(model)
    expected = run(kind, model)
    fresh = ancre_lightning.rewire(make(kind, seed=3), "ancre", tau=0.1)
    fresh.load_state_dict(model.state_dict())  # strict
    assert torch.equal(run(kind, fresh), expected)


@pytest.mark.parametrize("kind", MODELS)
def test_pretrained_weights_saved_before_rewiring_load_strictly_except_the_wiring(kind, tmp_path):
    plain = make(kind)
    before = run(kind, plain)
    torch.save(plain.state_dict(), tmp_path / "weights.pth")
    state = torch.load(tmp_path / "weights.pth", weights_only=True)
    wired = ancre_lightning.rewire(make(kind, seed=5), "ancre")
    left = load_pretrained(wired, state)
    assert left == sorted(wiring_keys(wired)) and left
    for name, value in plain.state_dict().items():
        assert torch.equal(wired.state_dict()[name], value)
    same = ancre_lightning.rewire(make(kind, seed=5), "residual")
    load_pretrained(same, state)
    assert torch.equal(run(kind, same), before)
    incomplete = dict(state)
    incomplete.pop(next(iter(incomplete)))
    with pytest.raises(UserInputError, match="1 tensors missing from the file"):
        load_pretrained(wired, incomplete)


@pytest.mark.parametrize("kind", MODELS)
def test_torch_compile_of_the_wired_model_runs(kind):
    """Traced as one graph (no graph break), also where the model loops over its blocks."""
    model = ancre_lightning.rewire(make(kind), "ancre")
    randomize_wiring(model)
    expected = run(kind, model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(run(kind, compiled), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "connectivity", "working"), [
    ("timm_resnet", "acn", "residual, ancre, denseformer"),
    ("timm_resnet", "mhc", "residual, ancre, denseformer"),
    ("plain", "hyper", "residual, ancre, denseformer, mudd"),
])  # fmt: skip
def test_a_refused_combination_is_one_message_naming_the_wirings_that_work(kind, connectivity, working):
    model = make(kind)
    before = run(kind, model)
    with pytest.raises(UserInputError) as exc:
        ancre_lightning.rewire(model, connectivity)
    message = str(exc.value)
    assert "\n" not in message and connectivity in message and f"use one of: {working} " in message
    assert not any(isinstance(m, RewiredBlocks) for m in model.modules())  # refused before any change
    assert torch.equal(run(kind, model), before)
    for name in working.split(", "):
        ancre_lightning.rewire(make(kind), name)  # and those do work


# --------------------------------------------------------------------------- the two paths
def _timm_block_model(depth: int = 3, dim: int = 16):
    """A plain model over timm's ViT blocks (splittable) that can call its container or loop over it."""
    from timm.models.vision_transformer import Block

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(dim, 2, qkv_bias=True, init_values=0.5) for _ in range(depth)])

        def forward(self, h, loop: bool = True, mask=None):
            if not loop:
                return self.layers(h, attn_mask=mask)
            for layer in self.layers:
                h = layer(h, attn_mask=mask)
            return h

    torch.manual_seed(0)
    return Model().eval()


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize("connectivity", list(CONNECTIVITIES))
def test_a_model_looping_over_its_blocks_runs_the_same_wiring_as_one_call(connectivity, granularity):
    """Every wiring and granularity: the model's own loop == the ConnectedStack forward, output and exits."""
    model = ancre_lightning.rewire(_timm_block_model(), connectivity, granularity=granularity)
    randomize_wiring(model)
    stack = model.layers
    torch.manual_seed(1)
    h = torch.randn(2, 5, 16)  # (B, N, D)
    mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))  # causal: it matters
    looped, called = model(h, loop=True, mask=mask), model(h, loop=False, mask=mask)
    torch.testing.assert_close(looped, called, rtol=0, atol=0)
    assert not torch.allclose(model(h, loop=False), called)  # the mask reached the blocks
    with stack.exits_as_batch() as n:
        batched_loop, batched_call = model(h, loop=True, mask=mask), model(h, loop=False, mask=mask)
    _, exits = stack(h, attn_mask=mask, return_exits=True)
    assert n == stack.num_layers + 1 == len(exits) == (6 if granularity == "sublayer" else 3) + 1
    torch.testing.assert_close(batched_loop, torch.cat(exits), rtol=0, atol=0)
    torch.testing.assert_close(batched_call, torch.cat(exits), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["timm_vit", "dit"])
def test_split_blocks_at_sublayer_granularity_keep_residual_exact(kind):
    model = make(kind)
    before = run(kind, model)
    ancre_lightning.rewire(model, "residual", granularity="sublayer")
    assert torch.equal(run(kind, model), before)
    ancre_lightning.rewire(make(kind), "mhc", granularity="sublayer")


def test_blocks_can_be_named_and_the_width_comes_from_the_blocks():
    model = ancre_lightning.rewire(make("timm_vit"), "attnres")
    assert model.blocks.connectivity.queries.shape[-1] == 32  # from the blocks' LayerNorm
    resnet = ancre_lightning.rewire(make("timm_resnet"), "ancre", blocks="layer4")
    assert [n for n, m in resnet.named_modules() if isinstance(m, RewiredBlocks)] == ["layer4"]
    assert resnet.layer4.transitions == 1 and resnet.layer4.num_layers == 1  # block 0 downsamples
    everywhere = ancre_lightning.rewire(make("timm_resnet"), "ancre")
    assert [n for n, m in everywhere.named_modules() if isinstance(m, RewiredBlocks)] == [f"layer{i}" for i in range(1, 5)]
    with pytest.raises(UserInputError, match="has no submodule 'trunk'"):
        ancre_lightning.rewire(make("timm_vit"), "ancre", blocks="trunk")
    with pytest.raises(UserInputError, match="already rewired"):
        ancre_lightning.rewire(model, "ancre")


class _AddLinear(nn.Module):
    """x + W x: the smallest residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        return x + self.f(x)


def test_a_model_that_is_its_own_container_is_wired_with_empty_blocks():
    torch.manual_seed(0)
    plain = nn.Sequential(_AddLinear(), _AddLinear(), _AddLinear())
    with pytest.raises(UserInputError, match="is itself a container of blocks: pass blocks=''") as info:
        ancre_lightning.rewire(plain, "ancre")
    assert "\n" not in str(info.value)
    x = torch.randn(2, 8, dtype=torch.float64)
    wired = ancre_lightning.rewire(plain, "residual", blocks="")
    assert isinstance(wired, RewiredBlocks) and len(list(plain.children())) == 3  # the model is left as it was
    torch.testing.assert_close(wired(x), plain(x), rtol=0, atol=0)
    assert isinstance(ancre_lightning.rewire(plain, "ancre", blocks=""), RewiredBlocks)


def test_a_model_without_a_container_hears_what_rewire_saw():
    class Loose(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = _AddLinear(), _AddLinear(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.second(self.first(x)))

    with pytest.raises(UserInputError, match=r"its children: first \(_AddLinear\), second \(_AddLinear\), head \(Linear\)"):
        ancre_lightning.rewire(Loose(), "ancre")
    with pytest.raises(UserInputError, match="the containers in this model: 'blocks'"):
        ancre_lightning.rewire(make("timm_vit"), "ancre", blocks="norm")


def test_indexing_gives_the_plain_block_and_slicing_is_refused():
    model = ancre_lightning.rewire(make("dit"), "ancre")
    assert isinstance(model.transformer_blocks[0], nn.Module) and len(model.transformer_blocks) == 3
    with pytest.raises(UserInputError, match="cannot be sliced"):
        model.transformer_blocks[:2]


# --------------------------------------------------------------------------- ClassifierModule
TIMM_SMALL = {"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_classifier_module_takes_a_timm_model_and_a_local_weight_file(tmp_path):
    import timm

    from ancre_lightning.modules import ClassifierModule

    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, in_chans=1, num_classes=3, **TIMM_SMALL)
    torch.save(plain.state_dict(), tmp_path / "vit.pth")
    module = ClassifierModule(timm_model="vit_tiny_patch16_224", timm_options=TIMM_SMALL, num_classes=10, in_chans=1,
                              img_size=28, pretrained_weights=str(tmp_path / "vit.pth"), connectivity="ancre").eval()  # fmt: skip
    own = module.net.model.state_dict()
    for name, value in plain.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(own[name], value), name
    assert own["head.weight"].shape == (10, 32)  # another number of classes: a new head
    assert list(module.connectivities()) == ["model.blocks"]
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert [id(p) for p in groups["gates"]["params"]] == [id(module.net.model.blocks.connectivity.gate_logits)]
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(module.net.model.cls_token) in no_decay and id(module.net.model.pos_embed) in no_decay
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    outputs, target = module.exit_predictions((images, labels))
    assert len(outputs) == 3 and all(o.shape == (4, 10) for o in outputs) and torch.equal(target, labels)
    torch.testing.assert_close(outputs[-1], module(images), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[-1])
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, in_chans=1, num_classes=10,
                               **{**TIMM_SMALL, "depth": 3})  # fmt: skip
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(UserInputError, match="tensors the model does not have"):
        ClassifierModule(timm_model="vit_tiny_patch16_224", timm_options=TIMM_SMALL, pretrained_weights=str(tmp_path / "deeper.pth"))
    with pytest.raises(UserInputError, match="do not exist"):
        ClassifierModule(timm_model="vit_tiny_patch16_224", timm_options=TIMM_SMALL, pretrained_weights=str(tmp_path / "none.pth"))


def test_classifier_module_with_a_timm_resnet_takes_any_image_size():
    from ancre_lightning.modules import ClassifierModule

    module = ClassifierModule(timm_model="resnet18", num_classes=10, in_chans=1, img_size=28, connectivity="ancre").eval()
    assert module.net.img_size is None and len(module.connectivities()) == 4
    images = torch.randn(2, 1, 40, 40)
    outputs, _ = module.exit_predictions((images, torch.tensor([0, 1])))
    assert len(outputs) == module.net.connectivity.num_layers + 1 == 2  # layer4: a transition and 1 wired block
    torch.testing.assert_close(outputs[-1], module(images), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_is_refused_rather_than_wrong():
    model = make("dit")
    model.enable_gradient_checkpointing()
    with pytest.raises(UserInputError, match="gradient checkpointing on"):
        ancre_lightning.rewire(model, "ancre")
    model = ancre_lightning.rewire(make("dit"), "ancre").train()
    model.enable_gradient_checkpointing()  # after rewiring: the recomputation runs a block out of turn
    with pytest.raises(UserInputError, match="ran out of turn"):
        run("dit", model).sum().backward()
