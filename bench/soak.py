"""Soak test of ``magicdec-serve`` over loopback: many mixed requests, MagicDec against plain decoding.

    python bench/soak.py --engine engines/soak                      # 1000 requests per mode
    python bench/soak.py --engine engines/soak --requests 200 --modes auto --out /tmp/soak.json

For each mode (a ``--gamma`` of the server: ``auto``, the planner, needs a calibrated engine; ``0``
is autoregressive) it starts ``magicdec-serve`` on 127.0.0.1 at a free port, sends the same
``--requests`` requests with ``--concurrency`` clients at a time through the ``openai`` client
(streamed; prompts of mixed lengths cut from the long-context corpus, or from the packaged Macbeth
without it; greedy, seeded and unseeded sampling; 16-128 new tokens; ``--cancel`` of them closed
mid-stream after 1-5 chunks), and reports:

* throughput (completion tokens and requests per second of the run);
* time to first token and inter-token latency (per request: (last token - first token) / (tokens
  - 1)) at p50 / p99, and the p99 gap between chunks (the stall a client sees);
* the server's resident memory when request 100 completes and at the end, and the growth;
* requests hung (no answer within ``--request-timeout``) or lost (no final chunk, not cancelled);
* the gammas the planner ran and the acceptance, from ``/metrics``;
* whether the first 20 seeded requests (and greedy ones) match an offline replay: the same
  request alone through ``Runtime.generate``.

Writes ``--out`` (JSON) and a markdown table beside it. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from workload import ROOT

from magicdec_rt import cpu


def prompts_source(tokenizer) -> list[int]:
    corpus = ROOT.parent / "shared" / "data" / "longctx"
    files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else []
    if not files:
        files = [ROOT / "magicdec_rt" / "data" / "macbeth.txt"]
    return [t for f in files for t in tokenizer(f.read_text()).input_ids]


def make_jobs(n: int, tokens: list[int], max_prompt: int, cancel: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        length = rng.randint(32, max_prompt)
        start = rng.randrange(0, len(tokens) - length)
        kind = rng.choices(["greedy", "seeded", "unseeded"], [0.4, 0.4, 0.2])[0]
        params = dict(max_tokens=rng.randint(16, 128), temperature=0.0)
        if kind != "greedy":
            params.update(temperature=rng.choice([0.6, 0.8, 1.0]), top_p=rng.choice([1.0, 0.9]))
            if rng.random() < 0.5:
                params["extra_body"] = {"top_k": 40}
        if kind == "seeded":
            params["seed"] = rng.randrange(2**31)
        jobs.append(dict(index=i, kind=kind, prompt=tokens[start : start + length], params=params,
                         cancel_after=rng.randint(1, 5) if rng.random() < cancel else None))
    return jobs


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


async def run_load(base: str, jobs: list[dict], concurrency: int, timeout: float, pid: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=timeout)
    sem = asyncio.Semaphore(concurrency)
    results, memory, done = [None] * len(jobs), {}, [0]

    async def one(job):
        async with sem:
            rec = dict(index=job["index"], kind=job["kind"], text="", chunks=[], tokens=None, finish=None,
                       cancelled=False, error=None)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    stream = await client.completions.create(model="soak", prompt=job["prompt"], stream=True,
                                                             stream_options={"include_usage": True}, **job["params"])
                    async for chunk in stream:
                        if chunk.usage is not None:
                            rec["tokens"] = chunk.usage.completion_tokens
                        if chunk.choices:
                            c = chunk.choices[0]
                            if c.text:
                                rec["chunks"].append(time.perf_counter() - t0)
                                rec["text"] += c.text
                            rec["finish"] = c.finish_reason or rec["finish"]
                        if job["cancel_after"] and len(rec["chunks"]) >= job["cancel_after"] and not rec["finish"]:
                            rec["cancelled"] = True
                            await stream.close()
                            break
            except TimeoutError:
                rec["error"] = "hung"
            except Exception as e:  # noqa: BLE001 -- counted as lost, with its message
                rec["error"] = f"{type(e).__name__}: {e}"
            results[job["index"]] = rec
            done[0] += 1
            if done[0] in (100, len(jobs)):
                memory[done[0]] = rss_mib(pid)

    t = time.perf_counter()
    await asyncio.gather(*(one(j) for j in jobs))
    wall = time.perf_counter() - t
    await client.close()
    return dict(records=results, wall_s=wall, rss_mib=memory)


def summarize(load: dict, metrics: str) -> dict:
    recs = load["records"]
    full = [r for r in recs if not r["cancelled"] and not r["error"]]
    ttft = [r["chunks"][0] for r in recs if r["chunks"]]
    itl = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in full if r["tokens"] and r["tokens"] > 1]
    gaps = [b - a for r in recs for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] or 0 for r in full)
    hung = sum(r["error"] == "hung" for r in recs)
    lost = sum(1 for r in recs if not r["cancelled"] and (r["error"] not in (None, "hung") or r["finish"] is None))
    rounds = {m.group(1): float(m.group(2)) for m in re.finditer(r'magicdec_rounds_total\{gamma="(\d+)"\} (\S+)', metrics)}
    acc = re.search(r"^magicdec_acceptance_rate (\S+)", metrics, re.M)
    mal = re.search(r"^magicdec_mean_accepted_length (\S+)", metrics, re.M)
    r100, rend = load["rss_mib"].get(100), load["rss_mib"].get(len(recs))
    return dict(requests=len(recs), completed=len(full), cancelled=sum(r["cancelled"] for r in recs), hung=hung,
                lost=lost, errors=sorted({r["error"] for r in recs if r["error"]}), wall_s=load["wall_s"],
                completion_tokens_per_s=tokens / load["wall_s"], requests_per_s=len(recs) / load["wall_s"],
                ttft_p50_s=percentile(ttft, 0.5), ttft_p99_s=percentile(ttft, 0.99),
                itl_p50_s=percentile(itl, 0.5), itl_p99_s=percentile(itl, 0.99), chunk_gap_p99_s=percentile(gaps, 0.99),
                rss_mib_at_100=r100, rss_mib_at_end=rend,
                rss_growth_pct=100 * (rend - r100) / r100 if r100 and rend else None,
                gamma_rounds=rounds, acceptance_rate=float(acc.group(1)) if acc else None,
                mean_accepted_length=float(mal.group(1)) if mal else None)


def serve(engine: Path, mode: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "magicdec_rt.server", "--engine", str(engine), "--port", "0", "--gamma", mode,
           "--model-name", "soak", "--max-waiting", str(args.concurrency), "--chunks-per-round",
           str(args.chunks_per_round)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        sys.exit(f"error: magicdec-serve did not start: {line!r}")
    return proc, f"http://127.0.0.1:{m.group(1)}"


def replay(engine: Path, mode: str, jobs: list[dict], records: list[dict], n: int) -> dict:
    """The first ``n`` completed seeded requests (and as many greedy ones), each run alone offline
    with the server's gamma policy."""
    from magicdec_rt import Runtime

    rt = Runtime.load(engine)
    out = {}
    for kind in ("seeded", "greedy"):
        picked = [j for j in jobs if j["kind"] == kind and not records[j["index"]]["cancelled"]
                  and not records[j["index"]]["error"]][:n]
        same = 0
        for j in picked:
            p = dict(j["params"])
            kw = dict(gamma=mode if mode == "auto" else int(mode), max_new_tokens=p.pop("max_tokens"), temperature=p.pop("temperature"), top_p=p.pop("top_p", 1.0),
                      seed=p.pop("seed", None), top_k=p.pop("extra_body", {}).get("top_k", 0))
            same += rt.generate([j["prompt"]], **kw)[0].text == records[j["index"]]["text"]
        out[kind] = dict(checked=len(picked), identical=same)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--modes", nargs="+", default=["auto", "0"], help="server --gamma values to compare")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cancel", type=float, default=0.1, help="fraction of requests closed mid-stream")
    p.add_argument("--max-prompt", type=int, default=1536, help="longest prompt, tokens (shortest 32)")
    p.add_argument("--chunks-per-round", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--replay", type=int, default=20, help="seeded (and greedy) requests replayed offline per mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak" / "soak.json")
    args = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.engine))
    jobs = make_jobs(args.requests, prompts_source(tok), args.max_prompt, args.cancel, args.seed)
    manifest = json.loads((args.engine / "manifest.json").read_text())
    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=cpu.describe(), modes={},
                  engine={k: manifest[k] for k in ("max_batch", "max_seq_len", "dtype", "backend")})
    for mode in args.modes:
        proc, base = serve(args.engine, mode, args)
        try:
            start_rss = rss_mib(proc.pid)
            load = asyncio.run(run_load(base, jobs, args.concurrency, args.request_timeout, proc.pid))
            import httpx

            metrics = httpx.get(f"{base}/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        s = summarize(load, metrics) | {"rss_mib_at_start": start_rss}
        s["offline_replay"] = replay(args.engine, mode, jobs, load["records"], args.replay)
        report["modes"][mode] = s
        print(f"gamma={mode}: {json.dumps(s)}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}`", "", f"{m['cpu']} ({', '.join(m['isa'])}); engine {r['engine']}.", "",
             "| server --gamma | requests | cancelled | hung | lost | tok/s | req/s | TTFT p50 / p99 s | ITL p50 / p99 ms "
             "| chunk gap p99 ms | RSS MiB start / @100 / end | growth | gamma rounds | acceptance | replay seeded / greedy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in r["modes"].items():
        rep = s["offline_replay"]
        ms = lambda x: f"{1e3 * x:.1f}" if x is not None else "-"  # noqa: E731
        sec = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        num = lambda x, f=".0f": format(x, f) if x is not None else "-"  # noqa: E731
        lines.append(
            f"| {mode} | {s['requests']} | {s['cancelled']} | {s['hung']} | {s['lost']} | {s['completion_tokens_per_s']:.1f} "
            f"| {s['requests_per_s']:.2f} | {sec(s['ttft_p50_s'])} / {sec(s['ttft_p99_s'])} | {ms(s['itl_p50_s'])} / "
            f"{ms(s['itl_p99_s'])} | {ms(s['chunk_gap_p99_s'])} | {num(s['rss_mib_at_start'])} / {num(s['rss_mib_at_100'])} / "
            f"{num(s['rss_mib_at_end'])} | {num(s['rss_growth_pct'], '+.1f')}% | {s['gamma_rounds']} | "
            f"{s['acceptance_rate'] if s['acceptance_rate'] is None else round(s['acceptance_rate'], 3)} | "
            f"{rep['seeded']['identical']}/{rep['seeded']['checked']} / {rep['greedy']['identical']}/{rep['greedy']['checked']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
