"""The engine core: one loop that owns the slots, the caches, the planner and the MagicDec rounds.

The engine's steps have a static batch of ``max_batch`` rows: each row of the preallocated caches
is a slot that holds one request at a time. ``EngineCore.step`` is one turn of the loop:

1. End requests that were cancelled or passed their deadline; their slots are free at once.
2. Admit waiting requests into free slots (first come, first served).
3. Prefill: requests prefill one chunk (``prefill_chunk`` tokens, one row per call) at a time,
   oldest first. With decoding rows present at most ``chunks_per_round`` chunks run per turn, so a
   live row waits at most that many chunks between rounds (None: prefill everything admitted
   before decoding, the best throughput for a batch job). A request whose prompt is in gets its
   first token from the last prompt position, and its sinks and recent window are copied into the
   draft cache.
4. One decoding round over the live rows: ``gamma`` draft steps (``[B, 1]`` over the draft
   cache), one verify step (``[B, gamma+1]`` over the full cache), then accept/reject per row
   (``sampling.RowRules``): row ``b`` keeps ``a_b`` drafts plus one token, its target K/V go into
   both caches, and its length advances by ``a_b + 1``. Acceptance is ragged; rows still in
   prefill or free ride along (static shapes) and nothing of theirs is kept.

Before every full-cache step the cache is laid out at the smallest context bucket that holds every
occupied row and the tokens about to be written, so a step's cost follows the actual context.
``gamma = 0`` is plain autoregressive decoding, the baseline; ``gamma = "auto"`` lets the planner
(``planner.py``) choose gamma every round, 0 included.

The core is single-threaded: ``add`` and ``step`` run on one thread (the front ends in
``runtime.py`` and ``service.py`` own that thread); only ``Request.cancel`` may come from another.
Events go to each request's ``sink`` as tokens are accepted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .kv_cache import DraftPolicy, KVCache, StreamingCache
from .planner import Planner, mode, omega
from .requests import Request, acceptance
from .sampling import RowRules, noise


class EngineCore:
    def __init__(self, manifest, steps, tokenizer, planner: Planner | None, gamma, cuda_graphs: bool = False,
                 chunks_per_round: int | None = None, show_progress: bool = False, policy=DraftPolicy(),
                 draft_steps=None):
        self.manifest, self.tokenizer, self.planner = manifest, tokenizer, planner
        self.gamma, self.chunks_per_round, self.show_progress = gamma, chunks_per_round, show_progress
        # The drafter: the target itself over its sparse cache, or a standalone draft model, which
        # then keeps its own full cache (its prompt K/V, and the K/V it drafted for committed
        # tokens) for the policy to select from, as the target's serves self-speculation.
        self.standalone = draft_steps is not None
        self._raw_draft_steps = draft_steps or steps  # a draft round on CUDA is captured whole, its steps inside it
        self._draft_graphs, self.cuda_graphs = {}, cuda_graphs
        if cuda_graphs:
            from .cuda_graphs import GraphedSteps

            steps = GraphedSteps(steps)
            draft_steps = draft_steps and GraphedSteps(draft_steps)
        self.steps, self.device = steps, steps.device
        self.draft_steps = draft_steps or steps
        m, dt = manifest, manifest.kv_torch_dtype
        self.full = KVCache(steps.model, m.max_batch, m.max_seq_len, dt, self.device)
        drafter = self.draft_steps.model
        self._draft_full = KVCache(drafter, m.max_batch, m.max_seq_len, dt, self.device) if self.standalone else None
        # One draft cache per policy: "auto" keeps both, and the planner picks the one to draft with
        # each round (SnapKV until then: it led wherever measured).
        kinds = ("snapkv", "streaming") if policy.kind == "auto" else (policy.kind,)
        scratch = m.draft_slots - m.draft_budget
        self.drafts = {k: StreamingCache(drafter, m.max_batch, m.draft_sinks, m.draft_budget, scratch, dt, self.device,
                                         replace(policy, kind=k)) for k in kinds}
        self.drafting = kinds[0]
        self.slots: list[Request | None] = [None] * m.max_batch
        self.lengths = [0] * m.max_batch  # cache slots holding the row's tokens
        self.nxt = [0] * m.max_batch  # a live row's newest token, not yet in the cache
        self.filling: deque[int] = deque()  # slots in prefill, oldest first
        self.waiting: deque[Request] = deque()
        self.totals = Totals()
        self.observer = None  # called with a dict after every prefill chunk and round (metrics)
        self._bar = None
        # Per row, the committed positions [start, end) rounds without drafts have not yet copied
        # into the draft caches (see _catch_up).
        self._behind: dict[int, tuple[int, int]] = {}

    # ------------------------------------------------------------------ requests

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def draft(self) -> StreamingCache:
        """The draft cache that drafts this round."""
        return self.drafts[self.drafting]

    @property
    def draft_full(self) -> KVCache:
        """The full cache the draft cache is filled from: the drafter's own, or the target's."""
        return self._draft_full if self.standalone else self.full

    @property
    def speculate(self) -> bool:
        """Whether the draft cache follows committed tokens (it must whenever gamma can be > 0)."""
        return self.gamma != 0

    def live(self) -> list[int]:
        return [b for b, r in enumerate(self.slots) if r is not None and b not in self.filling]

    def step(self) -> None:
        """One turn: expire, admit, prefill (within the chunk budget), one decoding round."""
        self._expire()
        for b, r in enumerate(self.slots):
            if r is None and self.waiting:
                self.slots[b], self.lengths[b] = self.waiting.popleft(), 0
                self.filling.append(b)
        budget = self.chunks_per_round
        while self.filling and (budget is None or budget > 0 or not self.live()):
            self._prefill_chunk()
            budget = None if budget is None else budget - 1
        if self._bar is not None and not self.filling:
            self._bar.close()
            self._bar = None
        if self.live():
            self._round()

    def _expire(self) -> None:
        now = time.monotonic()
        for r in [*self.waiting, *(r for r in self.slots if r is not None)]:
            if r.cancelled or (r.deadline is not None and now >= r.deadline):
                r.finish("cancelled" if r.cancelled else "deadline")
                self._emit(r)
        self.waiting = deque(r for r in self.waiting if not r.done)

    def _emit(self, r: Request) -> None:
        ev = r.event()
        if ev is not None and r.sink is not None:
            r.sink(ev)
        if r.done and r in self.slots:
            b = self.slots.index(r)
            self.slots[b] = None
            self._behind.pop(b, None)
            if b in self.filling:
                self.filling.remove(b)

    # ------------------------------------------------------------------ prefill

    def _bucket(self, slots: int) -> int:
        return self.manifest.bucket(min(max(slots, 1), self.manifest.max_seq_len))

    def _held(self) -> list[int]:
        """Cache slots each occupied row holds."""
        return [n for n, r in zip(self.lengths, self.slots) if r is not None] or [0]

    def fit(self, slots: int) -> None:
        """Lay the full cache out at the smallest bucket holding ``slots`` slots and every
        occupied row's tokens (a smaller layout would drop them)."""
        self.full.resize(self._bucket(max(slots, *self._held())))
        if self.standalone:
            self.draft_full.resize(self.full.slots)

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest prefilling request; its first token once its prompt is in."""
        t = time.perf_counter()
        C, dev = self.manifest.prefill_chunk, self.device
        b = self.filling[0]
        r, start = self.slots[b], self.lengths[b]
        seg = r.prompt[start : start + C]
        if self.show_progress and self._bar is None:
            self._bar = tqdm(desc="prefill", unit="chunk", leave=False)
        if self._bar is not None:
            self._bar.total = (self._bar.total or 0) + (-(-len(r.prompt) // C) if start == 0 else 0)
            self._bar.update()
        self.fit(start + len(seg))
        tokens = torch.tensor([seg + [0] * (C - len(seg))], device=dev)
        positions = (start + torch.arange(C, device=dev))[None]
        ck, cv = self.full.view(slice(b, b + 1))
        logits, k, v = self.steps(f"prefill@{self.full.slots}", tokens, positions, ck, cv,
                                  torch.tensor([start], device=dev), torch.tensor([len(seg) - 1], device=dev))
        self.full.write(b, start, k[:, 0, :, : len(seg)], v[:, 0, :, : len(seg)])
        if self.standalone and self.speculate:
            ck, cv = self.draft_full.view(slice(b, b + 1))
            _, k, v = self.draft_steps(f"prefill@{self.full.slots}", tokens, positions, ck, cv,
                                       torch.tensor([start], device=dev), torch.tensor([len(seg) - 1], device=dev))
            self.draft_full.write(b, start, k[:, 0, :, : len(seg)], v[:, 0, :, : len(seg)])
        self.lengths[b] = start + len(seg)
        if self.lengths[b] == len(r.prompt):
            self._prompt_done(b, logits.reshape(1, -1))
        self.totals.prefill += time.perf_counter() - t
        if self.observer:
            self.observer({"kind": "prefill", "seconds": time.perf_counter() - t})

    def _prompt_done(self, b: int, logits: torch.Tensor) -> None:
        """Row ``b``'s prompt is in the full cache: fill its draft cache and take its first token
        from the last prompt position's ``logits [1, V]``."""
        r = self.slots[b]
        self.filling.remove(b)
        if self.speculate:
            self._fill_draft(b, r.prompt)
        rules = RowRules([r.rule], self.device)
        e = noise(r.seed, len(r.prompt), self.manifest.model.vocab_size)[None] if rules.groups[0][1] else None
        token, _ = rules.select(logits, e, r.uniforms(1))
        self.nxt[b] = int(token[0])
        r.push([self.nxt[b]], self.tokenizer, self.manifest.eos_token_ids)
        self._emit(r)

    def _fill_draft(self, b: int, prompt: list[int]) -> None:
        """The draft caches of a freshly prefilled row, each by its policy."""
        for cache in self.drafts.values():
            if cache.policy.kind != "snapkv" or len(prompt) <= cache.budget:
                cache.absorb(self.draft_full, [(b, 0, len(prompt))])
            else:
                self._snap(cache, b, prompt)

    def _snap(self, cache: StreamingCache, b: int, tokens: list[int]) -> None:
        """SnapKV selection for row ``b`` holding ``tokens`` (all committed, all in the drafter's
        full cache): the newest ``window`` tokens re-run by the drafter over the cache of those
        before them, and their attention decides."""
        L, dev = len(tokens), self.device
        w = min(cache.policy.window, L)
        ck, cv = self.draft_full.view(slice(b, b + 1))
        S = self.draft_full.slots
        scores = self.draft_steps(f"observe@{S}", torch.tensor([tokens[L - w :]], device=dev),
                                  torch.arange(L - w, L, device=dev)[None], ck, cv, torch.tensor([L - w], device=dev))
        cache.select(self.draft_full, b, L, torch.cat((scores[:, 0, :, : L - w], scores[:, 0, :, S:]), dim=-1))

    # ------------------------------------------------------------------ decoding

    def _randomness(self, live: list[int], g: int):
        """This round's noise ``[B, g+1, V]`` for live seeded rows (positions ``length + 1 + i``)
        and uniforms ``[B, 2g+1]`` for live unseeded ones (g to draw the drafts, then g to accept
        them and one for the extra token: every decision its own), or None where no row needs them.
        Rows not live draw nothing."""
        B, V = self.manifest.max_batch, self.manifest.model.vocab_size
        seeded = [b for b in live if self.slots[b].rule[1]]
        e = None
        if seeded:
            e = torch.empty(B, g + 1, V, dtype=torch.float64)
            for b in seeded:
                r, L = self.slots[b], self.lengths[b]
                e[b] = torch.stack([noise(r.seed, L + 1 + i, V) for i in range(g + 1)])
            e = e.to(self.device)
        u = None
        if any(self.slots[b].gen is not None for b in live):
            u = torch.stack([self.slots[b].uniforms(2 * g + 1) if b in live else torch.zeros(2 * g + 1)
                             for b in range(B)]).to(self.device)
        return e, u

    def _draft_round(self, gamma: int, rules: RowRules, x, L, base, e, u):
        """``gamma`` draft steps from tokens ``x`` at positions ``L``, writing each draft token's K/V
        into the draft cache's scratch slots ``base + i``. Returns the drafts ``[B, gamma]`` and
        the distributions unseeded rows drew them from (``[B, gamma, V]``; empty when there are
        none). Tensors only (empty ones for absent noise ``e`` or uniforms ``u``), no host values:
        on CUDA the whole round is one graph. A standalone draft model also runs its last draft, for
        that token's K/V (kept should every draft be accepted)."""
        dk, dv = self.draft.view(slice(None))
        drafts, qs = [], []
        for i in range(gamma + self.standalone):
            logits, k, v = self._raw_draft_steps("draft", x[:, None], (L + i)[:, None], dk, dv, base + i)
            self.draft.write_column(base + i, k, v)
            if i == gamma:
                break
            x, q = rules.select(logits[:, 0], e[:, i] if e.numel() else None, u[:, i] if u.numel() else None)
            drafts.append(x)
            qs.append(q)
        if not drafts:
            return x.new_zeros(0), x.new_zeros(0)
        return torch.stack(drafts, dim=1), x.new_zeros(0) if qs[0] is None else torch.stack(qs, dim=1)

    def _draft(self, gamma: int, rules: RowRules, *inputs):
        """The draft round, replayed as one captured graph per ``(gamma, groups)`` when graphs are
        on (not yet run on a GPU)."""
        if not self.cuda_graphs:
            return self._draft_round(gamma, rules, *inputs)
        from .cuda_graphs import replay

        key = (gamma, rules.key, self.drafting)
        round_ = lambda *a: self._draft_round(gamma, rules, *a)  # noqa: E731
        return replay(self._draft_graphs, key, round_, inputs, pinned=lambda i, t: False)

    def _catch_up(self) -> None:
        """Copy into the draft caches what rounds without drafts committed, one copy for all rows.
        Such a round (the planner's gamma 0) leaves it behind: at B16 x 1k the copy took ~0.9 ms of
        a ~23 ms round, 4% that gamma 0 would otherwise lose to plain decoding. Deferred, a row's
        copies merge into one (only sinks and the newest ring's worth survive, as absorbing them
        one round at a time leaves them)."""
        if self._behind:
            spans = [(b, start, end) for b, (start, end) in self._behind.items()]
            for cache in self.drafts.values():
                cache.absorb(self.draft_full, spans)
            self._behind.clear()

    def _round(self) -> None:
        t_round = time.perf_counter()
        m, dev, totals = self.manifest, self.device, self.totals
        live = self.live()
        # Rows that are not live follow the live rows' rule when they all share one, so a
        # homogeneous batch has one set of groups (one captured draft graph per gamma on CUDA).
        kinds = {self.slots[b].rule for b in live}
        fill = next(iter(kinds)) if len(kinds) == 1 else None
        rules = RowRules([self.slots[b].rule if b in live else fill for b in range(m.max_batch)], dev)
        longest = max(self.lengths[b] for b in live)
        steady = len(live) == totals.target_rows and not self.filling
        before = sum(len(self.slots[b].tokens) for b in live)
        g = self.gamma
        if g == "auto":
            # Each gamma at the bucket its round would run at (fit below).
            buckets = {g: self._bucket(max(longest + g + 1, *self._held())) for g in self.planner.gammas}
            g = self.planner.choose(buckets, rules.greedy)
            self.drafting = self.planner.policy if self.planner.policy in self.drafts else self.drafting
        e, u = self._randomness(live, g)
        L = torch.tensor(self.lengths, device=dev)
        x = torch.tensor(self.nxt, device=dev)
        # gamma = 0: nothing to accept
        drafts = torch.zeros(m.max_batch, 0, dtype=torch.long, device=dev)
        qs = torch.zeros(m.max_batch, 0, m.model.vocab_size, device=dev)
        if g or (self.standalone and self.speculate):
            self._catch_up()
        if g and m.draft_positions == "cache":
            self.draft.reposition(self.draft_full, live, [self.lengths[b] for b in live],
                                  self.draft_steps.model.inv_freq)
        # A standalone drafter runs even at gamma = 0, for the K/V of the token about to be committed.
        if g or (self.standalone and self.speculate):
            bases = [self.draft.valid(n) for n in self.lengths]
            none = x.new_zeros(0)
            d, q = self._draft(g, rules, x, L, torch.tensor(bases, device=dev), none if e is None else e,
                               none if u is None else u)
            if g:
                drafts, qs = d, q
        totals.draft += time.perf_counter() - t_round
        t = time.perf_counter()
        self.fit(longest + g + 1)
        tokens = torch.cat((x[:, None], drafts), dim=1)
        ck, cv = self.full.view(slice(None))
        logits, k, v = self.steps(f"verify{g}@{self.full.slots}", tokens, L[:, None] + torch.arange(g + 1, device=dev),
                                  ck, cv, L)
        totals.verify += time.perf_counter() - t
        verify_s = time.perf_counter() - t
        totals.round(g, self.planner, self.full.slots, rules.greedy, self.drafting)
        acc, extra = rules.accept(drafts, qs, logits, e, None if u is None else u[:, g : 2 * g],
                                  None if u is None else u[:, 2 * g])
        # The one host synchronisation of the round: what each row accepted.
        acc, extra, tokens = acc.tolist(), extra.tolist(), tokens.tolist()
        by_mode = {"greedy": [], "sampled": []}
        spans = []  # (row, first slot, tokens): what each continuing row commits
        for b in live:
            r, a = self.slots[b], acc[b]
            by_mode[mode(r.params.greedy)].append(a)
            r.observe(g, a)
            r.push(tokens[b][1 : a + 1] + [extra[b]], self.tokenizer, m.eos_token_ids)
            if not r.done:
                spans.append((b, self.lengths[b], a + 1))
        # One copy per cache for all rows: per-row copies (about ten small ops each) added ~1 ms to
        # every round at batch 8, 4% of a 2k-context step.
        self.full.write_rows(spans, k, v)
        if self.standalone and self.speculate:  # the drafter's own K/V of the committed tokens, from its scratch
            self.draft_full.write_rows(spans, self.draft.k, self.draft.v, [bases[b] for b, _, _ in spans])
        if self.speculate:
            for b, start, n in spans:
                first = self._behind.get(b, (start, start))[0]
                self._behind[b] = (first, start + n)
            if g:  # the next round most likely drafts too
                self._catch_up()
        for b, start, n in spans:
            self.lengths[b] = start + n
            self.nxt[b] = extra[b]
            for cache in self.drafts.values() if self.speculate else ():
                if cache.due(b, self.lengths[b]):
                    self._snap(cache, b, (self.slots[b].prompt + self.slots[b].tokens)[: self.lengths[b]])
        round_s = time.perf_counter() - t_round
        totals.decode += round_s
        if steady:
            totals.steady += round_s
            totals.steady_tokens += sum(len(self.slots[b].tokens) for b in live) - before
        if self.planner:
            for name, accepted in by_mode.items():
                self.planner.learn(g, accepted, name == "greedy")
            self.planner.timed(g, rules.greedy, self.full.slots, 1e3 * round_s)
        for b in live:
            self._emit(self.slots[b])
        if self.observer:
            self.observer({"kind": "round", "gamma": g, "seconds": round_s, "verify_seconds": verify_s,
                           "live": len(live), "drafted": g * len(live), "accepted": sum(acc[b] for b in live)})


