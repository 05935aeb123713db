"""The 2025-26 families against plain reference loops written from the papers' equations.

Each reference below is written from the papers' equations (DESIGN.md, "The 2025-26 families"),
with explicit loops over layers, sources and streams and none of the library's code paths. The
comparisons run in float64 (a float64 model computes its wiring in float64 throughout), where only
the order of operations differs, so they hold on any CPU; one float32 check per family sits at the
end (:func:`test_each_family_matches_its_reference_in_float32`).
"""

from __future__ import annotations

import functools

import pytest
import torch

from ancre_lightning.connectivity import build_connectivity
from ancre_lightning.errors import UserInputError

import stacks

D = 8


make_stack = functools.partial(stacks.make_stack, dim=D)


def randomize(params, seed=1, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture
def x():
    torch.manual_seed(42)
    return torch.randn(2, 3, D, requires_grad=True)


@pytest.fixture
def x64():
    torch.manual_seed(42)
    return torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)


def make_stack64(name: str, k: int, **options):
    """The tiny stack of ``name`` in float64 (blocks and wiring)."""
    stack = make_stack(name, k, **options).double()
    assert all(p.dtype == torch.float64 for p in stack.parameters())
    return stack


#: (rtol, atol of outputs; gradient atol as a fraction of the tensor's largest gradient, floor)
TOLERANCES = {
    # float64: the two sides differ only in the order of operations (unit roundoff 1.1e-16, sums of
    # at most a few hundred terms through 20 Sinkhorn rounds): measured below 1e-14
    torch.float64: (1e-10, 1e-12, 1e-10, 1e-12),
    # float32: a gradient entry is a long sum (20 Sinkhorn rounds for mHC) whose rounding error scales
    # with the largest terms, i.e. with the tensor's largest gradient, not with the entry: measured
    # 1.9e-6 x max|grad| at worst on one CPU and 4.9e-6 absolute on another (mHC, 4 streams), so
    # 1e-4 x max|grad|; a wrong wiring moves outputs and gradients by 1e-2 or more
    torch.float32: (1e-4, 1e-5, 1e-4, 1e-5),
}


def check_against(stack, x, ref_out, ref_exits=None):
    """Output, exits and the gradients of the input and of every parameter equal the reference,
    within the rounding of ``x``'s dtype (:data:`TOLERANCES`)."""
    rtol, atol, grad_rel, grad_floor = TOLERANCES[x.dtype]
    out, exits = stack(x, return_exits=True)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    if ref_exits is not None:
        assert len(exits) == len(ref_exits)
        for e, r in zip(exits, ref_exits):
            torch.testing.assert_close(e, r, rtol=rtol, atol=atol)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    params = [x] + [p for p in stack.parameters() if p.requires_grad]
    ours = torch.autograd.grad((out * probe).sum(), params, allow_unused=True)
    ref = torch.autograd.grad((ref_out * probe).sum(), params, allow_unused=True)
    for p, g, r in zip(params, ours, ref):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=rtol, atol=max(grad_floor, grad_rel * float(r.abs().max())))


# --- attention residuals --------------------------------------------------------------------------
def rms_norm(v, gain, eps=1e-6):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * gain


def depth_attention(sources, query, gain, weight_sum="sources"):
    """Per token: a = softmax_i(query . RMSNorm(source_i)) and the weighted sum of the raw sources,
    scaled by the number of sources n under ``weight_sum: sources`` (the weights n * a: all ones at
    zero queries, the residual sum), the average itself under ``one``. Returns the sum and its weights."""
    scores = torch.stack([(rms_norm(s, gain) * query).sum(-1) for s in sources], dim=-1)  # (..., n)
    a = torch.softmax(scores, dim=-1)
    if weight_sum == "sources":
        a = a * len(sources)
    return sum(a[..., i : i + 1] * s for i, s in enumerate(sources)), a


