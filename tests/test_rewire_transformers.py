"""rewire(model, connectivity) on Hugging Face transformers causal LMs: Llama, Qwen2, Qwen3, GPT-2.

Random models from tiny configs only (3 layers of width 32, vocabulary 100); nothing is downloaded.
Llama-family models loop over ``self.layers[: config.num_hidden_layers]`` (the whole-stack slice
of the rewired container), GPT-2 over ``enumerate(self.h)``; both pass the attention mask, the
positions or rotary tables and the KV cache to every layer by keyword.

Float64 models compute their wiring in float64 (checked against a float64 reference loop and in
cached generation); the other cases run in float32.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import ancre_lightning
from ancre_lightning.connectivity import CONNECTIVITIES
from ancre_lightning.errors import UserInputError
from ancre_lightning.rewiring import RewiredBlocks, find_block_containers, load_pretrained, wiring_keys

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
warnings.filterwarnings("ignore", category=FutureWarning)

WIRINGS = list(CONNECTIVITIES)
GRANULARITIES = ["block", "sublayer"]
LAYERS = 3
VOCAB = 100
PAD, BOS, EOS = 0, 1, 2  # inside the vocabulary; the random token ids below are drawn from 3..VOCAB-1
#: where each architecture keeps its decoder stack
CONTAINER = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers", "gpt2": "transformer.h"}
ARCHS = list(CONTAINER)

def name_dtype(value):
    """Test ids that say ``float64`` rather than ``dtype1``."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


# --------------------------------------------------------------------------- models
def make(arch: str, seed: int = 0, layers: int = LAYERS, **overrides) -> torch.nn.Module:
    """A random tiny causal LM of ``arch`` in eval mode (no dropout)."""
    tf = transformers
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common, **overrides)
        return tf.GPT2LMHeadModel(config).eval()
    llama_like = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 64, **common, **overrides}  # fmt: skip
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like)).eval()
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like)).eval()
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **llama_like)).eval()
    raise ValueError(arch)


