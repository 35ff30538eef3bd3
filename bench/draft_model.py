"""A standalone draft model against self-speculation, on the corpus (issue 9).

    python bench/draft_model.py --batch 8 --context 4096 --layers 4 8 15 \
        --out bench/results/draft-model/b8-4k.json

Draft models are the embedded SmolLM2's first N layers with its final norm and head
(``magicdec-cut-draft``, no training). One eager engine per N (``--draft-model``) beside the
sweep's engine for self-speculation; every run prefills the same prompts (C-token windows of
different documents) and decodes ``--new-tokens`` tokens greedily: plain decoding, self-speculation
and each draft model at ``--gamma``, all with the default draft policy (SnapKV). Reports steady
tokens/s, acceptance and the draft time per round."""

from __future__ import annotations

import argparse
import sys

from sweep import engine_for
from workload import ROOT, drafter_args, load_prompts, write_report

from builders.build import build_engine
from builders.draft_model import cut_layers
from magicdec_rt import Runtime
from magicdec_rt.engine import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    drafter_args(p, ROOT / "bench" / "results" / "draft-model" / "draft-model.json")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 15])
    args = p.parse_args()
    base = engine_for(args.batch, args.budget, [args.context], args.new_tokens, [args.gamma], args.dtype)
    m = read_manifest(base)
    runs = [("autoregressive", base, 0), ("self-speculation", base, args.gamma)]
    for n in args.layers:
        cut = ROOT / "engines" / f"smollm2-first{n}"
        if not (cut / "config.json").is_file():
            cut_layers(None, n, cut)
        eng = ROOT / "engines" / f"{base.name}-draft{n}"
        if not (eng / "manifest.json").is_file():
            build_engine(eng, base, max_batch=m.max_batch, max_seq_len=m.max_seq_len, buckets=m.context_buckets[:-1],
                         dtype=m.dtype, kv_dtype=m.kv_dtype, draft_budget=m.draft_budget, draft_sinks=m.draft_sinks,
                         gammas=m.gammas, default_gamma=m.default_gamma, draft_model=cut, show_progress=False)
        runs.append((f"draft model: first {n} of 30 layers", eng, args.gamma))
    rows, prompts = [], None
    for name, eng, gamma in runs:
        rt = Runtime.load(eng)
        prompts = prompts or load_prompts(rt.tokenizer, args.corpus, args.batch, args.context)
        rt.generate(prompts, max_new_tokens=args.new_tokens, gamma=gamma)
        s = rt.last_stats
        rows.append(dict(drafter=name, gamma=gamma, tokens_per_s=s["steady_tokens_per_s"],
                         acceptance_rate=s.get("acceptance_rate"), per_position=s.get("per_position_acceptance"),
                         draft_ms_per_round=1e3 * s["draft_s"] / max(s["verify_steps"], 1),
                         round_ms=1e3 * s["decode_s"] / max(s["verify_steps"], 1)))
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    ar = rows[0]["tokens_per_s"]
    table = ["| drafter | gamma | tok/s | over AR | acceptance | per draft position | draft ms per round | round ms |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['drafter']} | {r['gamma']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ar:.2f}x | "
              + ("-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}") + " | "
              + (" / ".join(f"{x:.2f}" for x in r["per_position"]) if r["per_position"] else "-")
              + f" | {r['draft_ms_per_round']:.1f} | {r['round_ms']:.1f} |" for r in rows]
    write_report(args.out, args, rows, m.dtype, table)

if __name__ == "__main__":
    main()
