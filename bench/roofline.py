"""How close each step of the runtime comes to this CPU's roofline, and the attention op alone.

    python bench/roofline.py                                   # points 8x4096 16x7680, gamma 1-6
    python bench/roofline.py --points 2x512 --gammas 1 3 --repeats 1 --out /tmp/roofline/roofline.json
    python bench/roofline.py --engine engines/aoti-b16-7680 --out bench/results/roofline/aoti-b16-7680.json

Measures, in the same run, this machine's read bandwidth and float32 / bfloat16 matmul peaks, then
times the eager steps of the model (``magicdec_rt.model``, no engine), or with ``--engine`` that
engine's steps (compiled graphs for ``aoti``) at its batch and largest bucket, on random caches for every
batch x context point: the AR step (T=1 over the context), the draft step (T=1 over the draft
cache's slots), the verify steps (T=gamma+1 over the context) and a prefill chunk (one row, 256
tokens). Each step's floor is max(bytes / bandwidth, FLOPs / matmul peak of the dtype)
(``workload.StepCost``; a draft step with int8 weights, ``linear.py``, reads one byte per weight);
the table gives the measured time against it. A second table times the
attention op of one layer (``torch.ops.magicdec.attention``, per kernel ISA) against PyTorch's
flash kernel over the same cache. Prints markdown; writes ``--out`` (JSON) and ``.md`` beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from workload import ROOT, StepCost, measure_bandwidth, measure_matmul, time_ms

from magicdec_rt import attention, cpu
from magicdec_rt.checkpoint import build_model, embedded_model_path, load_source
from magicdec_rt.engine import step_module
from magicdec_rt.linear import pack_linears, quantize_linears



def random_caches(model, batch: int, slots: int, dtype: torch.dtype) -> list[torch.Tensor]:
    c = model.cfg
    return [torch.randn(batch, c.num_kv_heads, slots, c.head_dim, dtype=dtype) * 0.5 for _ in range(c.num_layers)]


def step_inputs(model, batch: int, tokens: int, context: int, length: int):
    """tokens, positions (the block right after the context), lengths."""
    ids = torch.randint(model.cfg.vocab_size, (batch, tokens))
    positions = (context + torch.arange(tokens)).expand(batch, tokens).contiguous()
    return ids, positions, torch.full((batch,), length, dtype=torch.long)


def step_caller(model, engine):
    """``call(name, *inputs)``: the model's eager modules, or an engine's steps (its compiled graphs)."""
    if engine is not None:
        return engine
    modules = {}

    def call(name, *inputs):
        if name not in modules:  # built once per step, outside the timed calls after the first
            modules[name] = step_module(model, name)
        return modules[name](*inputs)
    return call


def steps(call, model, cost, args, batch: int, context: int, bw: float, peak: float) -> list[dict]:
    dt = args.kv_torch_dtype
    ck, cv = random_caches(model, batch, context, dt), random_caches(model, batch, context, dt)
    dk, dv = random_caches(model, batch, args.draft_slots, dt), random_caches(model, batch, args.draft_slots, dt)
    # (label, step name, T, slots attended, caches). The draft attends to every slot of its own
    # cache, at positions after the context (keys keep their original positions).
    runs = []
    for label, name, T, slots, k, v in [("AR", f"verify0@{context}", 1, context, ck, cv),
                                        ("draft", "draft", 1, args.draft_slots, dk, dv),
                                        *((f"verify γ={g}", f"verify{g}@{context}", g + 1, context, ck, cv)
                                          for g in args.gammas)]:
        ids, pos, lengths = step_inputs(model, batch, T, context, slots)
        runs.append((label, T, batch, slots, functools.partial(call, name, ids, pos, k, v, lengths)))
    # Row 0 of each layer's cache is a contiguous [1, kv, S, d] view: no copy of the cache.
    pk, pv = [c[:1] for c in ck], [c[:1] for c in cv]
    ids, pos, lengths = step_inputs(model, 1, args.prefill_chunk, context, context)
    last = torch.tensor([args.prefill_chunk - 1])
    runs.append(("prefill", args.prefill_chunk, 1, context,
                 functools.partial(call, f"prefill@{context}", ids, pos, pk, pv, lengths, last)))
    rows = []
    for name, T, n, slots, fn in runs:
        ms = time_ms(fn, args.repeats)
        c = args.draft_cost if name == "draft" else cost
        floor_s, bound = c.floor_s(n, T, slots, bw, peak)
        rows.append(dict(batch=batch, context=context, step=name, tokens=T, rows=n, slots=slots,
                         bytes=c.bytes(n, slots), flops=c.flops(n, T, slots), bound=bound,
                         roofline_ms=1e3 * floor_s, measured_ms=ms, measured_over_roofline=ms / (1e3 * floor_s),
                         pct_of_roofline=100 * 1e3 * floor_s / ms))
        print(f"  {batch}x{context} {name}: {ms:.2f} ms", file=sys.stderr)
    for r in rows:
        r["over_AR"] = r["measured_ms"] / rows[0]["measured_ms"]
    return rows


def attention_ops(args, batch: int, context: int, bw: float, peaks: dict) -> list[dict]:
    """One layer's attention (3 KV heads x 3 query heads, head dim 64) over a full cache. Its
    roofline: the cache read once, or q.k and p.v (2 FLOPs per cached element per query row each)
    at the matmul peak of the path's arithmetic (bf16 pairs on the AVX512-BF16 path, else float32),
    for the path this process runs by default only: the peaks were measured under its instruction
    sets (MKL and oneDNN held to AVX2 with the AVX2 path, say), not the other paths'."""
    kv, G, d, dt = 3, 3, 64, args.kv_torch_dtype
    k_cache, v_cache = torch.randn(batch, kv, context, d, dtype=dt), torch.randn(batch, kv, context, d, dtype=dt)
    lengths = torch.full((batch,), context, dtype=torch.long)
    floor_ms = 1e3 * 2 * k_cache.nbytes / bw
    # The stock kernel gets the query group folded into rows too: same cache, same query rows.
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    default_isa = attention.set_isa("")
    rows = []
    try:
        for T in args.tokens:
            q = torch.randn(batch, kv, G * T, d, dtype=dt)
            k_new, v_new = torch.randn(batch, kv, T, d, dtype=dt), torch.randn(batch, kv, T, d, dtype=dt)
            stock = time_ms(lambda: flash(q, k_cache, v_cache, scale=d**-0.5), args.repeats)
            for isa in attention.ISAS:  # those this CPU lacks are skipped
                try:
                    attention.set_isa(isa)
                except RuntimeError:  # not supported here
                    continue
                ms = time_ms(lambda: torch.ops.magicdec.attention(q, k_cache, v_cache, lengths, k_new, v_new, d**-0.5),
                             args.repeats)
                flops = 4 * batch * kv * G * T * context * d
                roofline_ms = max(floor_ms, 1e3 * flops / peaks["bfloat16" if isa == "avx512bf16" else "float32"])
                rows.append(dict(batch=batch, context=context, tokens=T, isa=isa, kernel_ms=ms,
                                 GB_s=2 * k_cache.nbytes / ms / 1e6, pct_of_floor=100 * floor_ms / ms,
                                 GFLOP_s=flops / ms / 1e6, stock_ms=stock, speedup=stock / ms,
                                 pct_of_roofline=100 * roofline_ms / ms if isa == default_isa else None))
    finally:
        attention.set_isa("auto")
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}`", "",
             f"{m['cpu']} ({', '.join(m['isa'])}), torch {m['torch']}, {m['threads']} threads, {r['backend']}, {r['dtype']} "
             f"(KV cache {r.get('kv_dtype', r['dtype'])}), "
             f"kernel ISA {m['kernel_isa']}. Read bandwidth {m['read_bandwidth_GB_s']:.1f} GB/s; matmul "
             f"{m['matmul_GFLOP_s']['float32']:.0f} GFLOP/s float32, {m['matmul_GFLOP_s']['bfloat16']:.0f} bfloat16.", "",
             "| B x context | step | T | slots | MB read | GFLOP | bound | roofline ms | measured ms | measured / roofline "
             "| % of roofline | / AR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in r["steps"]:
        lines.append(f"| {s['batch']}x{s['context']} | {s['step']} | {s['tokens']} | {s['slots']} | {s['bytes'] / 1e6:.0f} "
                     f"| {s['flops'] / 1e9:.1f} | {s['bound']} | {s['roofline_ms']:.2f} | {s['measured_ms']:.2f} "
                     f"| {s['measured_over_roofline']:.2f} | {s['pct_of_roofline']:.0f}% | {s['over_AR']:.2f} |")
    lines += ["", "Attention op, one layer (3 KV x 3 query heads, d 64), cache read once: GB/s = 2 x K bytes / time; "
              "% of read floor = that read at the measured bandwidth; % of roofline = the larger of it and the op's "
              "FLOPs at the matmul peak above (bfloat16's for the avx512bf16 path, float32's for the others), for the "
              "path this process runs (the peaks were measured under its instruction sets; '-' for the others).", "",
              "| B x context | T | ISA | kernel ms | GB/s | % of read floor | GFLOP/s | % of roofline | stock flash ms "
              "| speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["attention"]:
        roof = "-" if a["pct_of_roofline"] is None else f"{a['pct_of_roofline']:.0f}%"
        lines.append(f"| {a['batch']}x{a['context']} | {a['tokens']} | {a['isa']} | {a['kernel_ms']:.3f} | {a['GB_s']:.1f} "
                     f"| {a['pct_of_floor']:.0f}% | {a['GFLOP_s']:.0f} | {roof} | {a['stock_ms']:.3f} | {a['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--engine", type=Path, help="time this engine's steps (e.g. compiled graphs) instead of eager "
                   "modules; its batch, context bucket, dtype, gammas and draft cache set the point")
    p.add_argument("--dtype", default=cpu.auto_dtype(), choices=["float32", "bfloat16"])
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16"], help="the KV caches' dtype (default: --dtype's)")
    p.add_argument("--points", nargs="+", default=["8x4096", "16x7680"], help="BATCHxCONTEXT")
    p.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--draft-slots", type=int, default=272, help="draft cache slots: budget 256 + 16 scratch")
    p.add_argument("--tokens", type=int, nargs="+", default=list(range(1, 8)), help="attention op: query tokens per row")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "roofline" / "roofline.json")
    args = p.parse_args()
    engine = None
    args.prefill_chunk = 256
    if args.engine:
        from magicdec_rt.engine import load_steps, read_manifest

        m = read_manifest(args.engine)
        engine = load_steps(args.engine, m)
        args.model, args.dtype, args.points = args.engine, m.dtype, [f"{m.max_batch}x{m.max_seq_len}"]
        args.kv_dtype = m.kv_dtype
        args.gammas = [g for g in m.gammas if g > 0]
        args.draft_slots, args.prefill_chunk = m.draft_slots, m.prefill_chunk
    args.torch_dtype = getattr(torch, args.dtype)
    args.kv_torch_dtype = getattr(torch, args.kv_dtype or args.dtype)
    points = [tuple(map(int, s.split("x"))) for s in args.points]
    if not attention.kernel_available():
        sys.exit("error: the attention kernel could not be built (see the warning above)")

    bw = measure_bandwidth()
    peaks = {name: measure_matmul(getattr(torch, name)) for name in ("float32", "bfloat16")}
    if engine is not None:
        model, draft_int8 = engine.model, m.draft_int8
    else:
        config, state, _, _ = load_source(args.model or embedded_model_path())
        model = build_model(config, state, args.torch_dtype)
        draft_int8 = quantize_linears(model)  # as an engine loads it (--draft-weights auto)
        pack_linears(model)
    call = step_caller(model, engine)
    cost = StepCost(model.cfg, args.torch_dtype.itemsize, args.kv_torch_dtype.itemsize)
    # The draft step's floor counts its weights as it reads them (int8: one byte each).
    args.draft_cost = StepCost(model.cfg, 1, args.kv_torch_dtype.itemsize) if draft_int8 else cost
    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), dtype=args.dtype,
                  kv_dtype=args.kv_dtype or args.dtype,
                  backend=engine.backend if engine else "eager",
                  model=str(args.model or embedded_model_path()),
                  machine=dict(**cpu.describe(), torch=torch.__version__, threads=torch.get_num_threads(),
                               kernel_isa=attention.set_isa(""), read_bandwidth_GB_s=bw / 1e9,
                               matmul_GFLOP_s={k: v / 1e9 for k, v in peaks.items()}),
                  steps=[], attention=[])
    with torch.inference_mode():
        for B, S in points:
            report["steps"] += steps(call, model, cost, args, B, S, bw, peaks[args.dtype])
        for B, S in points:
            report["attention"] += attention_ops(args, B, S, bw, peaks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
