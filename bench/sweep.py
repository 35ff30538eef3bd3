"""The MagicDec sweep: where speculation wins, by how much, and why.

    python bench/sweep.py --quick        # batch 1/4, context 1k/2k: under 10 minutes on 2 cores
    python bench/sweep.py                # batch 1-16 x context 1k-7.5k x gamma 1-6 x budget 128-512 (hours)
    python bench/sweep.py --batch 16 --context 7680 --gamma 2 3 4 --budget 256 --temperature 0

For every batch B, draft budget W and ``--draft-weights`` there is one engine (built under
``engines/`` when missing, and calibrated for the planner). For every context C the B rows get C-token windows of
different documents from ``--corpus``; they are prefilled once (timed apart), and every mode then
decodes ``--new-tokens`` tokens from that same prefilled state: our autoregressive decoding
(gamma 0), MagicDec at each gamma, and the planner choosing gamma per round ("auto"), greedy and at
each ``--temperature`` (sampled unseeded, by the rejection sampler, unless ``--seeded``). Hugging
Face ``generate`` with its static cache decodes the same prompts
(greedy, same dtype) as the outside baseline.

Throughput is steady-state: tokens committed in the rounds where every row is live, over their
time (a server refilling finished rows sees that); the batch's own rate, until its last row is
done, is reported beside it (with ragged acceptance some rows finish rounds before others, and a
static batch pays for them idling). Every point carries the roofline (bytes and FLOPs a step must move, this machine's measured read
bandwidth and matmul rate, and the fraction of that floor achieved) and the planner's predicted
speedup beside the measured one. Writes ``sweep.json``, ``sweep.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from magicdec_rt import cpu
from magicdec_rt.kv_cache import DraftPolicy
from workload import DEFAULT_CORPUS, ROOT, StepCost, load_prompts, measure_bandwidth, measure_matmul

QUICK = dict(batch=[1, 4], context=[1024, 2048], gamma=[1, 2, 3], budget=[256], temperature=[0.0, 0.7], new_tokens=32,
             repeats=3)
FULL = dict(batch=[1, 4, 8, 16], context=[1024, 2048, 4096, 7680], gamma=[1, 2, 3, 4, 5, 6], budget=[128, 256, 512],
            temperature=[0.0, 0.7], new_tokens=64, repeats=3)


def sweep_runtime_class():
    from magicdec_rt import Runtime
    from magicdec_rt.core import EngineCore

    class SweepCore(EngineCore):
        """An engine core that prefills each prompt once: a later request for the same prompt (in
        any SweepRuntime of the same batch) restores its rows of the full cache instead, so every
        mode starts from the same state and the sweep pays each prefill once."""

        saved = {}  # prompt -> (k, v [layers, kv, P, d], first-token logits [1, V])

        def _prefill_chunk(self):
            b = self.filling[0]
            r = self.slots[b]
            hit = SweepCore.saved.get(tuple(r.prompt))
            if hit is None:
                return super()._prefill_chunk()
            k, v, logits = hit
            self.fit(len(r.prompt))
            self.full.write(b, 0, k, v)
            self.lengths[b] = len(r.prompt)
            self._prompt_done(b, logits)

        def _prompt_done(self, b, logits):
            P = len(self.slots[b].prompt)
            SweepCore.saved[tuple(self.slots[b].prompt)] = (self.full.k[:, b, :, :P].clone(),
                                                           self.full.v[:, b, :, :P].clone(), logits.clone())
            super()._prompt_done(b, logits)

    class SweepRuntime(Runtime):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.core.__class__ = SweepCore

    return SweepRuntime, SweepCore


def engine_for(batch: int, budget: int, contexts: list[int], new_tokens: int, gammas: list[int], dtype: str,
               backend: str = "eager", draft_positions: str = "original", draft_weights: str = "auto",
               kv_dtype: str | None = None, cpu_isa: str = "native") -> Path:
    """An engine with one context bucket per swept context (each just large enough), so every
    point runs at a bucket that fits it rather than at the next power of two."""
    from builders.build import build_engine
    from magicdec_rt.engine import read_manifest

    buckets = [c + new_tokens + 8 for c in sorted(contexts)]
    name = (f"sweep-{dtype}-b{batch}-w{budget}-c{'-'.join(map(str, buckets))}" + ("-cachepos" if draft_positions == "cache" else "")
            + ("" if draft_weights == "auto" else f"-{draft_weights}")
            + ("" if kv_dtype in (None, dtype) else f"-kv{kv_dtype}") + ("" if cpu_isa == "native" else f"-{cpu_isa}"))
    path = ROOT / "engines" / (name if backend == "eager" else f"{name}-{backend}")
    # Graphs compiled for another x86-64 level (or, before the level was recorded, -march=native) are rebuilt.
    arch = cpu.compile_target(cpu_isa)[0] if backend == "aoti" else ""
    if ((path / "manifest.json").is_file() and set(gammas) <= set((m := read_manifest(path)).gammas)
            and m.cpu_arch == arch):
        from magicdec_rt.planner import Calibration

        calibration = Calibration.load(path)
        if calibration is None or calibration.changed():  # none, or measured under other kernels / CPU / torch
            from magicdec_rt.cli import calibrate

            calibrate(path)
        return path
    return build_engine(path, backend=backend, max_batch=batch, max_seq_len=buckets[-1], buckets=buckets, dtype=dtype,
                        draft_budget=budget, gammas=gammas, default_gamma=gammas[-1], show_progress=False,
                        calibrate=True, draft_positions=draft_positions, draft_weights=draft_weights,
                        kv_dtype=kv_dtype, cpu_isa=cpu_isa)


def hf_generate(engine: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> dict:
    """Hugging Face ``generate``, greedy, static cache: prefill time and decode tokens/s, timed by a
    logits processor that stamps every step."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    model = AutoModelForCausalLM.from_pretrained(engine, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, cache_implementation="static", logits_processor=LogitsProcessorList([Stamp()]),
                       pad_token_id=0)
    decode_s = stamps[-1] - stamps[0]
    return {"prefill_s": stamps[0] - t0, "decode_s": decode_s,
            "decode_tokens_per_s": len(prompts) * (len(stamps) - 1) / decode_s}


