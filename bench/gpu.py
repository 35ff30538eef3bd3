"""Every CUDA path of magicdec-rt, checked and measured, in one script for a lent GPU machine
(run it through ``bench/gpu.sh``). Ran on an H200 (2026-11-25 and 26, ``bench/results/gpu/``):
the eager parts completed; aoti-cuda builds crashed (see ``aoti_probe``). Without CUDA it refuses
(tested in CI).

    bash bench/gpu.sh                        # everything (split it with --phase if a limit bites)
    bash bench/gpu.sh --phase exact          # eager-cuda / aoti-cuda / CUDA graphs vs the CPU float32 reference
    bash bench/gpu.sh --phase speed --backends eager --batches 16 64 --contexts 4096 8192
    bash bench/gpu.sh --phase profile        # the CUDA kernels of one eager draft step and AR step

The embedded GGUF (94 MB) is more than one command may send to those machines, so the model is a
random-weight Llama of SmolLM2-135M's exact shape (30 layers, GQA 9/3, head dim 64, vocabulary
49152), written as an HF directory with a word-level tokenizer. That is enough for exactness (same
weights on CPU and GPU) and for step costs (they depend on shapes only); acceptance is not: the
predicted MagicDec speedup combines the GPU's step costs with the per-position acceptance measured
on the CPU with the real model (``--acceptance-from``), and says so.

Phases: ``exact`` builds float32 engines (CPU eager = the reference; CUDA eager; CUDA aoti) at batch
4 and compares greedy tokens for gamma 0 and 3 on 1k-token prompts, with and without CUDA graphs;
``speed`` times the AR, draft and verify steps (bf16, random caches, CUDA events, CUDA graphs on)
per batch x context and predicts MagicDec's speedup per gamma; ``profile`` lists the CUDA kernels
of one eager draft step and AR step. Writes ``--out`` (JSON) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
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


EXACT = dict(max_batch=4, max_seq_len=1152, buckets=[1152], gammas=[3], default_gamma=3, dtype="float32",
             show_progress=False)


def exact_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, SMOLLM2["vocab_size"], (n,), generator=g).tolist() for n in (1000, 1024, 950, 1010)]


def greedy_tokens(engine: Path, cuda_graphs: bool) -> dict[int, list[list[int]]]:
    from magicdec_rt import Runtime

    rt = Runtime.load(engine, cuda_graphs=cuda_graphs)
    return {gamma: [r.token_ids for r in rt.generate(exact_prompts(), max_new_tokens=16, gamma=gamma)]
            for gamma in (0, 3)}


def exact(src: Path, work: Path, backend: str, ref: dict) -> dict:
    """Rows of a CUDA engine (without and with CUDA graphs) equal to the CPU float32 reference."""
    from builders.build import build_engine

    t0 = time.perf_counter()
    eng = build_engine(work / f"exact-cuda-{backend}", src, backend=backend, device="cuda", **EXACT)
    report = {"build_s": round(time.perf_counter() - t0, 1)}
    for graphs in (False, True):
        toks = greedy_tokens(eng, graphs)
        label = "CUDA graphs" if graphs else "no graphs"
        report[label] = {f"gamma {gamma}": sum(a == b for a, b in zip(toks[gamma], ref[gamma])) for gamma in (0, 3)}
        log(f"cuda {backend} {label}: rows equal to the CPU float32 reference {report[label]} of {len(ref[0])}")
    return report


PROBE = """
import sys, tempfile, torch
from pathlib import Path
from builders.compile import AOTI_OPTIONS
case = sys.argv[1]
if "kernel" in case:
    from magicdec_rt import attention
    attention.kernel_available()
device = "cpu" if "cpu" in case else "cuda"
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU()).to(device)
x = torch.randn(4, 64, device=device)
ep = torch.export.export(m, (x,))
path = str(Path(tempfile.mkdtemp()) / "g.pt2")
torch._inductor.aoti_compile_and_package(ep, package_path=path,
                                         inductor_configs=dict(AOTI_OPTIONS) if "options" in case else {})
g = torch._inductor.aoti_load_package(path)
if "options" in case:
    g.load_constants(dict(m.named_parameters()), check_full_update=True, user_managed=True)
