"""The model's steps: agreement with transformers, static-shape export, and the draft's attention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders.export import export_step, step_inputs
from magicdec_rt.checkpoint import load_model_dir
from magicdec_rt.engine import read_manifest, step_module
from magicdec_rt.kv_cache import KVCache, StreamingCache
from magicdec_rt.model import DecodeStep, PrefillStep

from .conftest import tiny_hf_model_dir


@pytest.mark.parametrize(
    "rope",
    [
        {},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}},
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ],
    ids=["default", "llama3", "linear"],
)
def test_chunked_steps_match_transformers(tmp_path, rope):
    """Prefill in two chunks, then decode blocks of 1 and 3 tokens over the cache: every logit
    equals transformers' one-shot forward over the whole sequence (float32)."""
    src = tiny_hf_model_dir(tmp_path, seed=1, **rope)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = load_model_dir(src, torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = KVCache(model, 2, 64, torch.float32)
    got, pos = [], 0
    with torch.no_grad():
        for T in (20, 16, 1, 3):
            toks = ids[:, pos : pos + T]
            positions = (pos + torch.arange(T)).expand(2, T)
            logits, k, v = DecodeStep(model)(toks, positions, cache.k, cache.v, torch.full((2,), pos))
            for b in range(2):
                cache.write(b, pos, k[:, b], v[:, b])
            got.append(logits)
            pos += T
    torch.testing.assert_close(torch.cat(got, 1), ref, rtol=1e-4, atol=1e-4)


def test_block_over_an_empty_cache_ignores_stale_slots(tmp_path):
    """A verify-sized block (T=3) whose rows have no valid cache slot, over a cache full of stale
    K/V, equals transformers on the block alone (the fused CPU kernel reports such rows oddly)."""
    src = tiny_hf_model_dir(tmp_path, seed=2)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = load_model_dir(src, torch.float32)
    ids = torch.randint(0, 16, (2, 3))
    cache = KVCache(model, 2, 16, torch.float32)
    for t in cache.k + cache.v:
        t.normal_()
    with torch.no_grad():
        logits, _, _ = DecodeStep(model)(ids, torch.arange(3).expand(2, 3), cache.k, cache.v, torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_prefill_step_returns_logits_at_last(tiny_engine):
    model = load_model_dir(tiny_engine, torch.float32)
    toks = torch.randint(0, 16, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    c = KVCache(model, 2, 16, torch.float32)
    zero = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        full, _, _ = DecodeStep(model)(toks, pos, c.k, c.v, zero)
        last, _, _ = PrefillStep(model)(toks, pos, c.k, c.v, zero, torch.tensor([7, 3]))
    torch.testing.assert_close(last, torch.stack([full[0, 7], full[1, 3]]))


def test_steps_compute_only_on_their_device(tiny_engine):
    """Every step exported on a non-CPU device (meta, standing in for CUDA) creates no tensor on
    the CPU: a CUDA graph cannot capture the copy of a CPU tensor, and AOTInductor turns one into
    a host constant (the H200 run of bench/gpu.sh failed on both before the masks' scalars moved)."""
    manifest = read_manifest(tiny_engine)
    model = load_model_dir(tiny_engine, torch.float32).to("meta")
    for name in manifest.step_names():
        ep = export_step(model, manifest, name, device="meta")
        off = [n.name for n in ep.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].device.type != "meta"]
        assert off == [], (name, off)


def test_every_step_exports_at_static_shapes(tiny_engine):
    """Each step of the engine passes torch.export; the exported graph computes what eager does."""
    manifest = read_manifest(tiny_engine)
    model = load_model_dir(tiny_engine, torch.float32)
    names = manifest.step_names()
    small, top = manifest.context_buckets[0], manifest.max_seq_len
    assert {"draft", f"prefill@{small}", f"prefill@{top}", f"verify3@{top}", f"verify0@{small}"} <= set(names)
    # One of each kind, at both ends of the bucket range (exporting all of them takes minutes).
    for name in ("draft", f"prefill@{small}", f"verify0@{top}", f"verify{manifest.max_gamma}@{small}"):
        ep = export_step(model, manifest, name)
        args = list(step_inputs(model, manifest, name))
        B, T, S = manifest.step_shape(name)
        assert args[0].shape == (B, T) and all(c.shape == (B, model.kv_heads, S, model.cfg.head_dim) for c in args[2])
        torch.manual_seed(1)
        args[0] = torch.randint(0, 16, args[0].shape)
        args[2], args[3] = [torch.randn_like(c) for c in args[2]], [torch.randn_like(c) for c in args[3]]
        args[4] = torch.randint(0, S, args[4].shape)
        eager = step_module(model, name)
        with torch.no_grad():
            want = eager(*args)
            got = ep.module()(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, msg=name)
        # Static: every input of the graph has a fixed shape.
        for spec in ep.graph_signature.input_specs:
            node = next(n for n in ep.graph.nodes if n.name == spec.arg.name)
            assert all(isinstance(d, int) for d in node.meta["val"].shape), name


def test_draft_attends_exactly_to_sinks_and_window(tiny_engine):
    """A whole draft round over the streaming cache equals transformers' forward over the whole
    sequence with an explicit mask: committed tokens see everything before them; the draft tokens
    at positions L.. see the sinks, the (budget - sinks) most recent committed tokens, and the
    draft tokens before them."""
    manifest = read_manifest(tiny_engine)
    model = load_model_dir(tiny_engine, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tiny_engine, dtype=torch.float32, attn_implementation="sdpa").eval()
    sinks, budget, gamma = manifest.draft_sinks, manifest.draft_budget, 3
    torch.manual_seed(2)
    for L in (5, 8, 30):  # shorter than, equal to, and far beyond the draft budget
        seq = torch.randint(0, 16, (1, L + gamma))
        full = KVCache(model, 1, 64, torch.float32)
        draft = StreamingCache(model, 1, sinks, budget, gamma, torch.float32)
        with torch.no_grad():
            _, k, v = DecodeStep(model)(seq[:, :L], torch.arange(L)[None], full.k, full.v, torch.zeros(1, dtype=torch.long))
        full.write(0, 0, k[:, 0], v[:, 0])
        draft.absorb(full, [(0, 0, L)])
        got = []
        base = draft.valid(L)
        for i in range(gamma):
            with torch.no_grad():
                logits, k, v = DecodeStep(model)(
                    seq[:, L + i : L + i + 1], torch.tensor([[L + i]]), draft.k, draft.v, torch.tensor([base + i])
                )
            draft.write(0, base + i, k[:, 0], v[:, 0])
            got.append(logits[0, 0])
        n = L + gamma
        mask = torch.ones(n, n).tril().bool()
        for q in range(L, n):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[:sinks] = True
            keep[max(sinks, L - (budget - sinks)) : q + 1] = True
            mask[q] &= keep
        with torch.no_grad():
            ref = hf(seq, attention_mask=mask[None, None]).logits[0, L:]
        torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4, msg=f"L={L}")
        if L > budget:  # the restriction matters: full attention gives other logits
            with torch.no_grad():
                dense = hf(seq).logits[0, L:]
            assert (dense - ref).abs().max() > 1e-3


def test_streaming_cache_ring_keeps_sinks_and_recent(tiny_engine):
    """After committing positions one round at a time, the ring holds exactly the sinks and the
    most recent (budget - sinks) positions."""
    model = load_model_dir(tiny_engine, torch.float32)
    full = KVCache(model, 1, 64, torch.float32)
    # Tag each position's key with its own index so slots can be read back as positions.
    full.k[:] = torch.arange(64, dtype=torch.float32)[None, None, None, :, None]
    draft = StreamingCache(model, 1, 2, 8, 3, torch.float32)
    pos = 0
    for n in (5, 1, 4, 2, 4, 9, 3):
        draft.absorb(full, [(0, pos, pos + n)])
        pos += n
        held = sorted(draft.k[0, 0, 0, : draft.valid(pos), 0].long().tolist())
        want = sorted(set(range(min(2, pos))) | set(range(max(2, pos - 6), pos)))
        assert held == want, (pos, held)


def test_cache_resize_keeps_every_row_and_stays_dense(tiny_engine):
    """Re-laying the full cache out for another bucket keeps the first slots of every (layer, row,
    head), zeroes new slots, and leaves every layer and row view contiguous (as engines need)."""
    model = load_model_dir(tiny_engine, torch.float32)
    cache = KVCache(model, 3, 64, torch.float32)
    cache.resize(8)
    torch.manual_seed(0)
    ref_k, ref_v = torch.randn_like(cache.k), torch.randn_like(cache.v)
    cache.k.copy_(ref_k)
    cache.v.copy_(ref_v)
    for slots, keep in ((32, 8), (64, 8), (5, 5), (16, 5), (16, 5)):
        cache.resize(slots)
        assert cache.k.shape[3] == slots and cache.k.is_contiguous()
        torch.testing.assert_close(cache.k[..., :keep, :], ref_k[..., :keep, :], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[..., :keep, :], ref_v[..., :keep, :], rtol=0, atol=0)
        assert (cache.k[..., keep:, :] == 0).all() and (cache.v[..., keep:, :] == 0).all()
        ks, vs = cache.view(slice(1, 2))
        assert all(t.is_contiguous() and t.shape == (1, model.kv_heads, slots, model.cfg.head_dim) for t in ks + vs)
    with pytest.raises(ValueError, match=r"slots 65 out of range \[1, 64\]"):
        cache.resize(65)


def test_write_column_writes_one_token_per_row(tiny_engine):
    model = load_model_dir(tiny_engine, torch.float32)
    cache = KVCache(model, 4, 16, torch.float32)
    k = torch.randn(model.cfg.num_layers, 4, model.kv_heads, 1, model.cfg.head_dim)
    slots = torch.tensor([0, 5, 15, 5])
    cache.write_column(slots, k, -k)
    for b in range(4):
        torch.testing.assert_close(cache.k[:, b, :, slots[b]], k[:, b, :, 0])
        torch.testing.assert_close(cache.v[:, b, :, slots[b]], -k[:, b, :, 0])
    assert int((cache.k != 0).any(-1).sum()) == 4 * model.cfg.num_layers * model.kv_heads