def point(stats: dict, ar: dict, batch: int, context: int, budget: int, temperature: float, rt, roof) -> dict:
    """One measured mode against the autoregressive run of the same prompts."""
    cost, bw, mm = roof
    rounds = stats["verify_steps"]
    gamma = stats["gamma"]
    # Floors: every round's draft steps and verify, at the context the rows had on average.
    ctx = context + stats["new_tokens"] / batch / 2
    floor = 0.0
    bound = set()
    # Draft steps read their weights as the engine holds them for drafting (int8: one byte each).
    m = rt.manifest
    draft_cost = StepCost(m.model, 1, m.kv_torch_dtype.itemsize) if m.draft_int8 else cost
    for g, n in stats["gamma_rounds"].items():
        f, b = cost.floor_s(batch, g + 1, ctx, bw, mm)
        floor += n * f
        bound.add(b)
        if g:
            f, b = draft_cost.floor_s(batch, 1, budget + g, bw, mm)
            floor += n * g * f
    p = stats["per_position_acceptance"]
    predicted = None
    if isinstance(gamma, int) and gamma:
        # The model's prediction from this run's acceptance: conditional alphas from the
        # unconditional per-position rates, costs from the calibration at the run's bucket.
        alphas = [p[0]] + [p[i] / p[i - 1] if p[i - 1] else 0.0 for i in range(1, len(p))]
        bucket = rt.manifest.bucket(context + stats["new_tokens"] // batch)
        predicted = rt.planner.speedup(gamma, bucket, temperature == 0, alphas)
    return {
        "batch": batch, "context": context, "budget": budget, "temperature": temperature, "gamma": gamma,
        "gamma_rounds": stats["gamma_rounds"], "policy_rounds": stats.get("policy_rounds"),
        "tokens_per_s": stats["steady_tokens_per_s"],
        "speedup": stats["steady_tokens_per_s"] / ar["steady_tokens_per_s"],
        "batch_tokens_per_s": stats["decode_tokens_per_s"],
        "batch_speedup": stats["decode_tokens_per_s"] / ar["decode_tokens_per_s"],
        "predicted_speedup": predicted,
        "planner_online_prediction": stats["predicted_speedup"],
        "acceptance_rate": stats["acceptance_rate"],
        "per_position_acceptance": p,
        "tokens_per_row_per_verify": (stats["new_tokens"] - batch) / batch / rounds,
        "ms_autoregressive_step": 1e3 * ar["decode_s"] / ar["verify_steps"],
        "ms_per_round": 1e3 * stats["decode_s"] / rounds,
        "ms_draft_per_round": 1e3 * stats["draft_s"] / rounds,
        "ms_verify_per_round": 1e3 * stats["verify_s"] / rounds,
        "ms_rest_per_round": 1e3 * stats["rest_s"] / rounds,
        "ms_per_token_per_row": 1e3 * stats["decode_s"] / ((stats["new_tokens"] - batch) / batch),
        "bytes_per_verify": cost.bytes(batch, int(ctx)),
        "floor_ms_per_round": 1e3 * floor / rounds,
        "fraction_of_floor": floor / stats["decode_s"],
        "bound": "/".join(sorted(bound)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"the quick preset: {QUICK}")
    p.add_argument("--batch", type=int, nargs="+")
    p.add_argument("--context", type=int, nargs="+")
    p.add_argument("--gamma", type=int, nargs="+")
    p.add_argument("--budget", type=int, nargs="+", help="draft budgets (sinks + window slots)")
    p.add_argument("--policy", nargs="+", default=["snapkv"], choices=DraftPolicy.KINDS,
                   help="draft cache policies (kv_cache.DraftPolicy, default settings)")
    p.add_argument("--draft-weights", nargs="+", default=["auto"], choices=["auto", "int8", "target"],
                   help="the draft step's weights (magicdec-build --draft-weights), one engine each, compared in the run")
    p.add_argument("--temperature", type=float, nargs="+")
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--repeats", type=int, help="runs of every mode, interleaved; the median is reported")
    p.add_argument("--dtype", default=cpu.auto_dtype(), choices=["float32", "bfloat16"],
                   help="default: what --dtype auto picks on this CPU")
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16"],
                   help="the KV caches' dtype (default: --dtype's; bfloat16 under float32 weights is what "
                        "--dtype auto builds on CPUs without native bf16)")
    p.add_argument("--seeded", action="store_true", help="sample with seeds: drafter-invariant Gumbel sampling "
                   "instead of the rejection sampler (sampling.py), whose acceptance is higher")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    p.add_argument("--backend", default="eager", choices=["eager", "aoti"],
                   help="engine backend (aoti: AOTInductor graphs, built once per point and kept under engines/)")
    p.add_argument("--cpu-isa", default="native", choices=list(cpu.TARGETS),
                   help="the CPUs aoti graphs are compiled for (magicdec-build --cpu-isa)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, help="results directory (default bench/results/sweep[-quick])")
    args = p.parse_args()
    preset = QUICK if args.quick else FULL
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    out = args.out or ROOT / "bench" / "results" / ("sweep-quick" if args.quick else "sweep")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch_dtype = getattr(torch, args.dtype)
    bw, mm = measure_bandwidth(), measure_matmul(torch_dtype)
    print(f"machine: read bandwidth {bw / 1e9:.1f} GB/s, {args.dtype} matmul {mm / 1e9:.0f} GFLOP/s", file=sys.stderr)
    gammas = sorted(set(cfg["gamma"]))
    SweepRuntime, SweepCore = sweep_runtime_class()
    points, hf, prefill = [], [], []
    for batch in cfg["batch"]:
        engines = {(w, dw): engine_for(batch, w, cfg["context"], cfg["new_tokens"], gammas, args.dtype, args.backend,
                                       draft_weights=dw, kv_dtype=args.kv_dtype, cpu_isa=args.cpu_isa)
                   for w in cfg["budget"] for dw in args.draft_weights}
        # A drafter: (budget, draft weights, policy).
        drafters = [(w, dw, policy) for w in cfg["budget"] for dw in args.draft_weights for policy in args.policy]
        runtimes = {}
        for w, dw, policy in drafters:
            rt = runtimes[w, dw, policy] = SweepRuntime.load(engines[w, dw], draft_policy=DraftPolicy(policy))
            rt.core.full = runtimes[drafters[0]].full  # one full cache per batch, shared
        first = runtimes[drafters[0]]
        cost = StepCost(first.manifest.model, torch_dtype.itemsize, first.manifest.kv_torch_dtype.itemsize)
        for context in cfg["context"]:
            prompts = load_prompts(first.tokenizer, args.corpus, batch, context)
            SweepCore.saved.clear()
            for temperature in cfg["temperature"]:
                # Modes run interleaved, --repeats times; each reports its median run (this
                # machine's step times wander by +-20-40% over minutes).
                modes = [(*drafters[0], 0)] + [(*d, g) for d in drafters for g in gammas + ["auto"]]
                runs = {mode: [] for mode in modes}
                for _ in range(cfg["repeats"]):
                    for *drafter, gamma in modes:
                        rt, fresh = runtimes[tuple(drafter)], not SweepCore.saved  # fresh: this run really prefills
                        torch.manual_seed(0)  # unseeded requests draw their generators from it
                        rt.generate(prompts, max_new_tokens=cfg["new_tokens"], temperature=temperature,
                                    seed=0 if args.seeded else None, gamma=gamma)
                        s = dict(rt.last_stats)
                        runs[(*drafter, gamma)].append(s)
                        if fresh:
                            prefill.append({"batch": batch, "context": context, "prefill_s": s["prefill_s"],
                                            "tokens_per_s": batch * context / s["prefill_s"]})
                median = {m: sorted(r, key=lambda s: s["steady_tokens_per_s"])[len(r) // 2] for m, r in runs.items()}
                ar = median[modes[0]]
                for (w, dw, policy, gamma), s in median.items():
                    rt = runtimes[w, dw, policy]
                    pt = point(s, ar, batch, context, w, temperature, rt, (cost, bw, mm))
                    pt["policy"], pt["draft_weights"] = policy, "int8" if rt.manifest.draft_int8 else "target"
                    pt["runs_tokens_per_s"] = [r["steady_tokens_per_s"] for r in runs[w, dw, policy, gamma]]
                    points.append(pt)
                    print(f"B{batch} C{context} W{w} {policy} {pt['draft_weights']} T{temperature} gamma {gamma}: "
                          f"{pt['tokens_per_s']:.1f} tok/s, "
                          f"speedup {pt['speedup']:.2f}x (predicted {_fmt(pt['predicted_speedup'])}), "
                          f"acceptance {_fmt(pt['acceptance_rate'])}", file=sys.stderr)
            if not args.no_hf:
                r = hf_generate(engines[drafters[0][:2]], prompts, cfg["new_tokens"], torch_dtype)
                ours = next(q for q in points if q["batch"] == batch and q["context"] == context and q["gamma"] == 0)
                r |= {"batch": batch, "context": context, "ours_autoregressive_tokens_per_s": ours["tokens_per_s"],
                      "ours_over_hf": ours["tokens_per_s"] / r["decode_tokens_per_s"]}
                hf.append(r)
                print(f"B{batch} C{context} HF generate: {r['decode_tokens_per_s']:.1f} tok/s; ours {r['ours_over_hf']:.2f}x",
                      file=sys.stderr)
        del runtimes, first
        SweepCore.saved.clear()
    report = {"command": " ".join(sys.argv), "config": cfg, "dtype": args.dtype, "kv_dtype": args.kv_dtype or args.dtype,
              "backend": args.backend,
              "machine": cpu.describe(),
              "read_bandwidth_GB_s": bw / 1e9, "matmul_GFLOP_s": mm / 1e9, "wall_s": time.perf_counter() - t_start,
              "prefill": prefill, "hf_generate": hf, "points": points}
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    (out / "sweep.md").write_text(markdown(report))
    plots(report, out)
    print(f"written {out}/sweep.json, sweep.md and plots in {report['wall_s']:.0f} s", file=sys.stderr)


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    kv = r.get("kv_dtype", r["dtype"])
    dtypes = r["dtype"] if kv == r["dtype"] else f"{r['dtype']} weights, {kv} KV cache"
    lines = [f"`{r['command']}` ({dtypes}, {r['backend']}; {r['wall_s']:.0f} s). This machine: "
             f"{m.get('cpu', '?')} ({', '.join(m.get('isa', []))}), read bandwidth "
             f"{r['read_bandwidth_GB_s']:.1f} GB/s, matmul {r['matmul_GFLOP_s']:.0f} GFLOP/s.", "",
             "| batch | context | budget | policy | draft weights | temp | gamma | tok/s | speedup | predicted | planner online | "
             "batch speedup | acceptance | tokens/verify | ms AR step | ms draft / verify / rest per round | GB per verify | "
             "floor fraction | bound |",
             "|" + "---|" * 19]
    for q in r["points"]:
        g = q["gamma"] if q["gamma"] != "auto" else "auto " + ",".join(f"{k}:{v}" for k, v in q["gamma_rounds"].items())
        lines.append(
            f"| {q['batch']} | {q['context']} | {q['budget']} | {q.get('policy', 'streaming')} | {q.get('draft_weights', 'target')} | "
            f"{q['temperature']} | {g} | {q['tokens_per_s']:.1f} | "
            f"{q['speedup']:.2f}x | {_fmt(q['predicted_speedup'])} | {_fmt(q['planner_online_prediction'])} | "
            f"{q['batch_speedup']:.2f}x | "
            f"{_fmt(q['acceptance_rate'])} | {q['tokens_per_row_per_verify']:.2f} | {q['ms_autoregressive_step']:.0f} | "
            f"{q['ms_draft_per_round']:.0f} / {q['ms_verify_per_round']:.0f} / {q['ms_rest_per_round']:.0f} | "
            f"{q['bytes_per_verify'] / 1e9:.2f} | {q['fraction_of_floor']:.2f} | {q['bound']} |")
    if r["hf_generate"]:
        lines += ["", "| batch | context | HF generate tok/s | our autoregressive tok/s | ours / HF | HF prefill s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {h['batch']} | {h['context']} | {h['decode_tokens_per_s']:.1f} | "
                  f"{h['ours_autoregressive_tokens_per_s']:.1f} | {h['ours_over_hf']:.2f}x | {h['prefill_s']:.1f} |"
                  for h in r["hf_generate"]]
    lines += ["", "| batch | context | prefill s | prefill tok/s |", "|---|---|---|---|"]
    lines += [f"| {q['batch']} | {q['context']} | {q['prefill_s']:.1f} | {q['tokens_per_s']:.0f} |" for q in r["prefill"]]
    return "\n".join(lines) + "\n"


def plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = r["points"]
    budget0 = r["config"]["budget"][len(r["config"]["budget"]) // 2]
    temps = r["config"]["temperature"]
    contexts = r["config"]["context"]

    def best(batch, context, temperature, budget=budget0):
        fixed = [q for q in pts if (q["batch"], q["context"], q["temperature"], q["budget"]) == (batch, context, temperature, budget)
                 and isinstance(q["gamma"], int) and q["gamma"] > 0]
        return max(fixed, key=lambda q: q["speedup"], default=None)

    def auto(batch, context, temperature, budget=budget0):
        return next((q for q in pts if (q["batch"], q["context"], q["temperature"], q["budget"], q["gamma"])
                     == (batch, context, temperature, budget, "auto")), None)

    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    for ax, t in zip(axes[0], temps):
        for c in contexts:
            bs = [b for b in r["config"]["batch"] if best(b, c, t)]
            ax.plot(bs, [best(b, c, t)["speedup"] for b in bs], "o-", label=f"{c} best gamma")
            ax.plot(bs, [auto(b, c, t)["speedup"] for b in bs], "x--", color=ax.lines[-1].get_color(), label=f"{c} planner")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xlabel="batch", ylabel="speedup over autoregressive", title=f"temperature {t}, budget {budget0}")
        ax.set_xticks(r["config"]["batch"], [str(b) for b in r["config"]["batch"]])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_batch.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for c in contexts:
        ar = [q for q in pts if q["context"] == c and q["gamma"] == 0 and q["temperature"] == temps[0]]
        md = [best(q["batch"], c, temps[0]) for q in ar]
        line = ax.plot([q["ms_per_token_per_row"] for q in ar], [q["tokens_per_s"] for q in ar], "o-", label=f"{c} autoregressive")
        ax.plot([q["ms_per_token_per_row"] for q in md if q], [q["tokens_per_s"] for q in md if q], "^--",
                color=line[0].get_color(), label=f"{c} MagicDec (best gamma)")
        for q in ar:
            ax.annotate(f"B{q['batch']}", (q["ms_per_token_per_row"], q["tokens_per_s"]), fontsize=7)
    ax.set(xlabel="ms per token per row", ylabel="tokens/s (batch)", title=f"throughput vs latency, temperature {temps[0]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_latency.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    gmax = max(r["config"]["gamma"])
    for w in r["config"]["budget"]:
        for policy, dw in sorted({(q.get("policy", "streaming"), q.get("draft_weights", "target")) for q in pts}):
            for t in temps:
                qs = [next((q for q in pts if (q["context"], q["budget"], q.get("policy", "streaming"),
                                               q.get("draft_weights", "target"), q["temperature"], q["gamma"], q["batch"])
                            == (c, w, policy, dw, t, gmax, r["config"]["batch"][-1])), None) for c in contexts]
                ax.plot([c for c, q in zip(contexts, qs) if q], [q["acceptance_rate"] for q in qs if q],
                        "o-" if t == 0 else "s--", label=f"{policy} ({dw} drafts), budget {w}, temperature {t}")
    ax.set(xlabel="context", ylabel=f"acceptance rate (gamma {gmax})", ylim=(0, 1), title="acceptance vs context and budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)

    bars = [q for q in pts if q["temperature"] == temps[0] and q["budget"] == budget0
            and (q["gamma"] == 0 or q is best(q["batch"], q["context"], temps[0]))]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(bars)), 4.5))
    labels = [f"B{q['batch']}\nC{q['context']}\ng{q['gamma']}" for q in bars]
    bottom = [0.0] * len(bars)
    for part in ("draft", "verify", "rest"):
        vals = [q[f"ms_{part}_per_round"] / q["tokens_per_row_per_verify"] for q in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(bars)), labels, fontsize=6)
    ax.set(ylabel="ms per round / tokens committed per row", title="time split: autoregressive (g0) vs best gamma")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=110)
    plt.close("all")


if __name__ == "__main__":
    main()
