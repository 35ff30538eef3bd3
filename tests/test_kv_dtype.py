"""A KV cache in another dtype than the weights (bf16 caches under float32 weights, what
``--dtype auto`` builds on CPUs without native bf16): speculation stays exact, the caches hold the
rounded K/V, and the build and manifest say what they hold."""

from __future__ import annotations

import pytest
import torch

from builders import build
from builders.build import build_engine
from builders.export import export_step
from magicdec_rt import EngineError, Runtime, cpu
from magicdec_rt.engine import load_steps, read_manifest

from .conftest import TINY, copy_engine, edit_manifest
from .test_runtime import MIXED


@pytest.fixture(scope="module")
def bf16_kv_engine(tmp_path_factory, tiny_hf):
    return build_engine(tmp_path_factory.mktemp("tiny-bf16kv") / "engine", tiny_hf, dtype="float32",
                        kv_dtype="bfloat16", **TINY)


@pytest.fixture(scope="module")
def bf16_kv_runtime(bf16_kv_engine):
    return Runtime.load(bf16_kv_engine)


def test_the_caches_are_bf16_and_hold_the_rounded_kv(bf16_kv_runtime, tiny_runtime):
    assert bf16_kv_runtime.manifest.kv_dtype == "bfloat16" and bf16_kv_runtime.manifest.dtype == "float32"
    assert bf16_kv_runtime.full.k.dtype == bf16_kv_runtime.draft.k.dtype == torch.bfloat16
    prompt = MIXED[3]
    bf16_kv_runtime.generate([prompt], max_new_tokens=1, gamma=0)
    tiny_runtime.generate([prompt], max_new_tokens=1, gamma=0)
    # Layer 0's keys depend on the embeddings alone: the float32 engine's, rounded to bf16.
    n = len(prompt)
    want = tiny_runtime.full.k[0, 0, :, :n].to(torch.bfloat16)
    assert torch.equal(bf16_kv_runtime.full.k[0, 0, :, :n], want)


@pytest.mark.parametrize("gamma", [1, 3, 4])
def test_greedy_speculation_equals_autoregressive(bf16_kv_runtime, gamma):
    ar = [r.token_ids for r in bf16_kv_runtime.generate(MIXED, max_new_tokens=40, gamma=0)]
    spec = [r.token_ids for r in bf16_kv_runtime.generate(MIXED, max_new_tokens=40, gamma=gamma)]
    assert spec == ar


def test_seeded_sampling_with_speculation_equals_autoregressive(bf16_kv_runtime):
    kw = dict(max_new_tokens=30, temperature=0.8, seed=7)
    ar = [r.token_ids for r in bf16_kv_runtime.generate(MIXED, gamma=0, **kw)]
    assert [r.token_ids for r in bf16_kv_runtime.generate(MIXED, gamma=3, **kw)] == ar


def test_steps_export_with_bf16_caches_under_float32_weights(bf16_kv_engine):
    m = read_manifest(bf16_kv_engine)
    steps = load_steps(bf16_kv_engine, m)
    ep = export_step(steps.model, m, "verify3@32")
    caches = [n for n in ep.graph.nodes if n.op == "placeholder" and "cache" in n.name]
    assert caches and all(n.meta["val"].dtype == torch.bfloat16 for n in caches)
    assert any("magicdec.attention" in str(n.target) for n in ep.graph.nodes)


def test_cli_auto_dtype_picks_a_bf16_cache_and_explicit_float32_keeps_float32(tiny_hf, tmp_path):
    assert build.main(["--model", str(tiny_hf), "--out", str(tmp_path / "auto"), "--max-seq-len", "64",
                       "--no-calibrate", "--quiet"]) == 0
    auto = read_manifest(tmp_path / "auto")
    assert (auto.dtype, auto.kv_dtype) == (cpu.auto_dtype(), cpu.auto_kv_dtype())
    assert build.main(["--model", str(tiny_hf), "--out", str(tmp_path / "f32"), "--max-seq-len", "64",
                       "--dtype", "float32", "--no-calibrate", "--quiet"]) == 0
    assert read_manifest(tmp_path / "f32").kv_dtype == "float32"


def test_a_manifest_without_kv_dtype_means_the_engine_dtype(tiny_engine, tmp_path):
    engine = copy_engine(tiny_engine, tmp_path)
    edit_manifest(engine, lambda d: d.pop("kv_dtype"))
    assert read_manifest(engine).kv_dtype == "float32"


def test_another_kv_dtype_off_the_cpu_is_refused(bf16_kv_engine, tmp_path):
    engine = copy_engine(bf16_kv_engine, tmp_path)
    edit_manifest(engine, lambda d: d.update(device="cuda"))
    with pytest.raises(EngineError, match="kv_dtype bfloat16 differs from dtype float32: only the CPU"):
        read_manifest(engine)
    with pytest.raises(EngineError, match="kv_dtype 'int8' is not supported"):
        build_engine(tmp_path / "x", tmp_path, kv_dtype="int8")
