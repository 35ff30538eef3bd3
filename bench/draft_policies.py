"""Acceptance of draft cache policies on the corpus: StreamingLLM against SnapKV settings.

    python bench/draft_policies.py --batch 8 --context 4096 \
        --snapkv 8:128 16:128 32:128 32:64 --out bench/results/draft-policies/b8-4k.json

One eager engine per batch (the sweep's, built when missing); the batch's rows get C-token windows
of different documents, prefilled once; then every policy decodes ``--new-tokens`` tokens at a
fixed gamma (greedy unless ``--temperature``; sampled requests are unseeded, so the rejection
sampler decides) and reports its acceptance per drafted token and per draft position.
``--snapkv W:R[:P[:I]]`` is a SnapKV policy with observation window W, recent ring R (the rest of
the budget, after the sinks, is the per-head selection), pooling width P (7) and re-selection every
I tokens (0: never).
"""

from __future__ import annotations

import argparse
import sys

import torch
from sweep import engine_for, sweep_runtime_class
from workload import ROOT, drafter_args, load_prompts, write_report

from magicdec_rt.kv_cache import DraftPolicy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    drafter_args(p, ROOT / "bench" / "results" / "draft-policies" / "policies.json")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--snapkv", nargs="+", default=["16:128"], help="WINDOW:RECENT[:POOL[:RESELECT]] settings")
    p.add_argument("--draft-positions", default="original", choices=["original", "cache"],
                   help="the engine's draft key positions (magicdec-build --draft-positions)")
    args = p.parse_args()
    policies = [DraftPolicy("streaming")] + [DraftPolicy("snapkv", *map(int, x.split(":"))) for x in args.snapkv]
    engine = engine_for(args.batch, args.budget, [args.context], args.new_tokens, [args.gamma], args.dtype,
                        draft_positions=args.draft_positions)
    SweepRuntime, _ = sweep_runtime_class()
    runtimes = []
    for policy in policies:
        rt = SweepRuntime.load(engine, draft_policy=policy)
        if runtimes:
            rt.core.full = runtimes[0].full  # one full cache, prefilled once
        runtimes.append(rt)
    prompts = load_prompts(runtimes[0].tokenizer, args.corpus, args.batch, args.context)
    rows = []
    for policy, rt in zip(policies, runtimes):
        torch.manual_seed(0)
        rt.generate(prompts, max_new_tokens=args.new_tokens, temperature=args.temperature, gamma=args.gamma)
        s = rt.last_stats
        snap = policy.kind == "snapkv"
        rows.append(dict(policy=policy.kind, window=policy.window if snap else None, recent=policy.ring(args.budget) if snap else None,
                         pool=policy.pool if snap else None, reselect=policy.reselect if snap else None,
                         tokens_per_s=s["steady_tokens_per_s"],
                         acceptance_rate=s["acceptance_rate"], per_position=s["per_position_acceptance"],
                         draft_tokens=s["draft_tokens"]))
        print(f"{policy}: acceptance {s['acceptance_rate']:.3f}", file=sys.stderr)
    table = ["| policy | window | recent | pool | reselect | acceptance | per draft position | drafted | tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['policy']} | {r['window'] or '-'} | {r['recent'] or '-'} | {r['pool'] or '-'} | "
              f"{'-' if r['reselect'] is None else r['reselect']} | {r['acceptance_rate']:.3f} | "
              f"{' / '.join(f'{x:.2f}' for x in r['per_position'])} | {r['draft_tokens']} | {r['tokens_per_s']:.1f} |"
              for r in rows]
    write_report(args.out, args, rows, f"{args.dtype}; {args.draft_positions} positions", table)

if __name__ == "__main__":
    main()
