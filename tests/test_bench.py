"""Smoke test of ``python -m ancre_lightning.bench``: every sub-benchmark at a tiny size, JSON fields.

The numbers of a tiny run mean nothing; the measured tables live in BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from ancre_lightning.bench import SUITES
from ancre_lightning.bench.__main__ import main
import torch

from ancre_lightning.bench._common import LLM_QUICK, build_llm, random_batch, train_step_fn
from ancre_lightning.bench.aggregation import impl_bytes, needed_bytes, row_shape, weighted_sum_rowwise
from ancre_lightning.connectivity import weighted_sum_loop

pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")

TEXT = " ".join(f"Sentence {i} of a small local corpus, about wiring layers." for i in range(400))


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """One quick run of every sub-benchmark, as the JSON document printed on stdout."""
    root = tmp_path_factory.mktemp("bench")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = main(["--quick", "--json", "--device", "cpu", "--out", str(root / "bench.json"),
                         "--set", f"framework.data_path={corpus}", "--set", f"framework.cache_dir={root / 'cache'}"])
    printed = json.loads(out.getvalue())
    assert printed == json.loads((root / "bench.json").read_text())
    assert printed["results"].keys() == returned["results"].keys()
    return printed


def test_document_names_the_machine_and_every_sub_benchmark(doc):
    assert doc["quick"] is True
    assert list(doc["results"]) == ["aggregation", "step", "memory", "framework", "loader"]
    machine = doc["machine"]
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "lightning", "device", "load_average_at_start", "load_average_at_end"):
        assert key in machine
    assert machine["device"] == "cpu"
    for result in doc["results"].values():
        assert {"settings", "rows", "targets", "wall_s"} <= result.keys()


def test_aggregation_fields(doc):
    result = doc["results"]["aggregation"]
    ks = result["settings"]["ks"]
    assert result["kernels"]["forward_kernels"] == 1 and result["kernels"]["backward_kernels"] == 1
    rows = {(r["k"], r["direction"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(k, d, i) for k in ks for d in ("forward", "forward+backward") for i in ("loop", "stacked", "fused", "fused-rows")}
    assert result["kernels"]["rows_forward_kernels"] == 1 and result["kernels"]["rows_backward_kernels"] == 1
    for r in rows.values():
        for key in ("median_s", "min_s", "iqr_rel", "needed_bytes", "impl_bytes", "gbps", "ceiling_gbps", "ratio_to_ceiling", "speedup_vs_loop"):
            assert r[key] is not None and r[key] >= 0, key
        assert r["median_s"] > 0 and r["impl_bytes"] >= r["needed_bytes"]
        assert r["ratio_to_ceiling"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
    assert all(rows[k, d, "loop"]["speedup_vs_loop"] == pytest.approx(1.0) for k in ks for d in ("forward", "forward+backward"))
    stack = {r["impl"]: r for r in result["stack_rows"]}  # the whole stack against the official loop
    assert list(stack) == ["official", "loop", "fused"] and result["settings"]["stack_blocks"] == 3
    assert stack["official"]["speedup_vs_official"] == pytest.approx(1.0)
    for r in stack.values():
        assert r["blocks"] == 3 and r["median_s"] > 0
        assert r["speedup_vs_official"] == pytest.approx(stack["official"]["median_s"] / r["median_s"])


@pytest.mark.parametrize("shape", [(2, 8, 512), (3, 16, 8, 8), (700,)])
def test_rowwise_candidate_equals_the_loop(shape):
    """The GPU candidate body: the same sum and the same gradients as the plain loop."""
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(shape, generator=gen, requires_grad=True) for _ in range(5)]
    weights = torch.randn(5, generator=gen, requires_grad=True)
    grad = torch.randn(shape, generator=gen)
    expected = torch.autograd.grad(ref := weighted_sum_loop(sources, weights), [*sources, weights], grad)
    got = torch.autograd.grad(out := weighted_sum_rowwise(sources, weights), [*sources, weights], grad)
    torch.testing.assert_close(out, ref)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert row_shape((64, 256, 512)) == (64, 256, 1) and row_shape((64, 64, 16, 16)) == (64, 64, 1, 1)
    assert row_shape((700,)) == (1,)


def test_bf16_true_benchmark_model_stores_bfloat16_states_and_float32_gates():
    """``--set step.precision=bf16-true`` times the network stored in bfloat16 (a bfloat16
    history of states), as Lightning's bf16-true stores it; the gates stay float32."""
    device = torch.device("cpu")
    shape = {**LLM_QUICK, "precision": "bf16-true"}
    module, optimizer = build_llm("ancre", "eager", shape, device)
    assert module.net.stack.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert module.connectivity.gate_logits.dtype == torch.float32
    before = module.connectivity.gate_logits.detach().clone()
    train_step_fn(module, optimizer, random_batch(shape, device), device, shape["precision"])()
    assert not torch.equal(module.connectivity.gate_logits.detach(), before)