torch.testing.assert_close(g(x), m(x))
print("ok")
"""


def aoti_probe() -> dict:
    """Which ingredient of an aoti-cuda graph crashes a process (the H200 runs of 2026-11-25/26
    segfaulted in ``aoti_load_package``): a two-layer model compiled with Inductor's defaults on the
    CPU and on the GPU, with the engine's options (weights outside the package, freezing), and with
    those after loading the CPU kernels. Each case runs in its own process, so a crash is reported by
    its exit status. On 2026-11-26 every case crashed, the CPU one too: the AOTI runtime of that
    machine's torch 2.11.0+cu130 fails to load any package, whatever magicdec-rt adds."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = {}
    for case in ("cpu defaults", "defaults", "options", "options+kernel"):
        proc = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, env=env, timeout=300)
        said = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Extension modules")]
        out[case] = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: " + (said or [""])[-1]
        log(f"aoti probe {case}: {out[case]}")
    return out


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


def step_inputs(m, B: int, T: int, slots: int, length: int):
    """A step's inputs on the GPU for manifest ``m``: T tokens per row after ``length`` cached ones,
    random caches of ``slots`` slots."""
    kv, d, L, dev = m.model.num_kv_heads, m.model.head_dim, m.model.num_layers, torch.device("cuda")
    caches = [[torch.randn(B, kv, slots, d, device=dev, dtype=m.torch_dtype) * 0.5 for _ in range(L)] for _ in range(2)]
    ids = torch.randint(0, m.model.vocab_size, (B, T), device=dev)
    pos = (length + torch.arange(T, device=dev)).expand(B, T).contiguous()
    return ids, pos, caches[0], caches[1], torch.full((B,), length, device=dev)


def speed(src: Path, work: Path, args, backend: str, B: int, acceptance: list[float]) -> list[dict]:
    """AR, draft and verify step times of one bf16 engine at batch B, per context."""
    from builders.build import build_engine
    from magicdec_rt.cuda_graphs import GraphedSteps
    from magicdec_rt.engine import load_steps, read_manifest
    from magicdec_rt.planner import omega

    t0 = time.perf_counter()
    eng = build_engine(work / f"speed-{backend}-b{B}", src, backend=backend, device="cuda", dtype="bfloat16",
                       max_batch=B, max_seq_len=max(args.contexts), buckets=args.contexts, gammas=args.gammas,
                       default_gamma=args.gammas[-1], show_progress=False)
    build_s = round(time.perf_counter() - t0, 1)
    m = read_manifest(eng)
    steps = GraphedSteps(load_steps(eng, m))
    draft_in = step_inputs(m, B, 1, m.draft_slots, m.draft_budget)
    draft = step_ms(lambda: steps("draft", *draft_in), args.repeats)
    rows = []
    for S in args.contexts:
        cost = {}
        for g in [0, *args.gammas]:
            x = step_inputs(m, B, g + 1, S, S - g - 1)
            cost[g] = step_ms(lambda: steps(f"verify{g}@{S}", *x), args.repeats)
        row = dict(backend=backend, batch=B, context=S, build_s=build_s, ar_ms=cost[0], draft_ms=draft,
                   verify_ms={g: cost[g] for g in args.gammas})
        # Predicted: tokens per round (CPU-measured acceptance) x AR step / round cost.
        row["predicted_speedup"] = {g: omega(acceptance[:g]) * cost[0] / (g * draft + cost[g]) for g in args.gammas}
        rows.append(row)
        log(f"{backend} B{B} S{S}: AR {cost[0]:.2f} ms, draft {draft:.2f} ms, verify "
            + ", ".join(f"g{g} {cost[g]:.2f}" for g in args.gammas) + " ms")
    return rows