def attnres_reference(stack, x):
    """Layers 1..L (the paper's numbering) in blocks of S; merge m (m = l-2 for layer l >= 2, L-1 for
    the output) uses query m (the parameter times ``query_scale``). Returns the output, the exits
    (h_1..h_L, output) and the weights."""
    conn = stack.connectivity
    q, g, size, layers = conn.queries * conn.query_scale, conn.key_gains, conn.block_size, len(stack.blocks)
    completed, partial, inputs, weights = [x], [], [x], []
    for l in range(1, layers + 1):
        v = stack.blocks[l - 1](inputs[-1])
        partial.append(v)
        if l % size == 0:
            completed.append(sum(partial))
            partial = []
        sources = completed + ([sum(partial)] if partial else [])
        h, a = depth_attention(sources, q[l - 1], g[l - 1], conn.weight_sum)
        inputs.append(h)
        weights.append(a)
    return inputs[-1], inputs, weights


@pytest.mark.parametrize("weight_sum", ["sources", "one"])
@pytest.mark.parametrize("k,block_size", [(1, 1), (4, 1), (5, 2), (6, 3), (4, 4)])
def test_attnres_matches_reference(x64, k, block_size, weight_sum):
    stack = make_stack64("attnres", k, block_size=block_size, weight_sum=weight_sum)
    assert not stack.connectivity.inner_residual and stack.connectivity.per_token
    randomize(stack.connectivity.gate_parameters())
    out, exits, _ = attnres_reference(stack, x64)
    check_against(stack, x64, out, exits)


def test_attnres_query_scale_multiplies_the_queries(x64):
    stack = make_stack64("attnres", 5, block_size=2, query_scale=0.1)
    randomize(stack.connectivity.gate_parameters())
    out, exits, _ = attnres_reference(stack, x64)
    check_against(stack, x64, out, exits)
    plain = make_stack64("attnres", 5, block_size=2)
    plain.load_state_dict(stack.state_dict())
    with torch.no_grad():
        plain.connectivity.queries.mul_(0.1)
    torch.testing.assert_close(plain(x64), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 2])
def test_attnres_zero_queries_give_the_residual_sum_or_the_uniform_average(x, block_size):
    """Zero queries: every merge is the sum of everything so far (weight_sum: sources, the
    residual stream h_0 + v_1 + .. + v_l) or that sum over the number of sources (one)."""
    k = 4
    for weight_sum in ("sources", "one"):
        stack = make_stack("attnres", k, block_size=block_size, weight_sum=weight_sum)
        vs, h = [x], x
        for l, block in enumerate(stack.blocks, start=1):
            vs.append(block(h))
            n_sources = 1 + l // block_size + (1 if l % block_size else 0)
            h = sum(vs) if weight_sum == "sources" else sum(vs) / n_sources
        torch.testing.assert_close(stack(x), h)
        assert torch.equal(stack.connectivity.gate_parameters()[0], torch.zeros(k, D))


def test_attnres_frozen_queries_are_buffers_that_keep_the_uniform_wiring(x):
    stack = make_stack("attnres", 3, learn_queries=False)
    conn = stack.connectivity
    assert conn.gate_parameters() == [] and not list(conn.parameters())
    assert set(conn.state_dict()) == {"queries", "key_gains"}  # the names of the learned ones: checkpoints load both ways
    learned = make_stack("attnres", 3)
    learned.load_state_dict(stack.state_dict())
    torch.testing.assert_close(stack(x), learned(x))
    stack(x).square().mean().backward()
    assert torch.equal(conn.queries, torch.zeros(3, D))


