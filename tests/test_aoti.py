"""The AOTInductor backend on the tiny model: same greedy tokens as eager across a context-bucket
change, graphs reused on rebuild, validation that stops a bad build, and load-time compatibility
checks that explain themselves."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace

import pytest
import torch

from builders.build import build_engine
from builders.compile import aoti_options, graph_key
from magicdec_rt import EngineError, Runtime, cli, cpu, linear
from magicdec_rt.engine import read_manifest

from .conftest import TINY_AOTI, copy_engine, edit_manifest

# Prompts of 3..60 tokens: generation crosses the 32-slot bucket, and rows start in either bucket.
PROMPTS = [[(7 * i + 3 * j) % 16 for j in range(n)] for i, n in enumerate((5, 20, 31, 40, 3, 60, 17, 9))]


@pytest.fixture(scope="module")
def aoti_runtime(tiny_aoti_engine):
    return Runtime.load(tiny_aoti_engine)


@pytest.fixture(scope="module")
def eager_runtime(tmp_path_factory, tiny_hf):
    return Runtime.load(build_engine(tmp_path_factory.mktemp("tiny-eager") / "engine", tiny_hf, **TINY_AOTI))


def test_manifest_records_every_graph(tiny_aoti_engine):
    m = read_manifest(tiny_aoti_engine)
    assert m.backend == "aoti" and m.device == "cpu" and m.context_buckets == [32, 128] and m.gammas == [0, 2]
    assert sorted(m.graphs) == sorted(["prefill@32", "prefill@128", "draft", "verify0@32", "verify0@128",
                                       "verify2@32", "verify2@128"])
    for name, g in m.graphs.items():
        assert (tiny_aoti_engine / g["file"]).stat().st_size == g["bytes"]
        # The float32 bound the build enforced, against eager; an int8 draft against the draft in the
        # model's own weights, within twice eager int8's own distance from it.
        assert all(g["rel_err"][k] <= 2 * g["eager_rel_err"][k] + 1e-4 for k in g["rel_err"]), name
        assert max(g["eager_rel_err"].values()) == 0 or (name == "draft" and m.draft_int8), name
    assert m.versions["torch"] == torch.__version__ and len(m.model_sha256) == 64
    # The instruction sets Inductor compiled for and the linear kernels need, all of which this CPU has.
    assert m.packed_linears == (linear.BLOCK if linear.wanted(torch.float32, "cpu") else 0)
    needs = set(linear.isa(torch.float32)) if m.packed_linears else set()
    arch, isa = cpu.compile_target()
    assert m.cpu_isa == sorted(set(isa) | needs | (set(linear.int8_isa(torch.float32)) if m.draft_int8 else set()))
    assert not cpu.missing(m.cpu_isa)
    # Compiled for an x86-64 level, not Inductor's -march=native (any instruction of the build CPU).
    assert m.cpu_arch == arch and aoti_options(m)["cpp.march"] == f"{arch} -mtune=native" and set(cpu.ARCH_LEVELS[256][1]) <= set(isa)
    # Inductor's own loops were generated for the threads the engine runs with, not for the build
    # workers' share of them (2 workers on 2 cores had 1 each: every loop serial).
    assert m.cpu_threads == torch.get_num_threads()
    assert aoti_options(m)["cpp.threads"] == m.cpu_threads
    assert graph_key(m, "draft") != graph_key(replace(m, cpu_threads=m.cpu_threads + 1), "draft")
    # The draft graph reads int8 weights where this CPU runs them (--draft-weights auto), so the
    # token tests below hold int8 drafts too to eager there.
    assert m.draft_int8 == linear.int8_wanted(torch.float32, "cpu")
    assert graph_key(m, "draft") != graph_key(replace(m, draft_int8=not m.draft_int8), "draft")
    assert graph_key(m, "verify2@32") == graph_key(replace(m, draft_int8=not m.draft_int8), "verify2@32")


@pytest.mark.parametrize("gamma", [0, 2])
def test_aoti_greedy_tokens_equal_eager(aoti_runtime, eager_runtime, gamma):
    got = aoti_runtime.generate(PROMPTS, max_new_tokens=40, gamma=gamma)
    want = eager_runtime.generate(PROMPTS, max_new_tokens=40, gamma=gamma)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert aoti_runtime.full.slots == 128  # the longest row ended past the first bucket
    if gamma:
        assert 0 < aoti_runtime.last_stats["acceptance_rate"] < 1


def test_float32_weights_over_a_bf16_cache_compile_and_speculate_exactly(tmp_path, tiny_hf):
    """What --dtype auto builds on CPUs without native bf16. A block's own K/V are rounded to the
    cache's dtype and back (model.py); Inductor drops such a round trip inside a fused kernel unless
    it emulates precision casts, and the build then failed validation (new K/V 4e-3 from eager, the
    embedded model's prefill) while its blocks attended to unrounded K/V. The graphs' new K/V now
    equal eager's, the engine is held to the bf16 bound (its cache's), and greedy speculation
    equals plain decoding."""
    small = dict(TINY_AOTI, max_seq_len=64, buckets=[64])
    engine = build_engine(tmp_path / "engine", tiny_hf, backend="aoti", kv_dtype="bfloat16", **small)
    m = read_manifest(engine)
    assert m.dtype == "float32" and m.kv_dtype == "bfloat16" and aoti_options(m)["emulate_precision_casts"]
    assert all(g["rel_err"][kv] == 0 for name, g in m.graphs.items() if name != "draft" for kv in ("new_k", "new_v"))
    rt = Runtime.load(engine)
    want = [r.token_ids for r in rt.generate(PROMPTS[:4], max_new_tokens=20, gamma=0)]
    assert [r.token_ids for r in rt.generate(PROMPTS[:4], max_new_tokens=20, gamma=2)] == want
    assert 0 < rt.last_stats["acceptance_rate"] <= 1


def _disassembly(engine, scratch) -> str:
    """objdump's text of every shared object in the engine's compiled graphs."""
    import subprocess
    import zipfile

    text = []
    for pt2 in sorted((engine / "graphs").glob("*.pt2")):
        with zipfile.ZipFile(pt2) as z:
            for name in z.namelist():
                if name.endswith(".so"):
                    so = scratch / os.path.basename(name)
                    so.write_bytes(z.read(name))
                    text.append(subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout)
                    so.unlink()
    return "\n".join(text)


AVX2_LEVEL = list(cpu.ARCH_LEVELS[256][1])


@pytest.mark.skipif(cpu.missing(AVX2_LEVEL) or not shutil.which("objdump"), reason="needs AVX2 and objdump")
def test_an_avx2_engine_holds_no_avx512_and_loads_where_a_native_one_is_refused(tmp_path, tiny_hf, tiny_aoti_engine,
                                                                                 monkeypatch):
    """``--cpu-isa avx2``: an engine built on any machine for every x86-64 CPU with AVX2 and FMA.
    Its graphs are compiled for x86-64-v3 with AVX2 vectors, so not one instruction touches an
    AVX-512 register (Inductor's default, -march=native, lets the compiler use any instruction of
    the build CPU); ``--dtype auto`` picks float32, as it would there; a CPU with only that level
    loads it and refuses an engine compiled for this one's AVX-512."""
    small = dict(TINY_AOTI, max_seq_len=64, buckets=[64])
    engine = build_engine(tmp_path / "avx2", tiny_hf, backend="aoti", dtype="auto", cpu_isa="avx2", **small)
    m = read_manifest(engine)
    assert m.dtype == "float32" and m.cpu_arch == "x86-64-v3" and aoti_options(m)["cpp.simdlen"] == 256
    assert set(m.cpu_isa) == set(AVX2_LEVEL)  # the level names AVX2 and FMA, all the linear kernels need
    # Registers as operands (%zmm0, %k1), not names: a file's name in objdump's header is a random hash.
    avx512 = re.compile(r"%zmm\d|%k[0-7]\b")
    code = _disassembly(engine, tmp_path)
    ymm, found = len(re.findall(r"%ymm\d", code)), sorted(set(avx512.findall(code)))
    assert ymm and not found, f"{ymm} ymm operands; AVX-512 registers {found}"
    if "avx512f" in cpu.flags() and cpu.compile_target()[0] == "x86-64-v4":  # the check sees AVX-512 where it is
        assert avx512.findall(_disassembly(tiny_aoti_engine, tmp_path)), "the native engine uses no AVX-512 register"
    eager = Runtime.load(build_engine(tmp_path / "eager", tiny_hf, dtype="float32", **small))
    want = [r.token_ids for r in eager.generate(PROMPTS[:4], max_new_tokens=20, gamma=2)]
    assert [r.token_ids for r in Runtime.load(engine).generate(PROMPTS[:4], max_new_tokens=20, gamma=2)] == want

    monkeypatch.setattr(cpu, "flags", lambda: frozenset(AVX2_LEVEL))  # an AVX2-only CPU
    Runtime.load(engine)
    native = read_manifest(tiny_aoti_engine)
    if native.cpu_arch == "x86-64-v4":
        with pytest.raises(EngineError) as err:
            Runtime.load(tiny_aoti_engine)
        assert (f"needs {', '.join(x for x in native.cpu_isa if x not in AVX2_LEVEL)}, which this CPU "
                f"({cpu.model_name()}) lacks: its graphs (compiled for x86-64-v4) would stop on an illegal instruction; "
                "rebuild the engine here, or on any machine with --cpu-isa avx2") in str(err.value)


