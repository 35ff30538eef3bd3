"""Export the steps with ``torch.export`` at static shapes: the graphs compiled backends consume.
Step names and shapes are the manifest's (``Manifest.step_names`` / ``step_shape``)."""

from __future__ import annotations

import torch

from magicdec_rt.engine import Manifest, step_module
from magicdec_rt.model import Transformer


def step_inputs(model: Transformer, manifest: Manifest, name: str, device="cpu") -> tuple:
    """Example inputs of the step ``name``: zeros of the right shapes and dtypes (any values of
    these shapes are valid inputs). Caches are one dense tensor per layer."""
    B, T, slots = manifest.step_shape(name)
    layer = (B, model.kv_heads, slots, model.cfg.head_dim)
    cache_k = [torch.zeros(layer, dtype=manifest.kv_torch_dtype, device=device) for _ in range(model.cfg.num_layers)]
    cache_v = [torch.zeros_like(c) for c in cache_k]
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    positions = torch.arange(T, device=device).expand(B, T).contiguous()
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    if name.startswith("prefill"):
        return tokens, positions, cache_k, cache_v, lengths, torch.zeros(B, dtype=torch.long, device=device)
    return tokens, positions, cache_k, cache_v, lengths


def export_step(model: Transformer, manifest: Manifest, name: str, device="cpu") -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(step_module(model, name), step_inputs(model, manifest, name, device))
