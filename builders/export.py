"""Export the steps with ``torch.export`` at static shapes: the graphs compiled backends consume.

Step names: ``prefill@{bucket}``, a prefill chunk over ``bucket`` full-cache slots; ``draft``,
``[B, 1]`` over the draft cache (``budget + max_gamma`` slots, the same for every gamma); and
``verify{gamma}@{bucket}``, ``[B, gamma + 1]`` over ``bucket`` full-cache slots.
"""

from __future__ import annotations

import torch

from magicdec_rt.engine import Manifest
from magicdec_rt.kv_cache import KVCache
from magicdec_rt.model import DecodeStep, PrefillStep, Transformer


def step_inputs(model: Transformer, manifest: Manifest, name: str) -> tuple:
    """Example inputs of the step ``name``; any values of these shapes and dtypes are valid."""
    B = manifest.max_batch
    kind, _, bucket = name.partition("@")
    if kind == "prefill":
        T, slots = manifest.prefill_chunk, int(bucket)
    elif kind == "draft":
        T, slots = 1, manifest.draft_budget + manifest.max_gamma
    elif kind.startswith("verify"):
        T, slots = int(kind.removeprefix("verify")) + 1, int(bucket)
    else:
        raise ValueError(f"unknown step {name!r}")
    tokens = torch.zeros(B, T, dtype=torch.long)
    positions = torch.arange(T).expand(B, T).contiguous()
    cache = KVCache(model, manifest.max_batch, slots, manifest.torch_dtype)
    ck, cv = cache.k, cache.v
    lengths = torch.zeros(B, dtype=torch.long)
    if kind == "prefill":
        return tokens, positions, ck, cv, lengths, torch.zeros(B, dtype=torch.long)
    return tokens, positions, ck, cv, lengths


def step_names(manifest: Manifest) -> list[str]:
    names = [f"prefill@{b}" for b in manifest.context_buckets] + ["draft"]
    return names + [f"verify{g}@{b}" for g in manifest.gammas for b in manifest.context_buckets]


def export_step(model: Transformer, manifest: Manifest, name: str) -> torch.export.ExportedProgram:
    module = PrefillStep(model) if name.startswith("prefill") else DecodeStep(model)
    with torch.no_grad():
        return torch.export.export(module, step_inputs(model, manifest, name), strict=True)
