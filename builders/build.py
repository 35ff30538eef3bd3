"""``magicdec-build``: turn a model (HF directory, GGUF file, or the embedded SmolLM2) into an engine
directory that ``magicdec_rt.Runtime.load`` serves."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import magicdec_rt
from magicdec_rt import cpu, linear
from magicdec_rt.checkpoint import embedded_model_path, load_model_dir, load_source, rank_file, rank_weights
from magicdec_rt.cli import OneLineErrors, ShowDefaults, run_cli
from magicdec_rt.engine import (BACKENDS, DEVICES, DRAFT_POSITIONS, DRAFT_WEIGHTS, DTYPES, FORMAT_VERSION, Manifest, default_buckets,
                                draft_manifest, read_manifest)
from magicdec_rt.errors import EngineError
from magicdec_rt.model import ModelConfig
from magicdec_rt.planner import CALIBRATION_FILE

from .compile import REL_ERR_BOUND, build_graph, kv_pool, reusable, sha256_file

EMBEDDED_NAME = "smollm2-135m-instruct"


def _check_options(backend, device, dtype, kv_dtype, max_batch, gammas, default_gamma, draft_sinks, draft_budget,
                   prefill_chunk, world_size, buckets):
    """Everything that can be checked before the (slow) model load."""
    if backend not in BACKENDS:
        raise EngineError(f"backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from magicdec_rt import trt_backend

        trt_backend.require()
        if device != "cuda":
            raise EngineError("backend 'tensorrt' builds engines for CUDA devices only; use --device cuda")
    if device not in DEVICES:
        raise EngineError(f"device {device!r} is not supported; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was requested but this machine has no CUDA device")
    if dtype not in DTYPES:
        raise EngineError(f"dtype {dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    if kv_dtype not in DTYPES:
        raise EngineError(f"kv_dtype {kv_dtype!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    if kv_dtype != dtype and device != "cpu":
        raise EngineError(f"kv_dtype {kv_dtype} differs from dtype {dtype}: only the CPU attention kernel reads a "
                          f"cache of another dtype; use --kv-dtype {dtype} on {device}")
    limits = (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1), ("world_size", world_size, 1))
    for name, value, low in limits:
        if value < low:
            raise EngineError(f"{name}={value} is out of range: must be >= {low}")
    if not gammas or min(gammas) < 0:
        raise EngineError(f"gammas={gammas} is out of range: each gamma must be >= 0")
    if default_gamma not in gammas:
        raise EngineError(f"default_gamma={default_gamma} is not one of the built gammas {sorted(gammas)}")
    if not 0 <= draft_sinks < draft_budget:
        raise EngineError(f"draft_sinks={draft_sinks} is out of range: must be in [0, draft_budget={draft_budget})")
    if buckets is not None and min(buckets, default=1) < 1:
        raise EngineError(f"buckets={buckets} is out of range: each bucket must be >= 1")
    if backend != "eager" and world_size > 1:
        # Tried with torch 2.13 on CPU/gloo: AOTInductor compiles the functional collectives into
        # its C shim, but the compiled sharded step fails in _c10d_functional.wait_tensor at run
        # time and its peer rank then waits for the collective timeout.
        raise EngineError(
            f"backend {backend!r} with world_size={world_size} is not supported: compiled graphs cannot run "
            "torch's collectives here (AOTInductor's wait_tensor fails at run time); use --backend eager"
        )


def warn_emulated_bf16() -> None:
    """bfloat16 without hardware support: say what it costs here, measured (a batch-16 projection
    of SmolLM2's MLP shape, 576 -> 1536)."""
    w, x = torch.randn(1536, 576), torch.randn(16, 576)

    def seconds(dt):
        a, b = x.to(dt), w.to(dt)
        torch.nn.functional.linear(a, b)
        t = time.perf_counter()
        for _ in range(5):
            torch.nn.functional.linear(a, b)
        return time.perf_counter() - t

    ratio = seconds(torch.bfloat16) / seconds(torch.float32)
    warnings.warn(
        f"this CPU ({cpu.model_name()}) has no AMX or AVX-512-BF16, so torch emulates bfloat16: a batch-16 "
        f"576x1536 linear ran {ratio:.1f}x the float32 time here; --dtype auto picks float32 on this CPU",
        RuntimeWarning,
        stacklevel=3,
    )


def build_engine(
    out_dir: str | Path,
    model: str | Path | None = None,
    *,
    backend: str = "eager",
    device: str = "cpu",
    dtype: str = "float32",
    kv_dtype: str | None = None,
    max_batch: int = 8,
    max_seq_len: int | None = None,
    max_gamma: int = 6,
    gammas: list[int] | None = None,
    default_gamma: int = 3,
    draft_sinks: int = 16,
    draft_budget: int = 256,
    prefill_chunk: int = 256,
    buckets: list[int] | None = None,
    world_size: int = 1,
    jobs: int | None = None,
    max_rel_err: float | None = None,
    show_progress: bool = True,
    calibrate: bool = False,
    draft_model: str | Path | None = None,
    draft_positions: str = "original",
    draft_weights: str = "auto",
    cpu_isa: str = "native",
) -> Path:
    """Build an engine directory and return its path. ``dtype="auto"`` picks bfloat16 where the CPU
    multiplies it natively (AMX, AVX-512-BF16) or on CUDA, float32 elsewhere. ``kv_dtype`` is the
    KV caches' (default: ``dtype``; ``"auto"``: ``cpu.auto_kv_dtype`` on the CPU). The engine serves ``gammas`` (default every
    gamma in [0, max_gamma]; 0, plain decoding, is always included) at every context bucket
    (default: powers of two from 512, ending at ``max_seq_len``). ``calibrate`` times the built
    steps here for the gamma planner (``magicdec-calibrate``). ``draft_model`` (HF directory or
    .gguf) drafts instead of the target over its sparse cache: it must share the target's
    tokenizer; one process; compiled like the target. ``draft_positions``: the draft's keys at their
    original positions, or at StreamingLLM's positions inside its cache (``"cache"``).
    ``draft_weights``: the draft step's linear weights, ``"int8"`` (``linear.py``; float32
    engines on CPUs with AVX2 and FMA, bf16 ones with AVX512-VNNI and AVX512-BF16), ``"target"``
    (the engine's own) or ``"auto"`` (int8 where it can run). ``cpu_isa``: the CPUs compiled graphs
    are for, ``"native"`` (this one's vector width) or ``"avx2"`` (any x86-64 CPU with AVX2 and FMA;
    ``dtype="auto"`` then picks float32, as on those CPUs)."""
    gammas = sorted(set(range(max_gamma + 1) if gammas is None else [0, *gammas]))
    if cpu_isa not in cpu.TARGETS or (cpu_isa != "native" and device != "cpu"):
        raise EngineError(f"cpu_isa {cpu_isa!r} is not supported on {device}; choose one of "
                          f"{', '.join(cpu.TARGETS) if device == 'cpu' else 'native'}")
    if dtype == "auto":
        dtype = ("float32" if cpu_isa == "avx2" else cpu.auto_dtype()) if device == "cpu" else "bfloat16"
    elif dtype == "bfloat16" and cpu_isa == "avx2":
        raise EngineError("dtype bfloat16 needs a CPU that multiplies it natively (AVX512-BF16 or AMX) and cpu_isa "
                          "avx2 builds for CPUs with AVX2 only, which emulate it: use --dtype float32 or auto")
    elif dtype == "bfloat16" and device == "cpu" and not cpu.native_bf16():
        warn_emulated_bf16()
    if kv_dtype == "auto":
        kv_dtype = cpu.auto_kv_dtype() if device == "cpu" else dtype
    kv_dtype = kv_dtype or dtype
    _check_options(backend, device, dtype, kv_dtype, max_batch, gammas, default_gamma, draft_sinks, draft_budget,
                   prefill_chunk, world_size, buckets)
    if draft_positions not in DRAFT_POSITIONS:
        raise EngineError(f"draft_positions {draft_positions!r} is not supported; choose one of {', '.join(DRAFT_POSITIONS)}")
    if draft_model is not None and world_size > 1:
        raise EngineError(f"--draft-model runs on one process only: got world_size {world_size}")
    if draft_weights not in DRAFT_WEIGHTS:
        raise EngineError(f"draft_weights {draft_weights!r} is not supported; choose one of {', '.join(DRAFT_WEIGHTS)}")
    int8_here = linear.int8_wanted(DTYPES[dtype], device)
    if draft_weights == "int8" and not int8_here:
        raise EngineError(f"draft_weights int8 needs a CPU with AVX2 and FMA for a float32 engine, AVX512-VNNI and "
                          f"AVX512-BF16 for a bfloat16 one, and no AMX; this is {dtype} on {device} ({cpu.model_name()}): "
                          "use --draft-weights target")
    draft_int8 = draft_weights == "int8" or (draft_weights == "auto" and int8_here)
    source = embedded_model_path() if model is None else Path(model)
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file() and not (out / "graphs").is_dir():
        raise EngineError(f"output {str(out)!r} is not empty and not an engine directory; refusing to overwrite it")
    t0 = time.perf_counter()
    config, state, tokenizer, generation = load_source(source)
    cfg = ModelConfig.from_hf(config)
    seq = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    if not 1 <= seq <= cfg.max_position_embeddings:
        raise EngineError(f"max_seq_len={seq} is out of range: must be in [1, {cfg.max_position_embeddings}] (the model's context)")
    if world_size > cfg.num_kv_heads:
        raise EngineError(f"world_size={world_size} is out of range: must be in [1, {cfg.num_kv_heads}] (the model's KV heads)")
    if buckets and max(buckets) > seq:
        raise EngineError(f"bucket {max(buckets)} is out of range: buckets must be <= max_seq_len {seq}")
    drafter = None if draft_model is None else _draft_source(Path(draft_model), config, tokenizer, seq)
    context_buckets = default_buckets(seq) if buckets is None else sorted(set(buckets) | {seq})

    # The manifest goes last: a directory without one is not an engine, so an interrupted build
    # never leaves a stale engine behind (its finished graphs are still reused next time).
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    # Step times of the engine built here before (other gammas or buckets, other kernels) are not
    # this one's; left behind, one that lacked a new gamma even stopped the calibration replacing it.
    (out / CALIBRATION_FILE).unlink(missing_ok=True)
    weights = write_weights(out, config, state, dtype)
    # Tensor parallelism: one weights file per rank, so each rank reads only its slice.
    for f in out.glob("rank*.safetensors"):
        f.unlink()
    if world_size > 1:
        for rank, part in enumerate(rank_weights(weights, config, world_size)):
            save_file(part, out / rank_file(rank), metadata={"format": "pt"})
    # The draft model's HF directory inside the engine (without one, a stale one goes).
    if drafter is None:
        shutil.rmtree(out / "draft", ignore_errors=True)
    else:
        write_weights(out / "draft", *drafter, dtype)
    tokenizer.save_pretrained(out)
    if generation is not None:
        generation.save_pretrained(out)
    eos = set()
    for src in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        eos.update([src] if isinstance(src, int) else (src or []))

    versions = {
        "magicdec_rt": magicdec_rt.__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "format_version": FORMAT_VERSION,
    }
    if backend == "tensorrt":
        from magicdec_rt import trt_backend

        versions |= trt_backend.versions()
    compiled_cpu = backend == "aoti" and device == "cpu"
    target = cpu.compile_target(cpu_isa) if compiled_cpu else None
    packed = compiled_cpu and linear.wanted(DTYPES[dtype], device)
    manifest = Manifest(
        name=out.name,
        backend=backend,
        device=device,
        dtype=dtype,
        kv_dtype=kv_dtype,
        max_batch=max_batch,
        max_seq_len=seq,
        prefill_chunk=prefill_chunk,
        gammas=gammas,
        default_gamma=default_gamma,
        draft_sinks=draft_sinks,
        draft_budget=draft_budget,
        context_buckets=context_buckets,
        model=cfg,
        eos_token_ids=sorted(eos),
        model_sha256=sha256_file(out / "model.safetensors"),
        world_size=world_size,
        versions=versions,
        # CPU graphs need what Inductor compiled for, and what the linear kernel needs where they call
        # it (AVX512-BF16 in bf16, AVX2 and FMA in float32).
        cpu_isa=sorted(set(target[1]) | (set(linear.isa(DTYPES[dtype])) if packed else set())
                       | (set(linear.int8_isa(DTYPES[dtype])) if draft_int8 else set())) if compiled_cpu else [],
        cpu_arch=target[0] if compiled_cpu else "",
        packed_linears=linear.BLOCK if packed else 0,
        cpu_threads=torch.get_num_threads() if compiled_cpu else 0,
        draft_model=None if drafter is None else ModelConfig.from_hf(drafter[0]),
        draft_positions=draft_positions,
        draft_int8=draft_int8,
    )
    graphs, draft_graphs = {}, {}
    if backend != "eager":
        # A cache of lower precision than the weights bounds the engine's accuracy: a K or V value
        # within float32 round-off of a bf16 rounding boundary rounds either way (1.3e-4 in the logits
        # of a float32-weights prefill chunk over a bf16 cache, compiled against eager, measured).
        bound = max(REL_ERR_BOUND[dtype], REL_ERR_BOUND[kv_dtype]) if max_rel_err is None else max_rel_err
        jobs = jobs or min(2, os.cpu_count() or 1)
        graphs = _build_graphs(out, manifest, manifest.step_names(), bound, jobs, show_progress)
        if drafter is not None:  # the draft model's steps, compiled like the target's, in its directory
            mine = replace(draft_manifest(manifest), model_sha256=sha256_file(out / "draft" / "model.safetensors"))
            draft_graphs = _build_graphs(out / "draft", mine, manifest.draft_step_names(), bound, jobs, show_progress)
    manifest = replace(manifest, graphs=graphs, draft_graphs=draft_graphs)
    manifest.check(str(out))
    doc = manifest.to_json()
    doc["model"]["source"] = str(source)
    (out / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    _report(out, manifest, time.perf_counter() - t0)
    if calibrate:
        from magicdec_rt.cli import calibrate as calibrate_engine

        calibrate_engine(out, show_progress=show_progress)
    return out


def _draft_source(path: Path, config: dict, tokenizer, seq: int) -> tuple[dict, dict]:
    """The draft model's (HF config, state dict), checked against the target's tokenizer."""
    dconfig, dstate, dtok, _ = load_source(path)
    where = f"draft model {str(path)!r}"
    if dconfig["vocab_size"] != config["vocab_size"] or dtok.get_vocab() != tokenizer.get_vocab():
        raise EngineError(f"{where} has another vocabulary than the target ({dconfig['vocab_size']} vs "
                          f"{config['vocab_size']} tokens, or different tokens): a draft must share the target's tokenizer")
    if dconfig.get("max_position_embeddings", seq) < seq:
        raise EngineError(f"{where} has a context of {dconfig['max_position_embeddings']} tokens, below max_seq_len {seq}")
    return dconfig, dstate


def write_weights(directory: Path, config: dict, state: dict, dtype: str) -> dict:
    """An HF model directory's ``config.json`` and ``model.safetensors`` (weights in ``dtype``);
    returns the weights as written."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return weights


def build_like(engine: str | Path, out_dir: str | Path, **overrides) -> Path:
    """An engine built with the settings of ``engine``, changing ``overrides`` (for example
    ``world_size``). An engine directory is an HF model directory, so it is its own source."""
    engine = Path(engine)
    m = read_manifest(engine)
    settings = dict(backend=m.backend, device=m.device, dtype=m.dtype, kv_dtype=m.kv_dtype, max_batch=m.max_batch,
                    max_seq_len=m.max_seq_len, gammas=m.gammas, default_gamma=m.default_gamma,
                    draft_sinks=m.draft_sinks, draft_budget=m.draft_budget, prefill_chunk=m.prefill_chunk,
                    buckets=m.context_buckets[:-1], world_size=m.world_size, draft_positions=m.draft_positions,
                    draft_model=engine / "draft" if m.draft_model else None,
                    draft_weights="int8" if m.draft_int8 else "target", show_progress=False)
    return build_engine(out_dir, engine, **(settings | overrides))


def _report(out: Path, m: Manifest, seconds: float) -> None:
    weights = (out / "model.safetensors").stat().st_size
    graphs = sum(g["bytes"] for g in [*m.graphs.values(), *m.draft_graphs.values()])
    print(
        f"built {out} ({m.backend} on {m.device}, {m.dtype}"
        + (f" with a {m.kv_dtype} KV cache" if m.kv_dtype != m.dtype else "")
        + f", batch {m.max_batch}, max_seq_len {m.max_seq_len}, "
        f"gammas {m.gammas}, buckets {m.context_buckets}) in {seconds:.1f} s: weights {weights / 2**20:.1f} MiB"
        + (f", {len(m.graphs) + len(m.draft_graphs)} graphs {graphs / 2**20:.1f} MiB" if m.graphs else "")
        + (f", a {m.draft_model.num_layers}-layer draft model" if m.draft_model else ""),
        file=sys.stderr,
    )


# One model per worker process, loaded once: workers compile graphs in parallel (Inductor's code
# generation is single-threaded Python).
_worker: dict = {}


def _worker_init(out: Path, manifest: Manifest, threads: int) -> None:
    torch.set_num_threads(threads)
    model = load_model_dir(out, manifest.torch_dtype).to(manifest.device)
    reference = model if manifest.dtype == "float32" else load_model_dir(out, torch.float32).to(manifest.device)
    if manifest.draft_int8:  # as the engine's Steps will load it
        linear.quantize_linears(model)
    if manifest.packed_linears:
        linear.pack_linears(model)
    _worker.update(out=out, manifest=manifest, model=model, reference=reference, pool=kv_pool(model, manifest))


def _worker_build(name: str, bound: float) -> tuple[str, dict]:
    w = _worker
    return name, build_graph(w["model"], w["reference"], w["manifest"], name, w["out"], w["pool"], bound)


def _build_graphs(out: Path, manifest: Manifest, names: list[str], bound: float, jobs: int, show_progress: bool) -> dict:
    graphs = {n: e for n in names if (e := reusable(out, manifest, n)) is not None}
    todo = [n for n in names if n not in graphs]
    bar = tqdm(total=len(names), initial=len(graphs), desc=f"compile ({manifest.backend})", unit="graph",
               disable=not show_progress)
    if todo:
        jobs = max(1, min(jobs, len(todo)))
        threads = max(1, torch.get_num_threads() // jobs)
        if jobs == 1:
            _worker_init(out, manifest, torch.get_num_threads())
            results = (_worker_build(n, bound) for n in todo)
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(out, manifest, threads))
            futures = [pool.submit(_worker_build, n, bound) for n in todo]
            results = (f.result() for f in as_completed(futures))
        try:
            for name, entry in results:
                graphs[name] = entry
                bar.set_postfix_str(f"{name} {entry['compile_s']:.0f} s")
                bar.update()
        finally:
            if jobs > 1:
                pool.shutdown(cancel_futures=True)
            _worker.clear()
    bar.close()
    # Graphs of steps this build no longer has are stale.
    for f in (out / "graphs").glob("*") if (out / "graphs").is_dir() else []:
        if f.stem not in graphs:
            f.unlink()
    return {n: graphs[n] for n in names}


def main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-build", description=__doc__, formatter_class=ShowDefaults)
    p.add_argument("--model", help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help=f"engine directory (default: engines/NAME, NAME {EMBEDDED_NAME} for the embedded model)")
    p.add_argument("--backend", default="eager", choices=list(BACKENDS),
                   help="eager (reference), aoti (AOTInductor, CPU or CUDA), tensorrt (torch-tensorrt, CUDA)")
    p.add_argument("--device", default="cpu", choices=list(DEVICES), help="where the engine runs")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 where the CPU multiplies it natively (AMX, AVX-512-BF16) or on CUDA, else float32")
    p.add_argument("--kv-dtype", choices=["auto", *DTYPES],
                   help="the KV caches' dtype (default: bfloat16 on the CPU with --dtype auto, so float32 weights "
                   "get a bf16 cache; else --dtype's)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (the static batch)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--max-gamma", type=int, default=6, help="the engine serves every gamma in [0, max-gamma]")
    p.add_argument("--gammas", type=int, nargs="+", help="the gammas to build instead (0 is always added)")
    p.add_argument("--buckets", type=int, nargs="+",
                   help="context buckets (max-seq-len is always added; default powers of two from 512)")
    p.add_argument("--gamma", type=int, default=3, help="default gamma for requests that name none")
    p.add_argument("--draft-sinks", type=int, default=16, help="draft cache slots kept for the first tokens")
    p.add_argument("--draft-budget", type=int, default=256, help="draft cache slots: sinks + recent window")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill step")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer (HF directory or .gguf) that drafts "
                   "instead of the target itself (default: self-speculation)")
    p.add_argument("--draft-positions", default="original", choices=["original", "cache"],
                   help="the draft's key positions: original, or StreamingLLM's inside the draft cache (the kept "
                   "tokens before the recent ring moved up to just before it)")
    p.add_argument("--draft-weights", default="auto", choices=list(DRAFT_WEIGHTS),
                   help="the draft step's linear weights: int8 (float32 engines on CPUs with AVX2 and FMA, bf16 ones with "
                   "AVX512-VNNI and AVX512-BF16: "
                   "1 byte per weight; the verify keeps the model's), target (the engine's own), auto (int8 where it can run)")
    p.add_argument("--cpu-isa", default="native", choices=list(cpu.TARGETS),
                   help="the CPUs compiled (aoti) graphs run on: native (this CPU's widest vectors and newer) or avx2 "
                   "(every x86-64 CPU with AVX2 and FMA; --dtype auto then picks float32)")
    p.add_argument("--world-size", type=int, default=1, help="tensor-parallel ranks (run under torchrun)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: up to 2)")
    p.add_argument("--max-rel-err", type=float, default=None,
                   help="validation bound on a graph's relative error against eager (default per dtype)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip timing the steps for the gamma planner (run magicdec-calibrate later)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def run():
        name = EMBEDDED_NAME if args.model is None else Path(args.model).stem
        build_engine(
            args.out or Path("engines") / name,
            args.model,
            backend=args.backend,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype or ("auto" if args.dtype == "auto" else None),
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_gamma=args.max_gamma,
            gammas=args.gammas,
            default_gamma=args.gamma,
            buckets=args.buckets,
            device=args.device,
            jobs=args.jobs,
            max_rel_err=args.max_rel_err,
            draft_sinks=args.draft_sinks,
            draft_budget=args.draft_budget,
            prefill_chunk=args.prefill_chunk,
            world_size=args.world_size,
            draft_model=args.draft_model,
            draft_positions=args.draft_positions,
            draft_weights=args.draft_weights,
            cpu_isa=args.cpu_isa,
            show_progress=not args.quiet,
            # Only where the engine can run here as one process.
            calibrate=not args.no_calibrate and args.world_size == 1 and (args.device == "cpu" or torch.cuda.is_available()),
        )
        return 0

    return run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
