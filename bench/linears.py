"""The linear kernels over one decode step's weights, streamed from memory.

    python bench/linears.py                        # 16 and 64 rows (a B16 draft / AR step, a gamma-3 verify)
    python bench/linears.py --rows 16 --repeats 9  # one size, more repeats

Times the 30 layers' q/k/v/o/gate/up/down projections of the embedded model (random bf16 weights,
one copy per layer, so every call reads its weights from memory as a step does), and apart the LM
head (49152 x 576), at M rows: ``torch.ops.magicdec.linear`` on packed weights, the same with
q/k/v and gate/up fused into one matrix each, ``torch.ops.magicdec.linear_q8`` on int8 copies (the
draft step's, ``linear.py``; where the CPU has AVX512-VNNI) and ``F.linear`` (oneDNN). Prints ms,
GB/s of weights read and the fraction of this run's read bandwidth. Needs a CPU with AVX512-BF16
(``linear.wanted``).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from roofline import time_ms
from workload import measure_bandwidth

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
    args = p.parse_args(argv)
    if not linear.wanted(torch.bfloat16, "cpu"):
        print("this CPU does not run the linear kernel (it needs AVX512-BF16 and no AMX)", file=sys.stderr)
        return 2
    attention.kernel_available()
    cfg = ModelConfig.from_hf(load_source(embedded_model_path())[0])
    bw = measure_bandwidth()
    print(f"CPU: {cpu.model_name()}; read bandwidth {bw / 1e9:.1f} GB/s; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; linear.BLOCK {linear.BLOCK}")
    gen = torch.Generator().manual_seed(0)

    def weights(shapes):
        return [(torch.randn(n, k, generator=gen) * 0.05).bfloat16() for n, k in shapes]

    def calls(ws, kind):
        """(K, x -> y) per matrix, in call order."""
        if kind == "bf16":
            return [(w.shape[1], functools.partial(torch.ops.magicdec.linear, packed=linear.pack(w), n=w.shape[0]))
                    for w in ws]
        if kind == "int8":
            return [(w.shape[1], lambda x, q=linear.pack_q8(*linear.quantize(w)), n=w.shape[0]:
                     torch.ops.magicdec.linear_q8(x, *q, n)) for w in ws]
        return [(w.shape[1], functools.partial(F.linear, weight=w)) for w in ws]

    kinds = {"kernel": ("bf16", False, 2), "kernel, fused q/k/v and gate/up": ("bf16", True, 2),
             "int8 kernel (draft)": ("int8", False, 1), "F.linear": ("F", False, 2)}
    if not linear.int8_wanted(torch.bfloat16, "cpu"):
        del kinds["int8 kernel (draft)"]
    cases = {}
    for name, (kind, fused, itemsize) in kinds.items():
        layers = [c for _ in range(cfg.num_layers) for c in calls(weights(layer_shapes(cfg, fused)), kind)]
        cases[f"30 layers, {name}"] = (layers, itemsize * cfg.num_layers * sum(n * k for n, k in layer_shapes(cfg, False)))
        if not fused:
            head = calls(weights([(cfg.vocab_size, cfg.hidden_size)]), kind)
            cases[f"LM head, {name}"] = (head, itemsize * cfg.vocab_size * cfg.hidden_size)
    print("\n| rows | linears | ms | GB/s of weights | of the read bandwidth |\n|---|---|---|---|---|")
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=gen).bfloat16() for k in (cfg.hidden_size, cfg.intermediate_size)}

        def run(case):
            for k, f in case:
                f(xs[k])

        # The cases interleaved, best of 3 rounds: this machine's memory speed drifts within a run.
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(3):
            for name, (case, _) in cases.items():
                best[name] = min(best[name], time_ms(lambda: run(case), args.repeats))
        for name, ms in best.items():
            nbytes = cases[name][1]
            print(f"| {m} | {name} | {ms:.2f} | {nbytes / ms / 1e6:.1f} | {nbytes / ms / 1e6 / (bw / 1e9):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
