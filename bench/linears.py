"""The linear kernels over one decode step's weights, streamed from memory.

    python bench/linears.py                        # 16 and 64 rows (a B16 draft / AR step, a gamma-3 verify)
    python bench/linears.py --rows 16 --repeats 9  # one size, more repeats
    python bench/linears.py --dtype float32        # float32 weights (engines on CPUs without native bf16)

Times the 30 layers' q/k/v/o/gate/up/down projections of the embedded model (random weights, one
copy per layer, so every call reads its weights from memory as a step does), and apart the LM head
(49152 x 576), at M rows: ``torch.ops.magicdec.linear`` on packed weights (bf16: also with q/k/v
and gate/up fused into one matrix each; float32: also its AVX2 path, where the CPU has AVX-512),
``torch.ops.magicdec.linear_q8`` on int8 copies (the draft step's, ``linear.py``; float32: also its
AVX2 path, where the CPU has AVX512-VNNI) and ``F.linear`` (oneDNN in bf16, MKL in float32). Prints ms, GB/s of weights read and
the fraction of this run's read bandwidth. Needs a CPU that runs the kernel in that dtype
(``linear.wanted``: AVX512-BF16 for bf16, AVX2 and FMA for float32).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from workload import measure_bandwidth, time_ms

from magicdec_rt import attention, cpu, linear
from magicdec_rt.checkpoint import embedded_model_path, load_source
from magicdec_rt.model import ModelConfig


def layer_shapes(cfg: ModelConfig, fused: bool) -> list[tuple[int, int]]:
    """(N, K) of one layer's projections, in call order."""
    h, d, q, kv, i = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    if fused:
        return [((q + 2 * kv) * d, h), (h, q * d), (2 * i, h), (h, i)]
    return [(q * d, h), (kv * d, h), (kv * d, h), (h, q * d), (i, h), (i, h), (h, i)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not linear.wanted(dtype, "cpu"):
        print(f"this CPU does not run the {args.dtype} linear kernel (bf16: AVX512-BF16 and no AMX; float32: AVX2 "
              "and FMA)", file=sys.stderr)
        return 2
    attention.kernel_available()
    cfg = ModelConfig.from_hf(load_source(embedded_model_path())[0])
    bw = measure_bandwidth()
    print(f"CPU: {cpu.model_name()}; read bandwidth {bw / 1e9:.1f} GB/s; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; linear.BLOCK {linear.BLOCK}; {args.dtype}; CPU ops' ISA {attention.set_isa()}")
    gen = torch.Generator().manual_seed(0)

    def weights(shapes):
        return [(torch.randn(n, k, generator=gen) * 0.05).to(dtype) for n, k in shapes]

    def calls(ws, kind):
        """(K, x -> y) per matrix, in call order."""
        if kind == "packed":
            return [(w.shape[1], functools.partial(torch.ops.magicdec.linear, packed=linear.pack(w), n=w.shape[0]))
                    for w in ws]
        if kind == "int8":
            return [(w.shape[1], lambda x, q=linear.pack_q8(*linear.quantize(w)), n=w.shape[0]:
                     torch.ops.magicdec.linear_q8(x, *q, n)) for w in ws]
        return [(w.shape[1], functools.partial(F.linear, weight=w)) for w in ws]

    size, isa = dtype.itemsize, attention.DEFAULT_ISA
    # name: (kind, fused, bytes per weight, the CPU ops' instruction set)
    kinds = {"kernel": ("packed", False, size, isa), "kernel, fused q/k/v and gate/up": ("packed", True, size, isa),
             "kernel, AVX2 path": ("packed", False, size, "avx2"),
             "int8 kernel (draft)": ("int8", False, 1, isa), "int8 kernel (draft), AVX2 path": ("int8", False, 1, "avx2"),
             "F.linear": ("F", False, size, isa)}
    if dtype == torch.float32:
        del kinds["kernel, fused q/k/v and gate/up"]
    if dtype != torch.float32 or attention.set_isa() == "avx2":  # bf16 has no AVX2 path; else it is the kernel
        del kinds["kernel, AVX2 path"], kinds["int8 kernel (draft), AVX2 path"]
    if not linear.int8_wanted(dtype, "cpu"):
        del kinds["int8 kernel (draft)"]
    cases = {}
    for name, (kind, fused, itemsize, path) in kinds.items():
        layers = [c for _ in range(cfg.num_layers) for c in calls(weights(layer_shapes(cfg, fused)), kind)]
        cases[f"30 layers, {name}"] = (layers, itemsize * cfg.num_layers * sum(n * k for n, k in layer_shapes(cfg, False)),
                                       path)
        if not fused:
            head = calls(weights([(cfg.vocab_size, cfg.hidden_size)]), kind)
            cases[f"LM head, {name}"] = (head, itemsize * cfg.vocab_size * cfg.hidden_size, path)
    print("\n| rows | linears | ms | GB/s of weights | of the read bandwidth |\n|---|---|---|---|---|")
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in (cfg.hidden_size, cfg.intermediate_size)}

        def run(case):
            for k, f in case:
                f(xs[k])

        # The cases interleaved, best of 3 rounds: this machine's memory speed drifts within a run.
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(3):
            for name, (case, _, path) in cases.items():
                attention.set_isa(path)
                best[name] = min(best[name], time_ms(lambda: run(case), args.repeats))
        attention.set_isa(isa)
        for name, ms in best.items():
            nbytes = cases[name][1]
            print(f"| {m} | {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} | {nbytes / ms / 1e6 / (bw / 1e9):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
