"""A request outside the model: its validation, its text and stop strings, its events, its counts.

The engine core (``core.py``) moves requests through slots; everything here is per request and
runs on the core's thread, except ``Request.cancel``, which any thread may call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import RequestError
from .sampling import SamplingParams


@dataclass
class GenerationResult:
    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    # "eos", "stop" (a stop string), "length" (max_new_tokens), "cancelled" or "deadline"
    finish_reason: str
    stats: dict


@dataclass
class StreamEvent:
    index: int  # which prompt of its call
    token_ids: list[int]  # tokens accepted for it since the last event
    text: str  # text that became final since the last event
    result: GenerationResult | None = None  # set on the request's last event


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    seed: int | None  # seeded sampling is drafter-invariant (sampling.py); None: rejection sampling
    max_new: int
    stops: list[str]
    index: int = 0
    deadline: float | None = None  # time.monotonic() at which it ends with "deadline"
    sink: Callable[[StreamEvent], None] | None = None  # called with each event, on the core's thread
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    done: bool = False
    reason: str = ""
    cancelled: bool = False
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefix_hits: list[int] = field(default_factory=list)  # [i]: rounds whose first i+1 drafts were accepted
    reached: list[int] = field(default_factory=list)  # [i]: rounds that drafted more than i tokens
    submitted: float = field(default_factory=time.monotonic)
    gen: torch.Generator | None = None

    def __post_init__(self):
        if not self.params.greedy and self.seed is None:
            # Rejection sampling draws uniforms from the request's own generator.
            self.gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))

    @property
    def rule(self) -> tuple[SamplingParams, bool]:
        return self.params, self.seed is not None and not self.params.greedy

    def cancel(self) -> None:
        """Ask the core to end this request; it does so before its next round."""
        self.cancelled = True

    def uniforms(self, n: int) -> torch.Tensor:
        """``n`` uniforms in (0, 1] for rejection sampling; zeros for other rows (unused)."""
        return torch.zeros(n) if self.gen is None else 1.0 - torch.rand(n, generator=self.gen)

    def finish(self, reason: str) -> None:
        self.done, self.reason = True, reason

    def push(self, new: list[int], tokenizer, eos: list[int]) -> None:
        """Append accepted tokens one by one until the request finishes."""
        for t in new:
            self.tokens.append(t)
            if t in eos:
                self.finish("eos")
            elif self.stops:
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
                if hit >= 0:
                    self.text = text[:hit]
                    self.finish("stop")
            if not self.done and len(self.tokens) >= self.max_new:
                self.finish("length")
            if self.done:
                break
        if self.reason != "stop":
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)

    def event(self) -> StreamEvent | None:
        """What became final since the last event (None if nothing did); the last one carries
        the result."""
        end = self._final_text_end()
        if self.sent_tokens == len(self.tokens) and end == self.sent_text and not self.done:
            return None
        ev = StreamEvent(self.index, self.tokens[self.sent_tokens :], self.text[self.sent_text : end])
        self.sent_tokens, self.sent_text = len(self.tokens), end
        if self.done:
            ev.result = GenerationResult(self.index, self.text, list(self.tokens), len(self.prompt), self.reason,
                                         self.stats())
        return ev

    def _final_text_end(self) -> int:
        """How much of the text is final: all of it once done; otherwise hold back a trailing
        partial character and any tail that could still grow into a stop string."""
        text = self.text
        if self.done:
            return len(text)
        end = len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return max(end, self.sent_text)

    def observe(self, gamma: int, accepted: int) -> None:
        """One verify round that kept ``accepted`` of ``gamma`` drafts."""
        self.rounds += 1
        self.drafted += gamma
        self.accepted += accepted
        self.prefix_hits = add_prefix(self.prefix_hits, accepted, gamma)
        self.reached = add_prefix(self.reached, gamma, gamma)

    def stats(self) -> dict:
        return acceptance(self.rounds, self.drafted, self.accepted, self.prefix_hits, self.reached) | {
            "new_tokens": len(self.tokens)}


def add_prefix(counts: list[int], n: int, gamma: int) -> list[int]:
    """``counts`` grown to ``gamma`` positions, its first ``n`` incremented."""
    counts = counts + [0] * (gamma - len(counts))
    return [c + (i < n) for i, c in enumerate(counts)]


def acceptance(rounds: int, drafted: int, accepted: int, hits: list[int], reached: list[int]) -> dict:
    """Speculation statistics over ``rounds`` verifies. ``hits[i]``: rounds whose first ``i + 1``
    drafts were all accepted, of the ``reached[i]`` that drafted that many; with a fixed gamma
    ``per_position_acceptance`` is unconditional and non-increasing."""
    return {
        "verify_rounds": rounds,  # decode steps of the target (with or without drafts)
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": 1 + accepted / rounds if rounds else None,
        "per_position_acceptance": [h / n for h, n in zip(hits, reached)],
    }


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def encode(tokenizer, vocab: int, i: int, prompt) -> list[int]:
    """Token ids of prompt ``i``: a string, a list of token ids, or a list of chat messages."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids if prompt else []
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        try:
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 -- the template's own message is the useful part
            raise RequestError(f"prompt {i}: chat messages could not be rendered: {e}") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt {i}: token id {bad[0]} is out of range [0, {vocab})")
    else:
        raise RequestError(
            f"prompt {i} is {_a(type(prompt).__name__)}; a prompt is a string, a list of token ids, "
            "or a list of chat messages ({'role': ..., 'content': ...})"
        )
    if not ids:
        raise RequestError(f"prompt {i} is empty; a prompt needs at least 1 token")
    return ids


def make_requests(tokenizer, manifest, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                  stop=None, timeout=None) -> list[Request]:
    """Validated requests, one per prompt (prompt ``i`` seeded with ``seed + i``;
    ``max_new_tokens=None``: as many as the engine's context leaves). Everything is checked before
    anything is built, so a bad call changes nothing."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompts must be a non-empty list of prompts")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise RequestError(f"max_new_tokens={max_new_tokens!r} is out of range: must be an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise RequestError(f"temperature={temperature!r} is out of range: must be a finite number >= 0")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(f"top_p={top_p!r} is out of range: must be in (0, 1]")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise RequestError(f"top_k={top_k!r} is out of range: must be an integer >= 0 (0 disables it)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(f"seed={seed!r} is out of range: must be an integer in [0, 2**63) or None")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise RequestError(f"timeout={timeout!r} is out of range: must be a number of seconds > 0")
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else stop
    if stops is None:
        stops = []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop={stop!r} is invalid: must be a non-empty string or a list of them")
    ids = [encode(tokenizer, manifest.model.vocab_size, i, p) for i, p in enumerate(prompts)]
    limit = manifest.max_seq_len
    for i, p in enumerate(ids):
        if max_new_tokens is None and len(p) >= limit:
            raise RequestError(f"prompt {i} has {len(p)} tokens, leaving no room for new tokens within the "
                               f"engine's max_seq_len {limit}")
        if max_new_tokens is not None and len(p) + max_new_tokens > limit:
            raise RequestError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens}, beyond the engine's max_seq_len {limit}"
            )
    sp = SamplingParams(float(temperature), int(top_k), float(top_p))
    deadline = None if timeout is None else time.monotonic() + timeout
    return [Request(p, sp, None if seed is None else seed + i, max_new_tokens or limit - len(p), stops, i, deadline)
            for i, p in enumerate(ids)]
