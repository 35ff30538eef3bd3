"""The bf16 linear kernel (``torch.ops.magicdec.linear``) against ``F.linear``, weight packing, and
where the model uses it. The kernel's own tests need a CPU with AVX512-BF16; what decides whether
it is used is tested everywhere."""

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

HERE = linear.wanted(torch.bfloat16, "cpu")
needs_kernel = pytest.mark.skipif(not HERE, reason="the linear kernel runs on CPUs with AVX512-BF16 (no AMX)")


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


@needs_kernel
def test_bad_inputs_are_refused():
    w = linear.pack(torch.randn(64, 8).bfloat16())
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        torch.ops.magicdec.linear(torch.randn(2, 8), w, 64)
    with pytest.raises(RuntimeError, match="K even"):
        torch.ops.magicdec.linear(torch.randn(2, 7).bfloat16(), w, 64)
    with pytest.raises(RuntimeError, match="do not hold 65 features of K = 8"):
        torch.ops.magicdec.linear(torch.randn(2, 8).bfloat16(), w, 65)


def test_only_bf16_models_on_avx512_bf16_cpus_without_amx_use_it(monkeypatch):
    assert not linear.wanted(torch.float32, "cpu")
    assert not linear.wanted(torch.bfloat16, "cuda")
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
