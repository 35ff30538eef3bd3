"""The attention of one layer over a long cache: the split path (materialised scores) against the
merged path (fused flash kernel over the cache + the block's own keys), for blocks of T tokens.

    python bench/attention.py --batch 16 --context 7680 --tokens 1 2 3 4 5 7

Both paths are the model's own (``magicdec_rt.model.Attention``). Prints ms per call (median of
``--repeats``) and the read bandwidth it implies for the cache's K and V.
"""

from __future__ import annotations

import argparse
import time

import torch

from magicdec_rt.model import Attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=7680)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5, 7])
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--group", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    dt, B, kv, G, S, d = getattr(torch, args.dtype), args.batch, args.kv_heads, args.group, args.context, args.head_dim
    ck, cv = torch.randn(B, kv, S, d, dtype=dt), torch.randn(B, kv, S, d, dtype=dt)
    slots = torch.arange(S)
    cache_bias = torch.where(slots[None] < S - 8, 0.0, float("-inf")).to(dt).expand(B, S)[:, None, None, :]
    print("| T | split ms | merged ms | merged / split | split GB/s | merged GB/s |")
    print("|---|---|---|---|---|---|")
    for T in args.tokens:
        q, k, v = torch.randn(B, kv, G, T, d, dtype=dt), torch.randn(B, kv, T, d, dtype=dt), torch.randn(B, kv, T, d, dtype=dt)
        i = torch.arange(T)
        causal = torch.where(i[None] <= i[:, None], 0.0, float("-inf")).to(dt)
        ms = {}
        for name, fn in (("split", Attention._attend_split), ("merged", Attention._attend_merged)):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn(q, k, v, ck, cv, cache_bias, causal)
                times.append(time.perf_counter() - t)
            ms[name] = 1e3 * sorted(times)[len(times) // 2]
        gbs = {n: 2 * ck.nbytes / (t / 1e3) / 1e9 for n, t in ms.items()}
        print(f"| {T} | {ms['split']:.1f} | {ms['merged']:.1f} | {ms['merged'] / ms['split']:.2f} | "
              f"{gbs['split']:.1f} | {gbs['merged']:.1f} |")


if __name__ == "__main__":
    main()