def test_aoti_refill_and_bucket_shrink(aoti_runtime, eager_runtime):
    """More prompts than rows: a long row finishes, short ones take its slot, and the cache is laid
    out again at the smaller bucket; the tokens still equal eager's."""
    prompts = [PROMPTS[5], *PROMPTS[:4]] * 2 + [PROMPTS[4]] * 3
    kw = dict(max_new_tokens=12, gamma=2)
    got = aoti_runtime.generate(prompts, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in eager_runtime.generate(prompts, **kw)]


def test_generate_cli_uses_aoti_engine(tiny_aoti_engine, capsys):
    assert cli.main(["--engine", str(tiny_aoti_engine), "--json", "--max-new-tokens", "8", "w1 w2 w3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"][0]["token_ids"]) == 8


def test_rebuild_reuses_unchanged_graphs(tiny_aoti_engine, tiny_hf, capsys):
    files = {p: p.stat().st_mtime_ns for p in (tiny_aoti_engine / "graphs").glob("*.pt2")}
    before = read_manifest(tiny_aoti_engine).graphs
    build_engine(tiny_aoti_engine, tiny_hf, backend="aoti", **TINY_AOTI)
    assert read_manifest(tiny_aoti_engine).graphs == before
    assert {p: p.stat().st_mtime_ns for p in (tiny_aoti_engine / "graphs").glob("*.pt2")} == files
    assert "7 graphs" in capsys.readouterr().err


