"""The model's linear layers on the CPU: ``torch.ops.magicdec.linear`` over weights packed once at
load (bf16 on CPUs with AVX512-BF16, float32 on CPUs with AVX2 and FMA), and
``torch.ops.magicdec.linear_q8`` over int8 copies of them that only the draft step reads
(``csrc/linear.cpp``, built with the attention kernel).

The specifications are ``torch.nn.functional.linear`` and ``q8_reference``. Decoding multiplies few
rows (the batch, times gamma + 1 in a verify) by every weight, where oneDNN's bf16 GEMM ran at
20-25 GB/s of weights on the AVX512-BF16 EPYC and the kernel at ~2x that, and MKL's float32 GEMM
at 8.7 GB/s (16 rows) where the kernel read 44.9 (5.1x; 3.0x at 80 rows, where both compute:
``bench/linears.py --dtype float32``). Used where the engine runs bf16 on such a CPU without AMX
(where oneDNN has tiles and was not compared), and for every float32 engine on x86 CPUs with AVX2;
``torch.export`` records the ops and AOTInductor graphs call them, like the attention op.

Why int8 drafts: a draft step at batch 16 reads every weight for 16 rows, about as long in reads as
in ``vdpbf16ps`` work, and its proposals only need to be likely, not exact (the verify step, in the
target's weights, decides every token). Weights quantized per output feature and activations per
row halve the bytes and the multiply instructions (``vpdpbusd``, which retires about 2/3 as often
as ``vdpbf16ps`` on the AVX512-BF16 EPYC): 30 layers' linears plus the LM head at 16 rows took
4.7-5.0 ms against 7.1-8.4 in bf16 with memory at 44-47 GB/s (``bench/linears.py``; 1.1x at 69 GB/s,
where both are compute-bound). Acceptance dropped ~2%; the planner gained 1.03-1.2x where drafting
is a large share of a round (B4-B16 at 1k-4k) and 0.97-1.05x at B16 x 7.5k (README, CPU kernels).
A float32 engine without VNNI runs them on its AVX2 path (``vpmaddubsw``, the same integer sums):
there a quarter of float32's bytes, and 1.6-1.8x its multiply-adds per second on the AVX-512 EPYC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, cpu

BLOCK = 32  # output features per packed block (the kernel's NB)


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose weight may also be held packed for the CPU kernel, and in
    int8 for the draft step."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("q8", None, persistent=False)  # pack_q8's three tensors
        self.register_buffer("q8_scale", None, persistent=False)
        self.register_buffer("q8_wsum", None, persistent=False)

    def forward(self, x: torch.Tensor, int8: bool = False) -> torch.Tensor:
        """``int8``: the draft step's weights, where this layer holds them (else the layer's own)."""
        if int8 and self.q8 is not None:
            return torch.ops.magicdec.linear_q8(x, self.q8, self.q8_scale, self.q8_wsum, self.out_features)
        if self.packed is not None:
            return torch.ops.magicdec.linear(x, self.packed, self.out_features)
        return F.linear(x, self.weight)

    def full_weight(self) -> torch.Tensor:
        """The weight ``[N, K]``, from the packed copy when that replaced it."""
        if self.weight.numel() or self.packed is None:
            return self.weight.detach()
        return self.packed.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` as the kernel reads it: ``[ceil(N/BLOCK), K/P, BLOCK, P]``, each block's
    features side by side per pair of K in bf16 (P 2) or per value in float32 (P 1); zero rows pad N."""
    N, K = weight.shape
    per = 1 if weight.dtype == torch.float32 else 2
    blocks = -(-N // BLOCK)
    w = torch.zeros(blocks * BLOCK, K, dtype=weight.dtype)
    w[:N] = weight
    return w.view(blocks, BLOCK, K // per, per).transpose(1, 2).contiguous()


def _to_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` symmetric int8: ``q = round_half_even(x * (127 / amax))`` (float32) and the
    rows' scales ``amax / 127`` (a zero row: q 0, scale 0)."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    # A tensor numerator: `127 / amax` would multiply by amax's reciprocal, rounding differently.
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return (x * inv).round().clamp(-127, 127).to(torch.int8), amax / 127


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` in int8 per output feature: ``(w8 [N, K] int8, scale [N] float32)``."""
    w8, scale = _to_int8(weight)
    return w8, scale[:, 0]


def pack_q8(w8: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize``'s output as ``linear_q8`` reads it: the weights ``[ceil(N/BLOCK), K/4, BLOCK, 4]``
    (each block's features side by side per quad of K), the scales and each feature's sum of
    weights (the kernel's activations are unsigned, q + 128), both padded to whole blocks."""
    N, K = w8.shape
    blocks = -(-N // BLOCK)
    w = torch.zeros(blocks * BLOCK, K, dtype=torch.int8)
    w[:N] = w8
    padded = lambda t: torch.cat((t, t.new_zeros(blocks * BLOCK - N)))  # noqa: E731
    return (w.view(blocks, BLOCK, K // 4, 4).transpose(1, 2).contiguous(), padded(scale.float()),
            padded(w8.sum(1, dtype=torch.int32)))


def q8_reference(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What ``linear_q8`` computes: ``x`` quantized per row, exact integer dot products, then
    ``(float32(sum) * x_scale) * scale``, in ``x``'s dtype."""
    xq, x_scale = _to_int8(x)
    sums = (xq.double() @ w8.double().T).to(torch.int64)  # exact: |sum| < 2^53
    return ((sums.float() * x_scale) * scale).to(x.dtype)


def wanted(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a model of ``dtype`` on ``device`` runs its linears with the kernel here: bf16 on CPUs
    with AVX512-BF16 and no AMX, float32 on CPUs with AVX2 and FMA (the CPU ops' instruction set as
    ``attention.set_isa`` left it: none on the portable path)."""
    if torch.device(device).type != "cpu" or not attention.kernel_available():
        return False
    f = cpu.flags()
    if dtype == torch.bfloat16:
        return "avx512_bf16" in f and "amx_bf16" not in f
    return dtype == torch.float32 and set(isa(dtype)) <= f and attention.set_isa() != "portable"


def isa(dtype: torch.dtype) -> list[str]:
    """The instruction sets (cpuinfo names) the kernel needs for weights of ``dtype``."""
    return ["avx512_bf16"] if dtype == torch.bfloat16 else ["avx2", "fma"]


def int8_wanted(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the draft step of such a model runs int8 linears here (``linear_q8``): a float32 model
    wherever its float32 linears run the kernel (``wanted``: ``vpdpbusd`` on CPUs with AVX512-VNNI,
    ``vpmaddubsw`` on the AVX2 path), a bf16 model on CPUs with AVX512-VNNI and AVX512-BF16. Not on
    AMX CPUs, where it was not measured against oneDNN."""
    f = cpu.flags()
    if torch.device(device).type != "cpu" or "amx_bf16" in f:
        return False
    if dtype == torch.bfloat16:
        return {"avx512bw", "avx512vl", *int8_isa(dtype)} <= f and attention.kernel_available()
    return dtype == torch.float32 and wanted(dtype, device)


def int8_isa(dtype: torch.dtype) -> list[str]:
    """The instruction sets (cpuinfo names) ``linear_q8`` needs for a model of ``dtype``."""
    return ["avx512_bf16", "avx512_vnni"] if dtype == torch.bfloat16 else isa(dtype)


def _linears(model: nn.Module, multiple: int) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.in_features % multiple == 0]


def pack_linears(model: nn.Module) -> bool:
    """Pack every ``Linear`` of ``model`` not packed yet for the kernel where ``wanted``; returns
    whether it packed any. A weight no other module shares is then dropped (the packed copy
    replaces it); the LM head's, tied to the embedding, stays."""
    layers = [m for m in _linears(model, 2) if m.packed is None]
    if not layers or not wanted(layers[0].weight.dtype, layers[0].weight.device):
        return False
    shared = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    for m in layers:
        m.packed = pack(m.weight.detach())
        if id(m.weight) not in shared:
            m.weight = nn.Parameter(m.weight.new_empty(0), requires_grad=False)
    return True


def quantize_linears(model: nn.Module) -> bool:
    """Give every ``Linear`` of ``model`` its int8 copy for the draft step, where ``int8_wanted``;
    returns whether it did."""
    layers = [m for m in _linears(model, 4) if m.q8 is None]
    if not layers or not int8_wanted(layers[0].weight.dtype, layers[0].weight.device):
        return False
    for m in layers:
        m.q8, m.q8_scale, m.q8_wsum = pack_q8(*quantize(m.full_weight()))
    return True
