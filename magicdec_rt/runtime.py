"""The runtime: owns the caches, lengths and RNG, and runs the MagicDec loop.

Up to ``max_batch`` prompts run at once, each in a slot of the preallocated caches; when one
finishes and more are waiting, the next is admitted into its slot (continuous batching).

1. Prefill each prompt in fixed-size chunks into its row of the full cache (one row per call, the
   rows taking turns chunk by chunk so the cache grows evenly), then copy its sinks and recent
   window into the draft cache; sample the first token from the last prompt position.
2. Repeat until every row is finished: ``gamma`` draft steps (``[B, 1]`` over the draft cache),
   one verify step (``[B, gamma+1]`` over the full cache), then accept/reject per row
   (``sampling.accept``). Row ``b`` keeps its own ``a_b`` drafts plus one extra token; the target
   K/V of the tokens it committed go into the full cache and the draft cache, and its length
   advances by ``a_b + 1``: acceptance is ragged.

Before every full-cache step the cache is laid out at the smallest context bucket that holds the
live rows and the tokens about to be written, so the step's cost follows the actual context.
The decoding loop reads the device once per verify (the accept/reject outcome); the draft loop and
the cache writes need no host values.

``gamma = 0`` runs the same loop with no draft: the verify step is then a plain autoregressive
decode step, which is the baseline MagicDec is measured against. ``gamma = "auto"`` (the default
for an engine with a calibration) lets the planner (``planner.py``) choose gamma every round, 0
included, from the engine's measured step costs and the acceptance it has seen so far.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .engine import Manifest, load_steps, read_manifest
from .errors import EngineError, RequestError
from .kv_cache import KVCache, StreamingCache
from .planner import Calibration, Planner, host_info, mode, omega
from .sampling import SamplingParams, accept, probabilities, select


@dataclass
class GenerationResult:
    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string) or "length" (max_new_tokens)
    stats: dict


@dataclass
class StreamEvent:
    index: int  # which prompt
    token_ids: list[int]  # tokens accepted for it since the last event
    text: str  # text that became final since the last event
    result: GenerationResult | None = None  # set on the prompt's last event


@dataclass
class _Row:
    index: int
    prompt: list[int]
    max_new: int
    stops: list[str]
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    done: bool = False
    reason: str = ""
    reported: bool = False
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefix_hits: list[int] = field(default_factory=list)  # [i]: rounds whose first i+1 drafts were accepted
    reached: list[int] = field(default_factory=list)  # [i]: rounds that drafted more than i tokens

    def uniforms(self, n: int) -> torch.Tensor:
        # Rows without a generator are padding: their draws decide nothing (and must not touch
        # the global RNG).
        return torch.zeros(n) if self.gen is None else torch.rand(n, generator=self.gen)


class Runtime:
    def __init__(self, directory: Path, manifest: Manifest, steps, tokenizer, show_progress=False, cuda_graphs=None):
        self.directory, self.manifest, self.tokenizer = directory, manifest, tokenizer
        self.show_progress = show_progress
        # CUDA graphs (on by default on CUDA; not yet run on a GPU). Forcing them on elsewhere
        # runs the same bookkeeping without capture.
        self.cuda_graphs = steps.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._raw_steps, self._draft_graphs = steps, {}
        if self.cuda_graphs:
            from .cuda_graphs import GraphedSteps

            steps = GraphedSteps(steps)
        self.steps = steps
        m, dt = manifest, manifest.torch_dtype
        self.device = steps.device
        self.full = KVCache(steps.model, m.max_batch, m.max_seq_len, dt, self.device)
        self.draft = StreamingCache(steps.model, m.max_batch, m.draft_sinks, m.draft_budget, m.max_gamma, dt, self.device)
        self.last_stats: dict = {}
        self._request = 0  # the caches belong to the newest request; older streams must stop
        calibration = Calibration.load(directory)
        self.planner = None if calibration is None else Planner(calibration, m.gammas, m.context_buckets)

    @property
    def rank(self) -> int:
        """This process's tensor-parallel rank (0 when not sharded)."""
        return self.steps.model.shard.rank

    @classmethod
    def load(cls, engine_dir: str | Path, show_progress: bool = False, cuda_graphs: bool | None = None) -> "Runtime":
        from transformers import AutoTokenizer

        directory = Path(engine_dir)
        manifest = read_manifest(directory)
        steps = load_steps(directory, manifest)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(directory, manifest, steps, tokenizer, show_progress, cuda_graphs)

    # ------------------------------------------------------------------ requests

    def _encode(self, i: int, prompt) -> list[int]:
        tok, vocab = self.tokenizer, self.manifest.model.vocab_size
        if isinstance(prompt, str):
            ids = tok(prompt).input_ids if prompt else []
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            try:
                text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001 -- the template's own message is the useful part
                raise RequestError(f"prompt {i}: chat messages could not be rendered: {e}") from None
            ids = tok(text, add_special_tokens=False).input_ids
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

    def _requests(self, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, gamma):
        """Validate everything before touching any state, so a bad request changes nothing."""
        m = self.manifest
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RequestError("prompts must be a non-empty list of prompts")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens={max_new_tokens!r} is out of range: must be an integer >= 1")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise RequestError(f"temperature={temperature!r} is out of range: must be a finite number >= 0")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise RequestError(f"top_p={top_p!r} is out of range: must be in (0, 1]")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise RequestError(f"top_k={top_k!r} is out of range: must be an integer >= 0 (0 disables it)")
        if gamma is None:
            gamma = "auto" if self.planner else m.default_gamma
        if gamma == "auto":
            if self.planner is None:
                raise RequestError(
                    f"gamma='auto' needs a calibrated engine: run `magicdec-calibrate --engine {self.directory}`"
                )
        elif isinstance(gamma, bool) or not isinstance(gamma, int) or gamma not in m.gammas:
            raise RequestError(f"gamma={gamma!r} is not one the engine was built for: allowed {m.gammas} or 'auto'")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise RequestError(f"seed={seed!r} is out of range: must be an integer >= 0 or None")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise RequestError(f"stop={stop!r} is invalid: must be a non-empty string or a list of them")
        ids = [self._encode(i, p) for i, p in enumerate(prompts)]
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > m.max_seq_len:
                raise RequestError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(p) + max_new_tokens}, beyond the engine's max_seq_len {m.max_seq_len}"
                )
        sp = SamplingParams(float(temperature), int(top_k), float(top_p))
        base_seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        rows = []
        for i, p in enumerate(ids):
            gen = None
            if not sp.greedy:
                gen = torch.Generator().manual_seed(base_seed + i)
            rows.append(_Row(i, p, max_new_tokens, stops, gen))
        return rows, sp, gamma

    # ------------------------------------------------------------------ public API

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 stop=None, gamma=None) -> list[GenerationResult]:
        """One result per prompt, in order. Prompts: strings, token-id lists or chat message lists.
        Prompt ``i`` is sampled with seed ``seed + i``; greedy when ``temperature == 0``."""
        results = {}
        for ev in self.stream(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, gamma):
            if ev.result is not None:
                results[ev.index] = ev.result
        if self.rank != 0:
            return []  # under tensor parallelism only rank 0 answers; the others did their part
        return [results[i] for i in sorted(results)]

    def stream(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
               stop=None, gamma=None) -> Iterator[StreamEvent]:
        """Yields tokens as they are accepted; each prompt's last event carries its result.
        The request is validated before the first event. Under tensor parallelism every rank
        must iterate its stream (each drives its shard); all ranks see the same events."""
        rows, sp, gamma = self._requests(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, gamma)
        return self._serve(rows, sp, gamma)

    def _serve(self, rows, sp, gamma):
        self._request += 1
        request = self._request
        totals = _Totals()
        bar = tqdm(total=sum(r.max_new for r in rows), desc="generate", unit="tok", leave=False,
                   disable=not self.show_progress)
        for event in self._run(rows, sp, gamma, totals):
            bar.update(len(event.token_ids))
            yield event
            if self._request != request:
                raise RuntimeError(
                    "this stream was abandoned for a later request on the same Runtime, which "
                    "reused its caches; a Runtime serves one request at a time"
                )
        bar.close()
        self.last_stats = totals.summary(rows, gamma)

    def calibrate(self, repeats: int = 3) -> Calibration:
        """Time this engine's steps on this machine for the planner: a draft step, the verify step
        of every gamma at every bucket, and accept/reject, greedy and sampled (temperature 0.7),
        each the median of ``repeats`` calls after a warm-up. Step costs depend on shapes, not on
        what the caches hold, so this needs no prompts; it leaves the caches' contents undefined.
        Save the result with ``Calibration.save(engine_dir)``; a new Runtime then plans with it."""
        m, dev, B, V = self.manifest, self.device, self.manifest.max_batch, self.manifest.model.vocab_size
        if m.world_size > 1:
            raise EngineError("calibration under tensor parallelism is not supported yet; calibrate a world-size-1 engine")

        def ms(fn) -> float:
            times = []
            for i in range(repeats + 1):
                t = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
            return 1e3 * statistics.median(times)

        self._request += 1  # the caches are overwritten: a stream in flight must stop
        modes = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.7)}
        verify = {g: {} for g in m.gammas}
        steps = [(g, bucket) for g in m.gammas for bucket in m.context_buckets]
        bar = tqdm(steps, desc="calibrate", unit="step", leave=False, disable=not self.show_progress)
        for g, bucket in bar:
            self.full.resize(bucket)
            ck, cv = self.full.view(slice(None))
            L = torch.full((B,), max(bucket - g - 1, 0), device=dev)
            tokens = torch.zeros(B, g + 1, dtype=torch.long, device=dev)
            positions = L[:, None] + torch.arange(g + 1, device=dev)
            verify[g][bucket] = ms(lambda: self.steps(f"verify{g}@{bucket}", tokens, positions, ck, cv, L))
            bar.set_postfix_str(f"verify{g}@{bucket} {verify[g][bucket]:.0f} ms")
        L = torch.full((B,), m.draft_budget, device=dev)
        base = torch.tensor([self.draft.valid(n) for n in L.tolist()], device=dev)
        x, u = torch.zeros(B, dtype=torch.long, device=dev), torch.rand(B, m.max_gamma + 1, device=dev)
        draft = {name: ms(lambda: self._draft(1, sp, x, L, base, u)) for name, sp in modes.items()}
        rest = {}
        for name, sp in modes.items():
            rest[name] = {}
            for g in m.gammas:
                logits = torch.randn(B, g + 1, V, device=dev)
                q = None if sp.greedy else probabilities(torch.randn(B, g, V, device=dev), sp)
                drafts = torch.randint(0, V, (B, g), device=dev)
                rest[name][g] = ms(lambda: [t.tolist() for t in accept(drafts, q, logits, sp, u[:, :g], u[:, g])])
        self.full.resize(m.context_buckets[0])
        return Calibration(draft, verify, rest, host_info())

    # ------------------------------------------------------------------ the loop

    def _uniforms(self, rows: Sequence[_Row], sp: SamplingParams, n: int):
        if sp.greedy:
            return None
        return torch.stack([r.uniforms(n) for r in rows]).to(self.device)

    def _bucket(self, slots: int) -> int:
        return self.manifest.bucket(min(max(slots, 1), self.manifest.max_seq_len))

    def _fit(self, slots: int) -> None:
        """Lay the full cache out at the smallest bucket holding ``slots`` slots per row."""
        self.full.resize(self._bucket(slots))

    def _prefill(self, slots: Sequence[int], rows: Sequence[_Row], speculate: bool, live: int) -> torch.Tensor:
        """Prefill ``rows`` into cache rows ``slots``, whose other live rows hold up to ``live``
        slots; returns the logits of each prompt's last token."""
        m, C, dev = self.manifest, self.manifest.prefill_chunk, self.device
        P = [len(r.prompt) for r in rows]
        first = torch.empty(len(rows), m.model.vocab_size, device=dev)
        chunks = range(0, max(P), C)
        for start in tqdm(chunks, desc="prefill", unit="chunk", disable=not self.show_progress or len(chunks) < 4):
            self._fit(max([live] + [min(p, start + C) for p in P]))
            name = f"prefill@{self.full.slots}"
            positions = (start + torch.arange(C, device=dev))[None]
            for b, (slot, r) in enumerate(zip(slots, rows)):
                seg = r.prompt[start : start + C]
                if not seg:
                    continue
                tokens = torch.tensor([seg + [0] * (C - len(seg))], device=dev)
                ck, cv = self.full.view(slice(slot, slot + 1))
                lengths = torch.tensor([start], device=dev)
                last = torch.tensor([len(seg) - 1], device=dev)
                logits, k, v = self.steps(name, tokens, positions, ck, cv, lengths, last)
                self.full.write(slot, start, k[:, 0, :, : len(seg)], v[:, 0, :, : len(seg)])
                if start + len(seg) == P[b]:
                    first[b] = logits[0]
        if speculate:
            for slot, p in zip(slots, P):
                self.draft.absorb(self.full, slot, 0, p)
        return first

    def _admit(self, slots, rows, sp, speculate, totals: "_Totals", live: int = 0) -> list[int]:
        """Prefill ``rows`` into cache rows ``slots`` and emit their first tokens."""
        t = time.perf_counter()
        first = self._prefill(slots, rows, speculate, live)
        u = self._uniforms(rows, sp, 1)
        nxt, _ = select(first, sp, None if u is None else 1.0 - u[:, 0])
        nxt = nxt.tolist()
        for b, r in enumerate(rows):
            self._push(r, [nxt[b]])
        totals.prefill += time.perf_counter() - t
        return nxt

    def _draft_round(self, gamma: int, sp: SamplingParams, x, L, base, u):
        """``gamma`` draft steps from tokens ``x`` at positions ``L``, writing each draft token's K/V
        into the draft cache's scratch slots ``base + i``. Returns the drafts ``[B, gamma]`` and
        their distributions ``[B, gamma, V]`` (empty when greedy). Tensors only, no host values:
        on CUDA the whole round is one graph."""
        dk, dv = self.draft.view(slice(None))
        drafts, qs = [], []
        for i in range(gamma):
            logits, k, v = self._raw_steps("draft", x[:, None], (L + i)[:, None], dk, dv, base + i)
            self.draft.write_column(base + i, k, v)
            x, q = select(logits[:, 0], sp, None if sp.greedy else 1.0 - u[:, i])
            drafts.append(x)
            qs.append(q if q is not None else logits.new_zeros(0))
        return torch.stack(drafts, dim=1), torch.stack(qs, dim=1)

    def _draft(self, gamma: int, sp: SamplingParams, *inputs):
        """The draft round, replayed as one captured graph per ``(gamma, sp)`` when graphs are on."""
        if not self.cuda_graphs:
            return self._draft_round(gamma, sp, *inputs)
        from .cuda_graphs import replay

        round_ = lambda *a: self._draft_round(gamma, sp, *a)  # noqa: E731
        return replay(self._draft_graphs, (gamma, sp), round_, inputs, pinned=lambda i, t: False)

    def _run(self, rows: list[_Row], sp: SamplingParams, gamma: int | str, totals: "_Totals"):
        """Continuous batching over ``min(len(rows), max_batch)`` slots: the first rows are
        prefilled together; whenever a row finishes and prompts are waiting, the next one is
        prefilled into the freed slot and joins the following round. Finished rows with nobody to
        replace them ride along (static shapes) and are ignored."""
        m, dev = self.manifest, self.device
        auto = gamma == "auto"
        speculate = auto or gamma > 0  # then the draft cache follows every committed token
        B = min(len(rows), m.max_batch)
        pad = _Row(-1, [0], 1, [], None, done=True, reported=True)  # static batch: unused slots ride along
        slots, waiting = list(rows[:B]) + [pad] * (m.max_batch - B), deque(rows[B:])
        nxt = self._admit(range(B), slots[:B], sp, speculate, totals) + [0] * (m.max_batch - B)
        lengths = [len(r.prompt) for r in slots]
        yield from self._events(slots)
        while True:
            for b in range(B):
                while slots[b].done and waiting:  # a new row can finish at its first token
                    slots[b] = waiting.popleft()
                    live = max([n for n, r in zip(lengths, slots) if not r.done and r is not slots[b]], default=0)
                    nxt[b] = self._admit([b], [slots[b]], sp, speculate, totals, live)[0]
                    lengths[b] = len(slots[b].prompt)
                    yield from self._events([slots[b]])
            if all(r.done for r in slots):
                return
            t_round = time.perf_counter()
            # Steady state: every slot holding a request is live (none idles until the batch ends).
            steady, before = all(not r.done for r in slots if r is not pad), sum(len(r.tokens) for r in slots)
            longest = max(n for n, r in zip(lengths, slots) if not r.done)
            g = self.planner.choose(self._bucket(longest + m.max_gamma + 1), sp.greedy) if auto else gamma
            L = torch.tensor(lengths, device=dev)
            x = torch.tensor(nxt, device=dev)
            drafts, qs = None, torch.zeros(m.max_batch, 0, m.model.vocab_size, device=dev)  # g = 0: nothing to accept
            if g:
                u = self._uniforms(slots, sp, g)
                base = torch.tensor([self.draft.valid(n) for n in lengths], device=dev)
                drafts, qs = self._draft(g, sp, x, L, base, torch.zeros(0, device=dev) if u is None else u)
            totals.draft += time.perf_counter() - t_round
            t = time.perf_counter()
            self._fit(longest + g + 1)
            tokens = x[:, None] if drafts is None else torch.cat((x[:, None], drafts), dim=1)
            ck, cv = self.full.view(slice(None))
            positions = L[:, None] + torch.arange(g + 1, device=dev)
            logits, k, v = self.steps(f"verify{g}@{self.full.slots}", tokens, positions, ck, cv, L)
            totals.verify += time.perf_counter() - t
            totals.round(g, self.planner, self.full.slots, sp.greedy)
            u = self._uniforms(slots, sp, g + 1)
            acc, extra = accept(
                tokens[:, 1:],
                None if sp.greedy else qs,
                logits,
                sp,
                None if u is None else u[:, :g],
                None if u is None else 1.0 - u[:, g],
            )
            # The one host synchronisation of the round: what each row accepted.
            acc, extra, tokens = acc.tolist(), extra.tolist(), tokens.tolist()
            live_acc = [a for a, r in zip(acc, slots) if not r.done]
            for b, r in enumerate(slots):
                if r.done:
                    continue
                a = acc[b]
                r.rounds += 1
                r.drafted += g
                r.accepted += a
                r.prefix_hits = _add_prefix(r.prefix_hits, a, g)
                r.reached = _add_prefix(r.reached, g, g)
                self._push(r, tokens[b][1 : a + 1] + [extra[b]])
                if not r.done:
                    self.full.write(b, lengths[b], k[:, b, :, : a + 1], v[:, b, :, : a + 1])
                    if speculate:
                        self.draft.absorb(self.full, b, lengths[b], lengths[b] + a + 1)
                    lengths[b] += a + 1
            nxt = extra
            round_s = time.perf_counter() - t_round
            totals.decode += round_s
            if steady:
                totals.steady += round_s
                totals.steady_tokens += sum(len(r.tokens) for r in slots) - before
            if self.planner:
                self.planner.observe(g, live_acc, sp.greedy, self.full.slots, 1e3 * round_s)
            yield from self._events(slots)

    # ------------------------------------------------------------------ output

    def _push(self, r: _Row, new: list[int]) -> None:
        """Append accepted tokens one by one until the row finishes."""
        eos = self.manifest.eos_token_ids
        for t in new:
            r.tokens.append(t)
            if t in eos:
                r.done, r.reason = True, "eos"
            elif r.stops:
                text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
                hit = min((i for i in (text.find(s) for s in r.stops) if i >= 0), default=-1)
                if hit >= 0:
                    r.text, r.done, r.reason = text[:hit], True, "stop"
            if not r.done and len(r.tokens) >= r.max_new:
                r.done, r.reason = True, "length"
            if r.done:
                break
        if r.reason != "stop":
            r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)

    def _events(self, rows: Sequence[_Row]) -> Iterator[StreamEvent]:
        for r in rows:
            if r.reported:
                continue
            end = _final_text_end(r)
            if r.sent_tokens == len(r.tokens) and end == r.sent_text and not r.done:
                continue
            ev = StreamEvent(r.index, r.tokens[r.sent_tokens :], r.text[r.sent_text : end])
            r.sent_tokens, r.sent_text = len(r.tokens), end
            if r.done:
                r.reported = True
                ev.result = GenerationResult(r.index, r.text, list(r.tokens), len(r.prompt), r.reason, _row_stats(r))
            yield ev


