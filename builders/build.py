"""``magicdec-build``: turn a model (HF directory, GGUF file, or the embedded SmolLM2) into an engine
directory that ``magicdec_rt.Runtime.load`` serves."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import magicdec_rt
from magicdec_rt.checkpoint import embedded_model_path, load_source
from magicdec_rt.cli import OneLineErrors, run_cli
from magicdec_rt.engine import DTYPES, FORMAT_VERSION, Manifest, default_buckets
from magicdec_rt.errors import EngineError
from magicdec_rt.model import ModelConfig

EMBEDDED_NAME = "smollm2-135m-instruct"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _check_options(dtype, max_batch, max_gamma, default_gamma, draft_sinks, draft_budget, prefill_chunk, world_size):
    """Everything that can be checked before the (slow) model load."""
    if dtype not in DTYPES:
        raise EngineError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    limits = (("max_batch", max_batch, 1), ("max_gamma", max_gamma, 0), ("prefill_chunk", prefill_chunk, 1),
              ("world_size", world_size, 1))
    for name, value, low in limits:
        if value < low:
            raise EngineError(f"{name}={value} is out of range: must be >= {low}")
    if not 0 <= default_gamma <= max_gamma:
        raise EngineError(f"default_gamma={default_gamma} is out of range: must be in [0, max_gamma={max_gamma}]")
    if not 0 <= draft_sinks < draft_budget:
        raise EngineError(f"draft_sinks={draft_sinks} is out of range: must be in [0, draft_budget={draft_budget})")


def build_engine(
    out_dir: str | Path,
    model: str | Path | None = None,
    *,
    backend: str = "eager",
    dtype: str = "float32",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    max_gamma: int = 6,
    default_gamma: int = 3,
    draft_sinks: int = 16,
    draft_budget: int = 256,
    prefill_chunk: int = 256,
    world_size: int = 1,
    show_progress: bool = True,
) -> Path:
    """Build an engine directory and return its path."""
    _check_options(dtype, max_batch, max_gamma, default_gamma, draft_sinks, draft_budget, prefill_chunk, world_size)
    source = embedded_model_path() if model is None else Path(model)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise EngineError(f"output {str(out)!r} is not empty and not an engine directory; refusing to overwrite it")
    t0 = time.perf_counter()
    stages = tqdm(total=4, desc="build", unit="stage", disable=not show_progress)
    stages.set_postfix_str("load model")
    config, state, tokenizer, generation = load_source(source)
    cfg = ModelConfig.from_hf(config)
    seq = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    if not 1 <= seq <= cfg.max_position_embeddings:
        raise EngineError(f"max_seq_len={seq} is out of range: must be in [1, {cfg.max_position_embeddings}] (the model's context)")
    if world_size > cfg.num_kv_heads:
        raise EngineError(f"world_size={world_size} is out of range: must be in [1, {cfg.num_kv_heads}] (the model's KV heads)")
    stages.update()

    stages.set_postfix_str("write weights")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    stages.update()

    stages.set_postfix_str("write tokenizer")
    tokenizer.save_pretrained(out)
    if generation is not None:
        generation.save_pretrained(out)
    eos = set()
    for src in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        eos.update([src] if isinstance(src, int) else (src or []))
    stages.update()

    stages.set_postfix_str("manifest")
    manifest = Manifest(
        name=out.name,
        backend=backend,
        dtype=dtype,
        max_batch=max_batch,
        max_seq_len=seq,
        prefill_chunk=prefill_chunk,
        gammas=list(range(max_gamma + 1)),
        default_gamma=default_gamma,
        draft_sinks=draft_sinks,
        draft_budget=draft_budget,
        context_buckets=default_buckets(seq),
        model=cfg,
        eos_token_ids=sorted(eos),
        model_sha256=_sha256(out / "model.safetensors"),
        world_size=world_size,
        versions={
            "magicdec_rt": magicdec_rt.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "format_version": FORMAT_VERSION,
        },
    )
    manifest.check(str(out))
    doc = manifest.to_json()
    doc["model"]["source"] = str(source)
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    stages.update()
    stages.close()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"built {out} ({backend}, {dtype}, batch {max_batch}, max_seq_len {seq}) in "
        f"{time.perf_counter() - t0:.1f} s, {size / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    return out


def main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-build", description=__doc__)
    p.add_argument("--model", help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help=f"engine directory (default: engines/NAME, NAME {EMBEDDED_NAME} for the embedded model)")
    p.add_argument("--backend", default="eager", choices=["eager"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--max-gamma", type=int, default=6, help="the engine serves every gamma in [0, max-gamma]")
    p.add_argument("--gamma", type=int, default=3, help="default gamma for requests that name none")
    p.add_argument("--draft-sinks", type=int, default=16)
    p.add_argument("--draft-budget", type=int, default=256, help="draft cache slots: sinks + recent window")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--world-size", type=int, default=1, help="tensor-parallel ranks (run under torchrun)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def run():
        name = EMBEDDED_NAME if args.model is None else Path(args.model).stem
        build_engine(
            args.out or Path("engines") / name,
            args.model,
            backend=args.backend,
            dtype=args.dtype,
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_gamma=args.max_gamma,
            default_gamma=args.gamma,
            draft_sinks=args.draft_sinks,
            draft_budget=args.draft_budget,
            prefill_chunk=args.prefill_chunk,
            world_size=args.world_size,
            show_progress=not args.quiet,
        )
        return 0

    return run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
