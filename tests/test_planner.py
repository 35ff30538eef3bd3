"""The gamma planner: its cost model, its online acceptance estimates, calibration stored with the
engine, and the runtime choosing gamma per round without changing what it generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from magicdec_rt import RequestError, Runtime
from magicdec_rt.cli import calibrate_main
from magicdec_rt.errors import EngineError
from magicdec_rt.kv_cache import DraftPolicy
from magicdec_rt.planner import Acceptance, Calibration, Planner, omega

from .conftest import copy_engine

GAMMAS = [0, 1, 2, 3, 4]


def calibration(draft_ms: float, verify_ms=lambda g, s: s / 10, rest_ms: float = 0.0, buckets=(16, 32)) -> Calibration:
    return Calibration(
        draft_ms={"greedy": draft_ms, "sampled": draft_ms},
        verify_ms={g: {s: verify_ms(g, s) for s in buckets} for g in GAMMAS},
        rest_ms={m: {g: rest_ms for g in GAMMAS} for m in ("greedy", "sampled")},
    )


def test_omega_is_expected_tokens_per_verify():
    assert omega([]) == 1
    assert omega([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert omega([1.0, 0.0, 1.0]) == 2


def test_planner_picks_the_gamma_with_the_best_predicted_speedup():
    # Verify costs 2 ms whatever gamma, a draft 0.5 ms, rest 0.1 ms: speedup(g) = omega * 2.1 / (0.5 g + 2.1).
    p = Planner(calibration(0.5, lambda g, s: 2.0, 0.1), GAMMAS, [16, 32])
    alphas = [0.9, 0.8, 0.7, 0.6]
    want = {g: omega(alphas[:g]) * 2.1 / (0.5 * g + 2.1) for g in GAMMAS}
    assert {g: p.speedup(g, 16, True, alphas) for g in GAMMAS} == pytest.approx(want)
    p.acceptance["greedy"].accepted = [1e9 * a for a in alphas]  # the prior no longer matters
    p.acceptance["greedy"].reached = [1e9] * 4
    assert p.choose(16, greedy=True) == max(want, key=want.get) == 3


def test_each_gamma_is_costed_at_the_bucket_its_round_would_run_at():
    """Rows at 13 slots: gamma <= 2 rounds fit the 16-slot bucket, longer ones need 32, where a
    verify costs twice as much. Costing every gamma at 32 (the old way) would pick gamma 4."""
    p = Planner(calibration(0.5), GAMMAS, [16, 32])  # verify: slots / 10 ms, any gamma
    at = {g: 16 if 13 + g + 1 <= 16 else 32 for g in GAMMAS}
    alphas = p.acceptance["greedy"].alphas()
    want = {g: omega(alphas[:g]) * 1.6 / (0.5 * g + at[g] / 10) for g in GAMMAS}
    assert {g: p.speedup(g, at, True) for g in GAMMAS} == pytest.approx(want)
    assert p.choose(at, True) == max(want, key=want.get) == 2
    assert p.choose(32, True) == 4


def test_planner_turns_speculation_off_where_it_loses_and_probes_back():
    p = Planner(calibration(0.5, lambda g, s: 2.0 + g), GAMMAS, [16, 32], probe_every=4)
    assert p.choose(16, True) > 0  # the prior (0.8) makes speculation worth it
    for _ in range(20):  # every draft rejected
        p.observe(1, [0] * 8, greedy=True, bucket=16, round_ms=p.calibrated_ms(1, 16, True))
    assert p.acceptance["greedy"].alphas()[0] < 0.05
    chosen = [p.choose(16, True) for _ in range(100)]
    # Plain decoding, with a 1-draft probe every 4th round, then 8th, 16th, 32nd: each probe that
    # changes nothing doubles the wait, up to 8x.
    assert [i for i, g in enumerate(chosen) if g] == [3, 11, 27, 59, 91] and set(chosen) == {0, 1}
    assert p.choose(16, False) > 0  # sampled mode learns apart from greedy
    for _ in range(40):  # drafts accepted again: the probe's round makes speculation win on merit
        p.observe(1, [1] * 8, greedy=True, bucket=16, round_ms=p.calibrated_ms(1, 16, True))
    assert p.choose(16, True) > 0 and p._probe_gap == 4  # the wait starts over


def test_planner_scales_costs_by_measured_round_times():
    # Calibrated: verify 2 ms flat, draft 0.1 ms, so gamma 4 looks best at acceptance 0.8.
    p = Planner(calibration(0.1, lambda g, s: 2.0), GAMMAS, [16, 32], cost_weight=0.5)
    assert p.choose(16, True) == 4
    for _ in range(30):  # but every gamma > 0 round takes 4x what the calibration said
        for g in GAMMAS[1:]:
            p.observe(g, [], greedy=True, bucket=16, round_ms=4 * p.calibrated_ms(g, 16, True))
    assert p.cost_scale[4] == pytest.approx(4.0) and 0 not in p.cost_scale
    # Plain decoding, never run, is assumed to drift like the others: the ratio stays 4 / 4.
    assert p.speedup(4, 16, True) == pytest.approx(omega(p.acceptance["greedy"].alphas()) * 2.0 / 2.4)
    for _ in range(30):  # plain decoding runs as calibrated: only speculation is dearer than it looked
        p.observe(0, [], greedy=True, bucket=16, round_ms=p.calibrated_ms(0, 16, True))
    assert p.speedup(4, 16, True) == pytest.approx(omega(p.acceptance["greedy"].alphas()) * 2.0 / (4 * 2.4))
    assert p.choose(16, True) == 0


def test_planner_never_probes_where_even_perfect_acceptance_loses():
    # A draft step costs as much as a decode step: omega <= g + 1 cannot pay for g + 1 steps.
    p = Planner(calibration(10.0, lambda g, s: 10.0), GAMMAS, [16, 32], probe_every=2)
    assert [p.choose(16, True) for _ in range(10)] == [0] * 10


def test_planner_picks_the_draft_policy_that_accepts_more():
    """Policy "auto": the planner drafts with the policy whose best gamma predicts most. Both start
    at the prior; the running one that learns less is left for the other, which is kept while it
    does better than what the first learned."""
    p = Planner(calibration(0.1, lambda g, s: 2.0), GAMMAS, [16, 32], policies=("snapkv", "streaming"))
    assert p.choose(16, True) > 0 and p.policy == "snapkv"  # a tie at the prior: the first
    for _ in range(30):  # SnapKV's drafts are accepted about half the time here
        p.observe(3, [1, 2, 0, 3], greedy=True, bucket=16, round_ms=p.calibrated_ms(3, 16, True))
    p.choose(16, True)
    assert p.policy == "streaming" and p.acceptance is p.learned["streaming"]
    for _ in range(30):  # StreamingLLM's better: it stays
        p.observe(3, [3, 3, 2, 3], greedy=True, bucket=16, round_ms=p.calibrated_ms(3, 16, True))
    assert [p.choose(16, True) and p.policy for _ in range(5)] == ["streaming"] * 5
    for _ in range(60):  # until it turns worse than what SnapKV showed
        p.observe(3, [0, 0, 1, 0], greedy=True, bucket=16, round_ms=p.calibrated_ms(3, 16, True))
    p.choose(16, True)
    assert p.policy == "snapkv"


def test_auto_policy_drafts_with_either_cache_and_generates_what_plain_decoding_does(calibrated, tiny_runtime,
                                                                                     tmp_path):
    from magicdec_rt.kv_cache import DraftPolicy

    eng = copy_engine(calibrated, tmp_path)
    cal = Calibration.load(eng)  # drafts free, verifies dear: every round drafts, the policy choice is all that moves
    cal.draft_ms = {"greedy": 1e-6, "sampled": 1e-6}
    cal.verify_ms = {g: {s: 1e6 for s in b} for g, b in cal.verify_ms.items()}
    cal.save(eng)
    prompts = [[int(t) for t in torch.randint(0, 16, (40,), generator=torch.Generator().manual_seed(i))]
               for i in range(8)]
    want = [r.token_ids for r in tiny_runtime.generate(prompts, max_new_tokens=40, gamma=0)]
    rt = Runtime.load(eng, draft_policy=DraftPolicy("auto", window=5, recent=2, pool=3))
    assert sorted(rt.core.drafts) == ["snapkv", "streaming"]
    assert [r.token_ids for r in rt.generate(prompts, max_new_tokens=40, gamma="auto")] == want
    s = rt.last_stats
    assert sum(s["policy_rounds"].values()) == s["verify_steps"] and sorted(s["policy_rounds"]) == ["snapkv", "streaming"]
    p = rt.planner  # what each policy drafted and got, learned apart
    assert p.learned["snapkv"]["greedy"].reached[0] > 0 and p.learned["streaming"]["greedy"].reached[0] > 0
    # Both caches follow every row, each by its own policy (prompts of 40 > the budget of 8).
    snap, stream = rt.core.drafts["snapkv"], rt.core.drafts["streaming"]
    for b in range(8):
        length = rt.core.lengths[b]
        assert snap.selected_at[b] == 40 and stream.selected_at[b] is None
        assert sorted(stream.positions[0, b, 0, 2:].tolist()) == list(range(length - 6, length))
        assert sorted(snap.positions[0, b, 0, 6:].tolist()) == list(range(length - 2, length))


def test_acceptance_counts_positions_with_forgetting():
    a = Acceptance(3, prior=0.5, prior_weight=2.0, decay=0.5)
    a.observe(3, [0, 2, 3])  # reached: pos1 by 3 rows, pos2 by 2, pos3 by 2; accepted: 2, 2, 1
    assert a.reached == [3, 2, 2] and a.accepted == [2, 2, 1]
    a.observe(2, [2])  # the drafted positions' old counts halve; this row reached and accepted both
    assert a.reached == [2.5, 2.0, 2.0] and a.accepted == [2.0, 2.0, 1.0]
    assert a.alphas() == pytest.approx([(2 + 1) / (2.5 + 2), (2 + 1) / (2 + 2), (1 + 1) / (2 + 2)])
    for _ in range(50):  # a position not drafted keeps what was learned of it: the prior does not creep back
        a.observe(1, [1])
    assert a.reached[2] == 2.0 and a.alphas()[2] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def calibrated(tiny_engine, tmp_path_factory):
    eng = copy_engine(tiny_engine, tmp_path_factory.mktemp("calibrated"))
    assert calibrate_main(["--engine", str(eng), "--repeats", "1"]) == 0
    return eng


def test_calibration_is_stored_with_the_engine(calibrated):
    doc = json.loads((calibrated / "calibration.json").read_text())
    cal = Calibration.load(calibrated)
    rt = Runtime.load(calibrated)
    m = rt.manifest
    assert sorted(cal.verify_ms) == m.gammas and all(sorted(b) == m.context_buckets for b in cal.verify_ms.values())
    assert all(t > 0 for b in cal.verify_ms.values() for t in b.values())
    assert doc["host"]["threads"] >= 1
    assert rt.planner is not None


@pytest.mark.parametrize("key, old", [("kernels", "0123456789ab"), ("torch", "2.0.0"), ("cpu", "Another CPU"),
                                      ("kernel_isa", "another-isa")])
def test_a_calibration_measured_elsewhere_warns_that_it_is_stale(calibrated, tmp_path, key, old):
    """Step times depend on the CPU kernels' sources and instruction set, torch and the CPU: one measured under others
    misleads the planner, and loading it says so (a fresh one does not warn)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.load(calibrated)
    assert Calibration.load(calibrated).changed() == []
    eng = copy_engine(calibrated, tmp_path)
    cal = Calibration.load(eng)
    cal.host[key] = old
    cal.save(eng)
    assert Calibration.load(eng).changed() == [key]
    with pytest.warns(RuntimeWarning, match=rf"calibration.json was measured with another {key} than this process has, "
                                            r"so the planner may choose badly; rerun `magicdec-calibrate --engine "):
        rt = Runtime.load(eng)
    assert rt.planner is not None  # still used: the round times it measures rescale it
    with warnings.catch_warnings():  # recalibrating replaces it without warning of it
        warnings.simplefilter("error")
        assert calibrate_main(["--engine", str(eng), "--repeats", "1"]) == 0
    assert Calibration.load(eng).changed() == [] and not (eng / "calibration.json.old").exists()