def test_attnres_coefficients_are_the_token_mean_of_the_weights(x):
    k, size = 5, 2
    stack = make_stack("attnres", k, block_size=size)
    randomize(stack.connectivity.gate_parameters(), seed=4)
    before = stack.connectivity.coefficients().clone()
    for j in range(k):  # zero-query start: weight 1 on every source (n times the uniform 1 / n)
        torch.testing.assert_close(before[j, : j + 2], torch.ones(j + 2))
        assert before[j, j + 2 :].abs().sum() == 0
    stack(x)
    _, _, weights = attnres_reference(stack, x)
    mean, spread = stack.connectivity.coefficients(), stack.connectivity.coefficient_spread()
    for j, a in enumerate(weights):
        a = a.detach().reshape(-1, a.shape[-1])  # (tokens, sources)
        block_of = [0] + [1 + (c - 1) // size for c in range(1, j + 2)]  # history column -> source
        torch.testing.assert_close(mean[j, : j + 2], a.mean(0)[block_of])
        torch.testing.assert_close(spread[j, : j + 2], a.std(0, unbiased=False)[block_of], atol=1e-6, rtol=1e-5)
        assert mean[j, j + 2 :].abs().sum() == 0
    assert not torch.equal(mean, before)


@pytest.mark.parametrize("block_size", [0, 5])
def test_attnres_block_size_out_of_range_is_refused(block_size):
    with pytest.raises(UserInputError, match=r"attnres block_size must be between 1 .* 4, got"):
        build_connectivity("attnres", 4, dim=D, block_size=block_size)


def test_per_token_families_need_the_width():
    with pytest.raises(UserInputError, match="needs their width"):
        build_connectivity("attnres", 4)


# --- hyper-connections --------------------------------------------------------------------------
def plain_rms(v, eps=1e-6):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def hyper_reference(stack, x):
    """HC: h = sum_s Am[s] H_s; y = f(h); H'_t = B[t] y + sum_s Ar[s, t] H_s; the head sees sum_s H_s."""
    c = stack.connectivity
    n = c.num_streams
    streams = [x] * n
    exits = [sum(streams)]
    for l, block in enumerate(stack.blocks):
        am = [c.read[l, s] for s in range(n)]
        ar = [[c.mix[l, s, t] for t in range(n)] for s in range(n)]
        b = [c.write[l, t] for t in range(n)]
        if c.dynamic:
            normed = [plain_rms(h) for h in streams]
            sa, sr, sb = c.scales[l]
            am = [am[s] + sa * torch.tanh(normed[s] @ c.read_proj[l]).unsqueeze(-1) for s in range(n)]
            dyn = [torch.tanh(normed[s] @ c.mix_proj[l]) for s in range(n)]  # (..., n) per source
            ar = [[ar[s][t] + sr * dyn[s][..., t : t + 1] for t in range(n)] for s in range(n)]
            b = [b[t] + sb * torch.tanh(normed[t] @ c.write_proj[l]).unsqueeze(-1) for t in range(n)]
        y = block(sum(am[s] * streams[s] for s in range(n)))
        streams = [b[t] * y + sum(ar[s][t] * streams[s] for s in range(n)) for t in range(n)]
        exits.append(sum(streams))
    return exits[-1], exits


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("k,streams", [(1, 1), (4, 2), (5, 4)])
def test_hyper_matches_reference(x64, k, streams, dynamic):
    stack = make_stack64("hyper", k, streams=streams, dynamic=dynamic)
    assert not stack.connectivity.inner_residual and stack.connectivity.per_token == dynamic
    randomize(stack.connectivity.gate_parameters(), scale=0.3)
    out, exits = hyper_reference(stack, x64)
    check_against(stack, x64, out, exits)


@pytest.mark.parametrize("dynamic", [False, True])
def test_hyper_at_its_static_start_is_a_residual_network_after_the_final_norm(x, dynamic):
    k = 5
    hyper, plain = make_stack("hyper", k, seed=3, dynamic=dynamic), make_stack("residual", k, seed=3)
    for hb, pb in zip(hyper.blocks, plain.blocks):
        hb.load_state_dict(pb.state_dict())
    torch.testing.assert_close(plain_rms(hyper(x), 1e-12), plain_rms(plain(x), 1e-12))


# --- mHC ----------------------------------------------------------------------------------------
def sinkhorn_reference(logits, iters):
    """exp, then `iters` rounds of column then row normalisation, entry by entry: m[t][s] (..., )."""
    n = logits.shape[-1]
    m = [[torch.exp(logits[..., t, s]) for s in range(n)] for t in range(n)]
    for _ in range(iters):
        cols = [sum(m[t][s] for t in range(n)) for s in range(n)]
        m = [[m[t][s] / cols[s] for s in range(n)] for t in range(n)]
        rows = [sum(m[t][s] for s in range(n)) for t in range(n)]
        m = [[m[t][s] / rows[t] for s in range(n)] for t in range(n)]
    return m


def mhc_reference(stack, x):
    """mHC: x' = RMSNorm(vec H); pre = sigmoid(a x'P + b); post = 2 sigmoid(.); res = Sinkhorn(exp(.));
    H'_t = sum_s res[t][s] H_s + post[t] f(sum_s pre[s] H_s); the head sees sum_s r[s] H_s."""
    c = stack.connectivity
    n = c.num_streams

    def head(streams):
        if c.head == "sum":
            return sum(streams)
        r = torch.sigmoid(c.head_gating * (plain_rms(torch.cat(streams, -1), c.eps) @ c.head_proj.t()) + c.head_bias)
        return sum(r[..., s : s + 1] * streams[s] for s in range(n))

    streams = [x] * n
    exits = [head(streams)]
    for l, block in enumerate(stack.blocks):
        mixes = plain_rms(torch.cat(streams, -1), c.eps) @ c.proj[l].t()  # (..., 2n + n*n)
        a0, a1, a2 = c.gating[l]
        pre = [torch.sigmoid(a0 * mixes[..., s] + c.bias_pre[l, s]).unsqueeze(-1) for s in range(n)]
        post = [2 * torch.sigmoid(a1 * mixes[..., n + t] + c.bias_post[l, t]).unsqueeze(-1) for t in range(n)]
        logits = torch.stack(
            [torch.stack([a2 * mixes[..., 2 * n + t * n + s] + c.bias_res[l, t, s] for s in range(n)], -1) for t in range(n)], -2
        )
        res = sinkhorn_reference(logits, c.sinkhorn_iters)
        y = block(sum(pre[s] * streams[s] for s in range(n)))
        streams = [sum(res[t][s].unsqueeze(-1) * streams[s] for s in range(n)) + post[t] * y for t in range(n)]
        exits.append(head(streams))
    return exits[-1], exits


@pytest.mark.parametrize("init,head", [("residual", "learned"), ("uniform", "sum"), ("residual", "sum")])
@pytest.mark.parametrize("k,streams", [(1, 1), (3, 2), (4, 4)])
def test_mhc_matches_reference(x64, k, streams, init, head):
    stack = make_stack64("mhc", k, streams=streams, init=init, head=head)
    randomize(stack.connectivity.gate_parameters(), scale=0.3)
    out, exits = mhc_reference(stack, x64)
    check_against(stack, x64, out, exits)


def test_sinkhorn_is_doubly_stochastic_after_20_iterations():
    from ancre_lightning.connectivity import sinkhorn

    gen = torch.Generator().manual_seed(0)
    for logits in (torch.randn(256, 4, 4, generator=gen), 2 * torch.eye(4) + 0.5 * torch.randn(256, 4, 4, generator=gen)):
        m = sinkhorn(logits, 20)
        assert m.dtype == torch.float32 and (m > 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(256, 4), atol=1e-3, rtol=0)
        torch.testing.assert_close(m.sum(-2), torch.ones(256, 4), atol=1e-3, rtol=0)
    assert (sinkhorn(torch.randn(256, 4, 4, generator=gen), 1).sum(-2) - 1).abs().max() > 1e-3  # it takes rounds


def test_mhc_residual_start_is_near_a_residual_network(x):
    k = 4
    mhc, plain = make_stack("mhc", k, seed=3), make_stack("residual", k, seed=3)
    for hb, pb in zip(mhc.blocks, plain.blocks):
        hb.load_state_dict(pb.state_dict())
    # equal streams stay equal; only the O(0.01 * 0.02) per-token terms differ from residual
    torch.testing.assert_close(plain_rms(mhc(x)), plain_rms(plain(x)), atol=0.02, rtol=0)


# --- dynamic dense (MUDD, one view) ---------------------------------------------------------------
def mudd_reference(stack, x):
    """The pre- and post-norm form (the default), one stream: after block j, with X_0 = x and
    X_{j+1} = Block_j(h_j),
    w = W2 GELU(W1 (g_j * RMSNorm(X_{j+1}))) + a_j;  s = sum_i w_i n_i RMSNorm(X_i);
    h_{j+1} = X_{j+1} + q_j * RMSNorm(s).  The gains n_i, q_j broadcast over channels."""
    c = stack.connectivity
    eps = c.eps
    outputs, h, exits = [x], x, [x]
    for j, block in enumerate(stack.blocks):
        outputs.append(block(h))
        m = c.weights[j]
        w = torch.nn.functional.gelu((m.gain * plain_rms(outputs[-1], eps)) @ m.w1.t()) @ m.w2.t() + m.static  # (..., j+2)
        s = torch.zeros_like(x)
        for i in range(j + 2):
            s = s + w[..., i : i + 1] * (c.state_gains[i] * plain_rms(outputs[i], eps))
        h = outputs[-1] + c.post_gains[j] * plain_rms(s, eps)
        exits.append(h)
    return h, exits


def mudd_plain_reference(stack, x):
    """``norm: none``: after block j: w = W2 GELU(W1 RMSNorm(X_{j+1})) + a_j; h_{j+1} = sum_i w_i X_i."""
    c = stack.connectivity
    outputs, h, exits = [x], x, [x]
    for j, block in enumerate(stack.blocks):
        outputs.append(block(h))
        m = c.weights[j]
        w = torch.nn.functional.gelu(plain_rms(outputs[-1], m.eps) @ m.w1.t()) @ m.w2.t() + m.static  # (..., j+2)
        h = sum(w[..., i : i + 1] * outputs[i] for i in range(j + 2))
        exits.append(h)
    return h, exits


@pytest.mark.parametrize("k,options", [
    (1, {}), (4, {}), (3, {"hidden": 5}), (4, {"channel_gains": True}), (3, {"post_gain": 0.5}),
    (1, {"norm": "none"}), (4, {"norm": "none"}), (3, {"hidden": 5, "norm": "none"}),
])  # fmt: skip
def test_mudd_matches_reference(x64, k, options):
    stack = make_stack64("mudd", k, **options)
    assert stack.connectivity.inner_residual
    randomize(stack.connectivity.gate_parameters(), scale=0.3)
    reference = mudd_plain_reference if options.get("norm") == "none" else mudd_reference
    out, exits = reference(stack, x64)
    check_against(stack, x64, out, exits)


@pytest.mark.parametrize("options", [{}, {"norm": "none"}, {"channel_gains": True}])
def test_mudd_at_init_is_exactly_a_residual_network(x, options):
    mudd, plain = make_stack("mudd", 5, seed=2, **options), make_stack("residual", 5, seed=2)
    for hb, pb in zip(mudd.blocks, plain.blocks):
        hb.load_state_dict(pb.state_dict())
    out, exits = mudd(x, return_exits=True)
    ref, ref_exits = plain(x, return_exits=True)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(exits, ref_exits))