@dataclass
class Totals:
    """Counts and times of a run of the core, for ``Runtime.last_stats``."""

    target_rows: int = 0  # a round is steady when this many rows are live (every request's row)
    prefill: float = 0.0
    decode: float = 0.0
    draft: float = 0.0
    verify: float = 0.0
    draft_steps: int = 0  # batch steps, not per row
    verify_steps: int = 0
    steady: float = 0.0  # decoding time of the steady rounds
    steady_tokens: int = 0
    gammas: dict = field(default_factory=dict)  # gamma -> rounds run with it
    policies: dict = field(default_factory=dict)  # draft policy -> rounds that drafted with it
    # The planner's prediction, summed over rounds: tokens per row, and cost in autoregressive steps.
    predicted_tokens: float = 0.0
    predicted_ar_steps: float = 0.0

    def round(self, gamma: int, planner: Planner | None, bucket: int, greedy: bool, policy: str) -> None:
        self.verify_steps += 1
        self.draft_steps += gamma
        self.gammas[gamma] = self.gammas.get(gamma, 0) + 1
        if gamma:
            self.policies[policy] = self.policies.get(policy, 0) + 1
        if planner:
            self.predicted_tokens += omega(planner.acceptance[mode(greedy)].alphas()[:gamma])
            self.predicted_ar_steps += planner.cost_ms(gamma, bucket, greedy) / planner.cost_ms(0, bucket, greedy)

    def summary(self, requests: list[Request], gamma) -> dict:
        longest = max((len(r.reached) for r in requests), default=0)
        hits, reached = ([sum(getattr(r, f)[i] for r in requests if len(r.reached) > i) for i in range(longest)]
                         for f in ("prefix_hits", "reached"))
        new = sum(len(r.tokens) for r in requests)
        # The first token of each request comes from prefill, not from the decoding loop.
        decoded = new - sum(1 for r in requests if r.tokens)
        return {
            "gamma": gamma,
            "gamma_rounds": dict(sorted(self.gammas.items())),
            "policy_rounds": dict(sorted(self.policies.items())),
            "predicted_speedup": self.predicted_tokens / self.predicted_ar_steps if self.predicted_ar_steps else None,
            "prompts": len(requests),
            "new_tokens": new,
            **acceptance(sum(r.rounds for r in requests), sum(r.drafted for r in requests),
                         sum(r.accepted for r in requests), hits, reached),
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