def test_official_ancre_stack_is_the_stack_with_the_same_weights():
    """The whole-stack baseline computes what the ConnectedStack computes, so the timing compares like with like."""
    from ancre_lightning.bench.aggregation import TanhBlock, official_ancre_stack
    from ancre_lightning.connectivity import ConnectedStack, build_connectivity

    torch.manual_seed(0)
    k = 4
    wiring = build_connectivity("ancre", num_layers=k, tau=0.5)
    with torch.no_grad():
        for p in wiring.gate_parameters():
            p.normal_()
    stack = ConnectedStack([TanhBlock() for _ in range(k)], wiring, "loop")
    logits = torch.full((k, k), float("-inf"))
    p = wiring.coefficients()  # (K, K+1): column j+1 is the block output's weight (1 for ANCRe)
    assert torch.allclose(p[:, 1:].diagonal(), torch.ones(k))
    rows, cols = torch.tril_indices(k, k)
    logits[rows, cols] = p[rows, cols].log() * 0.5  # softmax(log p / 2 / 0.5) = p
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(official_ancre_stack(stack.blocks, logits, 0.5, x), stack(x))


def test_aggregation_byte_model():
    n, s = 1000, 4
    assert needed_bytes(12, n, s, "forward") == 13 * n * s
    assert needed_bytes(12, n, s, "forward+backward") == 38 * n * s
    assert impl_bytes("fused", 12, n, s, "forward") == needed_bytes(12, n, s, "forward")
    assert impl_bytes("loop", 12, n, s, "forward") == 57 * n * s  # 2 for the first product, 5 per further source
    assert impl_bytes("loop", 12, n, s, "forward+backward") == (57 + 72) * n * s
    assert impl_bytes("stacked", 12, n, s, "forward") == 37 * n * s