def _add_prefix(counts: list[int], n: int, gamma: int) -> list[int]:
    """``counts`` grown to ``gamma`` positions, its first ``n`` incremented."""
    counts = counts + [0] * (gamma - len(counts))
    return [c + (i < n) for i, c in enumerate(counts)]


def _final_text_end(r: _Row) -> int:
    """How much of the row's text is final: all of it once the row is done; otherwise hold back
    a trailing partial character and any tail that could still grow into a stop string."""
    text = r.text
    if r.done:
        return len(text)
    end = len(text.rstrip("\ufffd"))
    for s in r.stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return max(end, r.sent_text)


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _acceptance(rounds: int, drafted: int, accepted: int, hits: list[int], reached: list[int]) -> dict:
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


def _row_stats(r: _Row) -> dict:
    return _acceptance(r.rounds, r.drafted, r.accepted, r.prefix_hits, r.reached) | {"new_tokens": len(r.tokens)}


@dataclass
class _Totals:
    prefill: float = 0.0
    decode: float = 0.0
    draft: float = 0.0
    verify: float = 0.0
    draft_steps: int = 0  # batch steps, not per row
    verify_steps: int = 0
    steady: float = 0.0  # decoding time of the rounds in which every request's row was live
    steady_tokens: int = 0
    gammas: dict = field(default_factory=dict)  # gamma -> rounds run with it
    # The planner's prediction, summed over rounds: tokens per row, and cost in autoregressive steps.
    predicted_tokens: float = 0.0
    predicted_ar_steps: float = 0.0

    def round(self, gamma: int, planner: Planner | None, bucket: int, greedy: bool) -> None:
        self.verify_steps += 1
        self.draft_steps += gamma
        self.gammas[gamma] = self.gammas.get(gamma, 0) + 1
        if planner:
            self.predicted_tokens += omega(planner.acceptance[mode(greedy)].alphas()[:gamma])
            self.predicted_ar_steps += planner.cost_ms(gamma, bucket, greedy) / planner.cost_ms(0, bucket, greedy)

    def summary(self, rows: Sequence[_Row], gamma) -> dict:
        longest = max((len(r.reached) for r in rows), default=0)
        hits, reached = ([sum(getattr(r, f)[i] for r in rows if len(r.reached) > i) for i in range(longest)]
                         for f in ("prefix_hits", "reached"))
        new = sum(len(r.tokens) for r in rows)
        # The first token of each row comes from prefill, not from the decoding loop.
        decoded = new - len(rows)
        return {
            "gamma": gamma,
            "gamma_rounds": dict(sorted(self.gammas.items())),
            "predicted_speedup": self.predicted_tokens / self.predicted_ar_steps if self.predicted_ar_steps else None,
            "prompts": len(rows),
            "new_tokens": new,
            **_acceptance(sum(r.rounds for r in rows), sum(r.drafted for r in rows), sum(r.accepted for r in rows),
                          hits, reached),
            "prefill_s": self.prefill,
            "decode_s": self.decode,
            "draft_s": self.draft,
            "verify_s": self.verify,
            "rest_s": self.decode - self.draft - self.verify,
            "draft_steps": self.draft_steps,
            "verify_steps": self.verify_steps,
            "decode_tokens_per_s": decoded / self.decode if self.decode > 0 else None,
            # Without the tail where finished rows idle until the batch's last row is done: what
            # a server that refills finished rows would see.
            "steady_s": self.steady,
            "steady_tokens": self.steady_tokens,
            "steady_tokens_per_s": self.steady_tokens / self.steady if self.steady > 0 else None,
        }
