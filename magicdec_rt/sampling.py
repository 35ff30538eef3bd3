"""Token selection and speculative accept/reject, one module.

Rows of one batch may sample differently (each request brings its own temperature, top-k, top-p
and seed); ``RowRules`` groups the rows that share a rule so each group is one batched operation.
Every row is one of three kinds:

* **Greedy** (temperature 0): the token is ``argmax p``. Drafts are kept while they equal the
  target's argmax; the extra token is the target's argmax at the first mismatch, or the bonus
  ``argmax p_{g+1}`` if all were accepted. The output is exactly the target's greedy sequence.
* **Seeded** (temperature > 0 and a seed): the token is a Gumbel-max sample ``argmax_i p_i / E_i``
  with exponential noise ``E`` fixed by the seed and the token's position in the sequence
  (``noise``). The draft proposes ``argmax_i q_i / E_i`` with the same noise, and verification keeps
  drafts while they equal the target's token, as for greedy (greedy is this rule with no noise).
  Every token is then exactly the one plain sampling with that seed gives, whatever gamma the
  planner chooses and whichever requests share the batch: the draft decides only how many tokens
  a round commits, never which (drafter-invariant speculative decoding, Daliri et al. 2024). The
  price: V noise draws per sampled position (0.15 ms for V = 49152 on the 2-core EPYC here), and
  acceptance ``P(argmax q/E = argmax p/E) >= (1 - TV) / (1 + TV)`` against the rejection
  sampler's ``1 - TV`` (TV: total variation of p, q).
* **Unseeded** (temperature > 0, no seed): the rejection sampler. Accept ``d_i`` with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection ``i`` draw the extra token from
  ``normalise(max(0, p_i - q_i))``; if all ``g`` are accepted draw the bonus from ``p_{g+1}``
  (Leviathan et al. 2023; Chen et al. 2023). Setting ``q_{g+1} = 0`` makes the bonus the same
  formula as the residual, so both cases are one gather. Each emitted token follows the target's
  own sampling distribution exactly, with the best acceptance any scheme can have, but the
  realisation depends on where rounds start. Randomness is one uniform per decision from the
  row's own generator; sampling from a distribution is an inverse-CDF lookup of that uniform.

top-k and top-p are applied identically to p and q (``probabilities``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """The distribution that sampling draws from: temperature, then top-k, then top-p."""
    logits = logits.float() / sp.temperature
    vocab = logits.shape[-1]
    if 0 < sp.top_k < vocab:
        kth = logits.topk(sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token always survives.
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= sp.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample from (unnormalised) ``probs [B, V]`` with uniforms ``u [B]`` in (0, 1]."""
    cdf = probs.double().cumsum(-1)
    target = (u.double() * cdf[:, -1])[:, None]
    # u > 0, so the first index whose cdf reaches the target has positive probability.
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """The exponential noise ``E [V]`` of the token at ``position`` of a request seeded with
    ``seed``: a function of those two numbers only (numpy's PCG64 seeded with both, its ziggurat
    exponentials: 2.2x faster here than torch's generator and a logarithm)."""
    e = np.random.Generator(np.random.PCG64([seed, position])).standard_exponential(vocab)
    # float64: float32 would round E below ~2^-24 to 0 and hand every near-impossible token a
    # 2^-24 chance. E = 0 exactly would make p / E = 0 / 0.
    return torch.from_numpy(e).clamp_min(1e-300)


