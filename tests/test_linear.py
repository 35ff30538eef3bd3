"""The linear kernel (``torch.ops.magicdec.linear``, bf16 and float32) against ``F.linear``, weight
packing, and where the model uses it. The bf16 kernel's own tests need a CPU with AVX512-BF16, the
float32 one's AVX2 and FMA; what decides whether it is used is tested everywhere."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from builders.build import build_engine
from builders.export import export_step
from magicdec_rt import Runtime, attention, cpu, linear
from magicdec_rt.engine import load_steps, read_manifest
from magicdec_rt.errors import EngineError

from .conftest import TINY
from .test_runtime import MIXED

HERE = linear.wanted(torch.bfloat16, "cpu")
needs_kernel = pytest.mark.skipif(not HERE, reason="the linear kernel runs on CPUs with AVX512-BF16 (no AMX)")
FLOAT32 = linear.wanted(torch.float32, "cpu")
needs_f32_kernel = pytest.mark.skipif(not FLOAT32, reason="the float32 linear kernel runs on CPUs with AVX2 and FMA")
# The float32 paths this CPU runs: the AVX-512 tile where it has AVX-512, and the AVX2 one.
F32_PATHS = ["avx2"] + (["avx512"] if FLOAT32 and "avx512f" in cpu.flags() else [])


@needs_kernel
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (16, 576, 576), (16, 192, 576), (64, 1536, 576), (7, 100, 64),
                                   (6, 576, 1536), (130, 70, 30), (3, 1, 2), (13, 33, 64), (25, 96, 128)])
def test_kernel_matches_linear(M, N, K):
    """float32 sums of exact bf16 products, rounded once: within half a bf16 ulp of the float32
    result (at most 2^-8 relative: 8 significant bits), plus float32 summation error (K * 2^-24 of
    sum |x w|)."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g).bfloat16(), (torch.randn(N, K, generator=g) * 0.1).bfloat16()
    y = torch.ops.magicdec.linear(x, linear.pack(w), N)
    ref = F.linear(x.float(), w.float())
    bound = 2**-8 * ref.abs() + K * 2**-24 * (x.float().abs() @ w.float().abs().T)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert bool(((y.float() - ref).abs() <= bound).all())


@needs_f32_kernel
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (16, 576, 576), (16, 192, 576), (80, 1536, 576), (7, 100, 64),
                                   (6, 576, 1536), (130, 70, 30), (3, 1, 3), (13, 33, 64), (25, 96, 128), (5, 40, 8)])