def test_step_fields(doc):
    result = doc["results"]["step"]
    s = result["settings"]
    assert s["tokens_per_step"] == s["batch_size"] * s["seq_len"]
    rows = {(r["connectivity"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(c, m) for c in s["connectivities"] for m in s["modes"]}
    for (conn, _), r in rows.items():
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["first_step_s"] > 0 and r["parameters"] > 0
        assert r["overhead_vs_residual"] is not None
        if conn == "residual":
            assert r["overhead_vs_residual"] == pytest.approx(0.0)


def test_memory_fields(doc):
    result = doc["results"]["memory"]
    rows = {(r["connectivity"], r["activation_checkpointing"]): r for r in result["rows"]}
    assert set(rows) == {(c, on) for c in result["settings"]["connectivities"] for on in (False, True)}
    assert rows["residual", False]["ratio_vs_residual"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["peak_step_bytes"] > 0 and r["static_mib"] > 0
    # ANCRe keeps every block output alive for its merges: never less than residual
    assert rows["ancre", False]["peak_step_bytes"] >= rows["residual", False]["peak_step_bytes"]
    for conn in result["settings"]["connectivities"]:  # recomputing the layers keeps less at the peak
        on = rows[conn, True]
        assert on["ratio_vs_plain"] == pytest.approx(on["peak_step_bytes"] / rows[conn, False]["peak_step_bytes"])
        assert on["ratio_vs_plain"] < 1.0
    assert {t["name"] for t in result["targets"]} == {f"{c} checkpointed peak vs its plain step, eager" for c in result["settings"]["connectivities"]}


def test_framework_fields(doc):
    result = doc["results"]["framework"]
    rows = {r["loop"]: r for r in result["rows"]}
    assert set(rows) == {"bare PyTorch", "ancre fit"}
    assert all(r["tokens_per_s"] > 0 and len(r["runs_tokens_per_s"]) == result["settings"]["rounds"] for r in rows.values())
    assert rows["ancre fit"]["ratio_vs_bare"] == pytest.approx(rows["ancre fit"]["tokens_per_s"] / rows["bare PyTorch"]["tokens_per_s"])
    (goal,) = result["targets"]
    assert goal["threshold"] == 0.95 and goal["op"] == ">=" and isinstance(goal["ok"], bool)


def test_tables_render_as_markdown(doc):
    for name, suite in SUITES.items():
        text = suite.table(doc["results"][name])
        assert text.count("\n|") >= 3, name


def test_bad_arguments_are_explained():
    with pytest.raises(SystemExit, match="unknown sub-benchmark"):
        main(["aggregatoin"])
    with pytest.raises(SystemExit, match="NAME.KEY=VALUE"):
        main(["step", "--set", "reps=3"])
    with pytest.raises(SystemExit, match="options: .*reps"):
        main(["step", "--set", "step.repz=3"])


def test_memory_on_cpu_says_so_when_the_private_profiler_api_changes(monkeypatch):
    """``peak_bytes`` on CPU reads ``prof.profiler.kineto_results``; a torch without it must give a
    clear error, not a traceback from deep inside or a peak of 0."""
    from ancre_lightning.bench import memory

    buffers = []
    step = lambda: buffers.append(torch.ones(1 << 16))  # noqa: E731  (256 KiB)
    assert memory.peak_bytes(step, torch.device("cpu")) >= 1 << 18  # the API as it is today

    class Renamed:
        def __init__(self, results):
            self.renamed_results = results

    real = torch.profiler.profile

    class ChangedProfile(real):
        def __exit__(self, *exc):
            out = super().__exit__(*exc)
            self.profiler = Renamed(self.profiler.kineto_results)
            return out

    monkeypatch.setattr(torch.profiler, "profile", ChangedProfile)
    with pytest.raises(RuntimeError, match="private profiler API.*kineto_results"):
        memory.peak_bytes(step, torch.device("cpu"))


def test_hf_llama_rows_are_transformers_llama_of_the_benchmark_shape():
    """``hf-llama`` is transformers' own Llama (its ModuleList, no wiring) and ``hf-llama-rewired`` the
    same weights rewired with residual: the same logits, bit for bit; the step trains it."""
    pytest.importorskip("transformers")
    from ancre_lightning.rewiring import RewiredBlocks

    plain, _ = build_llm("hf-llama", "eager", LLM_QUICK, torch.device("cpu"))
    rewired, _ = build_llm("hf-llama-rewired", "eager", LLM_QUICK, torch.device("cpu"))
    layers = plain.net.model.model.layers
    assert type(layers) is torch.nn.ModuleList and len(layers) == LLM_QUICK["n_layers"]
    assert isinstance(rewired.net.model.model.layers, RewiredBlocks)
    assert plain.net.model.config.hidden_size == LLM_QUICK["dim"]
    input_ids, labels = random_batch(LLM_QUICK, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(plain.net(input_ids), rewired.net(input_ids))
    module, optimizer = build_llm("hf-llama", "eager", LLM_QUICK, torch.device("cpu"))
    before = module.net.model.lm_head.weight.detach().clone()
    train_step_fn(module, optimizer, (input_ids, labels), torch.device("cpu"), "32-true")()
    assert not torch.equal(module.net.model.lm_head.weight, before)