def profile(src: Path, work: Path, args) -> dict:
    """Where an eager-cuda step's time goes (the steps above cost ~4 ms even over a 260-slot draft
    cache): the CUDA kernels one draft step and one AR step launch, without graphs, at batch 16 and
    the first context: their number, summed GPU time, and the costliest."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from builders.build import build_engine
    from magicdec_rt.engine import load_steps, read_manifest

    B, S = 16, args.contexts[0]
    eng = build_engine(work / "profile-eager-b16", src, backend="eager", device="cuda", dtype="bfloat16", max_batch=B,
                       max_seq_len=S, buckets=[S], gammas=[3], default_gamma=3, show_progress=False)
    m = read_manifest(eng)
    steps = load_steps(eng, m)
    out = {}
    for name, x in (("draft", step_inputs(m, B, 1, m.draft_slots, m.draft_budget)),
                    (f"verify0@{S}", step_inputs(m, B, 1, S, S - 1))):
        for _ in range(3):
            steps(name, *x)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            steps(name, *x)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name: dict[str, list] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time)
        top = sorted(by_name.items(), key=lambda kv_: -sum(kv_[1]))[:8]
        out[name] = {"kernels": len(kernels), "gpu_ms": round(sum(e.device_time for e in kernels) / 1e3, 3),
                     "costliest": [{"name": n[:90], "calls": len(t), "ms": round(sum(t) / 1e3, 3)} for n, t in top]}
        log(f"profile {name}: {len(kernels)} kernels, {out[name]['gpu_ms']} ms of GPU time; costliest "
            + "; ".join(f"{c['name'][:40]} x{c['calls']} {c['ms']} ms" for c in out[name]["costliest"][:4]))
    return out


def cpu_acceptance(path: Path) -> list[float]:
    """Per-position conditional acceptance of the largest gamma in a CPU sweep (greedy)."""
    points = [p for p in json.loads(path.read_text())["points"] if p.get("temperature") == 0.0 and p.get("gamma") != "auto"
              and isinstance(p.get("gamma"), int) and p["gamma"] > 0]
    best = max(points, key=lambda p: p["gamma"])
    ppa = best["per_position_acceptance"]  # unconditional: the first i+1 drafts all accepted
    conditional = [ppa[0]] + [b / a if a else 0.0 for a, b in zip(ppa, ppa[1:])]
    return conditional + conditional[-1:] * 8  # gammas past the sweep's: its last position's


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def table(rows: list[dict], gammas: list[int]) -> str:
    lines = ["| backend | batch | context | AR ms | draft ms | " + " | ".join(f"verify g{g} ms" for g in gammas)
             + " | " + " | ".join(f"predicted g{g} (CPU acceptance)" for g in gammas) + " |",
             "|---" * (5 + 2 * len(gammas)) + "|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['context']} | {r['ar_ms']:.2f} | {r['draft_ms']:.2f} | "
                     + " | ".join(f"{r['verify_ms'][g]:.2f}" for g in gammas) + " | "
                     + " | ".join(f"{r['predicted_speedup'][g]:.2f}x" for g in gammas) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["exact", "speed", "profile", "all"], default="all")
    p.add_argument("--backends", nargs="+", default=["eager", "aoti"], choices=["eager", "aoti"])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--gammas", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--deadline", type=float, default=540.0,
                   help="seconds after which no new part starts (the machines stop a command at 600)")
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "gpu")
    p.add_argument("--acceptance-from", type=Path, default=ROOT / "bench" / "results" / "sweep-b16-7680-kernel" / "sweep.json")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu" / "gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        sys.exit(2)
    import transformers

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__, "command": " ".join(sys.argv),
              "model": "random weights, SmolLM2-135M shape", "exact": {}, "speed": [], "errors": {}, "skipped": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        report["wall_s"] = round(time.perf_counter() - T0, 1)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    def part(name: str, fn):
        """One part: its failure is recorded and the next part runs; past the deadline it is skipped."""
        if time.perf_counter() - T0 > args.deadline:
            report["skipped"].append(name)
            log(f"{name}: skipped (past --deadline {args.deadline:.0f} s)")
            return None
        log(f"{name}: start")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a GPU run must report every part it can
            report["errors"][name] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc().splitlines(True)[-12:])
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            return None
        finally:
            save()

    src = random_model_dir(args.work / "random-smollm2")
    ref = None
    if args.phase in ("exact", "all"):
        from builders.build import build_engine

        ref = part("exact: CPU float32 reference", lambda: greedy_tokens(
            build_engine(args.work / "exact-cpu", src, backend="eager", device="cpu", **EXACT), False))
    if args.phase in ("speed", "all"):
        acceptance = cpu_acceptance(args.acceptance_from)
        report["acceptance_from_cpu"] = {"file": str(args.acceptance_from), "conditional_per_position": acceptance[:6]}
    if args.phase in ("profile", "all"):
        report["profile"] = part("profile: eager B16", lambda: profile(src, args.work, args))
    # Eager before aoti, so that a run cut short still reports what the cheap parts reached.
    for backend in sorted(args.backends, key=["eager", "aoti"].index) if args.phase != "profile" else []:
        if backend == "aoti":
            report["aoti_probe"] = part("aoti probe", aoti_probe)
        if ref is not None:
            report["exact"][backend] = part(f"exact: cuda {backend}", lambda: exact(src, args.work, backend, ref))
        if args.phase in ("speed", "all"):
            for B in args.batches:
                report["speed"] += part(f"speed: {backend} B{B}",
                                        lambda: speed(src, args.work, args, backend, B, acceptance)) or []
    if report["speed"]:
        print(table(report["speed"], args.gammas))
    save()
    log(f"written {args.out}")


if __name__ == "__main__":
    main()
