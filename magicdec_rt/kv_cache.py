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

    def write_column(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per row, ``k, v`` of shape [layers, rows, kv_heads, 1, head_dim], row
        ``b`` into slot ``slots[b]``: one operation for the whole batch, no host values."""
        rows = torch.arange(self.rows, device=slots.device)
        self.k[:, rows, :, slots] = k[:, :, :, 0].transpose(0, 1)
        self.v[:, rows, :, slots] = v[:, :, :, 0].transpose(0, 1)


class StreamingCache(KVCache):
    def __init__(self, model: Transformer, rows: int, sinks: int, budget: int, max_gamma: int, dtype, device="cpu"):
        super().__init__(model, rows, budget + max_gamma, dtype, device)
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
        pos = torch.arange(start, end, device=self.k.device)
        pos = pos[(pos < self.sinks) | (pos >= window_start)]
        if pos.numel() == 0:
            return
        slots = self.ring_slot(pos)
        self.k[:, row].index_copy_(2, slots, full.k[:, row].index_select(2, pos))
        self.v[:, row].index_copy_(2, slots, full.v[:, row].index_select(2, pos))