# --- every family -----------------------------------------------------------------------------------
FLOAT32_CASES = {
    "attnres": ({"block_size": 2}, lambda stack, x: attnres_reference(stack, x)[:2]),
    "hyper": ({"streams": 2, "dynamic": True}, hyper_reference),
    "mhc": ({"streams": 4}, mhc_reference),
    "mudd": ({}, mudd_reference),
}


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
def test_each_family_matches_its_reference_in_float32(x, name):
    """The float32 smoke check of each family: the wiring computes in float32 on float32 states,
    within float32 rounding of the reference (:data:`TOLERANCES`)."""
    options, reference = FLOAT32_CASES[name]
    stack = make_stack(name, 4, **options)
    randomize(stack.connectivity.gate_parameters(), scale=0.3)
    out, exits = reference(stack, x)
    check_against(stack, x, out, exits)


FAMILIES = [
    ("attnres", {}), ("attnres", {"block_size": 2}), ("hyper", {}), ("hyper", {"dynamic": True}),
    ("mhc", {}), ("mudd", {}), ("mudd", {"norm": "none"}),
]  # fmt: skip


@pytest.mark.parametrize("name,options", FAMILIES)
def test_coefficients_rebuild_the_forward_pass_of_one_token(name, options):
    """With one token the token mean is that token's weights: the (K, K+1) picture must rebuild
    every layer's input (row j: layer j+1's) and the output (row K-1) from the history
    s_0 = v_0, s_{i+1} = u_i (the layers' outputs)."""
    k = 4
    stack = make_stack(name, k, **options)
    randomize(stack.connectivity.gate_parameters(), seed=6, scale=0.3)
    inputs, history = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in stack.blocks]
    hooks += [b.register_forward_hook(lambda m, a, o: history.append(o)) for b in stack.blocks]
    x1 = torch.randn(1, 1, D)
    with torch.no_grad():
        out = stack(x1)
    for hook in hooks:
        hook.remove()
    c = stack.connectivity.coefficients()
    sources, targets = [x1] + history, inputs[1:] + [out]
    for j in range(k):
        rebuilt = sum(c[j, i] * sources[i] for i in range(j + 2))
        torch.testing.assert_close(rebuilt, targets[j], rtol=1e-4, atol=1e-5)
    spread = stack.connectivity.coefficient_spread()
    assert spread is None or spread.abs().max() < 1e-5  # one token: no spread


