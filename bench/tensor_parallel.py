"""Cache memory per rank and time per step at tensor-parallel world sizes 1 and 2 (gloo, CPU).

    python bench/tensor_parallel.py --engine engines/smollm2-135m-instruct --batch 4 --context 1024

For each world size it starts that many processes on this machine (as torchrun would), each
loading the same engine with that world size, and runs autoregressive and MagicDec decoding on the
same prompts. On a 2-core CPU two ranks share the cores, so expect no speedup: the point is that
each rank holds only its share of the caches and weights, and that the output is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from workload import DEFAULT_CORPUS, ROOT, load_prompts  # bench/ is this script's directory


def engine_for_world(engine: Path, world: int, into: Path) -> Path:
    """The engine rebuilt for ``world`` ranks (one weights file per rank)."""
    from builders.build import build_like

    return engine if world == 1 else build_like(engine, into, world_size=world)


def rank_main(rank, world, port, engine, prompts, new_tokens, gamma, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, os.cpu_count() // world))
    from magicdec_rt import Runtime
    from magicdec_rt.parallel import shutdown

    rt = Runtime.load(engine)
    report = {"rank": rank, "kv_heads": rt.steps.model.kv_heads,
              "cache_MiB": (rt.full.nbytes() + rt.draft.nbytes()) / 2**20,
              "weights_MiB": sum({t.data_ptr(): t.nbytes for t in rt.steps.model.state_dict().values()}.values()) / 2**20}
    for mode, g in (("autoregressive", 0), ("magicdec", gamma)):
        out_tokens = rt.generate(prompts, max_new_tokens=new_tokens, gamma=g)
        s = rt.last_stats
        report[mode] = {
            "tokens": [r.token_ids for r in out_tokens],
            "ms_per_verify_step": 1e3 * s["verify_s"] / s["verify_steps"],
            "ms_per_draft_step": 1e3 * s["draft_s"] / s["draft_steps"] if s["draft_steps"] else None,
            "decode_tok_s": s["decode_tokens_per_s"],
        }
    Path(out, f"w{world}-rank{rank}.json").write_text(json.dumps(report))
    shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True, help="an engine built with world size 1")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tensor_parallel.json")
    args = p.parse_args()
    from transformers import AutoTokenizer

    prompts = load_prompts(AutoTokenizer.from_pretrained(args.engine), args.corpus, args.batch, args.context)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            engine = engine_for_world(args.engine, world, Path(tmp) / f"w{world}")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(rank_main, args=(world, port, str(engine), prompts, args.new_tokens, args.gamma, tmp),
                     nprocs=world, join=True)
            results[world] = [json.loads((Path(tmp) / f"w{world}-rank{r}.json").read_text()) for r in range(world)]
    same = all(results[2][0][m]["tokens"] == results[1][0][m]["tokens"] for m in ("autoregressive", "magicdec"))
    print("| world | rank | KV heads | cache MiB | weights MiB | AR ms/step | draft ms/step | verify ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for world, ranks in results.items():
        for r in ranks:
            print(f"| {world} | {r['rank']} | {r['kv_heads']} | {r['cache_MiB']:.1f} | {r['weights_MiB']:.1f} | "
                  f"{r['autoregressive']['ms_per_verify_step']:.1f} | {r['magicdec']['ms_per_draft_step']:.1f} | "
                  f"{r['magicdec']['ms_per_verify_step']:.1f} |")
    print(f"world 2 tokens == world 1 tokens: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "same_tokens": same, "results": results}, indent=2))


if __name__ == "__main__":
    main()
