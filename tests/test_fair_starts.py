"""Fair starts: under one seed, every wiring's network starts from residual's weights outside the wiring.

A comparison of wirings on one seed should differ in the wiring only. The wirings that draw random
initial values (mHC's projections, MUDD's weight MLPs) draw them from a generator of their own, so
the blocks, embeddings, norms and heads built after them get the same draws as residual's.
"""

from __future__ import annotations

import pytest
import torch

from ancre_lightning.connectivity import CONNECTIVITIES, build_connectivity
from ancre_lightning.connectivity.registry import own_random_stream, wiring_seed
from ancre_lightning.models import CausalLM, DiT, MLPMixer, VisionTransformer
from ancre_lightning.models.resnet import ResNet

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: every registered wiring with its default options, plus the variants that draw differently
WIRINGS: list[tuple[str, dict]] = [(name, {}) for name in CONNECTIVITIES] + [
    ("fixed", {"edges": ["0:2"]}),
    ("attnres", {"block_size": 2}),
    ("hyper", {"dynamic": True}),
    ("mhc", {"init": "uniform", "head": "sum"}),
    ("mudd", {"hidden": 8}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in options.items()) for name, options in WIRINGS]

NETWORKS = {
    "llm": lambda **kw: CausalLM(17, dim=16, n_layers=2, n_heads=2, max_seq_len=8, **kw),
    "vit": lambda **kw: VisionTransformer(num_classes=3, img_size=8, patch_size=4, dim=16, depth=2, num_heads=2, **kw),
    "mixer": lambda **kw: MLPMixer(num_classes=3, img_size=8, patch_size=4, dim=16, depth=2, **kw),
    "dit": lambda **kw: DiT(image_size=8, in_channels=1, patch_size=4, dim=16, n_layers=2, n_heads=2, num_classes=3, **kw),
}


def build(network: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return NETWORKS[network](**kw)


def split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters outside every wiring, the wirings' own parameters), by name, in float64."""
    outside, wiring = {}, {}
    for name, p in model.named_parameters():
        (wiring if ".connectivity." in f".{name}" else outside)[name] = p.detach().to(torch.float64)
    return outside, wiring


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"parameters outside the wiring differ from residual's: {differ}"


def test_the_cases_cover_every_registered_wiring():
    assert {name for name, _ in WIRINGS} == set(CONNECTIVITIES)


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("granularity", ["block", "sublayer"])
@pytest.mark.parametrize(("name", "options"), WIRINGS, ids=IDS)
def test_every_parameter_outside_the_wiring_equals_residuals(network, granularity, name, options):
    reference, _ = split(build(network, granularity=granularity))
    model = build(network, granularity=granularity, connectivity=name, connectivity_options=options)
    outside, _ = split(model)
    assert_same(outside, reference)


@pytest.mark.parametrize("name", ["ancre", "acn", "denseformer", "fixed"])
def test_resnet_stages_start_from_residuals_weights(name):
    """ResNet stages take the static wirings only (none draws today); the seed still pairs them."""
    kw = dict(num_classes=3, stage_depths=(2, 3), stage_widths=(4, 8), stem_width=4)
    torch.manual_seed(0)
    reference, _ = split(ResNet(**kw))
    torch.manual_seed(0)
    outside, _ = split(ResNet(connectivity=name, **kw))
    assert_same(outside, reference)


@pytest.mark.parametrize(("name", "options"), WIRINGS, ids=IDS)
def test_building_a_wiring_leaves_the_default_generator_as_it_was(name, options):
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    build_connectivity(name, 3, dim=8, **options)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(("name", "options"), [w for w in WIRINGS if w[0] in ("mhc", "mudd")], ids=lambda w: str(w))
def test_the_wirings_own_draws_are_deterministic_for_a_seed_and_change_with_it(name, options):
    _, first = split(build("llm", connectivity=name, connectivity_options=options))
    _, again = split(build("llm", connectivity=name, connectivity_options=options))
    _, other = split(build("llm", seed=1, connectivity=name, connectivity_options=options))
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # the random projections follow the seed


def test_the_wirings_draws_do_not_repeat_the_blocks_draws():
    """The wiring's generator is seeded apart from the default one: its first draws are not the
    numbers the default generator hands to the layers built next."""
    torch.manual_seed(0)
    seed = wiring_seed()
    with own_random_stream():
        inside = torch.randn(64, dtype=torch.float64)
    outside = torch.randn(64, dtype=torch.float64)
    assert not torch.equal(inside, outside)
    torch.manual_seed(0)
    assert wiring_seed() == seed  # read without advancing the default generator
    with own_random_stream():
        assert torch.equal(torch.randn(64, dtype=torch.float64), inside)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_network_built_on_a_cuda_device_starts_fair_too():
    """Built under ``torch.device("cuda")`` the draws come from the GPU's generator: it is forked too."""
    with torch.device("cuda"):
        torch.manual_seed(0)
        before = torch.cuda.get_rng_state()
        build_connectivity("mhc", 2, dim=8)
        assert torch.equal(torch.cuda.get_rng_state(), before)
        reference, _ = split(build("llm"))
        outside, _ = split(build("llm", connectivity="mudd"))
    assert_same(outside, reference)
