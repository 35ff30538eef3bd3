"""The engine core under a steady stream of requests, without HTTP: the Service in this process,
16 requests in flight; resident memory printed every 100 completions, and at the end the rounds
per gamma with their time and tokens (what the planner chose, and what each choice delivered).

    python bench/memory_probe.py --engine engines/soak-b16-2k --gamma auto --requests 800
    python bench/memory_probe.py --engine engines/soak-b16-2k --gamma auto --requests 200 --max-prompt 1024

Prompts of 32 to ``--max-prompt`` tokens from the packaged Macbeth, 16-64 new tokens, every other
request sampled with a seed. A diagnostic for the soak (``bench/soak.py``), which adds the HTTP
server.
"""

from __future__ import annotations

import argparse
import collections
import random
import threading
import time

from workload import ROOT

from magicdec_rt import Runtime, Service
from magicdec_rt.cli import gamma_arg


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True)
    p.add_argument("--gamma", type=gamma_arg, default="auto")
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--max-prompt", type=int, default=300)
    args = p.parse_args()
    rt = Runtime.load(args.engine)
    service = Service(rt, max_waiting=64, gamma=args.gamma)
    rounds = collections.defaultdict(lambda: [0, 0.0, 0])  # gamma -> rounds, seconds, tokens committed
    service.core.observer = lambda info: info["kind"] == "round" and rounds[info["gamma"]].__setitem__(
        slice(None), [a + b for a, b in zip(rounds[info["gamma"]], (1, info["seconds"], info["live"] + info["accepted"]))])
    tokens = rt.tokenizer((ROOT / "magicdec_rt" / "data" / "macbeth.txt").read_text()).input_ids
    rng, slots, lock, done = random.Random(0), threading.Semaphore(16), threading.Lock(), [0]

    def one(i: int) -> None:
        n = rng.randint(32, args.max_prompt)
        start = rng.randrange(len(tokens) - n)
        params = dict(max_tokens=rng.randint(16, 64), **(dict(temperature=0.8, seed=i) if i % 2 else {}))
        try:
            service.submit(tokens[start : start + n], **params).result()
        finally:
            slots.release()
            with lock:
                done[0] += 1
                if done[0] % 100 == 0:
                    print(f"{done[0]} requests: {rss_mib():.1f} MiB ({time.strftime('%X')})", flush=True)

    threads = []
    for i in range(args.requests):
        slots.acquire()
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    service.close()
    for g, (n, seconds, committed) in sorted(rounds.items()):
        print(f"gamma {g}: {n} rounds, {1e3 * seconds / n:.1f} ms per round, {committed / n:.2f} tokens per round, "
              f"{committed / seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
