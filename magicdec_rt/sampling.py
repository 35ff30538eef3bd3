"""Token selection and speculative accept/reject, one module.

Given draft tokens ``d_1..d_g`` proposed with draft distributions ``q_1..q_g`` and the target's
distributions ``p_1..p_{g+1}`` from one verify pass, each row independently:

* Greedy (temperature 0): accept ``d_i`` while it equals ``argmax p_i``; the extra token is the
  target's argmax at the first mismatch, or ``argmax p_{g+1}`` (the bonus) if all were accepted.
  The output is then exactly the target's greedy sequence.
* Sampling (temperature > 0, optional top-k / top-p applied identically to p and q): accept
  ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``. At the first rejection ``i``, draw the
  extra token from ``normalise(max(0, p_i - q_i))``; if all ``g`` are accepted, draw the bonus
  from ``p_{g+1}``. Every emitted token is then distributed exactly as the target's own sampling
  (Leviathan et al. 2023; Chen et al. 2023). Setting ``q_{g+1} = 0`` makes the bonus the same
  formula as the residual, so both cases are one gather.

Randomness is one uniform number per decision, drawn by the caller from each row's own generator,
so a request's output depends only on its seed, never on which other rows share its batch.
Sampling from a distribution is an inverse-CDF lookup of that uniform.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def select(logits: torch.Tensor, sp: SamplingParams, u: torch.Tensor | None):
    """One token per row from ``logits [B, V]``; also returns the distribution (None if greedy)."""
    if sp.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, sp)
    return sample(probs, u), probs


def accept(
    draft_tokens: torch.Tensor,  # [B, g]
    draft_probs: torch.Tensor | None,  # [B, g, V]; None when greedy
    target_logits: torch.Tensor,  # [B, g+1, V]
    sp: SamplingParams,
    u_accept: torch.Tensor | None,  # [B, g]
    u_extra: torch.Tensor | None,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(accepted [B], extra [B])``: how many leading drafts each row keeps, and the token
    that follows them (correction or bonus)."""
    B, g = draft_tokens.shape
    rows = torch.arange(B)
    if sp.greedy:
        best = target_logits.argmax(-1)  # [B, g+1]
        ok = draft_tokens == best[:, :g]
        accepted = ok.long().cumprod(-1).sum(-1)
        return accepted, best[rows, accepted]
    p = probabilities(target_logits, sp)  # [B, g+1, V]
    p_d = p[:, :g].gather(-1, draft_tokens[..., None])[..., 0]
    q_d = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    # u < p/q written without the division; q_d > 0 because d was drawn from q.
    ok = u_accept * q_d < p_d
    accepted = ok.long().cumprod(-1).sum(-1)
    q_ext = torch.cat((draft_probs, torch.zeros_like(p[:, :1])), dim=1)
    residual = (p[rows, accepted] - q_ext[rows, accepted]).clamp_min(0.0)
    return accepted, sample(residual, u_extra)
