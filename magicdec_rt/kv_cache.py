"""Preallocated KV caches, owned by the runtime. Steps never write here; the runtime does.

Full cache: slot ``p`` of row ``b`` holds the K/V of position ``p``; ``lengths[b]`` are valid.

Draft cache: ``budget`` slots of committed tokens, then ``max_gamma`` scratch slots for the draft
tokens of the round in flight. Two policies fill it (``DraftPolicy``):

* ``streaming`` (StreamingLLM): ``sinks`` slots for the first tokens, then a ring of
  ``budget - sinks`` slots for the most recent committed tokens.
* ``snapkv`` (SnapKV): for a prompt longer than the budget, the sinks, then for each layer and KV
  head the ``budget - sinks - recent`` prompt tokens that the prompt's last ``window`` queries
  attend to most (their attention summed over the window and the head's query group, max-pooled
  over neighbouring positions), then a ring of ``recent`` slots that rolls over the newest tokens
  during decoding. Each head keeps its own positions. The selection stays fixed, as in MagicDec,
  or, with ``reselect``, is made again every ``reselect`` tokens from the newest ``window``
  tokens' attention over everything committed. A prompt within the budget is kept whole and then
  rolls as ``streaming``.

Keys keep their *original* RoPE positions by default: contexts here never exceed the model's
trained length, so the draft's attention is exactly the target's attention restricted to the kept
tokens (whatever slot or head holds them), and the target's K/V can be copied in unchanged after
each verification. An engine built with ``draft_positions="cache"`` uses StreamingLLM's positions
inside the cache instead (``StreamingCache.reposition``: only the slots before the ring move).
Because attention does not care about slot order, the valid slots are always a prefix:
``min(length, budget)`` slots, then the round's draft tokens, so the draft step uses the same
``lengths`` mask as every other step. ``positions`` records which
position each slot holds (-1: none), for tests and inspection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import Transformer, rotate_half


class KVCache:
    """K/V for ``rows`` sequences of up to ``capacity`` tokens, for the KV heads ``model`` holds
    (its shard of them under tensor parallelism).

    Compiled engines read their inputs as dense arrays (AOTInductor silently ignores strides), so
    the cache never hands out strided views: ``k`` and ``v`` are ``[layers, rows, kv_heads, slots,
    head_dim]`` laid out contiguously at the current ``slots`` (the context bucket), inside flat
    buffers sized for ``capacity``. ``resize`` moves the data to another bucket's layout; a layer's
    view (``k[l]``) and a row of it (``k[l, i:i+1]``) are then contiguous as well."""

    def __init__(self, model: Transformer, rows: int, capacity: int, dtype: torch.dtype, device="cpu"):
        self.layers, self.rows, self.heads, self.dim = model.cfg.num_layers, rows, model.kv_heads, model.cfg.head_dim
        self.capacity = capacity
        self._planes = self.layers * rows * self.heads  # one plane: a (layer, row, head)'s slots
        # Zeros, not empty: masked slots still meet V in ``p @ V``, and 0 * NaN would poison rows.
        self._k = torch.zeros(self._planes * capacity * self.dim, dtype=dtype, device=device)
        self._v = torch.zeros_like(self._k)
        self._lay_out(capacity)

    def _lay_out(self, slots: int) -> None:
        shape = (self.layers, self.rows, self.heads, slots, self.dim)
        n = self._planes * slots * self.dim
        self.k, self.v = self._k[:n].view(shape), self._v[:n].view(shape)

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes

    def resize(self, slots: int) -> None:
        """Lay the cache out with ``slots`` slots per row, keeping the first ``min(slots, old)``
        of every row. In place, one layer at a time: growing moves layers last to first and
        shrinking first to last, so a layer's new place only covers data already moved."""
        old = self.slots
        if slots == old:
            return
        if not 1 <= slots <= self.capacity:
            raise ValueError(f"slots {slots} out of range [1, {self.capacity}]")
        keep, per_layer = min(old, slots), self.rows * self.heads
        layers = range(self.layers - 1, -1, -1) if slots > old else range(self.layers)
        for flat in (self._k, self._v):
            src = flat[: self._planes * old * self.dim].view(self.layers, per_layer, old, self.dim)
            dst = flat[: self._planes * slots * self.dim].view(self.layers, per_layer, slots, self.dim)
            for layer in layers:
                dst[layer, :, :keep] = src[layer, :, :keep].clone()
            dst[:, :, keep:] = 0
        self._lay_out(slots)

    def view(self, rows: slice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Step inputs for rows ``rows``: one contiguous ``[rows, kv_heads, slots, head_dim]`` tensor
        per layer (views, no copy)."""
        return [k[rows] for k in self.k], [v[rows] for v in self.v]

    def write(self, row: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v`` of shape [layers, kv_heads, n, head_dim] into slots [slot, slot+n)."""
        n = k.shape[2]
        self.k[:, row, :, slot : slot + n] = k
        self.v[:, row, :, slot : slot + n] = v

    def write_rows(self, spans: list[tuple[int, int, int]], k: torch.Tensor, v: torch.Tensor,
                   first: list[int] | None = None) -> None:
        """For each ``(row, slot, n)`` of ``spans``, write ``n`` tokens of batch row ``row`` of ``k, v``
        [layers, rows, kv_heads, T, head_dim], from its column ``first[i]`` (default 0), into slots
        [slot, slot+n): one gather and one scatter for all rows (a verify round's accepted tokens)."""
        first = first or [0] * len(spans)
        rows = [r for r, _, n in spans for _ in range(n)]
        cols = [f + j for (_, _, n), f in zip(spans, first) for j in range(n)]
        slots = [slot + j for _, slot, n in spans for j in range(n)]
        if rows:
            rows, cols, slots = (torch.tensor(x, device=self.k.device) for x in (rows, cols, slots))
            self.k[:, rows, :, slots] = k[:, rows, :, cols].to(self.k.dtype)
            self.v[:, rows, :, slots] = v[:, rows, :, cols].to(self.v.dtype)

    def write_column(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per row, ``k, v`` of shape [layers, rows, kv_heads, 1, head_dim], row
        ``b`` into slot ``slots[b]``: one operation for the whole batch, no host values."""
        rows = torch.arange(self.rows, device=slots.device)
        self.k[:, rows, :, slots] = k[:, :, :, 0].transpose(0, 1).to(self.k.dtype)
        self.v[:, rows, :, slots] = v[:, :, :, 0].transpose(0, 1).to(self.v.dtype)


@dataclass(frozen=True)
class DraftPolicy:
    # SnapKV by default: its acceptance led StreamingLLM's at 2k, 4k and 7.5k context (B8, budget
    # 256, greedy, 128 tokens: 0.82-0.84 / 0.78-0.81 / 0.82 against 0.78 / 0.78 / 0.79); window and
    # ring measured best of 8-64 x 32-192; pooling 7 against 3 a tie over four cells (0.792 / 0.789),
    # so SnapKV's usual 7 stays (bench/results/draft-policies).
    kind: str = "snapkv"  # or "streaming", or "auto" (the planner picks one per round)
    window: int = 16  # snapkv: the last prompt tokens whose attention scores the rest
    recent: int | None = None  # snapkv: ring slots for the newest tokens (None: half the budget)
    pool: int = 7  # snapkv: max-pooling width over neighbouring positions
    reselect: int = 0  # snapkv: select again from the newest `window` tokens every this many tokens (0: never)

    KINDS = ("streaming", "snapkv", "auto")  # auto: both caches kept, the planner picks per round

    def ring(self, budget: int) -> int:
        """snapkv: the recent ring's slots at this budget."""
        return budget // 2 if self.recent is None else self.recent

    def check(self, sinks: int, budget: int) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"draft policy {self.kind!r} is not one of {', '.join(self.KINDS)}")
        recent = self.ring(budget)
        if self.kind in ("snapkv", "auto") and not (1 <= recent and sinks + recent < budget and 1 <= self.window
                                          and self.pool >= 1 and self.pool % 2 and self.reselect >= 0):
            raise ValueError(f"snapkv needs window >= 1, an odd pool >= 1, reselect >= 0 and recent >= 1 with "
                             f"sinks + recent < budget ({sinks} + {recent} vs {budget})")


def snap_select(scores: torch.Tensor, sinks: int, keep: int, recent: int, pool: int) -> torch.Tensor:
    """SnapKV's choice from ``scores [..., P]`` (attention of the observation window to each prompt
    position): the ``keep`` positions in ``[sinks, P - recent)`` with the highest max-pooled score,
    ascending ``[..., keep]``."""
    cand = scores[..., sinks : scores.shape[-1] - recent].float()
    flat = cand.reshape(-1, 1, cand.shape[-1])
    pooled = F.max_pool1d(flat, pool, stride=1, padding=pool // 2).reshape(cand.shape)
    return pooled.topk(keep, dim=-1).indices.sort(dim=-1).values + sinks


class StreamingCache(KVCache):
    def __init__(self, model: Transformer, rows: int, sinks: int, budget: int, max_gamma: int, dtype, device="cpu",
                 policy: DraftPolicy = DraftPolicy()):
        super().__init__(model, rows, budget + max_gamma, dtype, device)
        policy.check(sinks, budget)
        self.sinks, self.budget, self.policy = sinks, budget, policy
        # Per row: the first slot of its ring (``sinks`` until a SnapKV selection puts the selected
        # tokens before it).
        self.ring_start = [sinks] * rows
        self.selected_at = [None] * rows  # length at the row's last SnapKV selection (None: never)
        self.positions = torch.full((self.layers, rows, self.heads, budget), -1, dtype=torch.long)

    def valid(self, length: int) -> int:
        """Slots holding committed tokens when ``length`` tokens are committed."""
        return min(length, self.budget)

    def _ring_slot(self, ring_start, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each position past the sinks: its place in the ring that starts at
        ``ring_start`` (an int, or one per position)."""
        s, w = ring_start, self.budget
        return torch.where(positions < w, positions, s + (positions - s) % (w - s))

    def _put(self, full: KVCache, rows, slots: torch.Tensor, pos: torch.Tensor) -> None:
        """Slots ``slots`` take the full cache's positions ``pos``: of ``rows`` (an int, or one row per
        position) when both are ``[n]``; of the one row ``rows`` when both are ``[layers, heads, n]``
        (a per-head choice)."""
        if pos.dim() == 1:
            rows = torch.as_tensor(rows).expand(pos.shape)
            r, sl, p = (x.to(self.k.device) for x in (rows, slots, pos))
            for dst, src in ((self.k, full.k), (self.v, full.v)):
                dst[:, r, :, sl] = src[:, r, :, p]
            self.positions[:, rows, :, slots] = pos.cpu()[:, None, None]
            return
        idx = pos.to(self.k.device)[..., None].expand(-1, -1, -1, self.dim)
        for dst, src in ((self.k, full.k), (self.v, full.v)):
            dst[:, rows, :, slots] = src[:, rows].gather(2, idx)
        self.positions[:, rows, :, slots] = pos.cpu()

    def absorb(self, full: KVCache, spans: list[tuple[int, int, int]]) -> None:
        """For each ``(row, start, end)`` of ``spans``, copy the committed positions [start, end) of
        ``row`` from the full cache, keeping only those that survive (sinks and the newest ring's
        worth), so no ring slot is written twice; one copy for all rows. ``start == 0`` starts the
        row afresh (a new request in the slot)."""
        rows, ring, pos = [], [], []
        for row, start, end in spans:
            if start == 0:
                self.ring_start[row], self.selected_at[row] = self.sinks, None
                self.positions[:, row] = -1
            s = self.ring_start[row]
            window_start = max(s, end - (self.budget - s))
            kept = [*range(start, min(end, self.sinks)), *range(max(start, window_start), end)]
            rows += [row] * len(kept)
            ring += [s] * len(kept)
            pos += kept
        if pos:
            pos = torch.tensor(pos)
            self._put(full, torch.tensor(rows), self._ring_slot(torch.tensor(ring), pos), pos)

    def reposition(self, full: KVCache, rows: list[int], lengths: list[int], inv_freq: torch.Tensor) -> None:
        """StreamingLLM's positions for ``rows`` holding ``lengths`` committed tokens: the slots
        before a row's ring (sinks, SnapKV's selection) take the positions just before the ring's
        oldest token, slot j at ``length - budget + j``, as if the cache were the whole text. The
        ring keeps its tokens' own positions: it is contiguous and ends at the query, so their
        distances to the query are StreamingLLM's already (RoPE sees only distances). Keys are
        rotated from the full cache's (post-RoPE at the original position) by the difference, each
        round afresh, so no rounding accumulates. A row not past its budget keeps everything: its
        slots already are its positions."""
        for row, length in zip(rows, lengths):
            n, shift = self.ring_start[row], length - self.budget
            if shift <= 0:
                continue
            pos = self.positions[:, row, :, :n]  # [layers, heads, n]
            delta = (shift + torch.arange(n) - pos).to(self.k.device, torch.float32)
            k = full.k[:, row].gather(2, pos.to(self.k.device)[..., None].expand(-1, -1, -1, self.dim)).float()
            angle = delta[..., None] * inv_freq.to(self.k.device)
            cos, sin = angle.cos().repeat(1, 1, 1, 2), angle.sin().repeat(1, 1, 1, 2)
            self.k[:, row, :, :n] = (k * cos + rotate_half(k) * sin).to(self.k.dtype)

    def due(self, row: int, length: int) -> bool:
        """Whether ``row``, now ``length`` tokens long, is due for a new SnapKV selection."""
        at, every = self.selected_at[row], self.policy.reselect
        return at is not None and every > 0 and length - at >= every

    def select(self, full: KVCache, row: int, length: int, scores: torch.Tensor) -> None:
        """Fill ``row`` holding ``length`` > budget committed tokens by SnapKV, from the
        observation window's ``scores [layers, heads, length]``."""
        p, s = self.policy, self.sinks
        ring = p.ring(self.budget)
        keep = self.budget - s - ring
        self.positions[:, row] = -1
        self._put(full, row, torch.arange(s), torch.arange(s))
        chosen = snap_select(scores, s, keep, ring, p.pool)
        self._put(full, row, torch.arange(s, s + keep), chosen)
        self.ring_start[row], self.selected_at[row] = s + keep, length
        recent = torch.arange(length - ring, length)
        self._put(full, row, self._ring_slot(self.ring_start[row], recent), recent)
