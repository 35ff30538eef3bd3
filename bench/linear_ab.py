"""An engine's steps with the package's linear kernel and with ``F.linear`` (or against another
engine's steps of the same shapes), calls alternated in one process (this machine's speed drifts
over minutes, so only side-by-side ratios are reported).

    python bench/linear_ab.py --engine engines/f32-b16-7752
    MAGICDEC_KERNEL_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/linear_ab.py --engine ...  # as an AVX2 CPU runs
    python bench/linear_ab.py --engine engines/A --against engines/B  # e.g. graphs compiled two ways

Loads the engine's eager steps twice, once with its linears packed for the kernel (what the runtime
does where ``linear.wanted``) and once without, and times the AR step (verify at gamma 0), the
verify at the engine's largest gamma up to 3 and the draft step at its full batch, with the caches
filled to ``--context`` (random K/V): medians of each step's calls per round, ``--rounds`` rounds.
An engine that drafts with its own weights also gets its draft step timed with int8 weights
(``linear_q8``), where this CPU runs them, and every step's ratio to the AR step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from roofline import random_caches, step_inputs
from workload import ROOT, measure_bandwidth, time_ms

from magicdec_rt import attention, cpu, linear
from magicdec_rt.engine import load_steps, read_manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--context", type=int, help="cached tokens per row (default: the largest bucket less 72)")
    p.add_argument("--against", help="time this engine's steps in place of the F.linear copy")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    path = ROOT / args.engine if not os.path.isabs(args.engine) else args.engine
    m = read_manifest(path)
    if not linear.wanted(m.torch_dtype, m.device) and not args.against:
        print(f"this CPU does not run the {m.dtype} linear kernel", file=sys.stderr)
        return 2
    attention.kernel_available()
    kernel = load_steps(path, m)
    if args.against:
        other = ROOT / args.against if not os.path.isabs(args.against) else args.against
        plain = load_steps(other, read_manifest(other))
    else:
        wanted, linear.wanted = linear.wanted, lambda *a: False
        try:
            plain = load_steps(path, m)
        finally:
            linear.wanted = wanted
    model, B, S = kernel.model, m.max_batch, m.context_buckets[-1]
    context = args.context or S - 72
    gamma = max(g for g in m.gammas if g <= 3)
    kv = m.kv_torch_dtype
    print(f"{cpu.model_name()}; CPU ops' ISA {attention.set_isa()}; MKL_ENABLE_INSTRUCTIONS "
          f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS', '-')}; read bandwidth {measure_bandwidth() / 1e9:.1f} GB/s; "
          f"{m.dtype} weights, {m.kv_dtype} KV cache, batch {B}, {context} cached tokens, draft "
          f"{'int8' if m.draft_int8 else 'target'} weights")
    full = random_caches(model, B, S, kv), random_caches(model, B, S, kv)
    draft = random_caches(model, B, m.draft_slots, kv), random_caches(model, B, m.draft_slots, kv)
    steps = {"AR": (f"verify0@{S}", step_inputs(model, B, 1, context, context), full, 4),
             f"verify gamma {gamma}": (f"verify{gamma}@{S}", step_inputs(model, B, gamma + 1, context, context), full, 3),
             "draft": ("draft", step_inputs(model, B, 1, context, m.draft_slots - 4), draft, 8)}
    callers = {"kernel": kernel, "F.linear": plain}
    if not m.draft_int8 and linear.int8_wanted(m.torch_dtype, m.device) and not args.against:  # a third copy, int8 drafts
        callers["int8"] = load_steps(path, m)
        linear.quantize_linears(callers["int8"].model)
        steps["draft, int8 weights"] = steps["draft"]
    times = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for step, (name, (ids, pos, lengths), (k, v), n) in steps.items():
                for label, e in callers.items():
                    if (label == "int8") == (step == "draft, int8 weights"):
                        times.setdefault((step, label), []).append(time_ms(lambda: e(name, ids, pos, k, v, lengths), n))
    b_name = args.against or "F.linear"
    print(f"\n| step | {'engine' if args.against else 'kernel'}, ms | {b_name}, ms | speedup per round | "
          f"{'engine' if args.against else 'kernel'} / AR per round |\n|---|---|---|---|---|")
    ar = times["AR", "kernel"]
    fmt = lambda xs, f: " / ".join(f.format(x) for x in xs)  # noqa: E731
    for step in steps:
        a = times.get((step, "kernel")) or times[step, "int8"]
        b = times.get((step, "F.linear"))
        print(f"| {step} | {fmt(a, '{:.1f}')} | {fmt(b, '{:.1f}') if b else '-'} | "
              f"{fmt([y / x for x, y in zip(a, b)], '{:.2f}x') if b else '-'} | {fmt([x / r for x, r in zip(a, ar)], '{:.3f}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
