"""Sampling is lossless: exact distributions, checked with chi-square at fixed seeds."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from builders.build import build_engine
from builders.draft_model import cut_layers
from magicdec_rt import Runtime
from magicdec_rt.kv_cache import DraftPolicy
from magicdec_rt.planner import Calibration
from magicdec_rt.sampling import (RowRules, SamplingParams, accept_matching, accept_rejection, gumbel_choice, noise,
                                  probabilities, sample)

from .conftest import tiny_hf_model_dir

CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.7),
]


def hf_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The reference: transformers' own warpers, in the same order."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(sp.temperature)])
    if sp.top_k:
        procs.append(TopKLogitsWarper(sp.top_k))
    if sp.top_p < 1:
        procs.append(TopPLogitsWarper(sp.top_p))
    flat = logits.reshape(-1, logits.shape[-1])
    return torch.softmax(procs(None, flat.clone()), -1).reshape(logits.shape)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit, pooling cells expected to hold fewer than 5 samples."""
    probs = np.asarray(probs, dtype=np.float64)
    expected = probs / probs.sum() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a sample fell where the target has no mass"
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("sp", CONFIGS, ids=["t1", "t0.7-k4", "t1.3-p0.7"])
def test_probabilities_match_transformers_warpers(sp):
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 50) * 3
    torch.testing.assert_close(probabilities(logits, sp), hf_probs(logits, sp))


def test_sample_is_inverse_cdf_and_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75]]).expand(4, 4)
    u = torch.tensor([1e-9, 0.25, 0.2500001, 1.0])
    assert sample(probs, u).tolist() == [1, 1, 3, 3]


def test_row_rules_index_rows_on_the_logits_device():
    """Group row indices are built on the device given (a captured CUDA draft round cannot copy
    them from the CPU), and consecutive rows are a slice (their logits read in place, not copied);
    the graph key is plain data, read without touching the device."""
    rules = RowRules([None, (SamplingParams(temperature=0.7), True), None, (SamplingParams(temperature=0.7), True)],
                     "meta")
    assert [rows.device.type for _, _, rows in rules.groups] == ["meta", "meta"]
    assert rules.key == ((SamplingParams(), False, (0, 2)), (SamplingParams(temperature=0.7), True, (1, 3)))
    assert [rows for _, _, rows in RowRules([None, None, (SamplingParams(0.5), False)]).groups] == [slice(0, 2),
                                                                                                    slice(2, 3)]
    logits = torch.randn(3, 1, 8)
    target = RowRules([None] * 3).groups[0][2]
    assert logits[target].data_ptr() == logits.data_ptr()  # a view: no gather


def test_greedy_accept_keeps_the_agreeing_prefix():
    target = torch.full((3, 4, 5), -1.0)
    best = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4], [0, 2, 3, 4]])
    target.scatter_(-1, best[..., None], 1.0)
    drafts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    acc, extra = RowRules([None] * 3).accept(drafts, None, target)
    assert acc.tolist() == [3, 1, 0]
    assert extra.tolist() == [4, 0, 0]  # bonus; correction at 1; correction at 0


@pytest.mark.parametrize("gamma", [1, 3])
def test_rejection_sampler_first_token_is_distributed_as_target(gamma):
    """With fixed p and q, the first emitted token (accepted draft or correction) follows p_1
    exactly. Control: the drafts themselves (what 'always accept' would emit) are rejected by the
    same test, so the test has the power to fail."""
    V, N = 6, 40000
    g = torch.Generator().manual_seed(gamma)
    p_logits = torch.randn(gamma + 1, V, generator=g) * 2
    q = torch.softmax(torch.randn(gamma, V, generator=g) * 2, -1)
    sp = SamplingParams(temperature=1.0)
    p = probabilities(p_logits, sp)
    drafts = torch.stack([sample(q[i].expand(N, V), 1 - torch.rand(N, generator=g)) for i in range(gamma)], 1)
    acc, extra = accept_rejection(drafts, q.expand(N, gamma, V), p.expand(N, gamma + 1, V),
                                  torch.rand(N, gamma, generator=g), 1 - torch.rand(N, generator=g))
    first = torch.where(acc > 0, drafts[:, 0], extra)
    assert 0.1 < (acc > 0).float().mean() < 0.9  # both branches are exercised
    counts = np.bincount(first.numpy(), minlength=V)
    assert chi2_pvalue(counts, p[0].numpy()) > 1e-3
    naive = np.bincount(drafts[:, 0].numpy(), minlength=V)
    assert chi2_pvalue(naive, p[0].numpy()) < 1e-6