def test_auto_gamma_generates_what_plain_decoding_does(calibrated, tiny_runtime):
    prompts = [f"w{i} w{i + 3} w{(5 * i) % 16}" for i in range(12)]  # more prompts than slots: refills
    want = [r.token_ids for r in tiny_runtime.generate(prompts, max_new_tokens=30, gamma=0)]
    rt = Runtime.load(calibrated)
    out = rt.generate(prompts, max_new_tokens=30)  # default: auto on a calibrated engine
    assert [r.token_ids for r in out] == want
    s = rt.last_stats
    assert s["gamma"] == "auto" and sum(s["gamma_rounds"].values()) == s["verify_steps"]
    assert s["draft_steps"] == sum(g * n for g, n in s["gamma_rounds"].items())
    assert s["predicted_speedup"] > 0


@pytest.mark.parametrize("draft_ms, verify_ms, want", [(1e6, 1.0, {0}), (1e-6, 1e6, {4})],
                         ids=["draft-too-dear", "draft-free"])
def test_auto_gamma_follows_the_costs(calibrated, tmp_path, draft_ms, verify_ms, want):
    """Calibrations so lopsided that the measured round times, which rescale them, cannot matter."""
    eng = copy_engine(calibrated, tmp_path)
    cal = Calibration.load(eng)
    cal.draft_ms = {"greedy": draft_ms, "sampled": draft_ms}
    cal.verify_ms = {g: {s: verify_ms for s in b} for g, b in cal.verify_ms.items()}  # verify as dear as a decode step
    cal.save(eng)
    rt = Runtime.load(eng)
    rt.generate(["w1 w2 w3"] * 8, max_new_tokens=20, gamma="auto")
    assert set(rt.last_stats["gamma_rounds"]) == want