def test_validation_failure_stops_the_build(tmp_path, tiny_hf):
    """A bound no compiled graph can meet (compiled float32 differs from eager by ~1e-7): the build
    stops at the first graph, names the step, bucket and error, and writes no manifest."""
    opts = TINY_AOTI | dict(gammas=[], default_gamma=0, buckets=[], max_batch=2)
    with pytest.raises(EngineError, match=r"step \S+ \(context bucket .+\) failed validation: compiled \S+ differ "
                                          r"from the float32 reference by median relative error \S+, above the allowed "
                                          r"1.00e-12 \(2 x eager float32's 0.00e\+00 \+ bound 1e-12\)"):
        build_engine(tmp_path / "e", tiny_hf, backend="aoti", jobs=1, max_rel_err=1e-12, **opts)
    assert not (tmp_path / "e" / "manifest.json").exists()


@pytest.fixture
def aoti_copy(tiny_aoti_engine, tmp_path):
    return copy_engine(tiny_aoti_engine, tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["versions"].update(torch="2.99.0"),
         "was compiled with torch 2.99.0 and this is torch " + torch.__version__ + ": compiled graphs only load in the "
         "torch that built them; install torch==2.99.0 or rebuild the engine"),
        pytest.param(lambda d: d.update(device="cuda"), "was built for CUDA and this machine has no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
        (lambda d: d.update(backend="tensorrt"), "backend 'tensorrt' needs torch-tensorrt, which is not installed"),
        (lambda d: d["graphs"].pop("draft"), "no compiled graph for step 'draft' (1 missing); rebuild the engine"),
        (lambda d: d.update(cpu_isa=["amx_fp64"]),
         f"needs amx_fp64, which this CPU ({cpu.model_name()}) lacks: its graphs (compiled for "
         f"{cpu.compile_target()[0]}) would stop on an illegal instruction; rebuild the engine here"),
    ],
    ids=["torch-version", "no-cuda", "no-tensorrt", "graph-missing", "cpu-isa"],
)
def test_incompatible_compiled_engine(aoti_copy, edit, message):
    edit_manifest(aoti_copy, edit)
    with pytest.raises(EngineError) as err:
        Runtime.load(aoti_copy)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit, built", [
    (lambda d: d.update(cpu_threads=torch.get_num_threads() + 1), torch.get_num_threads() + 1),
    pytest.param(lambda d: d.pop("cpu_threads"), 1,  # built before the field: Inductor's loops serial
                 marks=pytest.mark.skipif(torch.get_num_threads() == 1, reason="runs 1 thread")),
], ids=["other-count", "before-the-field"])
def test_an_engine_compiled_for_other_threads_warns(aoti_copy, edit, built):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.load(aoti_copy)  # built here, for the threads this process runs
    edit_manifest(aoti_copy, edit)
    n = torch.get_num_threads()
    with pytest.warns(RuntimeWarning, match=rf"graphs were compiled for {built} threads? and this process runs {n}: "
                                            rf"their own loops \(norms, RoPE, SiLU\) use {built}; rebuild the engine"):
        Runtime.load(aoti_copy)


def test_missing_graph_file(aoti_copy):
    os.remove(aoti_copy / "graphs" / "verify2@32.pt2")
    with pytest.raises(EngineError, match=r"is missing graphs/verify2@32.pt2 \(step verify2@32\); rebuild it"):
        Runtime.load(aoti_copy)


def test_compiled_steps_refuse_strided_inputs(aoti_runtime):
    """AOTInductor reads inputs as dense arrays whatever their strides; the runtime guards it."""
    m = aoti_runtime.manifest
    aoti_runtime.full.resize(32)
    k, v = aoti_runtime.full.view(slice(None))
    B = m.max_batch
    strided = [c[:, :, :16] for c in k]  # a bucket view of a larger layout
    args = (torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long), strided, v,
            torch.zeros(B, dtype=torch.long))
    shape = f"[{B}, {m.model.num_kv_heads}, 16, {m.model.head_dim}]"
    with pytest.raises(RuntimeError, match=rf"step input 2 \(shape \{shape}\) is not contiguous"):
        aoti_runtime.steps("verify0@32", *args)
