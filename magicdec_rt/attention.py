"""Attention over a KV cache for short blocks (decode, draft, verify): the torch math that
specifies it, and the fused CPU kernel ``torch.ops.magicdec.attention`` (``csrc/attention.cpp``)
that computes it there.

Semantics, shared by both: ``q [B, kv, G*T, d]`` holds the query group folded into rows (query head
``g`` of KV head ``h``, block token ``t`` at row ``g*T + t``); row ``b`` attends to its cache slots
``[0, lengths[b])`` and, causally, to the block's own ``T`` keys (``k_new``, ``v_new``: token ``t``
sees ``0..t``); without block keys, a row with no valid slot returns zeros.

The kernel is compiled once per machine on first use (``torch.utils.cpp_extension``, cached in
torch's extension directory) and registered with ``TORCH_LIBRARY``, so ``torch.export`` records it
as one op and AOTInductor graphs call it. Where it cannot be built (no C++ compiler) the model
falls back to ``split_attention`` with one warning.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

# One library of the package's CPU ops: this attention and ``linear.py``'s bf16 linear layers.
SOURCES = [Path(__file__).with_name("csrc") / f for f in ("attention.cpp", "linear.cpp")]
NAME = "magicdec_kernels"
BUILD_FLAGS = dict(extra_cflags=["-O3", "-fopenmp", "-Wno-psabi"], extra_ldflags=["-fopenmp"])  # also bench/op_ab.py, which builds a revision's kernels as the package does
HEAD_DIMS = (64, 128)
ISAS = ("avx512bf16", "avx512", "avx2", "portable")
DEFAULT_ISA = os.environ.get("MAGICDEC_KERNEL_ISA") or "auto"


def split_attention(q, k, v, cache_k, cache_v, cache_bias, causal_bias):
    """The torch math: ``q [B, kv, R, d]``, block keys ``k, v [B, kv, T, d]``, masks as
    additive biases ``cache_bias [B, 1, 1, S]`` and ``causal_bias [T, T]``. The query group is folded
    into the rows so every matmul is a batched GEMM over ``[B*kv]``: the cache is read once per KV
    head, never expanded to the query heads nor concatenated with the new keys (that would copy it
    every step). Scale and masks ride in the GEMMs (``baddbmm``). Used on CUDA, and on a CPU where
    the kernel cannot be built."""
    B, kv, R, d = q.shape
    T, S = k.shape[2], cache_k.shape[2]
    q = (q * d**-0.5).reshape(B * kv, R, d)
    bias = cache_bias.expand(B, kv, 1, S).reshape(B * kv, 1, S)
    s_cache = torch.baddbmm(bias, q, cache_k.reshape(B * kv, S, d).transpose(1, 2))
    s_block = torch.baddbmm(causal_bias.repeat(R // T, 1), q, k.reshape(B * kv, T, d).transpose(1, 2))
    # Every query sees at least itself, so no row of the softmax is all -inf.
    p = torch.softmax(torch.cat((s_cache, s_block), dim=-1), dim=-1, dtype=torch.float32).to(v.dtype)
    o = torch.baddbmm(p[..., S:] @ v.reshape(B * kv, T, d), p[..., :S], cache_v.reshape(B * kv, S, d))
    return o.view(B, kv, R, d)


def window_scores(q, k, cache_k, cache_bias, causal_bias):
    """Attention weights of the block's queries ``q [B, kv, G, T, d]`` over the cache slots and the
    block's own keys ``k [B, kv, T, d]`` (masks as in ``split_attention``), summed over the query
    group and the block: ``[B, kv, S + T]`` in float32. SnapKV's observation (``model.ObserveStep``)."""
    d = q.shape[-1]
    q = q.float() * d**-0.5
    s_cache = torch.einsum("bhgtd,bhsd->bhgts", q, cache_k.float()) + cache_bias[:, :, None].float()
    s_block = torch.einsum("bhgtd,bhud->bhgtu", q, k.float()) + causal_bias.float()
    return torch.softmax(torch.cat((s_cache, s_block), dim=-1), dim=-1).sum((2, 3))


def reference(q, k_cache, v_cache, lengths, k_new, v_new, scale):
    """The op's specification, computed and returned in float32: one softmax over the valid cache
    slots and the block's visible keys."""
    B, kv, R, d = q.shape
    S = k_cache.shape[2]
    keys, values = k_cache.float(), v_cache.float()
    mask = (torch.arange(S)[None] < lengths[:, None])[:, None, None, :].expand(B, 1, R, S)
    if k_new is not None:
        T = k_new.shape[2]
        keys, values = torch.cat((keys, k_new.float()), 2), torch.cat((values, v_new.float()), 2)
        t = torch.arange(R) % T
        causal = torch.arange(T)[None, :] <= t[:, None]  # [R, T]
        mask = torch.cat((mask, causal.expand(B, 1, R, T)), -1)
    s = (q.float() @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no visible key: all weights 0
    return p @ values


@functools.cache
def fingerprint() -> str:
    """A short hash of the CPU kernels' sources: step times measured with other kernels are stale."""
    h = hashlib.sha256()
    for source in SOURCES:
        h.update(source.read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def kernel_available() -> bool:
    """Build (once per machine) and load the CPU kernel; False, with one warning, if it cannot be."""
    try:
        from torch.utils import cpp_extension

        if not any(Path(cpp_extension._get_build_directory(NAME, verbose=False)).glob(f"{NAME}*.so")):
            print("magicdec-rt: compiling the CPU kernels (once per machine, ~25 s)", file=sys.stderr)
        cpp_extension.load(
            name=NAME,
            sources=[str(s) for s in SOURCES],
            is_python_module=False,
            verbose=False,
            **BUILD_FLAGS,
        )
    except Exception as e:  # no compiler, no ninja, a failed build: the reference path still works
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"magicdec-rt: the CPU attention kernel could not be built ({msg}); using the slower "
            "torch path. Install a C++ compiler (g++) to get it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    # MAGICDEC_KERNEL_ISA runs another instruction-set path (e.g. a whole test suite on the avx2
    # or portable path, as another CPU would); an unknown or unsupported one is an error.
    torch.ops.magicdec.set_isa(DEFAULT_ISA)
    return True


def use_kernel(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.shape[-1] in HEAD_DIMS and kernel_available()


def set_isa(isa: str = "") -> str:
    """Force the kernel's instruction set (``avx512bf16``, ``avx512``, ``avx2``, ``portable``, or
    ``auto``: the best this CPU has); returns the one in use. For tests and benchmarks."""
    kernel_available()
    return torch.ops.magicdec.set_isa(isa)
