"""The attention op of two versions of the CPU kernels, side by side: a git revision's
``magicdec_rt/csrc`` against the working tree's, each built into its own library and timed in its
own process (both register ``torch.ops.magicdec``), runs alternated (this machine's speed drifts).

    python bench/op_ab.py --base HEAD~1                                # avx2 and avx512 paths, T 1-5
    python bench/op_ab.py --base c0ffa1b --isa avx2 --tokens 3 4 --rounds 3

One layer of the embedded model's shape (3 KV x 3 query heads, head dim 64) at B x context slots,
bf16 and float32 caches, the block's own T keys: median ms of ``--repeats`` calls per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from workload import time_ms

ROOT = Path(__file__).resolve().parents[1]
CSRC = "magicdec_rt/csrc"


def build(src: Path, name: str, out: Path) -> Path:
    """The op library from ``src`` (attention.cpp, linear.cpp), compiled as the package does, in a
    child process (building also loads it, and one process takes one ``magicdec`` library)."""
    out.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from torch.utils import cpp_extension; from magicdec_rt.attention import BUILD_FLAGS; "
            "cpp_extension.load(name=sys.argv[1], sources=sys.argv[3:], build_directory=sys.argv[2], "
            "is_python_module=False, verbose=False, **BUILD_FLAGS)")
    subprocess.run([sys.executable, "-c", code, name, str(out), str(src / "attention.cpp"), str(src / "linear.cpp")],
                   check=True)
    return out / f"{name}.so"


def time_op(args) -> dict:
    """Run in the child: load one library and time every (dtype, isa, T)."""
    torch.ops.load_library(args.library)
    B, S, kv, G, d = args.batch, args.context, 3, 3, 64
    times = {}
    for dtype in (torch.bfloat16, torch.float32):
        k, v = torch.randn(B, kv, S, d, dtype=dtype), torch.randn(B, kv, S, d, dtype=dtype)
        lengths = torch.full((B,), S)
        for isa in args.isa:
            torch.ops.magicdec.set_isa(isa)
            for T in args.tokens:
                q = torch.randn(B, kv, G * T, d, dtype=dtype)
                kn, vn = torch.randn(B, kv, T, d, dtype=dtype), torch.randn(B, kv, T, d, dtype=dtype)
                call = lambda: torch.ops.magicdec.attention(q, k, v, lengths, kn, vn, d**-0.5)  # noqa: E731
                times[f"{str(dtype)[6:]} {isa} T{T}"] = time_ms(call, args.repeats)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    p.add_argument("--isa", nargs="+", default=["avx2", "avx512"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=7680)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--library", help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.library:
        print(json.dumps(time_op(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_src = tmp / "base"
        base_src.mkdir()
        for f in ("attention.cpp", "linear.cpp"):
            text = subprocess.run(["git", "show", f"{args.base}:{CSRC}/{f}"], cwd=ROOT, capture_output=True, text=True)
            if text.returncode:
                sys.exit(f"error: git show {args.base}:{CSRC}/{f}: {text.stderr.strip()}")
            (base_src / f).write_text(text.stdout)
        libs = {args.base: build(base_src, "op_ab_base", tmp / "build-base"),
                "working tree": build(ROOT / CSRC, "op_ab_tree", tmp / "build-tree")}
        runs = {name: [] for name in libs}
        child = [sys.executable, __file__, "--base", args.base, "--isa", *args.isa, "--tokens", *map(str, args.tokens),
                 "--batch", str(args.batch), "--context", str(args.context), "--repeats", str(args.repeats)]
        for _ in range(args.rounds):
            for name, lib in libs.items():
                out = subprocess.run(child + ["--library", str(lib)], capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    from magicdec_rt import cpu

    print(f"{cpu.model_name()} ({', '.join(cpu.describe()['isa'])}); B{args.batch} x {args.context} slots, one layer; "
          f"ms per call, {args.rounds} alternated runs each\n")
    print(f"| cache, ISA, query tokens | {args.base}, ms | working tree, ms | speedup |\n|---|---|---|---|")
    base, tree = runs[args.base], runs["working tree"]
    for key in base[0]:
        a, b = [r[key] for r in base], [r[key] for r in tree]
        print(f"| {key} | {' / '.join(f'{x:.2f}' for x in a)} | {' / '.join(f'{x:.2f}' for x in b)} | "
              f"{min(a) / min(b):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