def test_float32_kernel_matches_linear_and_its_paths_agree_bit_for_bit(M, N, K):
    """float32 sums of exact products in the order of K (one FMA per value): within float32
    summation error of the exact result (K * 2^-24 of sum |x w|). The AVX2 tile (6 rows x 16
    features) makes the same FMAs in the same order as the AVX-512 one (12 rows x 32), so the two
    agree exactly, whatever the tiles' shapes."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1
    packed = linear.pack(w)
    assert packed.shape == (-(-N // linear.BLOCK), K, linear.BLOCK, 1)
    exact = x.double() @ w.double().T
    bound = K * 2**-24 * (x.double().abs() @ w.double().abs().T)
    ys = {}
    try:
        for path in F32_PATHS:
            attention.set_isa(path)
            ys[path] = torch.ops.magicdec.linear(x, packed, N)
            assert ys[path].dtype == torch.float32 and ys[path].shape == (M, N)
            assert bool(((ys[path].double() - exact).abs() <= bound).all()), path
    finally:
        attention.set_isa(attention.DEFAULT_ISA)
    assert all(torch.equal(y, ys["avx2"]) for y in ys.values())


@needs_kernel
def test_leading_dims_and_non_contiguous_inputs():
    x = torch.randn(4, 3, 130).bfloat16()[:, :, :128]
    w = torch.randn(65, 128).bfloat16()
    y = torch.ops.magicdec.linear(x, linear.pack(w), 65)
    assert y.shape == (4, 3, 65)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=2**-8, atol=1e-3)


def test_packing_layout():
    w = torch.arange(70 * 6, dtype=torch.float32).view(70, 6).bfloat16()
    p = linear.pack(w)
    assert p.shape == (3, 3, 32, 2)
    # Block b, pair j, feature f, element e holds W[32 b + f, 2 j + e]; features past N are zero.
    assert p[2, 2, 5, 1] == w[69, 5] and p[1, 1, 3, 0] == w[35, 2] and (p[2, :, 6:] == 0).all()
    # float32: one value of K per step.
    p = linear.pack(w.float())
    assert p.shape == (3, 6, 32, 1) and p[2, 5, 5, 0] == w[69, 5] and p[1, 2, 3, 0] == w[35, 2]
    for weight in (w, w.float()):
        layer = linear.Linear(6, 70)
        layer.weight.data = weight
        layer.packed = linear.pack(weight)
        layer.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
        assert torch.equal(layer.full_weight(), weight)


@needs_kernel
def test_bad_inputs_are_refused():
    w = linear.pack(torch.randn(64, 8).bfloat16())
    with pytest.raises(RuntimeError, match="must be both bfloat16 or both float32"):
        torch.ops.magicdec.linear(torch.randn(2, 8), w, 64)
    with pytest.raises(RuntimeError, match="must be both bfloat16 or both float32"):
        torch.ops.magicdec.linear(torch.randn(2, 8).double(), w, 64)
    with pytest.raises(RuntimeError, match="K a multiple of 2"):
        torch.ops.magicdec.linear(torch.randn(2, 7).bfloat16(), w, 64)
    with pytest.raises(RuntimeError, match="do not hold 65 features of K = 8"):
        torch.ops.magicdec.linear(torch.randn(2, 8).bfloat16(), w, 65)


def test_which_models_on_which_cpus_use_it(monkeypatch):
    """bf16 on CPUs with AVX512-BF16 and no AMX; float32 on CPUs with AVX2 and FMA, unless the CPU
    ops were forced onto the portable path (as a CPU without them would run)."""
    assert not linear.wanted(torch.bfloat16, "cuda") and not linear.wanted(torch.float32, "cuda")
    assert not linear.wanted(torch.float16, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2"}))
    assert not linear.wanted(torch.float32, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2", "fma"}))
    assert linear.wanted(torch.float32, "cpu") == attention.kernel_available()
    if attention.kernel_available():
        try:
            attention.set_isa("portable")
            assert not linear.wanted(torch.float32, "cpu")
        finally:
            attention.set_isa(attention.DEFAULT_ISA)
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert not linear.wanted(torch.bfloat16, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert not linear.wanted(torch.bfloat16, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert linear.wanted(torch.bfloat16, "cpu") == attention.kernel_available()


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory, tiny_hf):
    return build_engine(tmp_path_factory.mktemp("tiny-bf16") / "engine", tiny_hf, dtype="bfloat16", **TINY)


@needs_kernel
def test_a_bf16_engine_packs_its_linears_and_exports_the_op(bf16_engine):
    steps = load_steps(bf16_engine, read_manifest(bf16_engine))
    m = steps.model
    assert all(x.packed is not None for x in m.modules() if isinstance(x, linear.Linear))
    assert m.layers[0].mlp.up_proj.weight.numel() == 0  # the packed copy replaces it
    assert m.embed_tokens.weight.numel() > 0  # the embedding (which a tied LM head shares) stays
    assert not linear.pack_linears(m)  # packing twice is a no-op
    ep = export_step(m, read_manifest(bf16_engine), "verify3@32")
    calls = [n for n in ep.graph.nodes if "magicdec.linear" in str(n.target)]
    assert len(calls) == 7 * m.cfg.num_layers + 1


@needs_kernel
def test_packed_steps_agree_with_onednn(bf16_engine, monkeypatch):
    """The same bf16 engine with and without the kernel: logits within what one bf16 rounding per
    linear can move them (the two sum in different orders)."""
    packed = Runtime.load(bf16_engine)
    monkeypatch.setattr(linear, "wanted", lambda *a: False)
    plain = Runtime.load(bf16_engine)
    assert plain.core.steps.model.lm_head.packed is None
    ids = torch.randint(packed.manifest.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None]
    lengths = torch.zeros(1, dtype=torch.long)
    caches = [torch.zeros(1, packed.core.steps.model.kv_heads, 16, 64, dtype=torch.bfloat16) for _ in range(2)]
    out = [rt.core.steps("prefill@16", ids, pos, caches, caches, lengths, torch.tensor([15]))[0]
           for rt in (packed, plain)]
    torch.testing.assert_close(out[0], out[1], rtol=0.05, atol=0.05)


@needs_kernel
def test_an_aoti_bf16_engine_calls_the_kernel_and_matches_eager(tmp_path_factory, tiny_hf):
    """Compiled graphs take the packed weights (the manifest says so, and needs AVX512-BF16) and
    compute what the eager engine does, up to bf16 rounding of fused elementwise work."""
    small = dict(dtype="bfloat16", max_batch=4, max_seq_len=32, gammas=[2], default_gamma=2, draft_sinks=2,
                 draft_budget=8, prefill_chunk=16, show_progress=False)
    engine = build_engine(tmp_path_factory.mktemp("tiny-aoti-bf16") / "engine", tiny_hf, backend="aoti", **small)
    m = read_manifest(engine)
    assert m.packed_linears and "avx512_bf16" in m.cpu_isa
    compiled = load_steps(engine, m)
    plain = build_engine(tmp_path_factory.mktemp("tiny-eager-bf16") / "engine", tiny_hf, **small)
    eager = load_steps(plain, read_manifest(plain))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(m.model.vocab_size, (4, 3), generator=g)
    caches = [torch.randn(4, compiled.model.kv_heads, 32, 64, generator=g).bfloat16() for _ in range(2)]
    lengths = torch.tensor([0, 5, 17, 29])
    pos = lengths[:, None] + torch.arange(3)
    out = [s("verify2@32", ids, pos, caches, caches, lengths)[0] for s in (compiled, eager)]
    torch.testing.assert_close(out[0], out[1], rtol=0.05, atol=0.05)
    # An engine whose graphs were built for another packing (manifests before the block width
    # was recorded say `true`: 64 features) is refused with what to do, not a shape error.
    data = json.loads((engine / "manifest.json").read_text())
    assert data["packed_linears"] == linear.BLOCK
    data["packed_linears"] = True
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineError, match=f"blocks of 64 features; this magicdec-rt's linear kernel packs {linear.BLOCK}: rebuild"):
        load_steps(engine, read_manifest(engine))


# --- int8 drafts: torch.ops.magicdec.linear_q8 ---------------------------------------------------

needs_q8 = pytest.mark.skipif(not linear.int8_wanted(torch.bfloat16, "cpu"),
                              reason="int8 drafts run on CPUs with AVX512-VNNI (bf16 ones with AVX512-BF16 too), no AMX")


@needs_q8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (16, 576, 576), (16, 192, 576), (16, 576, 1536), (7, 100, 4),
                                   (64, 1536, 576), (13, 33, 68), (3, 1, 8), (25, 96, 128)])
def test_q8_kernel_equals_its_reference(M, N, K, dtype):
    """Bit for bit: the same per-row quantization (round half to even), exact integer sums, the same
    two float32 scalings, then x's dtype. A zero row gives zeros."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) * 0.1).to(dtype)
    x[M // 2] = 0
    w8, scale = linear.quantize(w)
    y = torch.ops.magicdec.linear_q8(x, *linear.pack_q8(w8, scale), N)
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.equal(y, linear.q8_reference(x, w8, scale))
    assert not y[M // 2].any()
    # And what the quantization costs against the bf16 product: ~1% of its norm on random data.
    ref = F.linear(x.float(), w.float())
    assert (y.float() - ref).norm() <= 0.03 * ref.norm()


# The float32 int8 paths this CPU runs: vpmaddubsw (AVX2), and vpdpbusd where it has AVX512-VNNI.
Q8_F32_PATHS = ["avx2"] + (["avx512"] if {"avx512bw", "avx512vl", "avx512_vnni"} <= cpu.flags() else [])


@needs_f32_kernel
@pytest.mark.parametrize("M,N,K", [(1, 64, 64), (16, 576, 576), (16, 192, 1536), (7, 100, 4), (64, 1536, 576),
                                   (13, 33, 68), (5, 40, 12), (3, 1, 8)])
def test_q8_float32_paths_equal_the_reference(M, N, K):
    """The AVX2 path multiplies |w| by q with w's sign (vpmaddubsw: a pair sum is at most
    2 * 127 * 127 < 2^15) and widens the pairs (vpmaddwd), so its integer sums are exact: it equals
    ``q8_reference``, and the VNNI path, bit for bit; also where every product is +-127 * 127 and
    pairs agree in sign (a saturating pair sum, as vpmaddubsw of q + 128 would give, shows there)."""
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1
    x[M // 2] = 0
    sign = lambda n: 1 - 2 * ((torch.arange(n * K) // 2) % 3 == 0).float().view(n, K)  # noqa: E731
    for x, w in ((x, w), (sign(M), sign(N))):
        w8, scale = linear.quantize(w)
        ref = linear.q8_reference(x, w8, scale)
        for path in Q8_F32_PATHS:
            try:
                attention.set_isa(path)
                assert torch.equal(torch.ops.magicdec.linear_q8(x, *linear.pack_q8(w8, scale), N), ref), path
            finally:
                attention.set_isa(attention.DEFAULT_ISA)
    assert ref.abs().max() == K and not linear.q8_reference(x * 0, w8, scale).any()


def test_q8_packing_layout_and_sums():
    w = (torch.arange(40 * 8, dtype=torch.float32).view(40, 8) - 100).bfloat16()
    w8, scale = linear.quantize(w)
    assert w8.dtype == torch.int8 and w8.abs().amax(1).eq(127).all()  # each feature spans its range
    torch.testing.assert_close(w8.float() * scale[:, None], w.float(), rtol=0, atol=float(scale.max()) / 2)
    p, s, ws = linear.pack_q8(w8, scale)
    assert p.shape == (2, 2, 32, 4) and s.shape == ws.shape == (64,)
    # Block b, quad j, feature f, element e holds W8[32 b + f, 4 j + e]; features past N are zero.
    assert p[1, 1, 7, 2] == w8[39, 6] and p[0, 0, 3, 1] == w8[3, 1] and (p[1, :, 8:] == 0).all()
    assert torch.equal(ws[:40], w8.sum(1, dtype=torch.int32)) and not ws[40:].any() and not s[40:].any()


@needs_q8
def test_q8_bad_inputs_are_refused():
    p, s, ws = linear.pack_q8(*linear.quantize(torch.randn(64, 8).bfloat16()))
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float32 and the packed weights int8"):
        torch.ops.magicdec.linear_q8(torch.randn(2, 8).half(), p, s, ws, 64)
    with pytest.raises(RuntimeError, match="K a multiple of 4"):
        torch.ops.magicdec.linear_q8(torch.randn(2, 6).bfloat16(), p, s, ws, 64)
    with pytest.raises(RuntimeError, match=r"scale must be float32 and wsum int32, both \[64\]"):
        torch.ops.magicdec.linear_q8(torch.randn(2, 8).bfloat16(), p, s[:32], ws, 64)


def test_int8_drafts_run_where_float32_linears_do_and_for_bf16_models_need_vnni(monkeypatch):
    assert not linear.int8_wanted(torch.float16, "cpu") and not linear.int8_wanted(torch.float32, "cuda")
    here = attention.kernel_available() and attention.set_isa() != "portable"
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx2", "fma"}
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only CPU: vpmaddubsw
    assert linear.int8_wanted(torch.float32, "cpu") == here and not linear.int8_wanted(torch.bfloat16, "cpu")
    assert linear.int8_isa(torch.float32) == ["avx2", "fma"]
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx", "sse4_2"}))
    assert not linear.int8_wanted(torch.float32, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset(avx512 | {"avx512_bf16"}))
    assert not linear.int8_wanted(torch.bfloat16, "cpu") and linear.int8_wanted(torch.float32, "cpu") == here
    monkeypatch.setattr(cpu, "flags", lambda: frozenset(avx512 | {"avx512_vnni"}))  # e.g. Ice Lake
    assert not linear.int8_wanted(torch.bfloat16, "cpu") and linear.int8_wanted(torch.float32, "cpu") == here
    monkeypatch.setattr(cpu, "flags", lambda: frozenset(avx512 | {"avx512_bf16", "avx512_vnni", "amx_bf16"}))
    assert not linear.int8_wanted(torch.bfloat16, "cpu") and not linear.int8_wanted(torch.float32, "cpu")
    monkeypatch.setattr(cpu, "flags", lambda: frozenset(avx512 | {"avx512_bf16", "avx512_vnni"}))
    assert linear.int8_wanted(torch.bfloat16, "cpu") == attention.kernel_available()
    assert linear.int8_isa(torch.bfloat16) == ["avx512_bf16", "avx512_vnni"]
    if attention.kernel_available():  # the portable path runs no packed linears, float32 or int8
        try:
            attention.set_isa("portable")
            assert not linear.int8_wanted(torch.float32, "cpu")
        finally:
            attention.set_isa(attention.DEFAULT_ISA)


@needs_q8
def test_only_the_draft_step_reads_the_int8_weights(bf16_engine):
    m = read_manifest(bf16_engine)
    assert m.draft_int8  # --draft-weights auto, on this CPU
    steps = load_steps(bf16_engine, m)
    layers = [x for x in steps.model.modules() if isinstance(x, linear.Linear)]
    assert all(x.q8 is not None and x.packed is not None for x in layers)
    ops = {}
    for name in ("draft", "verify3@32", "prefill@32"):
        ep = export_step(steps.model, m, name)
        ops[name] = [str(n.target) for n in ep.graph.nodes if "magicdec.linear" in str(n.target)]
    n = 7 * steps.model.cfg.num_layers + 1
    assert ops["draft"] == ["magicdec.linear_q8.default"] * n
    assert ops["verify3@32"] == ops["prefill@32"] == ["magicdec.linear.default"] * n
    # The draft step's logits are the int8 linears' (not the bf16 ones'), close to the verify's.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(m.model.vocab_size, (m.max_batch, 1), generator=g)
    caches = [torch.randn(m.max_batch, steps.model.kv_heads, m.draft_slots, 64, generator=g).bfloat16() for _ in range(2)]
    lengths = torch.full((m.max_batch,), 5)
    draft = steps("draft", ids, lengths[:, None], caches, caches, lengths)[0]
    full = steps._module("verify0@32")(ids, lengths[:, None], caches, caches, lengths)[0]
    assert not torch.equal(draft, full)
    torch.testing.assert_close(draft, full, rtol=0.1, atol=0.1)


@pytest.mark.skipif(not linear.int8_wanted(torch.float32, "cpu"), reason="float32 int8 drafts need AVX2 and FMA, no AMX")
def test_greedy_speculation_with_int8_drafts_equals_autoregressive(tiny_engine, tiny_runtime):
    """A float32 engine drafting with int8 weights (auto, on this CPU): greedy speculation gives
    the target's tokens at gamma 2 and 4 (test_runtime.py holds every gamma to transformers')."""
    assert read_manifest(tiny_engine).draft_int8 and tiny_runtime.core.steps.model.lm_head.q8 is not None
    ar = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=40, gamma=0)]
    for gamma in (2, 4):
        assert [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=40, gamma=gamma)] == ar
        assert 0 < tiny_runtime.last_stats["acceptance_rate"] < 1


def test_draft_weights_are_checked(tiny_hf, tmp_path, monkeypatch):
    with pytest.raises(EngineError, match="draft_weights 'int4' is not supported; choose one of auto, int8, target"):
        build_engine(tmp_path / "e", tiny_hf, draft_weights="int4", **TINY)
    with monkeypatch.context() as m:
        m.setattr(cpu, "flags", lambda: frozenset({"avx", "sse4_2"}))  # no AVX2
        with pytest.raises(EngineError, match=r"draft_weights int8 needs a CPU with AVX2 and FMA for a float32 engine, "
                           r"AVX512-VNNI and AVX512-BF16 for a bfloat16 one, and no AMX; this is float32 on cpu \(.*\): "
                           r"use --draft-weights target"):
            build_engine(tmp_path / "e", tiny_hf, dtype="float32", draft_weights="int8", **TINY)
        assert not read_manifest(build_engine(tmp_path / "a", tiny_hf, **TINY)).draft_int8  # auto: not here
    engine = build_engine(tmp_path / "t", tiny_hf, dtype="bfloat16", draft_weights="target", **TINY)
    m = read_manifest(engine)
    assert not m.draft_int8 and json.loads((engine / "manifest.json").read_text())["draft"]["weights"] == "target"
    assert all(x.q8 is None for x in load_steps(engine, m).model.modules() if isinstance(x, linear.Linear))


@needs_f32_kernel
def test_a_float32_engine_packs_its_linears_and_both_paths_decode_alike(tiny_engine):
    """Float32 engines (what --dtype auto builds on CPUs without native bf16) run the kernel; its
    AVX2 path, as an AVX2-only CPU runs it, gives the same tokens as the AVX-512 one here (the same
    sums in the same order: equal bit for bit). Agreement with transformers is tested with the
    kernel in use (test_runtime, test_embedded)."""
    rt = Runtime.load(tiny_engine)
    m = rt.core.steps.model
    assert all(x.packed is not None and x.packed.dtype == torch.float32 for x in m.modules()
               if isinstance(x, linear.Linear))
    want = [r.token_ids for r in rt.generate(MIXED, max_new_tokens=20, gamma=3)]
    try:
        attention.set_isa("avx2")
        assert [r.token_ids for r in rt.generate(MIXED, max_new_tokens=20, gamma=3)] == want
    finally:
        attention.set_isa(attention.DEFAULT_ISA)
