"""Attention residuals with zero queries are the residual network, at any depth (float64).

With zero queries every merge weighs its sources equally, and the sources add up to the residual
stream (the embedding plus every layer output so far). The paper's merge is the average, which the
layers' pre-norms and the head's final norm see only up to a factor, except through their epsilon;
at small init and depth the average is so small that the epsilon dominates (section "The factor" of
``ancre_lightning/connectivity/attnres.py``). With ``weight_sum: sources`` (the default) the merge is
the sum itself and the network is the residual network to float rounding; the last test shows that
the average (``weight_sum: one``, the earlier behaviour) fails the same comparison.

The residual network of the comparison runs the same layers: at ``granularity: sublayer`` the
ordinary pre-norm transformer (``residual``); at ``granularity: block`` attention residuals run
whole blocks without inner residual (``mlp(norm(attn(norm(x))))``, as ACN, hyper and mHC do), whose
residual network is ``h_{j+1} = h_j + f_j(h_j)``: ``fixed`` with the edges ``j:j+1``.
"""

from __future__ import annotations

import pytest
import torch

from ancre_lightning.models import CausalLM

VOCAB, DIM, HEADS, SEQ = 61, 32, 2, 12


def residual_of(n_layers: int, granularity: str) -> tuple[str, dict | None]:
    """The residual network over the layers attention residuals run at this granularity."""
    if granularity == "sublayer":
        return "residual", None
    return "fixed", {"edges": ",".join(f"{j}:{j + 1}" for j in range(n_layers))}


def twins(n_layers: int, granularity: str, **options) -> tuple[CausalLM, CausalLM]:
    """(attention residuals, residual network) in float64 with the same embedding, layers, final
    norm and head: every parameter but the wiring's copied from the residual model."""
    name, ref_options = residual_of(n_layers, granularity)
    kw = dict(dim=DIM, n_layers=n_layers, n_heads=HEADS, max_seq_len=SEQ, granularity=granularity, aggregation="loop")
    torch.manual_seed(0)
    ref = CausalLM(VOCAB, connectivity=name, connectivity_options=ref_options, **kw).double()
    torch.manual_seed(1)
    net = CausalLM(VOCAB, connectivity="attnres", connectivity_options=options, **kw).double()
    missing, unexpected = net.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and missing and all(".connectivity." in k for k in missing), (missing, unexpected)
    return net, ref


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def block_sizes(n_layers: int, granularity: str) -> list[int]:
    """Full (1) and blocks of 4 layers where the stack has that many."""
    layers = n_layers * (2 if granularity == "sublayer" else 1)
    return [1, 4] if layers >= 4 else [1]


CASES = [(n, g, s) for n in (4, 16, 32) for g in ("sublayer", "block") for s in block_sizes(n, g)]


@pytest.mark.parametrize("n_layers,granularity,block_size", CASES)
def test_zero_queries_give_the_logits_of_the_residual_network(ids, n_layers, granularity, block_size):
    net, ref = twins(n_layers, granularity, block_size=block_size)
    assert not net.connectivity.queries.any()
    with torch.no_grad():
        logits, expected = net(ids), ref(ids)
        _, exits = net.forward_features(ids, return_exits=True)
        _, ref_exits = ref.forward_features(ids, return_exits=True)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    for e, r in zip(exits, ref_exits):  # every early exit is the residual network's too
        torch.testing.assert_close(net.forward_head(e), ref.forward_head(r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("granularity,block_size", [("sublayer", 1), ("sublayer", 4), ("block", 1)])
def test_frozen_zero_queries_train_as_the_residual_network(ids, granularity, block_size):
    """Three AdamW steps: the same parameters, updated by the same gradients, the same logits."""
    net, ref = twins(4, granularity, block_size=block_size, learn_queries=False)
    assert net.connectivity.gate_parameters() == []
    params = [[p for n, p in m.named_parameters() if ".connectivity." not in n] for m in (net, ref)]
    assert [p.shape for p in params[0]] == [p.shape for p in params[1]]
    opts = [torch.optim.AdamW(p, lr=1e-2) for p in params]
    targets = torch.roll(ids, -1, dims=1)
    for _ in range(3):
        for model, opt in zip((net, ref), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
            opt.step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(net(ids), ref(ids), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("granularity,block_size", [("sublayer", 1), ("sublayer", 4), ("block", 1)])
def test_the_average_drowns_in_the_norms_epsilon_at_depth(ids, granularity, block_size):
    """``weight_sum: one`` (the merge as the softmax average): at 32 blocks the layers' inputs have
    RMS below 1e-3, the norms' epsilon (1e-5) is no longer negligible and the logits move away from
    the residual network's by far more than rounding (0.2-0.6 here)."""
    net, ref = twins(32, granularity, block_size=block_size, weight_sum="one")
    with torch.no_grad():
        gap = float((net(ids) - ref(ids)).abs().max())
    assert gap > 0.05
