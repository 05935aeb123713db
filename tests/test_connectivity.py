"""Every connectivity against a plain reference loop written from the math of DESIGN.md."""

from __future__ import annotations

import functools

import pytest
import torch

from ancre_lightning.connectivity import (
    CONNECTIVITIES,
    ConnectedStack,
    StaticWiring,
    build_connectivity,
    weighted_sum,
    weighted_sum_loop,
)
from ancre_lightning.errors import UserInputError

import stacks

D = 6


TinyBlock = functools.partial(stacks.TinyBlock, D)
make_stack = functools.partial(stacks.make_stack, dim=D)


def randomize_gates(stack, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.connectivity.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def grads(stack, x, out):
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    params = [x] + list(stack.parameters())
    params = [p for p in params if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_grads(stack, x, out, ref):
    for g, r in zip(grads(stack, x, out), grads(stack, x, ref)):
        if g is None or r is None:
            assert g is None and r is None
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def ancre_reference(stack, x):
    conn = stack.connectivity
    k, tau = conn.num_layers, conn.tau
    flat = conn.gate_logits
    pos = lambda j, i: j * (j + 1) // 2 + i  # row-major lower triangle
    p = {}
    if conn.normalization == "incoming":
        for j in range(k):
            row = torch.softmax(torch.stack([flat[pos(j, i)] for i in range(j + 1)]) / tau, 0)
            for i in range(j + 1):
                p[i, j] = row[i]
    else:
        for i in range(k):
            col = torch.softmax(torch.stack([flat[pos(j, i)] for j in range(i, k)]) / tau, 0)
            for n, j in enumerate(range(i, k)):
                p[i, j] = col[n]
    hs = [x]
    for j, block in enumerate(stack.blocks):
        f = torch.tanh(block.lin(hs[j]))  # the branch f_j of the paper
        u = hs[j] + f if conn.inner_residual else f  # as released: the block keeps its inner residual
        hs.append(u + sum(p[i, j] * hs[i] for i in range(j + 1)))
    return hs


def assert_matches_ancre_reference(stack, x):
    """Output, every exit and the gradients of the input and all parameters equal the paper's loop."""
    hs = ancre_reference(stack, x)
    out, exits = stack(x, return_exits=True)
    torch.testing.assert_close(out, hs[-1])
    for e, h in zip(exits, hs):
        torch.testing.assert_close(e, h)
    assert_same_grads(stack, x, out, hs[-1])


@pytest.fixture
def x():
    torch.manual_seed(42)
    return torch.randn(3, 5, D, requires_grad=True)


def test_residual_equals_plain_loop(x):
    stack = make_stack("residual", 4)
    ref = x
    for b in stack.blocks:
        ref = b(ref)
    out = stack(x)
    assert torch.equal(out, ref)
    assert_same_grads(stack, x, out, ref)


@pytest.mark.parametrize("normalization", ["incoming", "outgoing"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_ancre_matches_reference_loop(x, normalization, k):
    stack = make_stack("ancre", k, normalization=normalization, tau=0.05)
    randomize_gates(stack)
    assert_matches_ancre_reference(stack, x)
    if k > 1:
        logit_grad = torch.autograd.grad(stack(x).square().sum(), stack.connectivity.gate_logits)[0]
        assert logit_grad.abs().sum() > 0, "no gradient reaches the gate logits"


@pytest.mark.parametrize("normalization", ["incoming", "outgoing"])
@pytest.mark.parametrize("init", ["uniform", "embedding", "predecessor"])
def test_ancre_options_match_reference_loop(x, normalization, init):
    """inner_residual=False (the merge is the blocks' only skip) and every start, against the loop."""
    if init == "embedding" and normalization == "outgoing":
        with pytest.raises(UserInputError, match="normalization 'incoming'"):
            build_connectivity("ancre", 4, normalization=normalization, init=init)
        return
    stack = make_stack("ancre", 4, normalization=normalization, tau=0.05, inner_residual=False, init=init, init_weight=0.7)
    assert not stack.connectivity.inner_residual and not any(b.residual for b in stack.blocks)
    assert_matches_ancre_reference(stack, x)
    g = torch.autograd.grad(stack(x).square().sum(), stack.connectivity.gate_logits)[0]
    g_ref = torch.autograd.grad(ancre_reference(stack, x)[-1].square().sum(), stack.connectivity.gate_logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)  # float32 rounding, amplified by 1 / tau


@pytest.mark.parametrize("tau", [0.01, 1.0])
def test_ancre_init_puts_the_weight_where_it_says(tau):
    k, w = 5, 0.8
    gates = build_connectivity("ancre", k, init="predecessor", init_weight=w, tau=tau).gate_matrix()
    for j in range(1, k):  # row j: sources h_0..h_j, the predecessor h_j gets w, the others share 1 - w
        torch.testing.assert_close(gates[j, j], torch.tensor(w))
        torch.testing.assert_close(gates[j, :j], torch.full((j,), (1 - w) / j))
    assert gates[0, 0] == 1.0
    gates = build_connectivity("ancre", k, init="embedding", init_weight=w, tau=tau).gate_matrix()
    for j in range(1, k):
        torch.testing.assert_close(gates[j, 0], torch.tensor(w))
        torch.testing.assert_close(gates[j, 1 : j + 1], torch.full((j,), (1 - w) / j))
    gates = build_connectivity("ancre", k, normalization="outgoing", init="predecessor", init_weight=w, tau=tau).gate_matrix()
    for i in range(k - 1):  # column i: targets j = i..K-1, the first (j = i) gets w
        torch.testing.assert_close(gates[i, i], torch.tensor(w))
        torch.testing.assert_close(gates[i + 1 :, i], torch.full((k - 1 - i,), (1 - w) / (k - 1 - i)))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UserInputError, match="init_weight"):
            build_connectivity("ancre", k, init="predecessor", init_weight=bad)


def test_ancre_without_inner_residual_started_on_the_predecessor_is_residual(x):
    """h_{j+1} = f_j(h_j) + sum_i p_ij h_i with p on h_j: the plain residual chain h + f(h)."""
    stack = make_stack("ancre", 6, inner_residual=False, init="predecessor", init_weight=1 - 1e-6)
    ref = x
    for block in stack.blocks:
        ref = ref + torch.tanh(block.lin(ref))
    torch.testing.assert_close(stack(x), ref, rtol=1e-4, atol=1e-4)


def test_ancre_inner_residual_option_reaches_the_models_and_rewire():
    from ancre_lightning.connectivity.registry import keeps_inner_residual
    from ancre_lightning.models.llama import CausalLM

    assert keeps_inner_residual("ancre", {}) and not keeps_inner_residual("ancre", {"inner_residual": "false"})
    assert not keeps_inner_residual("acn", {}) and keeps_inner_residual("residual", {})
    for granularity, layers in (("block", 3), ("sublayer", 6)):
        lm = CausalLM(vocab_size=11, dim=8, n_layers=3, n_heads=2, connectivity="ancre", granularity=granularity,
                      connectivity_options={"inner_residual": False})  # fmt: skip
        assert lm.stack.num_layers == layers and not lm.stack.connectivity.inner_residual
        assert all(not getattr(b, "inner_residual", getattr(b, "residual", True)) for b in lm.stack.blocks)
    import test_rewire
    from ancre_lightning import rewire

    wired = rewire(test_rewire.make("timm_vit"), "ancre", inner_residual=False).blocks  # timm's blocks split in two
    assert not wired.connectivity.inner_residual and [layer.residual for layer in wired.blocks] == [False] * 3


def test_ancre_gate_gradient_matches_reference(x):
    stack = make_stack("ancre", 4, tau=0.1)
    randomize_gates(stack, seed=3)
    logits = stack.connectivity.gate_logits
    g_ours = torch.autograd.grad(stack(x).square().sum(), logits)[0]
    g_ref = torch.autograd.grad(ancre_reference(stack, x)[-1].square().sum(), logits)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_ancre_normalisation_and_frozen_single_logits():
    k = 5
    conn = build_connectivity("ancre", k)
    assert conn.gate_logits.dtype == torch.float32 and conn.gate_logits.numel() == k * (k + 1) // 2
    assert not any(n == "tau" for n, _ in conn.named_parameters()) and conn.tau.dtype == torch.float32
    coeffs = conn.coefficients()
    assert coeffs.shape == (k, k + 1)
    # logits start at zero: uniform 1/(j+1), not identity
    for j in range(k):
        torch.testing.assert_close(coeffs[j, : j + 1], torch.full((j + 1,), 1.0 / (j + 1)))
        assert coeffs[j, j + 1] == 1.0 and coeffs[j, j + 2 :].abs().sum() == 0
    with torch.no_grad():
        conn.gate_logits.copy_(torch.randn_like(conn.gate_logits))
    gates = conn.gate_matrix()
    torch.testing.assert_close(gates.sum(1), torch.ones(k))
    (gates * torch.randn(k, k)).sum().backward()
    assert conn.gate_logits.grad[0] == 0  # row 0 has one source: frozen at p = 1

    out = build_connectivity("ancre", k, normalization="outgoing")
    with torch.no_grad():
        out.gate_logits.copy_(torch.randn_like(out.gate_logits))
    gates = out.gate_matrix()
    torch.testing.assert_close(gates.sum(0), torch.ones(k))
    (gates * torch.randn(k, k)).sum().backward()
    assert out.gate_logits.grad[-1] == 0  # the last source has one target: frozen


def test_ancre_constant_is_frozen_uniform():
    conn = build_connectivity("ancre", 4, parameterization="constant")
    assert not conn.gate_logits.requires_grad and conn.gate_parameters() == []
    torch.testing.assert_close(conn.coefficients()[3, :4], torch.full((4,), 0.25))


def test_tau_is_a_buffer_that_changes_the_gates_in_place():
    conn = build_connectivity("ancre", 3, tau=1.0)
    with torch.no_grad():
        conn.gate_logits.copy_(torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.3]))
    soft = conn.gate_matrix()[2].clone()
    conn.tau.fill_(0.01)
    sharp = conn.gate_matrix()[2]
    assert sharp[2] > 0.99 > soft[2]
    assert "tau" in conn.state_dict()


def test_acn_matches_reference_and_exits(x):
    k = 4
    stack = make_stack("acn", k)
    assert not stack.connectivity.inner_residual
    h, us = x, []
    for b in stack.blocks:
        h = b(h)
        us.append(h)
    ref = x + sum(us)
    out = stack(x)
    torch.testing.assert_close(out, ref)
    assert_same_grads(stack, x, out, ref)
    out2, exits = stack(x, return_exits=True)
    assert len(exits) == k + 1 and torch.equal(out2, exits[k])
    for c in range(k + 1):
        torch.testing.assert_close(exits[c], x + sum(us[:c]) if c else x)


def denseformer_reference(stack, x):
    conn = stack.connectivity
    k, d, per = conn.num_layers, conn.dilation, conn.period
    alphas = iter(conn.dwa_weights)
    weights = {}
    for j in range(k):
        if (j + 1) % per == 0:
            for i in range((j + 1) % d, j + 2, d):
                weights[j, i] = next(alphas)
    xs, h = [x], x
    for j, block in enumerate(stack.blocks):
        xs.append(block(h))
        if (j + 1) % per == 0:
            h = sum(weights[j, i] * xs[i] for i in range(j + 2) if (j, i) in weights)
        else:
            h = xs[-1]
    return h


@pytest.mark.parametrize("dilation,period", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_denseformer_matches_reference(x, dilation, period):
    stack = make_stack("denseformer", 6, dilation=dilation, period=period)
    randomize_gates(stack, seed=5)
    out = stack(x)
    ref = denseformer_reference(stack, x)
    torch.testing.assert_close(out, ref)
    assert_same_grads(stack, x, out, ref)


def test_denseformer_equals_residual_at_init(x):
    dense = make_stack("denseformer", 5, seed=7, dilation=2, period=1)
    plain = make_stack("residual", 5, seed=7)
    torch.testing.assert_close(dense(x), plain(x))


def test_fixed_topology_matches_reference(x):
    stack = make_stack("fixed", 4, edges=["0:2", "1:3", "0:4"])
    assert not stack.connectivity.inner_residual
    hs = [x]
    edges = {(0, 2), (1, 3), (0, 4)}
    for j in range(1, 5):
        hs.append(stack.blocks[j - 1](hs[j - 1]) + sum(hs[i] for i in range(j) if (i, j) in edges))
    out = stack(x)
    torch.testing.assert_close(out, hs[-1])
    assert_same_grads(stack, x, out, hs[-1])
    assert build_connectivity("fixed", 4, edges="0:2+2:3").edges == [(0, 2), (2, 3)]


def test_extra_arguments_reach_every_block(x):
    stack = make_stack("ancre", 3)
    shift = torch.randn(D)
    hs = [x]
    for j, b in enumerate(stack.blocks):
        hs.append(b(hs[j], shift) + sum(hs[i] / (j + 1) for i in range(j + 1)))
    torch.testing.assert_close(stack(x, shift), hs[-1])
    torch.testing.assert_close(stack(x, shift=shift), hs[-1])


@pytest.mark.parametrize("name", sorted(n for n, cls in CONNECTIVITIES.items() if issubclass(cls, StaticWiring)))
def test_coefficients_describe_the_forward_pass(x, name):
    """Rebuild the output from coefficients() alone: the single source of truth for the wiring
    (per-token and multi-stream families: tests/test_families.py)."""
    k = 4
    options = {"edges": ["0:2", "1:4"]} if name == "fixed" else {}
    stack = make_stack(name, k, **options)
    randomize_gates(stack, seed=9)
    conn = stack.connectivity
    c = conn.coefficients().detach()
    assert c.shape == (k, k + 1) and c.dtype == torch.float32
    assert conn.shortcut_mask().shape == (k, k + 1)
    history, h = [x], x
    for j, b in enumerate(stack.blocks):
        u = b(h)
        h = sum(c[j, i] * history[i] for i in range(j + 1)) + c[j, j + 1] * u
        history.append(u if conn.stores_block_outputs else h)
    torch.testing.assert_close(stack(x), h)
    exits = stack(x, return_exits=True)[1]
    assert len(exits) == k + 1 and exits[0] is x


@pytest.mark.parametrize("name", ["ancre", "denseformer", "acn"])
def test_fused_aggregation_equals_loop(x, name):
    stack = make_stack(name, 3)
    randomize_gates(stack)
    ref = stack(x)
    ref_grads = grads(stack, x, ref)
    stack.aggregation = "fused"
    out = stack(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads(stack, x, out), ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_weighted_sum_fused_equals_loop_with_weight_gradients():
    torch.manual_seed(0)
    srcs = [torch.randn(4, 7, requires_grad=True) for _ in range(5)]
    w = torch.randn(5, requires_grad=True)
    ref = weighted_sum_loop(srcs, w)
    out = weighted_sum(srcs, w, "fused")
    torch.testing.assert_close(out, ref)
    g_ref = torch.autograd.grad(ref.sum() * 2, [w, *srcs])
    g_out = torch.autograd.grad(out.sum() * 2, [w, *srcs])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def test_bad_names_and_options_are_explained():
    with pytest.raises(ValueError, match="valid connectivities: residual, ancre, acn, denseformer, fixed"):
        build_connectivity("ancer", 4)
    with pytest.raises(ValueError, match="did you mean 'ancre'"):
        build_connectivity("ancer", 4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\].*tau=0.01"):
        build_connectivity("ancre", 4, temperature=0.1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        build_connectivity("ancre", 4, tau=0.0)
    with pytest.raises(ValueError, match="normalization"):
        build_connectivity("ancre", 4, normalization="rows")
    with pytest.raises(ValueError, match="0 <= i < j <= num_layers=3"):
        build_connectivity("fixed", 3, edges=["2:5"])
    with pytest.raises(ValueError, match="form 'i:j'"):
        build_connectivity("fixed", 3, edges=["a-b"])
    with pytest.raises(ValueError, match="3 blocks but .* num_layers=4"):
        ConnectedStack([TinyBlock(True) for _ in range(3)], build_connectivity("residual", 4))


def test_denseformer_period_beyond_the_depth_is_refused():
    with pytest.raises(UserInputError, match="period=7 is larger than the 6 blocks"):
        build_connectivity("denseformer", 6, period=7)
    assert build_connectivity("denseformer", 6, period=6).dwa_weights.numel() == 7  # one DWA, after the last block
