"""Weight decay of the wirings' projections of the states (``wiring_weight_decay``).

The large per-token projections (mHC's P, dynamic hyper-connections' W, MUDD's weight MLPs) are
decayed like the blocks' matrices by default (each paper's practice); the static gates, biases,
gating factors and gains never are; ``wiring_weight_decay: false`` keeps every wiring parameter
undecayed, ``true`` decays every wiring's projections.
"""

from __future__ import annotations

import pytest
import torch

from ancre_lightning.connectivity import CONNECTIVITIES, build_connectivity
from ancre_lightning.connectivity.mhc import ManifoldHyperConnections
from ancre_lightning.modules import ClassifierModule, DiffusionModule, LLMModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

#: (connectivity, options) -> names of its projection_parameters() at 2 layers
PROJECTIONS: dict[tuple[str, tuple], set[str]] = {
    ("residual", ()): set(),
    ("ancre", ()): set(),
    ("acn", ()): set(),
    ("denseformer", ()): set(),
    ("fixed", ()): set(),
    ("attnres", ()): set(),
    ("hyper", ()): set(),
    ("hyper", (("dynamic", True),)): {"read_proj", "mix_proj", "write_proj"},
    ("mhc", ()): {"proj", "head_proj"},
    ("mhc", (("head", "sum"),)): {"proj"},
    ("mudd", ()): {"weights.0.w1", "weights.0.w2", "weights.1.w1", "weights.1.w2"},
}


def names_of(module: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in module.named_parameters() if id(p) in ids}


def tiny_llm(connectivity: str, options: dict | None = None, **kw) -> LLMModule:
    torch.manual_seed(0)
    return LLMModule(vocab_size=17, dim=16, n_layers=2, n_heads=2, max_seq_len=8, connectivity=connectivity,
                     connectivity_options=options or {}, weight_decay=0.1, gate_lr=3e-3, **kw)  # fmt: skip


def groups_by_name(module) -> dict[str, dict]:
    groups = module.parameter_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter sits in two groups"
    assert set(seen) == {id(p) for p in module.net.parameters() if p.requires_grad}, "a parameter is in no group"
    return {g["name"]: g for g in groups}


def test_every_registered_wiring_names_its_projections():
    assert {name for name, _ in PROJECTIONS} == set(CONNECTIVITIES)
    for (name, options), expected in PROJECTIONS.items():
        conn = build_connectivity(name, 2, dim=8, **dict(options))
        assert names_of(conn, conn.projection_parameters()) == expected, name
        gates = {id(p) for p in conn.gate_parameters()}
        assert all(id(p) in gates for p in conn.projection_parameters())  # a subset of the wiring's parameters
        assert all(p.ndim >= 2 for p in conn.projection_parameters())


@pytest.mark.parametrize(
    ("name", "options", "decayed"),
    [
        ("mhc", {}, {"proj", "head_proj"}),
        ("hyper", {"dynamic": True}, {"read_proj", "mix_proj", "write_proj"}),
        ("mudd", {}, {"weights.0.w1", "weights.0.w2", "weights.1.w1", "weights.1.w2"}),
        ("ancre", {}, set()),
        ("hyper", {}, set()),
        ("denseformer", {}, set()),
    ],
)
def test_by_default_the_projections_are_decayed_like_the_blocks_matrices(name, options, decayed):
    module = tiny_llm(name, options)
    groups = groups_by_name(module)
    conn = module.connectivity
    wiring = {n for n, p in conn.named_parameters() if p.requires_grad}
    if decayed:
        group = groups["wiring_decay"]
        assert names_of(conn, group["params"]) == decayed
        assert group["weight_decay"] == groups["decay"]["weight_decay"] == 0.1
        assert group["lr"] == 3e-3  # gate_lr, as the rest of the wiring
    else:
        assert "wiring_decay" not in groups
    assert names_of(conn, groups["gates"]["params"]) == wiring - decayed
    assert groups["gates"]["weight_decay"] == 0.0 and groups["gates"]["lr"] == 3e-3
    blocks = {id(p) for p in module.net.stack.blocks.parameters()}
    assert not blocks & {id(p) for p in groups["gates"]["params"] + groups.get("wiring_decay", {"params": []})["params"]}