def container(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_submodule(CONTAINER["gpt2" if hasattr(model, "transformer") else "llama"])


def tokens(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(length: int = 7, pad: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 2 prompts, the second left-padded by ``pad`` tokens, and its attention mask."""
    ids = tokens(2, length, seed)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = PAD, 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() gives a left-padded batch: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def randomize_wiring(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move every wiring parameter away from its start (many wirings start as a residual network)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in container(model).connectivity.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def wiring_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in container(model).connectivity.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- finding the stack
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_rewire_finds_the_decoder_stack_by_itself(arch, granularity):
    """No ``blocks=``: the decoder layers are found at ``model.layers`` / ``transformer.h`` and
    replaced by a RewiredBlocks holding the very same layer modules, in order."""
    model = make(arch)
    path = CONTAINER[arch]
    layers = list(model.get_submodule(path))
    assert find_block_containers(model) == [path]
    assert ancre_lightning.rewire(model, "ancre", granularity=granularity) is model
    stack = model.get_submodule(path)
    assert isinstance(stack, RewiredBlocks)
    assert len(stack) == LAYERS and all(stack[i] is layer for i, layer in enumerate(layers))
    assert stack.connectivity.num_layers == LAYERS * (2 if granularity == "sublayer" else 1)
    assert stack.transitions == 0
    assert [n for n, m in model.named_modules() if isinstance(m, RewiredBlocks)] == [path]  # nothing else wired


# --------------------------------------------------------------------------- forward and backward
#: Wiring parameters whose gradient is exactly zero at the start, and why:
#: - attnres ``key_gains``: a merge's score is ``w_l . (g_l * RMSNorm(v))`` and the queries ``w_l``
#:   start at zero, so d score / d g_l = w_l * RMSNorm(v) = 0;
#: - mudd ``weights.j.w1`` and ``weights.j.gain``: the weights are ``W2 GELU(W1 (g * RMSNorm(x))) + a``
#:   with ``W2 = 0`` at the start, so d w / d W1 = d w / d g = 0; ``state_gains`` and ``post_gains``:
#:   the merge adds ``q_j RMSNorm(sum_i w_i n_i RMSNorm(X_i))`` and every ``w_i`` starts at zero, so
#:   the sum and its norm are zero and so are their derivatives by ``n_i`` and ``q_j``.
#: One optimiser step moves the queries and W2 off zero; then every gradient must be nonzero.
ZERO_GRADIENT_AT_START = {"attnres": ("key_gains",), "mudd": ("w1", "gain", "state_gains", "post_gains")}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("connectivity", WIRINGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_backward_reaches_every_wiring_parameter(arch, connectivity, granularity):
    """The model's own forward with labels runs the wiring; loss.backward() gives every wiring
    parameter that requires grad a finite gradient, zero at the start exactly where
    :data:`ZERO_GRADIENT_AT_START` says, and nonzero everywhere after one SGD step."""
    model = ancre_lightning.rewire(make(arch), connectivity, granularity=granularity).train()
    ids = tokens()
    params = wiring_parameters(model)
    assert bool(params) == (connectivity not in ("residual", "acn", "fixed"))  # those three have nothing to learn
    zero_expected = {n for n in params if n.rsplit(".", 1)[-1] in ZERO_GRADIENT_AT_START.get(connectivity, ())}
    assert bool(zero_expected) == (connectivity in ZERO_GRADIENT_AT_START)  # the names above exist
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        zero = {n for n, p in params.items() if not p.grad.abs().sum() > 0}
        assert zero == (zero_expected if step == 0 else set()), f"step {step}: zero gradient for {sorted(zero)}"
        first_layer = next(container(model)[0].parameters())
        assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0  # the blocks ran inside the wiring
        optimizer.step()


# --------------------------------------------------------------------------- residual start
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=name_dtype)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_residual_rewiring_gives_exactly_the_original_logits(arch, granularity, dtype):
    """The residual wiring runs the same operations in the same order as the layers' own
    forward (``x + attn(norm(x))``, then ``x + mlp(norm(x))``), at block and at sub-layer
    granularity: logits bitwise equal, in float32 and in float64, and no new state_dict key."""
    model = make(arch).to(dtype)
    ids, mask = left_padded()
    before = model(ids, attention_mask=mask).logits
    keys = set(model.state_dict())
    ancre_lightning.rewire(model, "residual", granularity=granularity)
    after = model(ids, attention_mask=mask).logits
    assert after.dtype == dtype
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # exact: nothing is computed differently
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=name_dtype)
@pytest.mark.parametrize("connectivity", ["denseformer", "mudd"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wirings_that_start_as_the_residual_network_give_the_original_logits(arch, granularity, connectivity, dtype):
    """DenseFormer (identity weights) and MUDD (``W2 = 0``, one-hot static weights) start as the
    residual network: every weight on an older state is 0 and the newest state's is 1, so the
    merge ``0 * x + ... + 1 * u`` is exactly ``u`` and the logits are bitwise those of the
    original model. Moving the wiring away from its start changes them."""
    model = make(arch).to(dtype)
    ids = tokens()
    before = model(ids).logits
    ancre_lightning.rewire(model, connectivity, granularity=granularity).to(dtype)  # the wiring too
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    randomize_wiring(model)
    assert (model(ids).logits - before).abs().max() > 1e-3


# --------------------------------------------------------------------------- the wiring's equations
def _reference_logits(model: torch.nn.Module, connectivity: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a rewired Llama computed here from the wiring's equations (DESIGN.md) and the
    layers' own sub-modules, without any of the package's wiring code.

    - ``ancre`` (block granularity, incoming normalization): ``u_j = Block_j(h_j)`` (the block with
      its inner residuals), ``p_{.,j} = softmax(c_j / tau)`` over the sources ``i <= j`` with
      ``c_j`` row j of the lower triangle of the flat ``gate_logits`` (row-major),
      ``h_{j+1} = u_j + sum_{i<=j} p_{i,j} h_i``; the head sees ``h_K``.
    - ``hyper`` (sub-layer granularity, static): n streams, all ``h_0`` at first; layer l (attention
      of block l // 2, then its MLP, both without residual) reads ``h = sum_s Am[l, s] H_s``,
      ``y = f_l(h)``, and the streams become ``H'_t = B[l, t] y + sum_s Ar[l, s, t] H_s``; the head
      sees ``sum_s H_s``.
    """
    base = model.model
    conn = base.layers.connectivity
    layers = [base.layers[i] for i in range(len(base.layers))]
    t = ids.shape[1]
    h0 = base.embed_tokens(ids)  # (B, T, D)
    rotary = base.rotary_emb(h0, position_ids=torch.arange(t)[None])  # (cos, sin)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]  # (1, 1, T, T), True = attend

    def attention(layer, h):
        out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rotary, attention_mask=causal)
        return out  # (B, T, D), the branch without the residual

    def mlp(layer, h):
        return layer.mlp(layer.post_attention_layernorm(h))  # (B, T, D)

    if connectivity == "ancre":
        assert conn.normalization == "incoming"
        logits, tau = conn.gate_logits.detach().double(), float(conn.tau)
        states = [h0]
        for j, layer in enumerate(layers):
            h = states[-1]
            u = h + attention(layer, h)
            u = u + mlp(layer, u)  # u_j = Block_j(h_j)
            p = torch.softmax(logits[j * (j + 1) // 2 : (j + 1) * (j + 2) // 2] / tau, dim=0)  # (j+1,)
            states.append(u + sum(p[i] * states[i] for i in range(j + 1)))
        out = states[-1]
    elif connectivity == "hyper":
        assert not conn.dynamic
        read, mix, write = conn.read.detach(), conn.mix.detach(), conn.write.detach()  # (L, n), (L, n, n) [s, t], (L, n)
        n = read.shape[1]
        streams = [h0] * n
        for l in range(2 * len(layers)):
            layer = layers[l // 2]
            h = sum(read[l, s] * streams[s] for s in range(n))
            y = attention(layer, h) if l % 2 == 0 else mlp(layer, h)
            streams = [write[l, t] * y + sum(mix[l, s, t] * streams[s] for s in range(n)) for t in range(n)]
        out = sum(streams)
    else:
        raise ValueError(connectivity)
    return model.lm_head(base.norm(out))  # (B, T, V)


REFERENCE_CASES = [("ancre", "block", {"tau": 0.5}), ("hyper", "sublayer", {})]


def _rewired_and_reference(connectivity: str, granularity: str, options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model = ancre_lightning.rewire(make("llama"), connectivity, granularity=granularity, **options)
    randomize_wiring(model, scale=1.0)  # random gates / stream maps: every source and stream matters
    model.double()
    ids = tokens()
    with torch.no_grad():
        return model(ids).logits, _reference_logits(model, connectivity, ids)


@pytest.mark.parametrize(("connectivity", "granularity", "options"), REFERENCE_CASES, ids=["ancre-block", "hyper-sublayer"])
def test_a_rewired_llama_computes_the_wirings_equations(connectivity, granularity, options):
    """The rewired Llama's logits equal those of a loop written here from the equations, with
    random wiring parameters, in float64: only the order of float64 operations may differ (a few
    units of 1e-16 on logits of ~0.35; 1e-12 leaves room for that). A wiring step rounded to
    float32 (ANCRe's gates or the streams' mixing, as before they computed in the states' dtype)
    misses by ~3e-8; a wrong wiring (a transposed stream map, a missing source, gates over the
    wrong row) by more than 1e-2."""
    got, ref = _rewired_and_reference(connectivity, granularity, options)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- generation
def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward's name for the KV cache (``cache`` in transformers 5.x, before ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_with_cache(model, ids, mask, new_tokens) -> list[torch.Tensor]:
    """The logits of each generation step, in the model's own dtype: the prompt once, then one
    token per forward with a DynamicCache (what generate does, without its float32 cast)."""
    cache = transformers.DynamicCache(config=model.config)
    kw = {_cache_keyword(model): cache, "use_cache": True}
    steps = [model(ids, attention_mask=mask, position_ids=positions(mask), **kw).logits[:, -1]]
    for k in range(new_tokens.shape[1] - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        steps.append(model(new_tokens[:, k : k + 1], attention_mask=mask, position_ids=positions(mask)[:, -1:], **kw).logits[:, -1])
    return steps  # each (B, V)


def _generate(model, ids, mask, use_cache: bool):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, use_cache=use_cache,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=PAD)  # fmt: skip


GENERATION_CASES = (
    [("llama", c, g, torch.float64) for g in GRANULARITIES for c in WIRINGS]
    + [("llama", c, g, torch.float32) for g in GRANULARITIES for c in ("denseformer", "attnres", "mhc", "mudd")]
    + [("gpt2", c, g, torch.float64)
       for c, g in [("residual", "sublayer"), ("ancre", "block"), ("hyper", "sublayer"), ("fixed", "block")]]
    + [("gpt2", "mhc", "sublayer", torch.float32), ("gpt2", "attnres", "block", torch.float32)]
)  # fmt: skip


@pytest.mark.parametrize(("arch", "connectivity", "granularity", "dtype"), GENERATION_CASES, ids=name_dtype)
def test_greedy_generation_with_and_without_the_kv_cache_agree(arch, connectivity, granularity, dtype):
    """A batch of two prompts, the second left-padded, with its attention mask; random wiring.

    - generate(use_cache=True) and generate(use_cache=False) pick the same tokens;
    - their per-step logits (which generate casts to float32) agree: float64 models to one
      float32 rounding (values equal to ~1e-15 round to the same float32 or to neighbours one
      float32 step apart; measured: equal), float32 models to 1e-4 (a one-token attention over
      the cache and a full attention sum in different orders: measured <= 2e-7 on logits of
      ~0.35, except mudd, whose random unnormalised per-token weights, up to ~6, amplify the
      float32 rounding of its weight MLP to 1e-5; a broken cache path, a lost mask or wrong
      positions move the logits by more than 1e-2);
    - in float64, step-by-step decoding with a DynamicCache gives, in float64, the logits of one
      full forward over the generated sequence to 1e-9 (measured <= 2.3e-16).
    """
    model = ancre_lightning.rewire(make(arch), connectivity, granularity=granularity)
    randomize_wiring(model)
    model.to(dtype)
    ids, mask = left_padded()
    cached, plain = _generate(model, ids, mask, True), _generate(model, ids, mask, False)
    assert torch.equal(cached.sequences, plain.sequences)
    assert len(cached.logits) == len(plain.logits) == cached.sequences.shape[1] - ids.shape[1]
    tight = {"rtol": 2**-23, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 0, "atol": 1e-4}
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, **tight)
    if dtype == torch.float64:
        new = cached.sequences[:, ids.shape[1] :]
        full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        with torch.no_grad():
            full = model(cached.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
            steps = _decode_with_cache(model, ids, mask, new)
        for k, step in enumerate(steps):
            assert step.dtype == torch.float64
            torch.testing.assert_close(step, full[:, ids.shape[1] - 1 + k], rtol=0, atol=1e-9)
            torch.testing.assert_close(cached.logits[k], step.float(), rtol=2**-23, atol=1e-9)


@pytest.mark.parametrize("connectivity", ["residual", "ancre", "attnres", "hyper", "mhc"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_attention_mask_and_positions_reach_every_sublayer(arch, connectivity):
    """At sub-layer granularity (the split layers call the attention themselves) a left-padded
    prompt gives the logits of the same prompt alone, and leaving the mask out changes them.
    Float32, tolerance 1e-5: measured equal here, but padding changes the attention's shapes and
    another kernel may sum in another order (float32 rounding ~3e-8 per operation on logits of
    ~0.3); without the mask the logits moved by 2e-2 to 2e-1."""
    model = ancre_lightning.rewire(make(arch), connectivity, granularity="sublayer")
    randomize_wiring(model)
    ids, mask = left_padded(pad=3)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
        unmasked = model(ids, attention_mask=torch.ones_like(mask), position_ids=positions(mask)).logits[1, 3:]
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    assert (unmasked - alone).abs().max() > 1e-3


# --------------------------------------------------------------------------- pretrained weights
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("connectivity", WIRINGS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_original_weights_load_into_the_rewired_model(arch, connectivity, granularity):
    """The rewired model's state_dict keys are the original's plus the wiring's, all under
    ``<container>.connectivity.``; load_pretrained takes the original state_dict strictly and
    returns exactly the wiring keys as left new; every original tensor is then in place."""
    plain = make(arch, seed=0)
    state = plain.state_dict()
    wired = ancre_lightning.rewire(make(arch, seed=5), connectivity, granularity=granularity)
    new = wiring_keys(wired)
    prefix = f"{CONTAINER[arch]}.connectivity."
    assert new == {prefix + k for k in container(wired).connectivity.state_dict()}
    assert set(wired.state_dict()) == set(state) | new and not new & set(state)
    assert load_pretrained(wired, state) == sorted(new)
    own = wired.state_dict()
    for name, value in state.items():
        assert torch.equal(own[name], value), name
    if connectivity == "residual":
        ids = tokens()
        torch.testing.assert_close(wired(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_load_pretrained_names_what_does_not_fit():
    """A state_dict of a 2-layer Llama does not load into a rewired 3-layer one: refused, naming
    the missing tensors, rather than leaving a layer at its random start."""
    wired = ancre_lightning.rewire(make("llama"), "ancre")
    with pytest.raises(UserInputError, match="missing from the file"):
        load_pretrained(wired, make("llama", layers=2).state_dict())


# --------------------------------------------------------------------------- bad input
def test_a_partial_slice_of_the_rewired_stack_is_refused():
    """The whole-stack slice the models take (``layers[:num_hidden_layers]``, ``layers[:]``) is
    the wired container itself; a slice of part of it, or a config that asks the model to run
    fewer layers than it holds, is refused rather than run without the wiring."""
    model = ancre_lightning.rewire(make("llama"), "ancre")
    stack = model.model.layers
    assert stack[:LAYERS] is stack and stack[:] is stack and stack[0:LAYERS:1] is stack
    with pytest.raises(UserInputError, match="cannot be sliced"):
        stack[:2]
    with pytest.raises(UserInputError, match="cannot be sliced"):
        stack[1:]
    model.config.num_hidden_layers = 2
    with pytest.raises(UserInputError, match="num_hidden_layers below the blocks it holds"):
        model(tokens())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpt2_with_cross_attention_is_refused_where_its_blocks_would_be_split(granularity):
    """GPT-2 blocks with cross-attention cannot be split: a branch-only wiring (hyper) and any
    sub-layer wiring are refused with a message naming cross-attention, before any change."""
    model = make("gpt2", add_cross_attention=True)
    for connectivity in ["hyper", "acn"] + (["residual", "ancre"] if granularity == "sublayer" else []):
        with pytest.raises(UserInputError, match="cannot split GPT2Block with cross-attention") as info:
            ancre_lightning.rewire(model, connectivity, granularity=granularity)
        assert "\n" not in str(info.value)
        assert not any(isinstance(m, RewiredBlocks) for m in model.modules())


@pytest.mark.parametrize("connectivity", ["residual", "ancre"])
def test_gpt2_with_cross_attention_runs_wirings_that_keep_whole_blocks(connectivity):
    """Residual and ANCRe call the whole block, cross-attention included: the encoder states
    reach every block (the logits change with them), and residual keeps the original logits."""
    encoder = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))  # (B, S, D)
    plain = make("gpt2", add_cross_attention=True)
    ids = tokens()
    before = plain(ids, encoder_hidden_states=encoder).logits
    model = ancre_lightning.rewire(make("gpt2", add_cross_attention=True), connectivity)
    after = model(ids, encoder_hidden_states=encoder).logits
    assert (model(ids, encoder_hidden_states=encoder * 2).logits - after).abs().max() > 1e-3
    if connectivity == "residual":
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_rewire_refuses_a_model_with_activation_checkpointing_on():
    """Checkpointing would recompute the layers outside the wiring: refused, saying how to turn
    it off; once off, rewire works."""
    model = make("llama")
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"  # 5.x renamed it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the switch of this version, without a deprecation warning
        getattr(model, f"{name}_checkpointing_enable")()
    with pytest.raises(UserInputError, match=r"gradient checkpointing on.*checkpointing_disable\(\)"):
        ancre_lightning.rewire(model, "ancre")
    assert not isinstance(model.model.layers, RewiredBlocks)
    getattr(model, f"{name}_checkpointing_disable")()
    assert isinstance(ancre_lightning.rewire(model, "ancre").model.layers, RewiredBlocks)
