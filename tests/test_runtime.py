"""The loop on a tiny model: ragged acceptance, mixed lengths, finishing rules, streaming, stats."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from magicdec_rt import RequestError, Runtime

# Lengths below, at, and far beyond the draft budget (8 slots: 2 sinks + 6 recent).
MIXED = [
    [int(t) for t in torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))]
    for n in (3, 8, 13, 40, 61)
]


@pytest.fixture(scope="module")
def hf_tiny(tiny_engine):
    return AutoModelForCausalLM.from_pretrained(tiny_engine, dtype=torch.float32).eval()


def test_greedy_speculation_equals_autoregressive_and_transformers_for_every_gamma(tiny_runtime, hf_tiny):
    """60 new tokens per row, so rows wrap the draft ring many times; every gamma gives the target's
    greedy sequence, while rows accept different numbers of drafts."""
    ar = [r.token_ids for r in tiny_runtime.generate(MIXED, max_new_tokens=60, gamma=0)]
    for p, got in zip(MIXED, ar):
        with torch.no_grad():
            ref = hf_tiny.generate(torch.tensor([p]), max_new_tokens=60, do_sample=False,
                                   attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert got == ref[0, len(p):].tolist()
    for gamma in (1, 2, 3, 4):
        out = tiny_runtime.generate(MIXED, max_new_tokens=60, gamma=gamma)
        assert [r.token_ids for r in out] == ar, gamma
        rates = {r.stats["acceptance_rate"] for r in out}
        assert len(rates) > 1, "acceptance should be ragged across rows"
        assert 0 < tiny_runtime.last_stats["acceptance_rate"] < 1


def test_stats_are_consistent(tiny_runtime):
    out = tiny_runtime.generate(MIXED, max_new_tokens=30, gamma=3)
    s = tiny_runtime.last_stats
    assert s["new_tokens"] == sum(len(r.token_ids) for r in out) == 5 * 30
    assert s["draft_tokens"] == 3 * s["verify_rounds"]
    assert s["mean_accepted_length"] == pytest.approx(1 + s["accepted_tokens"] / s["verify_rounds"])
    assert s["acceptance_rate"] == pytest.approx(s["accepted_tokens"] / s["draft_tokens"])
    ppa = s["per_position_acceptance"]
    assert len(ppa) == 3 and ppa == sorted(ppa, reverse=True)
    assert sum(ppa) == pytest.approx(s["accepted_tokens"] / s["verify_rounds"])
    # Every decoded token is an accepted draft or the one extra token of a verify; a row's last
    # round may verify up to gamma tokens beyond max_new_tokens, which are counted but cut.
    decoded = s["new_tokens"] - 5
    assert decoded <= s["accepted_tokens"] + s["verify_rounds"] <= decoded + 5 * 3
    assert s["draft_s"] > 0 and s["verify_s"] > 0 and s["decode_s"] >= s["draft_s"] + s["verify_s"]
    for r in out:
        assert r.stats["draft_tokens"] == 3 * r.stats["verify_rounds"]


def test_stream_yields_what_generate_returns(tiny_runtime):
    final = tiny_runtime.generate(MIXED, max_new_tokens=25, temperature=0.9, seed=3)
    tokens = {i: [] for i in range(len(MIXED))}
    text = {i: "" for i in range(len(MIXED))}
    results, events = {}, 0
    for ev in tiny_runtime.stream(MIXED, max_new_tokens=25, temperature=0.9, seed=3):
        assert ev.index not in results, "no events after a prompt's result"
        tokens[ev.index] += ev.token_ids
        text[ev.index] += ev.text
        events += 1
        if ev.result is not None:
            results[ev.index] = ev.result
    assert events > 2 * len(MIXED)  # tokens arrive round by round, not all at the end
    for r in final:
        assert tokens[r.index] == r.token_ids == results[r.index].token_ids
        assert text[r.index] == r.text


def test_stop_string_ends_a_row_and_is_never_emitted(tiny_runtime):
    base = tiny_runtime.generate(MIXED, max_new_tokens=20)
    row = base[3]
    words = row.text.split()
    stop = f"{words[5]} {words[6]}"
    start = row.text.index(stop)
    streamed = ""
    for ev in tiny_runtime.stream([MIXED[3]], max_new_tokens=20, stop=[stop, "zzz"]):
        streamed += ev.text
        if ev.result:
            res = ev.result
    assert res.finish_reason == "stop"
    assert res.text == row.text[:start]
    assert streamed == res.text
    assert res.token_ids == row.token_ids[: len(res.token_ids)] and len(res.token_ids) < 20
    # Other rows of the batch are unaffected by one row stopping.
    both = tiny_runtime.generate([MIXED[3], MIXED[1]], max_new_tokens=20, stop=stop)
    assert both[1].token_ids == base[1].token_ids or both[1].finish_reason == "stop"


def test_eos_finishes_a_row_without_stopping_the_batch(tiny_engine, tmp_path):
    base = Runtime.load(tiny_engine).generate(MIXED, max_new_tokens=20)
    eos = base[2].token_ids[4]
    engine = tmp_path / "e"
    shutil.copytree(tiny_engine, engine)
    doc = json.loads((engine / "manifest.json").read_text())
    doc["eos_token_ids"] = [eos]
    (engine / "manifest.json").write_text(json.dumps(doc))
    out = Runtime.load(engine).generate(MIXED, max_new_tokens=20, gamma=3)
    for b, r in zip(base, out):
        if eos in b.token_ids:
            cut = b.token_ids.index(eos) + 1
            assert r.token_ids == b.token_ids[:cut] and r.finish_reason == "eos"
        else:
            assert r.token_ids == b.token_ids and r.finish_reason == "length"
    assert out[2].finish_reason == "eos" and len(out[2].token_ids) <= 5


def test_string_prompts_and_chat_without_template(tiny_runtime):
    a = tiny_runtime.generate(["w1 w2 w3 w4"], max_new_tokens=5)[0]
    b = tiny_runtime.generate([[1, 2, 3, 4]], max_new_tokens=5)[0]
    assert a.token_ids == b.token_ids and a.prompt_tokens == 4
    with pytest.raises(RequestError, match="prompt 0: chat messages could not be rendered"):
        tiny_runtime.generate([[{"role": "user", "content": "w1"}]], max_new_tokens=5)


def test_an_abandoned_stream_cannot_resume_over_a_later_request(tiny_runtime):
    first = tiny_runtime.stream(MIXED, max_new_tokens=20)
    next(first)
    later = tiny_runtime.generate(MIXED[:2], max_new_tokens=5)
    assert len(later) == 2
    with pytest.raises(RuntimeError, match="abandoned for a later request on the same Runtime"):
        next(first)
    # The runtime itself is unharmed.
    assert tiny_runtime.generate(MIXED[:2], max_new_tokens=5)[0].token_ids == later[0].token_ids


def test_finished_slots_are_refilled_with_waiting_prompts(tiny_runtime):
    """20 prompts of mixed lengths through 8 slots: a waiting prompt enters as soon as any row
    finishes (not when the whole batch has), and every result equals the prompt run alone, greedy
    and with seeded sampling."""
    prompts = [MIXED[i % 5][: 3 + (7 * i) % 50] for i in range(20)]
    for kw in (dict(gamma=3), dict(gamma=2, temperature=0.9, seed=11)):
        first_seen, finished, results = {}, {}, {}
        for n, ev in enumerate(tiny_runtime.stream(prompts, max_new_tokens=25, **kw)):
            first_seen.setdefault(ev.index, n)
            if ev.result is not None:
                finished[ev.index], results[ev.index] = n, ev.result
        assert any(first_seen[i] < finished[j] for i in range(8, 20) for j in range(8))
        for i, p in enumerate(prompts):
            alone = dict(kw, seed=kw["seed"] + i) if "seed" in kw else kw
            assert results[i].token_ids == tiny_runtime.generate([p], max_new_tokens=25, **alone)[0].token_ids, i


def test_steady_state_throughput_leaves_out_the_tail(tiny_runtime):
    """Rounds count as steady while every request's row is live: all of them when rows finish
    together (plain decoding, no EOS here), only those before the first row finishes otherwise."""
    prompts = [f"w{i} w{(3 * i) % 16} w5" for i in range(8)]
    tiny_runtime.generate(prompts, max_new_tokens=20, gamma=0)
    s = tiny_runtime.last_stats
    assert s["steady_tokens"] == s["new_tokens"] - len(prompts) and s["steady_s"] == s["decode_s"]
    tiny_runtime.generate(prompts, max_new_tokens=20, gamma=4)
    s = tiny_runtime.last_stats
    # A steady round commits at least one token per row; the tail (rows done, others not) is left out.
    assert len(prompts) <= s["steady_tokens"] < s["new_tokens"] - len(prompts) and s["steady_s"] < s["decode_s"]
