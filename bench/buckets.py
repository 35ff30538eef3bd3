"""Does a step's cost follow the actual context, not the engine's maximum? Times the verify step at
one context in an engine built for that context and in an engine built for a much longer one (which
picks its smallest covering bucket), and, for contrast, the long engine's step at its largest
bucket (what every step would cost without buckets).

    python bench/buckets.py --context 1000 --small 1024 --large 8192 --gamma 3 --dtype bfloat16

Engines are built under engines/ (``--backend``) unless they exist. Steps are timed directly
(median of ``--reps`` calls after warm-up) on the runtime's own caches, laid out as the runtime
lays them out for that context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_verify(rt, context: int, gamma: int, reps: int, slots: int | None = None) -> tuple[str, float]:
    """Median ms of the verify step for rows at ``context`` committed tokens, at the bucket the
    runtime picks (or at ``slots``)."""
    m = rt.manifest
    rt.core.fit(context + gamma + 1) if slots is None else rt.full.resize(slots)
    name = f"verify{gamma}@{rt.full.slots}"
    B = m.max_batch
    lengths = torch.full((B,), context)
    tokens = torch.randint(0, m.model.vocab_size, (B, gamma + 1))
    positions = lengths[:, None] + torch.arange(gamma + 1)
    ck, cv = rt.full.view(slice(None))
    for _ in range(2):
        rt.steps(name, tokens, positions, ck, cv, lengths)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        rt.steps(name, tokens, positions, ck, cv, lengths)
        times.append(time.perf_counter() - t)
    return name, 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--small", type=int, default=1024, help="max_seq_len of the short engine")
    p.add_argument("--large", type=int, default=8192, help="max_seq_len of the long engine")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="eager", choices=["eager", "aoti"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, help="default: bench/results/buckets-BACKEND.json")
    args = p.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / f"buckets-{args.backend}.json"

    from builders.build import build_engine
    from magicdec_rt import Runtime

    rts = {}
    for size in (args.small, args.large):
        engine = ROOT / "engines" / f"buckets-{args.backend}-{args.dtype}-b{args.batch}-s{size}-g{args.gamma}"
        if not (engine / "manifest.json").is_file():
            # Only the buckets this measurement uses, to keep compiled builds short.
            build_engine(engine, backend=args.backend, dtype=args.dtype, max_batch=args.batch, max_seq_len=size,
                         gammas=[args.gamma], default_gamma=args.gamma, buckets=[args.small])
        rts[size] = Runtime.load(engine)

    small_name, small_ms = time_verify(rts[args.small], args.context, args.gamma, args.reps)
    large_name, large_ms = time_verify(rts[args.large], args.context, args.gamma, args.reps)
    top_name, top_ms = time_verify(rts[args.large], args.context, args.gamma, args.reps, slots=args.large)
    report = {
        "command": " ".join(sys.argv),
        "context": args.context, "gamma": args.gamma, "batch": args.batch, "dtype": args.dtype, "backend": args.backend,
        f"engine_{args.small}": {"step": small_name, "ms": small_ms},
        f"engine_{args.large}": {"step": large_name, "ms": large_ms},
        f"engine_{args.large}_largest_bucket": {"step": top_name, "ms": top_ms},
        "ratio_bucketed": large_ms / small_ms,
        "ratio_unbucketed": top_ms / small_ms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"| engine max_seq_len | step run at context {args.context} | ms | ratio to the {args.small} engine |")
    print("|---|---|---|---|")
    print(f"| {args.small} | {small_name} | {small_ms:.1f} | 1.00 |")
    print(f"| {args.large} | {large_name} | {large_ms:.1f} | {large_ms / small_ms:.2f} |")
    print(f"| {args.large}, largest bucket forced | {top_name} | {top_ms:.1f} | {top_ms / small_ms:.2f} |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