def test_gumbel_choice_samples_p_exactly_and_couples_q_to_it():
    """Over positions (fresh noise each), argmax p / E follows p exactly; a draft read from q with
    the same noise agrees with it with a probability between the drafter-invariant bound
    (1 - TV) / (1 + TV) and the maximal coupling's 1 - TV. Control: noise reused across positions
    gives one token every time."""
    V, N = 6, 20000
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.log(p) + 0.5 * torch.randn(V, generator=g), -1)
    e = torch.stack([noise(11, n, V) for n in range(N)])
    t, d = gumbel_choice(p.expand(N, V), e), gumbel_choice(q.expand(N, V), e)
    assert chi2_pvalue(np.bincount(t.numpy(), minlength=V), p.numpy()) > 1e-3
    assert chi2_pvalue(np.bincount(d.numpy(), minlength=V), q.numpy()) > 1e-3
    tv = 0.5 * (p - q).abs().sum().item()
    agree = (t == d).double().mean().item()
    assert (1 - tv) / (1 + tv) - 0.01 < agree < 1 - tv + 0.01, (agree, tv)
    assert gumbel_choice(p.expand(N, V), noise(11, 0, V).expand(N, V)).unique().numel() == 1
    acc, extra = accept_matching(torch.stack([d, d], 1), torch.stack([t, t, t], 1))
    assert torch.equal(extra, t) and torch.equal(acc, 2 * (d == t).long())


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    src = tiny_hf_model_dir(root / "hf", vocab=12, seed=3)
    engine = build_engine(
        root / "engine", src, max_batch=512, max_seq_len=64, max_gamma=3, default_gamma=3,
        draft_sinks=2, draft_budget=6, prefill_chunk=16, show_progress=False,
    )
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    rt = Runtime.load(engine)
    runtimes = {0: rt, 3: rt}
    # A copy whose planner chooses gamma each round from a calibration of this machine.
    planned = shutil.copytree(engine, root / "planned")
    Runtime.load(planned).calibrate(repeats=1).save(planned)
    runtimes["auto"] = Runtime.load(planned)
    runtimes["snapkv"] = Runtime.load(engine, draft_policy=DraftPolicy("snapkv", window=4, recent=2, pool=3))
    # Draft policy "auto", with a calibration that makes every round draft: the planner switches caches.
    free = shutil.copytree(planned, root / "planned-free")
    cal = Calibration.load(free)
    cal.draft_ms = {"greedy": 1e-6, "sampled": 1e-6}
    cal.verify_ms = {g: {s: 1e6 for s in b} for g, b in cal.verify_ms.items()}
    cal.save(free)
    runtimes["auto-policy"] = Runtime.load(free, draft_policy=DraftPolicy("auto", window=4, recent=2, pool=3))
    # A standalone draft model: the target's first layer (then its norm and head) over its own cache.
    drafter = build_engine(root / "engine-dm", src, max_batch=512, max_seq_len=64, max_gamma=3, default_gamma=3,
                           draft_sinks=2, draft_budget=6, prefill_chunk=16, show_progress=False,
                           draft_model=cut_layers(src, 1, root / "draft"))
    runtimes["draft-model"] = Runtime.load(drafter, draft_policy=DraftPolicy("snapkv", window=4, recent=2, pool=3))
    return runtimes, hf


def exact_sequence_distributions(hf, prompt, sp, n_tokens, vocab):
    """Exact P(x1, x2) and the marginals of x3..x_n under the target's own sampling."""
    dist = {(): 1.0}
    marginals = []
    for _ in range(n_tokens):
        seqs = list(dist)
        ids = torch.tensor([prompt + list(s) for s in seqs])
        with torch.no_grad():
            probs = hf_probs(hf(ids).logits[:, -1], sp).double()
        weights = torch.tensor([dist[s] for s in seqs], dtype=torch.float64)[:, None] * probs
        marginals.append(weights.sum(0).numpy())
        dist = {s + (t,): float(weights[i, t]) for i, s in enumerate(seqs) for t in range(vocab) if weights[i, t] > 0}
        if len(marginals) == 2:
            pairs = np.array([[sum(w for s, w in dist.items() if s[:2] == (a, b)) for b in range(vocab)] for a in range(vocab)])
    return pairs, marginals