@pytest.mark.parametrize(("name", "options"), [("mhc", {}), ("hyper", {"dynamic": True}), ("mudd", {}), ("ancre", {})])
def test_false_keeps_every_wiring_parameter_undecayed(name, options):
    module = tiny_llm(name, options, wiring_weight_decay=False)
    groups = groups_by_name(module)
    assert "wiring_decay" not in groups
    assert names_of(module.connectivity, groups["gates"]["params"]) == {n for n, _ in module.connectivity.named_parameters()}


def test_none_follows_the_wirings_paper_and_true_overrides_it(monkeypatch):
    monkeypatch.setattr(ManifoldHyperConnections, "projections_decayed", False)  # a wiring whose paper would not decay them
    assert "wiring_decay" not in groups_by_name(tiny_llm("mhc"))
    forced = tiny_llm("mhc", wiring_weight_decay=True)
    assert names_of(forced.connectivity, groups_by_name(forced)["wiring_decay"]["params"]) == {"proj", "head_proj"}


def test_an_adamw_step_decays_the_projections_and_leaves_the_gates(monkeypatch):
    """With zero gradients, AdamW moves only the decayed parameters: by the factor 1 - lr * wd."""
    module = tiny_llm("mhc", fused_optimizer=False)
    conn = module.connectivity
    before = {n: p.detach().to(torch.float64).clone() for n, p in conn.named_parameters()}
    optimizer = module.build_optimizer()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    shrink = 1 - 3e-3 * 0.1  # gate_lr * weight_decay
    for n, p in conn.named_parameters():
        now = p.detach().to(torch.float64)
        want = before[n] * shrink if n in ("proj", "head_proj") else before[n]
        torch.testing.assert_close(now, want, rtol=1e-6, atol=0.0, msg=n)
    assert not torch.equal(conn.proj.detach().to(torch.float64), before["proj"])


def test_the_option_reaches_every_domain():
    classifier = ClassifierModule(arch="vit", connectivity="mudd", dim=16, depth=2, num_heads=2, patch_size=7,
                                  wiring_weight_decay=False)  # fmt: skip
    assert "wiring_decay" not in groups_by_name(classifier)
    assert "wiring_decay" in groups_by_name(ClassifierModule(arch="vit", connectivity="mudd", dim=16, depth=2, num_heads=2, patch_size=7))
    diffusion = DiffusionModule(image_size=8, in_channels=1, patch_size=4, dim=16, n_layers=2, n_heads=2,
                                connectivity="mhc", weight_decay=0.05, wiring_weight_decay=None)  # fmt: skip
    group = groups_by_name(diffusion)["wiring_decay"]
    assert group["weight_decay"] == 0.05 and names_of(diffusion.connectivity, group["params"]) == {"proj", "head_proj"}
    assert diffusion.hparams.wiring_weight_decay is None and classifier.hparams.wiring_weight_decay is False


def test_a_run_saved_before_the_wiring_decay_group_resumes_with_its_groups():
    """An optimiser state with the three old groups (decay, no_decay, gates) loads: the resumed run
    keeps the wiring undecayed. A new run's state keeps the default."""
    old = tiny_llm("mhc", wiring_weight_decay=False)
    old_state = {"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams),
                 "optimizer_states": [old.build_optimizer().state_dict()]}  # fmt: skip
    old_state["hyper_parameters"].pop("wiring_weight_decay")  # as saved before the option existed
    resumed = tiny_llm("mhc")
    with pytest.warns(UserWarning, match="wiring_weight_decay"):
        resumed.on_load_checkpoint(old_state)
    assert resumed.wiring_weight_decay is False and "wiring_decay" not in groups_by_name(resumed)
    resumed.build_optimizer().load_state_dict(old_state["optimizer_states"][0])  # the same groups: loads

    new = tiny_llm("mhc")
    new_state = {"state_dict": new.state_dict(), "hyper_parameters": dict(new.hparams),
                 "optimizer_states": [new.build_optimizer().state_dict()]}  # fmt: skip
    again = tiny_llm("mhc")
    again.on_load_checkpoint(new_state)
    assert again.wiring_weight_decay is None and "wiring_decay" in groups_by_name(again)
    again.build_optimizer().load_state_dict(new_state["optimizer_states"][0])
