"""The CPU attention kernel (torch.ops.magicdec.attention) against its specification
(magicdec_rt.attention.reference), on every instruction-set path this CPU can run, in export, and
in the model's steps."""

from __future__ import annotations

import pytest
import torch

from magicdec_rt import attention

pytestmark = pytest.mark.skipif(not attention.kernel_available(), reason="no C++ compiler for the kernel")


def runs_here(isa: str) -> bool:
    try:
        return attention.set_isa(isa) == isa
    except RuntimeError:  # "this CPU cannot run the ... kernel"
        return False


ISAS = [isa for isa in attention.ISAS if attention.kernel_available() and runs_here(isa)]
if attention.kernel_available():
    attention.set_isa(attention.DEFAULT_ISA)

# float32: the kernel computes in float32 with a polynomial exp2 (~2e-7 relative) and another
# summation order: within 1e-5 of the row's scale. Low precision, with q, K, V exact in that dtype:
# the float32 path rounds only the output, by at most the unit roundoff u of its value (2^-8 for
# bf16's 8 significant bits, 2^-11 for fp16's 11); the AVX512-BF16 path also rounds each softmax
# weight to bf16 before p.v, which moves the output by at most u * sum(p |v|). So
# |error| <= 2u * sum(p |v|) (and sum(p |v|) >= |output|).
REL = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def case(B, kv, G, T, S, d, dtype, seed, block_keys=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, kv, G * T, d, generator=g).to(dtype)
    kc, vc = (torch.randn(B, kv, S, d, generator=g).to(dtype) for _ in range(2))
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    lengths[0] = 0
    lengths[-1] = S
    kn, vn = (torch.randn(B, kv, T, d, generator=g).to(dtype) for _ in range(2)) if block_keys else (None, None)
    return q, kc, vc, lengths, kn, vn


def check_close(out, dtype, q, kc, vc, lengths, kn, vn, scale):
    """``out`` (in ``dtype``) against the float32 reference, within the bounds above."""
    ref = attention.reference(q, kc, vc, lengths, kn, vn, scale)
    ref_abs = attention.reference(q, kc, vc.abs(), lengths, kn, None if vn is None else vn.abs(), scale)
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    err = (out.float() - ref).abs()
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    ok = err <= REL[dtype] * ref_abs + 1e-5 * scale
    assert bool(ok.all()), f"worst error {float((err / scale).max()):.3g} of the row's scale"


SHAPES = [  # B, kv, G, T, S, d
    (1, 3, 3, 1, 2000, 64),  # one row: slots split across threads
    (16, 3, 3, 4, 300, 64),
    (4, 2, 8, 16, 257, 128),
    (2, 1, 1, 7, 1500, 64),
    (5, 3, 3, 2, 17, 128),
    (3, 4, 3, 13, 64, 64),
    (1, 3, 3, 40, 1100, 64),  # prefill-like: 120 rows merged in parts of 48, slots split evenly over threads
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-kv{}-G{}-T{}-S{}-d{}".format(*s))
def test_kernel_matches_reference(isa, dtype, shape):
    attention.set_isa(isa)
    try:
        q, kc, vc, lengths, kn, vn = case(*shape, dtype, seed=sum(shape))
        scale = shape[-1] ** -0.5
        out = torch.ops.magicdec.attention(q, kc, vc, lengths, kn, vn, scale)
        check_close(out, dtype, q, kc, vc, lengths, kn, vn, scale)
    finally:
        attention.set_isa(attention.DEFAULT_ISA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", range(1, 17))
def test_every_block_length_and_per_row_lengths(T, dtype):
    q, kc, vc, lengths, kn, vn = case(7, 3, 3, T, 96, 64, dtype, seed=T)
    out = torch.ops.magicdec.attention(q, kc, vc, lengths, kn, vn, 0.125)
    check_close(out, dtype, q, kc, vc, lengths, kn, vn, 0.125)


def test_rows_without_keys_return_zeros_and_lengths_past_the_cache_mean_all_of_it():
    q, kc, vc, _, _, _ = case(3, 2, 3, 1, 40, 64, torch.float32, seed=1, block_keys=False)
    lengths = torch.tensor([0, 40, 1000])
    for t in (q, kc, vc):
        t[2] = t[1]
    out = torch.ops.magicdec.attention(q, kc, vc, lengths, None, None, 0.125)
    assert (out[0] == 0).all() and not out.isnan().any()
    check_close(out, torch.float32, q, kc, vc, lengths, None, None, 0.125)
    assert torch.equal(out[2], out[1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_isa_path_agrees_with_the_portable_one(isa, dtype):
    q, kc, vc, lengths, kn, vn = case(6, 3, 3, 4, 700, 64, dtype, seed=9)
    outs = {}
    for name in (isa, "portable"):
        attention.set_isa(name)
        outs[name] = torch.ops.magicdec.attention(q, kc, vc, lengths, kn, vn, 0.125).float()
    attention.set_isa(attention.DEFAULT_ISA)
    if isa == "avx512bf16" and dtype == torch.bfloat16:  # bf16 softmax weights: the bound above
        ref_abs = attention.reference(q, kc, vc.abs(), lengths, kn, vn.abs(), 0.125)
        assert bool(((outs[isa] - outs["portable"]).abs() <= 2 * REL[dtype] * ref_abs).all())  # both err
    else:  # float32 sums in another order (and FMA against mul + add): a bf16 output may round apart, by one ulp
        torch.testing.assert_close(outs[isa], outs["portable"], rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-6)


def test_bad_inputs_name_what_is_wrong():
    q, kc, vc, lengths, kn, vn = case(2, 1, 1, 2, 8, 64, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="head dim 32 is not 64 or 128"):
        torch.ops.magicdec.attention(q[..., :32], kc[..., :32], vc[..., :32], lengths, kn[..., :32], vn[..., :32], 1.0)
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        torch.ops.magicdec.attention(q, kc, vc, lengths.int(), kn, vn, 1.0)
    with pytest.raises(RuntimeError, match=r"T dividing the 2 query rows"):
        torch.ops.magicdec.attention(q, kc, vc, lengths, kn[:, :, :0], vn[:, :, :0], 1.0)
    with pytest.raises(RuntimeError, match="unknown kernel ISA 'sse9'"):
        attention.set_isa("sse9")
    assert attention.set_isa() == attention.set_isa(attention.DEFAULT_ISA)


def test_steps_call_the_kernel_and_export_it(tiny_engine):
    """The model's short blocks go through the op (the tiny engines have head dim 64), and
    torch.export records it as one node, which AOTInductor graphs then call (tests/test_aoti.py)."""
    from builders.export import export_step
    from magicdec_rt.engine import read_manifest
    from magicdec_rt.checkpoint import load_model_dir

    m = read_manifest(tiny_engine)
    model = load_model_dir(tiny_engine, torch.float32)
    for name in ("draft", "verify2@64", "prefill@64"):
        ep = export_step(model, m, name)
        ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.magicdec.attention.default) == m.model.num_layers
        assert torch.ops.aten.scaled_dot_product_attention.default not in ops