def test_rounds_without_drafts_leave_the_draft_cache_behind_until_one_drafts(calibrated, tmp_path):
    """gamma 0 rounds skip copying what they commit into the draft cache (a ~4% round at B16 x 1k);
    the next drafting round first catches up, to what copying every round leaves: the sinks and the
    newest tokens, each slot holding the full cache's K/V of its position."""
    eng = copy_engine(calibrated, tmp_path)
    cal = Calibration.load(eng)
    cal.draft_ms = {"greedy": 1e6, "sampled": 1e6}  # drafting never pays: every round is gamma 0
    cal.save(eng)
    rt = Runtime.load(eng, draft_policy=DraftPolicy("streaming"))
    core, draft = rt.core, rt.core.drafts["streaming"]
    for n, _ in enumerate(rt.stream(["w1 w2 w3"] * 4, max_new_tokens=30, gamma="auto")):
        if n == 60:
            break
    rows = sorted(core._behind)
    assert rows == [0, 1, 2, 3] and all(core.lengths[b] > 8 for b in rows)
    assert all(core.lengths[b] - 1 not in draft.positions[0, b].tolist() for b in rows)  # behind
    core._catch_up()
    assert not core._behind
    ring = draft.budget - draft.sinks
    for b in rows:
        held = draft.positions[:, b, :, : draft.budget]
        assert (held[..., : draft.sinks] == torch.arange(draft.sinks)).all()
        assert sorted(held[0, 0, draft.sinks :].tolist()) == list(range(core.lengths[b] - ring, core.lengths[b]))
        for layer in range(draft.layers):
            for h in range(draft.heads):
                pos = held[layer, h]
                assert torch.equal(draft.k[layer, b, h, : draft.budget], core.full.k[layer, b, h, pos])
                assert torch.equal(draft.v[layer, b, h, : draft.budget], core.full.v[layer, b, h, pos])


