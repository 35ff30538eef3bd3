"""Draft cache policies: StreamingLLM and SnapKV keep what they promise, and speculation over
either stays exact."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from magicdec_rt import EngineError, Runtime
from magicdec_rt.kv_cache import DraftPolicy, snap_select

from .test_runtime import MIXED

# The tiny engine: 2 sinks, budget 8. SnapKV keeps 4 selected positions per head and a ring of 2.
SNAP = DraftPolicy("snapkv", window=5, recent=2, pool=3)
RESELECT = DraftPolicy("snapkv", window=5, recent=2, pool=3, reselect=7)  # and again every 7 tokens


@pytest.fixture(scope="module")
def snap_runtime(tiny_engine):
    return Runtime.load(tiny_engine, draft_policy=SNAP)


@pytest.fixture(scope="module")
def hf_tiny_eager(tiny_engine):
    return AutoModelForCausalLM.from_pretrained(tiny_engine, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def test_snapkv_selection_equals_the_reference_from_transformers_attention(snap_runtime, hf_tiny_eager):
    """The positions each layer and KV head keeps are SnapKV's choice computed from transformers'
    own attention weights: the last `window` queries' weights summed over them and over the head's
    query group, max-pooled, top-k outside the sinks and the recent ring."""
    prompt = MIXED[4]  # 61 tokens
    snap_runtime.generate([prompt], max_new_tokens=1, gamma=3)
    with torch.no_grad():
        att = hf_tiny_eager(torch.tensor([prompt]), output_attentions=True).attentions  # [1, heads, P, P] per layer
    cfg = hf_tiny_eager.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    scores = torch.stack([a[0, :, -SNAP.window:].sum(1).view(cfg.num_key_value_heads, G, -1).sum(1) for a in att])
    keep = 8 - 2 - SNAP.recent
    want = snap_select(scores, 2, keep, SNAP.recent, SNAP.pool)
    held = snap_runtime.draft.positions[:, 0]
    assert torch.equal(held[:, :, 2 : 2 + keep], want)
    assert (held[:, :, :2] == torch.arange(2)).all()
    # Heads do keep different tokens (the test would pass trivially if they all agreed).
    assert len({tuple(h.tolist()) for h in want.reshape(-1, keep)}) > 1


@pytest.mark.parametrize("policy, drafter",
                         [(DraftPolicy("streaming"), False), (SNAP, False), (RESELECT, False),
                          (DraftPolicy("snapkv", window=5, pool=3), False), (DraftPolicy("streaming"), True),
                          (RESELECT, True)],
                         ids=["streaming", "snapkv", "snapkv-reselect", "snapkv-default-ring",
                              "draft-model-streaming", "draft-model-snapkv-reselect"])
def test_the_draft_cache_holds_only_what_the_policy_keeps(tiny_engine, dm_engine, policy, drafter):
    """After a long generation, each slot holds the K/V of the position the policy says, and nothing
    the policy dropped: sinks, (SnapKV's selection, made from the prompt or, re-selecting, from
    everything committed at the last selection,) and the newest committed positions; with a
    standalone draft model, its own K/V of them."""
    rt = Runtime.load(dm_engine if drafter else tiny_engine, draft_policy=policy)
    prompt = MIXED[3]  # 40 tokens
    rt.generate([prompt], max_new_tokens=50, gamma=3)
    length = rt.core.lengths[0]
    held = rt.draft.positions[:, 0]  # [layers, heads, budget]
    ring = 8 - rt.draft.ring_start[0]
    assert sorted(held[0, 0, 8 - ring :].tolist()) == list(range(length - ring, length))
    assert (held[:, :, :2] == torch.arange(2)).all()
    if policy.kind == "snapkv":
        at = rt.draft.selected_at[0]
        recent = policy.recent or 8 // 2  # by default the ring is half the budget
        assert rt.draft.ring_start[0] == 8 - recent and (held[:, :, 2 : 8 - recent] < at - recent).all()
        if policy.reselect:
            assert length - 7 < at <= length and (held[:, :, 2:6] >= len(prompt)).any()  # generated tokens chosen
        else:
            assert at == len(prompt)
    # The K/V in each slot are the drafter's full cache's at the recorded position.
    full = rt.core.draft_full
    assert (full is rt.full) != drafter and rt.draft.layers == (1 if drafter else 2)
    for layer in range(rt.draft.layers):
        for h in range(held.shape[1]):
            pos = held[layer, h]
            torch.testing.assert_close(rt.draft.k[layer, 0, h, :8], full.k[layer, 0, h, pos], rtol=0, atol=0)
            torch.testing.assert_close(rt.draft.v[layer, 0, h, :8], full.v[layer, 0, h, pos], rtol=0, atol=0)


def test_greedy_speculation_with_snapkv_equals_autoregressive(snap_runtime, tiny_runtime, tiny_engine):
    ar = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=40, gamma=0)]
    for rt in (snap_runtime, Runtime.load(tiny_engine, draft_policy=RESELECT)):
        for gamma in (1, 3, 4):
            got = [r.token_ids for r in rt.generate(MIXED, max_new_tokens=40, gamma=gamma)]
            assert got == ar, gamma
            assert 0 < rt.last_stats["acceptance_rate"] < 1


def test_seeded_sampling_with_snapkv_equals_autoregressive(snap_runtime, tiny_runtime):
    kw = dict(max_new_tokens=30, temperature=1.0, seed=3)
    ar = [r.token_ids for r in tiny_runtime.generate(MIXED, gamma=0, **kw)]
    assert [r.token_ids for r in snap_runtime.generate(MIXED, gamma=3, **kw)] == ar


@pytest.mark.parametrize("policy, message", [
    (DraftPolicy("h2o"), "draft policy 'h2o' is not one of streaming, snapkv"),
    (DraftPolicy("snapkv", recent=6), r"snapkv needs .* \(2 \+ 6 vs 8\)"),
    (DraftPolicy("snapkv", pool=4), "an odd pool"),
    (DraftPolicy("snapkv", recent=2, reselect=-1), "reselect >= 0"),
])
def test_bad_policies_are_refused(tiny_engine, policy, message):
    with pytest.raises(EngineError, match=message):
        Runtime.load(tiny_engine, draft_policy=policy)


def test_the_observation_step_exports_at_static_shapes(snap_runtime):
    """Like every step, SnapKV's observation is a pure static-shape function that torch.export
    captures (with the attention kernel in it); the exported graph computes what eager does."""
    from magicdec_rt.model import ObserveStep

    model = snap_runtime.steps.model
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    caches = [[torch.randn(1, cfg.num_kv_heads, 32, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)]
              for _ in range(2)]
    inputs = (torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(20, 25)[None], *caches, torch.tensor([20]))
    with torch.no_grad():
        ep = torch.export.export(ObserveStep(model), inputs)
        want = ObserveStep(model)(*inputs)
        torch.testing.assert_close(ep.module()(*inputs), want)
    assert any("magicdec.attention" in str(n.target) for n in ep.graph.nodes)
    assert want.shape == (cfg.num_layers, 1, cfg.num_kv_heads, 32 + 5)
    # Each query's weights sum to one: the window's 5 tokens x the group's query heads per KV head.
    G = cfg.num_heads // cfg.num_kv_heads
    torch.testing.assert_close(want.sum(-1), torch.full_like(want.sum(-1), 5.0 * G))
    assert (want[..., 20:32] == 0).all()  # slots past the length are never attended


def test_snapkv_with_pooling_7_is_the_default_everywhere(tiny_engine):
    """The measured default (README, "The draft cache and its positions") is the same for the
    Python API, a loaded runtime and the CLI."""
    import argparse

    from magicdec_rt.cli import add_draft_policy_args, draft_policy

    assert (DraftPolicy().kind, DraftPolicy().pool) == ("snapkv", 7)
    assert Runtime.load(tiny_engine).core.draft.policy == DraftPolicy()
    p = argparse.ArgumentParser()
    add_draft_policy_args(p)
    assert draft_policy(p.parse_args([])) == DraftPolicy()


@pytest.fixture(scope="module")
def cache_positions_engine(tmp_path_factory, tiny_hf):
    from builders.build import build_engine

    from .conftest import TINY

    return build_engine(tmp_path_factory.mktemp("cachepos") / "engine", tiny_hf, draft_positions="cache", **TINY)


@pytest.mark.parametrize("policy", [DraftPolicy("streaming"), SNAP], ids=["streaming", "snapkv"])
def test_cache_positions_rotate_the_kept_keys_as_transformers_rope_would(cache_positions_engine, hf_tiny_eager,
                                                                        policy):
    """StreamingLLM positions (``--draft-positions cache``): after a round at length L, each slot
    before the ring holds the key of its position p moved to position L - budget + slot (transformers'
    own RoPE undoing p and applying that position to its own key), values untouched; the ring keeps
    original keys."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rt = Runtime.load(cache_positions_engine, draft_policy=policy)
    assert rt.manifest.draft_positions == "cache"
    prompt = MIXED[4]  # 61 tokens, budget 8
    rt.generate([prompt], max_new_tokens=2, gamma=1)  # one round, at L = len(prompt)
    L, budget, n = len(prompt), rt.manifest.draft_budget, rt.draft.ring_start[0]
    with torch.no_grad():
        past = hf_tiny_eager(torch.tensor([prompt]), use_cache=True).past_key_values
    rope = hf_tiny_eager.model.rotary_emb
    pos = rt.draft.positions[:, 0, :, :n]  # [layers, heads, n]
    for layer in range(rt.draft.layers):
        keys = past.layers[layer].keys[0] if hasattr(past, "layers") else past[layer][0][0]  # [kv, P, d]
        kept = torch.stack([keys[h, pos[layer, h]] for h in range(keys.shape[0])])  # [kv, n, d]
        x = kept[None]  # rope reads only its dtype and device
        want = []
        for h in range(keys.shape[0]):
            cp, sp = rope(x, pos[layer, h][None])
            pre, _ = apply_rotary_pos_emb(kept[h][None, None], kept[h][None, None], cp, -sp)  # rotate back by p
            ca, sa = rope(x, (L - budget + torch.arange(n))[None])
            k, _ = apply_rotary_pos_emb(pre, pre, ca, sa)
            want.append(k[0, 0])
        torch.testing.assert_close(rt.draft.k[layer, 0, :, :n], torch.stack(want), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(rt.draft.k[layer, 0, :, :n], kept, atol=1e-3)  # they did move
        vals = past.layers[layer].values[0] if hasattr(past, "layers") else past[layer][1][0]
        torch.testing.assert_close(rt.draft.v[layer, 0, :, :n],
                                   torch.stack([vals[h, pos[layer, h]] for h in range(keys.shape[0])]),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", [DraftPolicy("streaming"), SNAP], ids=["streaming", "snapkv"])
def test_greedy_speculation_with_cache_positions_equals_autoregressive(cache_positions_engine, tiny_runtime, policy):
    rt = Runtime.load(cache_positions_engine, draft_policy=policy)
    want = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=30, gamma=0)]
    for gamma in (1, 3):
        assert [r.token_ids for r in rt.generate(MIXED, max_new_tokens=30, gamma=gamma)] == want


def test_draft_positions_are_a_build_option(tmp_path, tiny_hf, cache_positions_engine):
    from builders.build import build_engine

    from .conftest import TINY

    with pytest.raises(EngineError, match="draft_positions 'shifted' is not supported; choose one of original, cache"):
        build_engine(tmp_path / "e", tiny_hf, draft_positions="shifted", **TINY)
    doc = json.loads((cache_positions_engine / "manifest.json").read_text())
    assert doc["draft"]["positions"] == "cache"