@pytest.mark.parametrize("name,options", FAMILIES)
def test_every_wiring_parameter_learns_by_the_second_step(name, options):
    stack = make_stack(name, 3, **options)
    params = stack.connectivity.gate_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-2)
    touched = {id(p): False for p in params}
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        opt.zero_grad()
        xb = torch.randn(4, 5, D, generator=gen)
        stack(xb).square().mean().backward()
        for p in params:
            touched[id(p)] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        opt.step()
    names = {id(p): n for n, p in stack.connectivity.named_parameters()}
    assert all(touched.values()), [names[i] for i, t in touched.items() if not t]


@pytest.mark.parametrize("name,option", [("hyper", "streams"), ("mhc", "streams"), ("mhc", "sinkhorn_iters")])
def test_counts_below_one_are_refused(name, option):
    with pytest.raises(UserInputError, match=f"{name} {option} must be >= 1"):
        build_connectivity(name, 4, dim=D, **{option: 0})


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,options", FAMILIES)
def test_compiles_in_one_graph_without_recompiles_as_training_goes_on(name, options, backend):
    """fullgraph=True fails at any graph break; error_on_recompile fails when an optimiser step (new
    parameter values) or the recorded statistics (buffers changed in place) trigger a new compile."""
    import torch._dynamo

    torch._dynamo.reset()
    stack = make_stack(name, 3, **options)
    eager = make_stack(name, 3, **options)
    compiled = torch.compile(stack, backend=backend, fullgraph=True)
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    xb = torch.randn(2, 5, D, generator=gen)
    out = compiled(xb)
    torch.testing.assert_close(out, eager(xb), rtol=1e-4, atol=1e-5)  # the same function as eager
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            opt.zero_grad()
            compiled(torch.randn(2, 5, D, generator=gen)).square().mean().backward()
            opt.step()
    if stack.connectivity.per_token:  # the statistics were recorded inside the compiled graph
        assert not torch.equal(stack.connectivity.coefficients(), eager.connectivity.coefficients())