def test_auto_gamma_needs_a_calibration(tiny_runtime):
    with pytest.raises(RequestError, match=r"gamma='auto' needs a calibrated engine: run `magicdec-calibrate --engine "):
        tiny_runtime.generate(["w1"], max_new_tokens=2, gamma="auto")
    assert tiny_runtime.generate(["w1"], max_new_tokens=2)[0].token_ids  # the default stays the engine's gamma


def test_bad_calibrations_are_clear_errors(calibrated, tmp_path):
    eng = copy_engine(calibrated, tmp_path)
    (eng / "calibration.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"calibration.json is unreadable .*; rerun `magicdec-calibrate --engine"):
        Runtime.load(eng)
    cal = Calibration.load(calibrated)
    del cal.verify_ms[2][16]
    cal.save(eng)
    with pytest.raises(EngineError, match=r"calibration.json does not cover this engine \(no timing for gamma, bucket \[\(2, 16\)\]\)"):
        Runtime.load(eng)
    # What the errors advise works: the calibration replaces the bad file (also an unreadable one).
    assert calibrate_main(["--engine", str(eng), "--repeats", "1"]) == 0
    assert Runtime.load(eng).planner is not None
    (eng / "calibration.json").write_text("{not json")
    assert calibrate_main(["--engine", str(eng), "--repeats", "1"]) == 0
    assert Runtime.load(eng).planner is not None


def test_rebuilding_an_engine_drops_the_old_engines_calibration(calibrated, tiny_hf, tmp_path):
    """Its step times belong to the engine built there before (here: without gamma 5, which then
    made every load, and the calibration replacing it, fail)."""
    from builders.build import build_engine

    from .conftest import TINY

    eng = copy_engine(calibrated, tmp_path)
    assert (eng / "calibration.json").is_file()
    build_engine(eng, tiny_hf, **{**TINY, "max_gamma": 5})
    assert not (eng / "calibration.json").exists()
    assert Runtime.load(eng).planner is None


def test_calibrate_cli_rejects_bad_repeats(calibrated):
    r = subprocess.run([sys.executable, "-c", "import sys; from magicdec_rt.cli import calibrate_main; "
                        "sys.exit(calibrate_main(sys.argv[1:]))", "--engine", str(calibrated), "--repeats", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "magicdec-calibrate: error: repeats=0 is out of range: must be >= 1\n"
