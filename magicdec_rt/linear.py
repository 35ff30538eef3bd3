"""The model's linear layers on CPUs with AVX512-BF16: ``torch.ops.magicdec.linear``
(``csrc/linear.cpp``, built with the attention kernel) over weights packed once at load.

The specification is ``torch.nn.functional.linear``. Decoding multiplies few rows (the batch, times
gamma + 1 in a verify) by every weight, where oneDNN's bf16 GEMM ran at 20-25 GB/s of weights on
the AVX512-BF16 EPYC and the kernel at ~2x that (``bench/roofline.py`` times the steps). Used where
the engine runs bf16 on such a CPU without AMX (where oneDNN has tiles and was not compared);
``torch.export`` records the op and AOTInductor graphs call it, like the attention op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, cpu

BLOCK = 32  # output features per packed block (the kernel's NB)


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose weight may also be held packed for the CPU kernel."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("packed", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.magicdec.linear(x, self.packed, self.out_features)
        return F.linear(x, self.weight)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` as the kernel reads it: ``[ceil(N/BLOCK), K/2, BLOCK, 2]``, each block's
    features side by side per pair of K (zero rows pad N)."""
    N, K = weight.shape
    blocks = -(-N // BLOCK)
    w = torch.zeros(blocks * BLOCK, K, dtype=weight.dtype)
    w[:N] = weight
    return w.view(blocks, BLOCK, K // 2, 2).transpose(1, 2).contiguous()


def wanted(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a model of ``dtype`` on ``device`` runs its linears with the kernel here."""
    f = cpu.flags()
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and "avx512_bf16" in f
            and "amx_bf16" not in f and attention.kernel_available())


def pack_linears(model: nn.Module) -> bool:
    """Pack every ``Linear`` of ``model`` not packed yet for the kernel where ``wanted``; returns
    whether it packed any. A weight no other module shares is then dropped (the packed copy
    replaces it); the LM head's, tied to the embedding, stays."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.in_features % 2 == 0 and m.packed is None]
    if not layers or not wanted(layers[0].weight.dtype, layers[0].weight.device):
        return False
    shared = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    for m in layers:
        m.packed = pack(m.weight.detach())
        if id(m.weight) not in shared:
            m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)
    return True