def gumbel_choice(probs: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``argmax p / E`` over the last dim: a sample of ``p`` (the exponential race) that every
    distribution read with the same ``E`` couples to."""
    return (probs.double() / e).argmax(-1)


def accept_matching(drafts: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy and seeded rows: keep drafts ``[n, g]`` while they equal the target's tokens
    ``choice [n, g+1]``; the extra token is the target's token after them."""
    accepted = (drafts == choice[:, : drafts.shape[1]]).long().cumprod(-1).sum(-1)
    return accepted, choice[torch.arange(len(choice), device=choice.device), accepted]


def accept_rejection(drafts, draft_probs, target_probs, u_accept, u_extra) -> tuple[torch.Tensor, torch.Tensor]:
    """Unseeded rows: the rejection sampler over drafts ``[n, g]`` drawn from ``draft_probs
    [n, g, V]``, against ``target_probs [n, g+1, V]``, with uniforms ``u_accept [n, g]`` and
    ``u_extra [n]`` in (0, 1]."""
    n, g = drafts.shape
    rows = torch.arange(n, device=drafts.device)
    p_d = target_probs[:, :g].gather(-1, drafts[..., None])[..., 0]
    q_d = draft_probs.gather(-1, drafts[..., None])[..., 0]
    # u < p/q written without the division; q_d > 0 because d was drawn from q.
    ok = u_accept * q_d < p_d
    accepted = ok.long().cumprod(-1).sum(-1)
    q_ext = torch.cat((draft_probs, torch.zeros_like(target_probs[:, :1])), dim=1)
    residual = (target_probs[rows, accepted] - q_ext[rows, accepted]).clamp_min(0.0)
    return accepted, sample(residual, u_extra)


def _index(rows: list[int], device) -> slice | torch.Tensor:
    """How a group's rows are picked: consecutive rows (every row of a batch that shares one rule)
    as a slice, so their logits are read in place (gathering a B16 verify's [16, 5, 49152] float32
    logits copied 15.7 MB: the greedy accept took 1.60 ms with the gather, 1.08 without); other sets
    as an index tensor on the logits' device (a captured CUDA graph cannot copy it there)."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


class RowRules:
    """How each row of a batch samples: ``rules[b] = (params, seeded)``, or None for a row that
    holds no request (it is treated as greedy and its output ignored). Groups rows with one rule
    so each group is one batched call; the per-row randomness is given by the caller:
    ``noise [B, n, V]`` (rows that are seeded; positions of the round) and uniforms ``u [B, n]``
    (unseeded rows)."""

    def __init__(self, rules, device: torch.device | str = "cpu"):
        groups: dict = {}
        for b, rule in enumerate(rules):
            groups.setdefault(rule or (SamplingParams(), False), []).append(b)
        self.groups = [(sp, seeded, _index(rows, device)) for (sp, seeded), rows in groups.items()]
        self.key = tuple((sp, seeded, tuple(rows)) for (sp, seeded), rows in groups.items())
        self.greedy = all(sp.greedy for sp, _, _ in self.groups)

    def select(self, logits: torch.Tensor, noise=None, u=None):
        """One token per row from ``logits [B, V]``, and the draft distribution ``[B, V]`` that
        unseeded rows sampled from (zeros elsewhere; None when no row is unseeded)."""
        tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
        dist = None
        for sp, seeded, rows in self.groups:
            if sp.greedy:
                tokens[rows] = logits[rows].argmax(-1)
                continue
            probs = probabilities(logits[rows], sp)
            if seeded:
                tokens[rows] = gumbel_choice(probs, noise[rows])
            else:
                tokens[rows] = sample(probs, u[rows])
                dist = torch.zeros_like(logits, dtype=torch.float32) if dist is None else dist
                dist[rows] = probs
        return tokens, dist

    def accept(self, drafts, draft_probs, target_logits, noise=None, u_accept=None, u_extra=None):
        """``(accepted [B], extra [B])``: how many leading drafts ``[B, g]`` each row keeps, and the
        token that follows them. ``noise [B, g+1, V]`` covers the round's g + 1 positions."""
        B, g = drafts.shape
        accepted = torch.empty(B, dtype=torch.long, device=drafts.device)
        extra = torch.empty_like(accepted)
        for sp, seeded, rows in self.groups:
            logits = target_logits[rows]
            if sp.greedy:
                accepted[rows], extra[rows] = accept_matching(drafts[rows], logits.argmax(-1))
            elif seeded:
                accepted[rows], extra[rows] = accept_matching(drafts[rows], gumbel_choice(probabilities(logits, sp),
                                                                                          noise[rows]))
            else:
                accepted[rows], extra[rows] = accept_rejection(drafts[rows], draft_probs[rows],
                                                               probabilities(logits, sp), u_accept[rows], u_extra[rows])
        return accepted, extra