@pytest.mark.parametrize("sp, gamma, seeded", [(CONFIGS[0], 3, True), (CONFIGS[1], 3, True), (CONFIGS[2], 3, True),
                                               (CONFIGS[0], 0, True), (CONFIGS[1], "auto", True),
                                               (CONFIGS[0], 3, False), (CONFIGS[2], 3, False),
                                               (CONFIGS[1], "auto", False), (CONFIGS[0], "snapkv", True),
                                               (CONFIGS[2], "snapkv", False), (CONFIGS[0], "draft-model", True),
                                               (CONFIGS[2], "draft-model", False), (CONFIGS[2], "auto-policy", False)],
                         ids=["t1", "t0.7-k4", "t1.3-p0.7", "t1-autoregressive", "t0.7-k4-planner",
                              "t1-rejection", "t1.3-p0.7-rejection", "t0.7-k4-planner-rejection", "t1-snapkv",
                              "t1.3-p0.7-snapkv-rejection", "t1-draft-model", "t1.3-p0.7-draft-model-rejection",
                              "t1.3-p0.7-auto-policy-rejection"])
def test_generation_samples_the_target_distribution(wide_tiny, sp, gamma, seeded):
    """Tiny model, draft cache far smaller than the prompt (so drafts are often rejected): the joint
    of the first two generated tokens and the marginals of the 3rd and 4th (made of accepted
    drafts, corrections and bonus tokens) equal the target's exact sampling distributions, with
    speculation, without it, and with the planner choosing gamma round by round; for seeded
    requests (drafter-invariant Gumbel sampling) and unseeded ones (the rejection sampler, whose
    per-request generators are seeded from torch's global RNG, fixed here)."""
    runtimes, hf = wide_tiny
    rt = runtimes[gamma]
    vocab, N, n_tokens = 12, 3000, 4
    prompt = [int(t) for t in torch.randint(0, vocab, (14,), generator=torch.Generator().manual_seed(7))]
    torch.manual_seed(1000 * CONFIGS.index(sp) + 1)
    if gamma in ("snapkv", "draft-model"):
        gamma = 3
    auto_policy = gamma == "auto-policy"
    if auto_policy:
        gamma = "auto"
    outs = rt.generate([prompt] * N, max_new_tokens=n_tokens, temperature=sp.temperature,
                       top_k=sp.top_k, top_p=sp.top_p, seed=1000 * CONFIGS.index(sp) if seeded else None, gamma=gamma)
    stats = rt.last_stats
    assert stats["gamma"] == gamma
    if gamma == 3:
        assert 0.05 < stats["acceptance_rate"] < 0.95, stats
    if auto_policy:
        assert sorted(stats["policy_rounds"]) == ["snapkv", "streaming"], stats
    toks = np.array([o.token_ids for o in outs])
    assert toks.shape == (N, n_tokens)
    pairs, marginals = exact_sequence_distributions(hf, prompt, sp, n_tokens, vocab)
    pair_counts = np.bincount(toks[:, 0] * vocab + toks[:, 1], minlength=vocab * vocab)
    assert chi2_pvalue(pair_counts, pairs.reshape(-1)) > 1e-3
    for pos in (2, 3):
        counts = np.bincount(toks[:, pos], minlength=vocab)
        assert chi2_pvalue(counts, marginals[pos]) > 1e-3, pos


def test_seeds_make_each_request_reproducible_whatever_its_batch(tiny_runtime):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 4, 3, 2, 1]]
    both = tiny_runtime.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5)
    again = tiny_runtime.generate(prompts, max_new_tokens=12, temperature=1.0, seed=5)
    alone = tiny_runtime.generate([prompts[1]], max_new_tokens=12, temperature=1.0, seed=6)
    assert [r.token_ids for r in both] == [r.token_ids for r in again]
    assert both[1].token_ids == alone[0].token_ids  # prompt i is sampled with seed + i
    other = tiny_runtime.generate(prompts, max_new_tokens=12, temperature=1.0, seed=99)
    assert [r.token_ids for r in other] != [r.token_ids for r in both]
