"""Compiled vs eager engines, side by side in one process: time per draft step, per verify step and
per autoregressive step, and each engine's end-to-end MagicDec speedup over its own autoregressive
decoding, on the same prompts.

    python bench/backends.py --engines engines/smol-eager-b8-4k engines/smol-aoti-b8-4k --gamma 3

The engines must have the same batch and dtype. Each row gets ``--context`` tokens from a
different document of the corpus; modes alternate over engines ``--repeats`` times and the best run
of each is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workload import DEFAULT_CORPUS, ROOT, load_prompts  # bench/ is this script's directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", required=True)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, nargs="+", default=[3])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    args = p.parse_args()

    from magicdec_rt import Runtime

    runtimes = {e: Runtime.load(e) for e in args.engines}
    first = next(iter(runtimes.values()))
    batch = first.manifest.max_batch
    prompts = load_prompts(first.tokenizer, args.corpus, batch, args.context)
    modes = [0, *args.gamma]
    runs = {e: {g: [] for g in modes} for e in args.engines}
    tokens = {e: {} for e in args.engines}
    for _ in range(args.repeats):
        for g in modes:
            for e, rt in runtimes.items():
                results = rt.generate(prompts, max_new_tokens=args.new_tokens, gamma=g)
                tokens[e][g] = [r.token_ids for r in results]
                s = dict(rt.last_stats)
                runs[e][g].append(s)
                print(f"{rt.manifest.backend:>6} gamma {g}: {s['decode_tokens_per_s']:.2f} tok/s, "
                      f"verify {1e3 * s['verify_s'] / s['verify_steps']:.0f} ms, prefill {s['prefill_s']:.1f} s",
                      file=sys.stderr)

    rows = []
    for e, rt in runtimes.items():
        best = {g: max(runs[e][g], key=lambda s: s["decode_tokens_per_s"]) for g in modes}
        ar = best[0]
        for g in args.gamma:
            s = best[g]
            rows.append({
                "engine": e,
                "backend": rt.manifest.backend,
                "gamma": g,
                "ms_autoregressive_step": 1e3 * ar["verify_s"] / ar["verify_steps"],
                "ms_draft_step": 1e3 * s["draft_s"] / s["draft_steps"],
                "ms_verify_step": 1e3 * s["verify_s"] / s["verify_steps"],
                "autoregressive_tok_s": ar["decode_tokens_per_s"],
                "magicdec_tok_s": s["decode_tokens_per_s"],
                "speedup": s["decode_tokens_per_s"] / ar["decode_tokens_per_s"],
                "acceptance_rate": s["acceptance_rate"],
                "prefill_tok_s": batch * args.context / ar["prefill_s"],
                # Rows whose tokens equal the first engine's (exact in float32; bf16 may drift).
                "rows_equal_to_first_engine": sum(a == b for a, b in zip(tokens[e][g], tokens[args.engines[0]][g])),
            })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "runs": {
        e: {str(g): r for g, r in v.items()} for e, v in runs.items()}}, indent=2))
    print("| backend | gamma | ms AR step | ms draft step | ms verify step | AR tok/s | MagicDec tok/s | speedup | acceptance | prefill tok/s | rows = first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['gamma']} | {r['ms_autoregressive_step']:.0f} | {r['ms_draft_step']:.0f} | "
              f"{r['ms_verify_step']:.0f} | {r['autoregressive_tok_s']:.2f} | {r['magicdec_tok_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['acceptance_rate']:.3f} | {r['prefill_tok_s']:.0f} | "
              f"{r['rows_equal_to_first_engine']}/{batch} |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
