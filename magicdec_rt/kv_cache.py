"""Preallocated KV caches, owned by the runtime. Steps never write here; the runtime does.

Full cache: slot ``p`` of row ``b`` holds the K/V of position ``p``; ``lengths[b]`` are valid.

Draft cache (StreamingLLM): ``sinks`` slots for the first tokens, then a ring of
``budget - sinks`` slots for the most recent committed tokens, then ``max_gamma`` scratch slots
for the draft tokens of the round in flight. Keys keep their *original* RoPE positions: contexts
here never exceed the model's trained length, so the draft's attention is exactly the target's
attention restricted to the kept tokens, and the target's K/V can be copied in unchanged after each
verification (re-indexing positions inside the cache, as StreamingLLM does to run past the trained
length, would mean re-rotating every key on every copy). Because attention does not care about slot
order, the valid slots are always a prefix: ``min(length, budget)`` ring slots, then the round's
draft tokens, so the draft step uses the same ``lengths`` mask as every other step.
"""

from __future__ import annotations

import torch

from .model import Transformer


class KVCache:
    """K/V for ``rows`` sequences of up to ``slots`` tokens, for the KV heads ``model`` holds (its
    shard of them under tensor parallelism)."""

    def __init__(self, model: Transformer, rows: int, slots: int, dtype: torch.dtype):
        shape = (model.cfg.num_layers, rows, model.kv_heads, slots, model.cfg.head_dim)
        # Zeros, not empty: masked slots still meet V in ``p @ V``, and 0 * NaN would poison rows.
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @property
    def slots(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def view(self, rows: slice, slots: int | None = None):
        """Rows ``rows`` and the first ``slots`` slots, as step inputs (a view, no copy)."""
        s = self.slots if slots is None else slots
        return self.k[:, rows, :, :s], self.v[:, rows, :, :s]

    def write(self, row: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v`` of shape [layers, kv_heads, n, head_dim] into slots [slot, slot+n)."""
        n = k.shape[2]
        self.k[:, row, :, slot : slot + n] = k
        self.v[:, row, :, slot : slot + n] = v


class StreamingCache(KVCache):
    def __init__(self, model: Transformer, rows: int, sinks: int, budget: int, max_gamma: int, dtype):
        super().__init__(model, rows, budget + max_gamma, dtype)
        self.sinks, self.budget = sinks, budget

    def valid(self, length: int) -> int:
        """Ring slots holding committed tokens when ``length`` tokens are committed."""
        return min(length, self.budget)

    def ring_slot(self, positions: torch.Tensor) -> torch.Tensor:
        s, w = self.sinks, self.budget
        return torch.where(positions < w, positions, s + (positions - s) % (w - s))

    def absorb(self, full: KVCache, row: int, start: int, end: int) -> None:
        """Copy the committed positions [start, end) of ``row`` from the full cache, keeping only
        those that survive (sinks and the most recent ``budget - sinks``), so no ring slot is
        written twice."""
        window_start = max(self.sinks, end - (self.budget - self.sinks))
        pos = torch.arange(start, end)
        pos = pos[(pos < self.sinks) | (pos >= window_start)]
        if pos.numel() == 0:
            return
        slots = self.ring_slot(pos)
        self.k[:, row].index_copy_(2, slots, full.k[:, row].index_select(2, pos))
        self.v[:, row].index_copy_(2, slots, full.v[:, row].index_select(2, pos))
