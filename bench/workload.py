"""What the benchmarks share: long-context prompts from a corpus, this machine's roofline, and the
bytes and FLOPs a decoding step must move."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "longctx"


def drafter_args(p, out: Path) -> None:
    """The settings the drafter benchmarks share: one batch of corpus windows, one budget and gamma."""
    from magicdec_rt import cpu

    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default=cpu.auto_dtype(), choices=["float32", "bfloat16"])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--out", type=Path, default=out)


def write_report(out: Path, args, rows: list[dict], title: str, table: list[str]) -> None:
    """``out`` (JSON: the command, this machine, the settings, the rows) and ``out`` with ``.md``: the
    command, ``title`` and the CPU, then the markdown ``table``, which is also printed."""
    import json

    from magicdec_rt import cpu

    report = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=cpu.describe(),
                  config={k: v for k, v in vars(args).items() if k not in ("out", "corpus")}, rows=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    lines = [f"`{report['command']}` ({title}; {report['machine']['cpu']})", "", *table]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def load_prompts(tokenizer, corpus: Path, batch: int, context: int) -> list[list[int]]:
    """``batch`` prompts of ``context`` tokens, row ``i`` from document ``i`` of the corpus (a
    second pass over the documents takes their next windows)."""
    files = sorted(corpus.glob("*.txt")) if corpus.is_dir() else []
    if not files:
        sys.exit(f"error: no .txt files in corpus directory {str(corpus)!r}; pass --corpus DIR")
    prompts = []
    for i in range(batch):
        ids = tokenizer(files[i % len(files)].read_text()).input_ids
        start = (i // len(files)) * context
        window = ids[start : start + context]
        if len(window) < context:
            sys.exit(f"error: {files[i % len(files)].name} has fewer than {start + context} tokens")
        prompts.append(window)
    return prompts


def time_ms(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def _best_rate(fn, work: float, repeats: int = 5) -> float:
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, work / (time.perf_counter() - t))
    return best


def measure_bandwidth() -> float:
    """Bytes per second of a large streaming read (best of 5)."""
    x = torch.ones(1024 * 2**20 // 4)
    return _best_rate(x.sum, x.nbytes)


def measure_matmul(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP per second of a square matmul in ``dtype`` (best of 5)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return _best_rate(lambda: a @ b, 2 * n**3)


class StepCost:
    """The bytes a step must read and the FLOPs it must do, for a model config and the weights' and
    KV cache's element sizes: every matmul weight once (the embedding is a gather of B rows, not
    counted), plus the K/V of the cache slots the step attends to (context, not the bucket it is
    laid out at)."""

    def __init__(self, cfg, itemsize: int, kv_itemsize: int | None = None):
        h, i, d, L = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
        per_layer = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * h * i
        self.matmul_params = L * per_layer + cfg.vocab_size * h
        self.weight_bytes = self.matmul_params * itemsize
        self.kv_bytes_per_token = 2 * L * cfg.num_kv_heads * d * (kv_itemsize or itemsize)
        self.cfg = cfg

    def bytes(self, batch: int, context: int) -> float:
        return self.weight_bytes + batch * context * self.kv_bytes_per_token

    def flops(self, batch: int, tokens: int, context: int) -> float:
        c = self.cfg
        attention = 4 * batch * c.num_heads * tokens * (context + tokens) * c.head_dim * c.num_layers
        return 2 * self.matmul_params * batch * tokens + attention

    def floor_s(self, batch: int, tokens: int, context: int, bandwidth: float, matmul: float) -> tuple[float, str]:
        """The step's lower bound on this machine and which resource sets it."""
        mem, comp = self.bytes(batch, context) / bandwidth, self.flops(batch, tokens, context) / matmul
        return (mem, "memory") if mem >= comp else (comp, "compute")
