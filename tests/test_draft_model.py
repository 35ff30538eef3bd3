"""A standalone draft model (``magicdec-build --draft-model``): a smaller model with the target's
tokenizer drafts over its own sparse cache; verification by the target keeps the output exact."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders.build import build_engine, main as build_main
from builders.draft_model import cut_layers
from magicdec_rt import EngineError, Runtime
from magicdec_rt.engine import read_manifest
from magicdec_rt.kv_cache import DraftPolicy

from .conftest import TINY, TINY_AOTI, tiny_hf_model_dir
from .test_runtime import MIXED


def test_cut_keeps_the_first_layers_norm_and_head(tiny_hf, drafter_dir):
    full = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    cut = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32).eval()
    assert cut.config.num_hidden_layers == 1 and full.config.num_hidden_layers == 2
    ids = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad():
        h = full.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        h = full.model.layers[0](h, position_embeddings=full.model.rotary_emb(h, pos), attention_mask=None,
                                 position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
        # Layer 0 with causal attention: transformers' mask-free call is bidirectional, so compare
        # only the first position (which sees itself alone either way).
        want = full.lm_head(full.model.norm(h))[:, 0]
        got = cut(ids).logits[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(EngineError, match=r"layers=2 is out of range: must be in \[1, 1\]"):
        cut_layers(tiny_hf, 2, drafter_dir.parent / "bad")


@pytest.mark.parametrize("policy", ["streaming", "snapkv"])
def test_greedy_with_a_draft_model_equals_autoregressive_and_transformers(dm_engine, tiny_runtime, policy):
    rt = Runtime.load(dm_engine, draft_policy=DraftPolicy(policy))
    assert rt.core.standalone and rt.draft.layers == 1 and rt.core.draft_full is not rt.full
    want = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=40, gamma=0)]
    hf = AutoModelForCausalLM.from_pretrained(dm_engine, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([MIXED[3]]), max_new_tokens=40, do_sample=False)[0, len(MIXED[3]):].tolist()
    assert want[3] == ref
    for gamma in (1, 3):
        got = rt.generate(MIXED, max_new_tokens=40, gamma=gamma)
        assert [r.token_ids for r in got] == want, (policy, gamma)
        stats = rt.last_stats
        assert stats["draft_steps"] > 0 and 0.0 < stats["acceptance_rate"] < 1.0, stats


def test_the_drafter_keeps_its_own_prompt_kv(dm_engine, drafter_dir):
    """The draft cache holds the draft model's K/V (its prefill of the prompt), not the target's."""
    rt = Runtime.load(dm_engine, draft_policy=DraftPolicy("streaming"))
    prompt = MIXED[3]
    rt.generate([prompt], max_new_tokens=1, gamma=3)
    cut = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = cut(torch.tensor([prompt]), use_cache=True).past_key_values
    k_ref = cache.layers[0].keys[0] if hasattr(cache, "layers") else cache[0][0][0]  # [kv, P, d]
    torch.testing.assert_close(rt.core.draft_full.k[0, 0, :, : len(prompt)], k_ref, rtol=1e-4, atol=1e-4)
    sinks = rt.manifest.draft_sinks  # slots below the sinks hold positions 0.. as they are
    torch.testing.assert_close(rt.draft.k[0, 0, :, :sinks], k_ref[:, :sinks], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_and_the_planner_with_a_draft_model(dm_engine, tiny_runtime, tmp_path):
    rt = Runtime.load(dm_engine)
    want = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=24, temperature=0.9, seed=3, gamma=0)]
    assert [r.token_ids for r in rt.generate(MIXED, max_new_tokens=24, temperature=0.9, seed=3, gamma=3)] == want
    planned = shutil.copytree(dm_engine, tmp_path / "planned")
    cal = Runtime.load(planned).calibrate(repeats=1)
    # The drafter's extra step (the last draft's K/V, or at gamma 0 the new token's) is charged to every round.
    assert all(cal.rest_ms[m][g] > cal.draft_ms[m] for m in ("greedy", "sampled") for g in cal.rest_ms[m])
    cal.save(planned)
    auto = Runtime.load(planned)
    greedy = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=24, gamma=0)]
    assert [r.token_ids for r in auto.generate(MIXED, max_new_tokens=24)] == greedy
    assert auto.last_stats["gamma"] == "auto"


def test_a_draft_model_must_share_the_tokenizer_and_one_process(tmp_path, tiny_hf, drafter_dir, capsys):
    other = tiny_hf_model_dir(tmp_path / "other", vocab=17, layers=1)
    with pytest.raises(EngineError, match="another vocabulary than the target \\(17 vs 16 tokens"):
        build_engine(tmp_path / "e1", tiny_hf, draft_model=other, **TINY)
    with pytest.raises(EngineError, match="--draft-model runs on one process only: got world_size 2"):
        build_engine(tmp_path / "e2", tiny_hf, draft_model=drafter_dir, world_size=2, **TINY)
    capsys.readouterr()
    code = build_main(["--model", str(tiny_hf), "--draft-model", str(other), "--out", str(tmp_path / "e3"),
                       "--max-seq-len", "64", "--quiet", "--no-calibrate"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # transformers' own loading bars come before it
    assert code == 2 and "Traceback" not in err and last.startswith("magicdec-build: error: draft model")
    assert "another vocabulary" in last


def test_the_cli_builds_with_a_draft_model(tmp_path, tiny_hf, drafter_dir):
    out = tmp_path / "engine"
    assert build_main(["--model", str(tiny_hf), "--draft-model", str(drafter_dir), "--out", str(out), "--dtype",
                       "float32", "--max-seq-len", "64", "--draft-budget", "8", "--draft-sinks", "2",
                       "--quiet", "--no-calibrate"]) == 0
    m = read_manifest(out)
    assert m.draft_model is not None and m.draft_model.num_layers == 1 and m.draft_slots == 8 + m.max_gamma + 1


def test_the_draft_models_steps_export_at_static_shapes(dm_engine):
    """The drafter is the same model definition: its draft and prefill steps pass torch.export at
    the engine's shapes and compute what eager does (what compiling it will take; not yet compiled)."""
    from dataclasses import replace

    from builders.export import export_step, step_inputs
    from magicdec_rt.checkpoint import load_model_dir
    from magicdec_rt.engine import step_module

    m = read_manifest(dm_engine)
    model = load_model_dir(dm_engine / "draft", torch.float32)
    dm = replace(m, model=m.draft_model)
    for name in ("draft", f"prefill@{m.context_buckets[0]}"):
        ep = export_step(model, dm, name)
        args = list(step_inputs(model, dm, name))
        torch.manual_seed(2)
        args[0] = torch.randint(0, 16, args[0].shape)
        args[2], args[3] = [torch.randn_like(c) for c in args[2]], [torch.randn_like(c) for c in args[3]]
        with torch.no_grad():
            want, got = step_module(model, name)(*args), ep.module()(*args)
        assert len(args[2]) == 1 and want[1].shape[0] == 1  # one layer: the drafter's, not the target's
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_an_aoti_engine_compiles_the_draft_model(tmp_path, tiny_aoti_engine, tiny_hf, drafter_dir, tiny_runtime):
    """The draft model's prefill and draft steps are compiled like the target's (its own graphs in
    draft/graphs), and the compiled engine's greedy speculation equals eager plain decoding. Built
    over a copy of the tiny aoti engine, so only the steps whose shapes change are compiled again."""
    out = shutil.copytree(tiny_aoti_engine, tmp_path / "engine")
    build_engine(out, tiny_hf, backend="aoti", draft_model=drafter_dir, **TINY_AOTI)
    m = read_manifest(out)
    assert sorted(m.draft_graphs) == sorted(m.draft_step_names()) == ["draft", "prefill@128", "prefill@32"]
    assert all((out / "draft" / e["file"]).is_file() for e in m.draft_graphs.values())
    rt = Runtime.load(out)
    assert rt.core.draft_steps.backend == "aoti" and sorted(rt.core.draft_steps._graphs) == sorted(m.draft_graphs)
    want = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=24, gamma=0)]
    assert [r.token_ids for r in rt.generate(MIXED, max_new_tokens=24, gamma=2)] == want
    assert 0.0 < rt.last_stats["acceptance_rate"] < 1.0
    # Rebuilt without it: the draft model and its graphs go.
    build_engine(out, tiny_hf, backend="aoti", **TINY_AOTI)
    assert not (out / "draft").exists() and read_manifest(out).draft_model is None


def test_cut_draft_cli_errors_are_one_line(tmp_path, tiny_hf, capsys):
    from builders.draft_model import main as cut_main

    for argv, message in ((["--layers", "0"], "layers=0 is out of range: must be in [1, 1]"),
                          (["--layers", "1", "--model", str(tmp_path / "none")], "does not exist")):
        capsys.readouterr()
        model = [] if "--model" in argv else ["--model", str(tiny_hf)]
        assert cut_main([*model, *argv, "--out", str(tmp_path / "cut")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("magicdec-cut-draft: error:") and message in last, last
    assert cut_main(["--model", str(tiny_hf), "--layers", "1", "--out", str(tmp_path / "cut")]) == 0
    assert (tmp_path / "cut" / "model.safetensors").is_file()