# --- in the models and modules --------------------------------------------------------------------
MODEL_FAMILIES = [("attnres", {"block_size": 2}), ("hyper", {"dynamic": True}), ("mhc", {}), ("mudd", {})]


@pytest.mark.parametrize("name,options", MODEL_FAMILIES)
def test_wiring_stays_float32_under_bf16_true_and_only_its_projections_are_decayed(name, options):
    from ancre_lightning.modules import LLMModule

    module = LLMModule(dim=32, n_layers=2, n_heads=2, max_seq_len=16, connectivity=name,
                       connectivity_options=options, granularity="sublayer")  # fmt: skip
    module.to(torch.bfloat16)  # what precision: bf16-true does
    gates = module.gate_parameters()
    assert gates and all(p.dtype == torch.float32 for p in gates)
    assert module.net.embed.weight.dtype == torch.bfloat16
    groups = {g["name"]: g for g in module.parameter_groups()}
    projections = {id(p) for p in module.connectivity.projection_parameters()}  # decayed by default (wiring_weight_decay)
    assert {id(p) for p in groups["gates"]["params"]} == {id(p) for p in gates} - projections
    assert groups["gates"]["weight_decay"] == 0.0
    if projections:
        assert {id(p) for p in groups["wiring_decay"]["params"]} == projections
        assert groups["wiring_decay"]["weight_decay"] == module.weight_decay > 0
    else:
        assert "wiring_decay" not in groups
    named = dict(module.named_parameters())
    wiring = {n for n, p in named.items() if id(p) in {id(g) for g in gates}}
    assert wiring == {n for n in named if ".connectivity." in n}  # every wiring parameter is a gate
    ids = torch.randint(0, 257, (2, 16))
    logits = module(ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    _, exits = module.net.forward_features(ids, return_exits=True)
    assert len(exits) == 5 and all(e.dtype == torch.bfloat16 for e in exits)


def test_sublayer_granularity_is_the_ordinary_pre_norm_transformer_for_residual():
    from ancre_lightning.models import CausalLM

    ids = torch.randint(0, 257, (2, 12))
    torch.manual_seed(0)
    block = CausalLM(257, dim=32, n_layers=3, n_heads=2, connectivity="residual")
    torch.manual_seed(0)
    sub = CausalLM(257, dim=32, n_layers=3, n_heads=2, connectivity="residual", granularity="sublayer")
    assert sub.connectivity.num_layers == 6 and block.connectivity.num_layers == 3
    assert torch.equal(block(ids), sub(ids))  # same weights (same seed), same function


def test_gate_sparsity_refuses_wirings_where_a_penalty_means_nothing():
    from ancre_lightning.callbacks import GateSparsity
    from ancre_lightning.modules import LLMModule

    module = LLMModule(dim=32, n_layers=2, n_heads=2, connectivity="mhc")
    with pytest.raises(UserInputError, match="GateSparsity: a penalty on the wiring of stack: mhc has no meaning"):
        GateSparsity().setup(None, module, "fit")


def test_gate_visualization_draws_the_token_spread_of_per_token_wirings(tmp_path):
    import lightning as L

    from ancre_lightning.callbacks import GateVisualization
    from ancre_lightning.modules import LLMModule

    module = LLMModule(dim=32, n_layers=2, n_heads=2, max_seq_len=16, connectivity="attnres")
    randomize(module.gate_parameters(), scale=0.5)
    module(torch.randint(0, 257, (2, 16)))
    trainer = L.Trainer(default_root_dir=tmp_path, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), enable_progress_bar=False)
    callback = GateVisualization()
    callback.log_dir = tmp_path
    callback.draw(trainer, module, 7)
    files = sorted(p.name for p in (tmp_path / "gates").glob("*.png"))
    assert files == ["token_spread_step0000007.png", "wiring_step0000007.png"]
    assert module.connectivity.coefficient_spread().max() > 0


@pytest.mark.parametrize("overrides,message", [
    ({"granularity": "sublayer"}, "ResNet granularity must be 'block'"),
    ({"connectivity": "attnres"}, "ResNet states are (B, C, H, W) feature maps"),
    ({"connectivity": "hyper"}, "wire the ResNet with one of residual, ancre, acn, denseformer, fixed"),
])  # fmt: skip
def test_the_resnet_refuses_what_has_no_meaning_for_feature_maps(overrides, message):
    from ancre_lightning.models import ResNet

    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ResNet(stage_depths=(2, 2), stage_widths=(8, 16), **overrides)
