"""Every CUDA path of magicdec-rt, checked and measured, in one script for a lent GPU machine
(run it through ``bench/gpu.sh``). NOT YET RUN ON A GPU: written on a CPU-only machine; only its
refusal there is tested.

    bash bench/gpu.sh                        # everything (split it with --phase if a limit bites)
    bash bench/gpu.sh --phase exact          # eager-cuda / aoti-cuda / CUDA graphs vs the CPU float32 reference
    bash bench/gpu.sh --phase speed --backends eager --batches 16 64 --contexts 4096 8192

The embedded GGUF (94 MB) is more than one command may send to those machines, so the model is a
random-weight Llama of SmolLM2-135M's exact shape (30 layers, GQA 9/3, head dim 64, vocabulary
49152), written as an HF directory with a word-level tokenizer. That is enough for exactness (same
weights on CPU and GPU) and for step costs (they depend on shapes only); acceptance is not: the
predicted MagicDec speedup combines the GPU's step costs with the per-position acceptance measured
on the CPU with the real model (``--acceptance-from``), and says so.

Phases: ``exact`` builds float32 engines (CPU eager = the reference; CUDA eager; CUDA aoti) at batch
4 and compares greedy tokens for gamma 0 and 3 on 1k-token prompts, with and without CUDA graphs;
``speed`` times the AR, draft and verify steps (bf16, random caches, CUDA events, CUDA graphs on)
per batch x context and predicts MagicDec's speedup per gamma. Writes ``--out`` (JSON) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=False)


def random_model_dir(path: Path, seed: int = 0) -> Path:
    """SmolLM2-135M's shape with random weights (LM head scaled up so greedy choices are not
    near-ties) and a word-level tokenizer ``w0 .. w49151``."""
    if (path / "config.json").is_file():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(SMOLLM2["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return path


def exact(src: Path, work: Path, args) -> dict:
    from builders.build import build_engine
    from magicdec_rt import Runtime

    opts = dict(max_batch=4, max_seq_len=1152, buckets=[1152], gammas=[3], default_gamma=3, dtype="float32",
                show_progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=g).tolist() for n in (1000, 1024, 950, 1010)]
    engines = {"cpu eager": build_engine(work / "exact-cpu", src, backend="eager", device="cpu", **opts)}
    for backend in args.backends:
        engines[f"cuda {backend}"] = build_engine(work / f"exact-cuda-{backend}", src, backend=backend, device="cuda", **opts)
    tokens, report = {}, {}
    for name, eng in engines.items():
        for graphs in ([False, True] if name.startswith("cuda") else [False]):
            rt = Runtime.load(eng, cuda_graphs=graphs)
            label = name + (" + CUDA graphs" if graphs else "")
            tokens[label] = {gamma: [r.token_ids for r in rt.generate(prompts, max_new_tokens=16, gamma=gamma)]
                             for gamma in (0, 3)}
            ref = tokens["cpu eager"]
            report[label] = {f"gamma {gamma}": sum(a == b for a, b in zip(tokens[label][gamma], ref[gamma]))
                             for gamma in (0, 3)}
            print(f"  {label}: rows equal to the CPU float32 reference {report[label]}", file=sys.stderr)
    return {"rows": len(prompts), "equal_rows": report}


def step_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` calls timed with CUDA events, after a warm-up that also captures graphs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def speed(src: Path, work: Path, args, acceptance: dict) -> list[dict]:
    from builders.build import build_engine
    from magicdec_rt.cuda_graphs import GraphedSteps
    from magicdec_rt.engine import load_steps, read_manifest
    from magicdec_rt.planner import omega

    rows = []
    for backend in args.backends:
        for B in args.batches:
            eng = build_engine(work / f"speed-{backend}-b{B}", src, backend=backend, device="cuda", dtype="bfloat16",
                               max_batch=B, max_seq_len=max(args.contexts), buckets=args.contexts, gammas=args.gammas,
                               default_gamma=args.gammas[-1], show_progress=False)
            m = read_manifest(eng)
            steps = GraphedSteps(load_steps(eng, m))
            kv, d, L = m.model.num_kv_heads, m.model.head_dim, m.model.num_layers
            dev, dt = torch.device("cuda"), m.torch_dtype

            def inputs(T, slots, length):
                caches = [[torch.randn(B, kv, slots, d, device=dev, dtype=dt) * 0.5 for _ in range(L)] for _ in range(2)]
                ids = torch.randint(0, m.model.vocab_size, (B, T), device=dev)
                pos = (length + torch.arange(T, device=dev)).expand(B, T).contiguous()
                return ids, pos, caches[0], caches[1], torch.full((B,), length, device=dev)

            draft_in = inputs(1, m.draft_slots, m.draft_budget)
            draft = step_ms(lambda: steps("draft", *draft_in), args.repeats)
            for S in args.contexts:
                cost = {}
                for g in [0, *args.gammas]:
                    x = inputs(g + 1, S, S - g - 1)
                    cost[g] = step_ms(lambda: steps(f"verify{g}@{S}", *x), args.repeats)
                    del x
                row = dict(backend=backend, batch=B, context=S, ar_ms=cost[0], draft_ms=draft,
                           verify_ms={g: cost[g] for g in args.gammas})
                # Predicted: tokens per round (CPU-measured acceptance) x AR step / round cost.
                row["predicted_speedup"] = {g: omega(acceptance[:g]) * cost[0] / (g * draft + cost[g]) for g in args.gammas}
                rows.append(row)
                print(f"  {backend} B{B} S{S}: AR {cost[0]:.2f} ms, draft {draft:.2f} ms, verify "
                      f"{', '.join(f'g{g} {cost[g]:.2f}' for g in args.gammas)} ms", file=sys.stderr)
            del steps
            torch.cuda.empty_cache()
    return rows


def cpu_acceptance(path: Path) -> list[float]:
    """Per-position conditional acceptance of the largest gamma in a CPU sweep (greedy)."""
    points = [p for p in json.loads(path.read_text())["points"] if p.get("temperature") == 0.0 and p.get("gamma") != "auto"
              and isinstance(p.get("gamma"), int) and p["gamma"] > 0]
    best = max(points, key=lambda p: p["gamma"])
    ppa = best["per_position_acceptance"]  # unconditional: the first i+1 drafts all accepted
    conditional = [ppa[0]] + [b / a if a else 0.0 for a, b in zip(ppa, ppa[1:])]
    return conditional + conditional[-1:] * 8  # gammas past the sweep's: its last position's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["exact", "speed", "all"], default="all")
    p.add_argument("--backends", nargs="+", default=["eager", "aoti"], choices=["eager", "aoti"])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "gpu")
    p.add_argument("--acceptance-from", type=Path, default=ROOT / "bench" / "results" / "sweep-b16-7680-kernel" / "sweep.json")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu" / "gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    src = random_model_dir(args.work / "random-smollm2")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "command": " ".join(sys.argv), "model": "random weights, SmolLM2-135M shape"}
    if args.phase in ("exact", "all"):
        report["exact"] = exact(src, args.work, args)
    if args.phase in ("speed", "all"):
        acceptance = cpu_acceptance(args.acceptance_from)
        report["acceptance_from_cpu"] = {"file": str(args.acceptance_from), "conditional_per_position": acceptance[:6]}
        report["speed"] = speed(src, args.work, args, acceptance)
        print("| backend | batch | context | AR ms | draft ms | " + " | ".join(f"verify g{g} ms" for g in args.gammas)
              + " | " + " | ".join(f"predicted g{g} (CPU acceptance)" for g in args.gammas) + " |")
        print("|---" * (5 + 2 * len(args.gammas)) + "|")
        for r in report["speed"]:
            print(f"| {r['backend']} | {r['batch']} | {r['context']} | {r['ar_ms']:.2f} | {r['draft_ms']:.2f} | "
                  + " | ".join(f"{r['verify_ms'][g]:.2f}" for g in args.gammas) + " | "
                  + " | ".join(f"{r['predicted_speedup'][g]:.2f}x" for g in args.gammas) + " |")
    report["wall_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"written {args.out} in {report['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
