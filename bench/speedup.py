"""MagicDec vs autoregressive decoding on one engine, same prompts, same number of new tokens.

    python bench/speedup.py --batch 8 --context 4096 --gamma 1 2 3 --dtype float32

Each row of the batch gets a window of ``--context`` tokens from a different document of the
corpus (default ``../shared/data/longctx`` when present). Both modes run in this one process,
alternating, ``--repeats`` times; prefill is timed apart from decoding. Besides the throughput
ratio it prints, per step, the bytes the step must read (weights + KV) and the bandwidth that
implies, so the numbers can be set against the machine's memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "longctx"


def load_prompts(tokenizer, corpus: Path, batch: int, context: int) -> list[list[int]]:
    files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else []
    if not files:
        sys.exit(f"speedup.py: error: no .txt files in corpus directory {str(corpus)!r}; pass --corpus DIR")
    prompts = []
    for i in range(batch):
        ids = tokenizer(files[i % len(files)].read_text()).input_ids
        start = (i // len(files)) * context  # a second pass over the files takes later windows
        window = ids[start : start + context]
        if len(window) < context:
            sys.exit(f"speedup.py: error: {files[i % len(files)].name} has fewer than {start + context} tokens")
        prompts.append(window)
    return prompts


def measure_bandwidth() -> float:
    """Bytes per second of a large streaming read on this machine (best of 5)."""
    x = torch.ones(512 * 2**20 // 4)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = max(best, x.nbytes / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", help="engine directory (default: build one under engines/ for these settings)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, nargs="+", default=[3], help="one or more draft lengths")
    p.add_argument("--draft-budget", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speedup.json")
    args = p.parse_args()

    from builders.build import build_engine
    from magicdec_rt import Runtime

    engine = Path(args.engine) if args.engine else ROOT / "engines" / (
        f"bench-{args.dtype}-b{args.batch}-s{args.context + args.new_tokens}-w{args.draft_budget}"
    )
    if not (engine / "manifest.json").is_file():
        build_engine(engine, max_batch=args.batch, max_seq_len=args.context + args.new_tokens,
                     dtype=args.dtype, draft_budget=args.draft_budget, max_gamma=max(*args.gamma, 6))
    rt = Runtime.load(engine)
    m = rt.manifest
    prompts = load_prompts(rt.tokenizer, args.corpus, args.batch, args.context)
    modes = [("autoregressive", 0)] + [(f"magicdec-g{g}", g) for g in args.gamma]
    runs = {mode: [] for mode, _ in modes}
    for _ in range(args.repeats):
        for mode, gamma in modes:
            rt.generate(prompts, max_new_tokens=args.new_tokens, temperature=args.temperature, seed=0, gamma=gamma)
            s = dict(rt.last_stats)
            runs[mode].append(s)
            rate = s["acceptance_rate"]
            print(f"{mode:>16}: decode {s['decode_tokens_per_s']:.2f} tok/s, prefill {s['prefill_s']:.1f} s, "
                  f"acceptance {'-' if rate is None else f'{rate:.3f}'}", file=sys.stderr)

    c, item = m.model, m.torch_dtype.itemsize
    weights = sum(t.numel() * t.element_size() for t in rt.steps.model.state_dict().values()) - (
        c.vocab_size * c.hidden_size * item if c.tie_word_embeddings else 0
    )
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item
    full_bytes = weights + args.batch * args.context * kv_per_token
    bw = measure_bandwidth()

    def best(mode):
        return max(runs[mode], key=lambda s: s["decode_tokens_per_s"])

    ar = best("autoregressive")
    ar_step = ar["verify_s"] / ar["verify_steps"]
    points = []
    for mode, gamma in modes[1:]:
        md = best(mode)
        verify = md["verify_s"] / md["verify_steps"]
        draft = md["draft_s"] / md["draft_steps"]
        draft_bytes = weights + args.batch * (m.draft_budget + gamma) * kv_per_token
        points.append({
            "gamma": gamma,
            "autoregressive_tok_s": ar["decode_tokens_per_s"],
            "magicdec_tok_s": md["decode_tokens_per_s"],
            "speedup": md["decode_tokens_per_s"] / ar["decode_tokens_per_s"],
            "acceptance_rate": md["acceptance_rate"],
            "mean_accepted_length": md["mean_accepted_length"],
            "tokens_per_batch_verify": (md["new_tokens"] - args.batch) / args.batch / md["verify_steps"],
            "per_position_acceptance": md["per_position_acceptance"],
            "ms_per_step": {"autoregressive": 1e3 * ar_step, "draft": 1e3 * draft, "verify": 1e3 * verify},
            "bytes_per_step": {"autoregressive": full_bytes, "draft": draft_bytes, "verify": full_bytes},
            "fraction_of_bandwidth_floor": {
                "autoregressive": full_bytes / bw / ar_step,
                "draft": draft_bytes / bw / draft,
                "verify": full_bytes / bw / verify,
            },
        })
    report = {
        "command": " ".join(sys.argv),
        "engine": str(engine),
        "dtype": args.dtype,
        "batch": args.batch,
        "context": args.context,
        "new_tokens": args.new_tokens,
        "draft_budget": m.draft_budget,
        "temperature": args.temperature,
        "machine_read_bandwidth_GB_s": bw / 1e9,
        "prefill_tok_s": args.batch * args.context / ar["prefill_s"],
        "points": points,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("| gamma | AR tok/s | MagicDec tok/s | speedup | acceptance | tokens/verify | ms AR / draft / verify |")
    print("|---|---|---|---|---|---|---|")
    for pt in points:
        ms = pt["ms_per_step"]
        print(f"| {pt['gamma']} | {pt['autoregressive_tok_s']:.2f} | {pt['magicdec_tok_s']:.2f} | "
              f"{pt['speedup']:.2f}x | {pt['acceptance_rate']:.3f} | {pt['tokens_per_batch_verify']:.2f} | "
              f"{ms['autoregressive']:.0f} / {ms['draft']:.0f} / {ms['verify']:.0f} |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
