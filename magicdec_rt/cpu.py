"""What this CPU can do: its model and flags (recorded with every measurement and in compiled
engines), whether it multiplies bfloat16 natively, and the instruction sets a compiled graph needs.

Why it matters: the same kind of machine comes with an AMX Xeon, an AVX-512-BF16 EPYC or an
AVX2-only EPYC. Without AVX-512-BF16 or AMX, torch multiplies bfloat16 by emulation (a 2048^2
bf16 matmul measured < 1 GFLOP/s there against 170 in float32), so ``--dtype auto`` picks float32;
and an AOTInductor graph compiled for AVX-512 dies with an illegal instruction on an AVX2 CPU, so
the manifest names the instruction sets its graphs need and loading checks them.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from .errors import EngineError

# Spellings of compiler -m flags as /proc/cpuinfo lists them, where they differ.
_CPUINFO_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
                  "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16", "amx-int8": "amx_int8"}


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first CPU's; all are alike here
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, frozenset(fields.get("flags", "").split())


def model_name() -> str:
    return _cpuinfo()[0]


def flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them (empty where it does not exist)."""
    return _cpuinfo()[1]


def native_bf16() -> bool:
    """Does this CPU multiply bfloat16 in hardware (AMX or AVX-512-BF16, which oneDNN uses)?"""
    return bool({"amx_bf16", "avx512_bf16"} & flags())


def describe() -> dict:
    """What a measurement records about the machine."""
    f = flags()
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if x in f]
    # Variables that hold kernels to fewer instructions than the CPU has (an AVX2 CPU's paths, run here).
    held = {k: os.environ[k] for k in ("MAGICDEC_KERNEL_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                       "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)}
    return {"cpu": model_name(), "isa": isa, "native_bf16": native_bf16()} | ({"held_to": held} if held else {})


def auto_dtype() -> str:
    """The engine dtype ``--dtype auto`` picks on this machine's CPU."""
    return "bfloat16" if native_bf16() else "float32"


def auto_kv_dtype() -> str:
    """The KV cache dtype ``--dtype auto`` picks: bfloat16 everywhere on the CPU. Where the weights
    stay float32 (no native bf16) the attention kernel widens bf16 keys and values to float32 in
    registers, so the cache, which decoding at long context mostly reads, costs half the bytes."""
    return "bfloat16"


# The x86-64 micro-architecture levels (the psABI's) CPU graphs are compiled for, by the width of
# the vectors Inductor generates, with the /proc/cpuinfo flags each needs. An explicit level, not
# Inductor's default -march=native: with native the compiler may use any instruction of the build
# CPU, and the manifest could not name them all.
_V3 = ("cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2",
       "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
ARCH_LEVELS = {0: ("x86-64", ()), 256: ("x86-64-v3", _V3),
               512: ("x86-64-v4", _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"))}
TARGETS = ("native", "avx2")  # what ``magicdec-build --cpu-isa`` compiles for


def inductor_options(arch: str) -> dict:
    """Inductor's config for graphs compiled for the level ``arch``: the level, and AVX2 vectors at
    x86-64-v3 (at v4, Inductor's default pick is the widest this CPU has, as ``compile_target`` saw).
    Scheduled for the build CPU (``-mtune`` never adds an instruction; Inductor has no option for it
    but passes ``cpp.march`` on as written): the draft step's graph ran 2-3% slower tuned generic."""
    return {"cpp.march": f"{arch} -mtune=native"} | ({"cpp.simdlen": 256} if arch == "x86-64-v3" else {})


def compile_target(target: str = "native") -> tuple[str, list[str]]:
    """The -march level AOTInductor compiles CPU graphs for and every cpuinfo flag they need (the
    level's and Inductor's vector flags), for ``target``: ``"native"``, the widest vectors Inductor uses on
    this CPU (AVX-512, with VNNI or AMX where present; it follows ``ATEN_CPU_CAPABILITY``), or
    ``"avx2"``, any x86-64 CPU with AVX2 and FMA, so that an engine built here runs on those too."""
    from torch._inductor import config, cpu_vec_isa

    with config.patch({"cpp.simdlen": 256 if target == "avx2" else None}):
        vec = cpu_vec_isa.pick_vec_isa()
    if target == "avx2" and vec.bit_width() != 256:
        raise EngineError(f"cpu_isa avx2 needs a build machine with AVX2 and FMA (the build runs the graphs to "
                         f"validate them); this CPU ({model_name()}) has no AVX2")
    arch, level = ARCH_LEVELS.get(vec.bit_width(), ARCH_LEVELS[0])
    names = set(level)
    for flag in vec.build_arch_flags().split():
        if flag.startswith("-m") and not flag.startswith("-march"):
            names.add(_CPUINFO_NAMES.get(flag[2:], flag[2:].replace("-", "_")))
    return arch, sorted(names)


def missing(required: list[str]) -> list[str]:
    """The instruction sets of ``required`` this CPU lacks (none where its flags are unknown)."""
    f = flags()
    return [x for x in required if f and x not in f]
