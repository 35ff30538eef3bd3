"""Compile exported steps into an engine's graphs, check each against the eager step, and reuse
the graphs whose inputs have not changed.

Each graph ``graphs/NAME.pt2`` has a sidecar ``graphs/NAME.json`` holding its build key: a hash of
everything the compiled graph depends on (model weights and definition, step shape, dtype,
backend, device, compiler versions and options). A rebuild keeps a graph whose key and file hash
still match, so an interrupted build resumes and an unchanged one takes seconds.

Validation: the compiled graph and the eager step run on the same random inputs and are compared
with the step computed in float32 (the same weights, upcast). The error of an output is the median,
over its tokens, of the relative error ``||x - ref|| / ||ref||`` of each token's logits or K/V
vector; for the logits and the new K/V it must satisfy ``compiled <= 2 * eager + bound[dtype]``: a
compiled graph may not be much less accurate than eager in its own dtype (in float32 the reference
is eager itself, so the bound alone applies; a float32 engine's int8 draft is compared with the draft
in the model's own weights). The median, because in low precision a few tokens
on random inputs are chaotic (per-token errors above 1 for eager bf16 itself, measured), while a
miscompiled graph is wrong on most tokens. The caches are filled with K/V the model itself produced
(a prefill of random tokens): random normal caches give near-uniform, ill-conditioned attention.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import torch

import magicdec_rt
from magicdec_rt import attention as attention_module
from magicdec_rt import cpu
from magicdec_rt import linear as linear_module
from magicdec_rt import model as model_module
from magicdec_rt.engine import Manifest, load_aoti_graph, step_module
from magicdec_rt.errors import EngineError
from magicdec_rt.model import DecodeStep, Transformer

from .export import export_step, step_inputs

# torch's own pytree code warns about itself on every export in this torch version.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

# Inductor options for AOTInductor graphs. Weights are left out of the package (each graph is
# given the engine's one copy at load), ``freezing`` lets Inductor treat them as constants (2x on
# bf16 GEMMs here), and the wrapper is compiled without optimisation (it only sequences kernels).
AOTI_OPTIONS = {
    "freezing": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.compile_wrapper_opt_level": "O0",
}


def aoti_options(manifest: Manifest) -> dict:
    """``AOTI_OPTIONS`` for this engine. Inductor decides when it compiles which of its loops run in
    parallel and on how many threads: on a CPU, for the threads the engine runs with (a build
    worker has only its share of them, and with 1 it generated every loop serial). Under a cache of
    another dtype (bf16 KV, float32 weights) a block's own K/V are rounded to the cache's dtype and
    back (``model.py``), which Inductor drops inside a fused kernel unless it emulates precision
    casts: the compiled block would attend to unrounded K/V (4e-3 from eager at a prefill chunk,
    measured), and speculation would no longer equal plain decoding. The graphs are compiled for
    the manifest's x86-64 level, so they use no instruction its ``cpu_isa`` does not name."""
    return (AOTI_OPTIONS | ({"cpp.threads": manifest.cpu_threads} if manifest.cpu_threads else {})
            | (cpu.inductor_options(manifest.cpu_arch) if manifest.cpu_arch else {})
            | ({"emulate_precision_casts": True} if manifest.kv_dtype != manifest.dtype else {}))


# Default bounds on the relative error of a compiled graph beyond twice eager's own (see above), by
# dtype; an engine takes the larger of its weights' and its cache's.
REL_ERR_BOUND = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def graph_key(manifest: Manifest, name: str) -> str:
    # The step's code: the model, its attention paths and the linear weights' packing (the CPU
    # kernels themselves are called by name at run time, so their changes need no rebuild).
    model_source = b"".join(Path(m.__file__).read_bytes() for m in (model_module, attention_module, linear_module))
    parts = {
        "name": name,
        "shape": manifest.step_shape(name),
        "model_sha256": manifest.model_sha256,
        "model_py": hashlib.sha256(model_source).hexdigest(),
        "config": manifest.model.to_dict(),
        "dtype": manifest.dtype,
        "kv_dtype": manifest.kv_dtype,
        "backend": manifest.backend,
        "device": manifest.device,
        "world_size": manifest.world_size,
        "cpu_isa": manifest.cpu_isa,
        "draft_int8": manifest.draft_int8 and name == "draft",
        "versions": {k: v for k, v in manifest.versions.items() if k != "transformers"},
        "options": aoti_options(manifest) if manifest.backend == "aoti" else {},
        "magicdec_rt": magicdec_rt.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def reusable(out: Path, manifest: Manifest, name: str) -> dict | None:
    """The manifest entry of an existing graph for ``name`` built with the same key, if any."""
    sidecar = out / "graphs" / f"{name}.json"
    try:
        entry = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    path = out / entry.get("file", "")
    if entry.get("key") != graph_key(manifest, name) or not path.is_file() or sha256_file(path) != entry.get("sha256"):
        return None
    return entry


def kv_pool(model: Transformer, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V ``[layers, kv_heads, n, head_dim]`` of a prefill of random tokens: realistic cache
    contents for validation inputs."""
    gen = torch.Generator().manual_seed(0)
    name = f"prefill@{manifest.context_buckets[0]}"
    tokens, positions, ck, cv, lengths, last = step_inputs(model, manifest, name, manifest.device)
    tokens = torch.randint(0, manifest.model.vocab_size, tokens.shape, generator=gen).to(manifest.device)
    with torch.no_grad():
        _, k, v = step_module(model, name)(tokens, positions, ck, cv, lengths, last)
    return k[:, 0], v[:, 0]


def validation_inputs(model: Transformer, manifest: Manifest, name: str, pool, seed: int) -> tuple:
    """Random inputs of the step ``name``: random tokens, lengths spread over the cache, caches
    filled with pool K/V at random."""
    gen = torch.Generator().manual_seed(seed)
    B, T, S = manifest.step_shape(name)
    inputs = list(step_inputs(model, manifest, name, manifest.device))
    room = max(S - T, 1) if name.startswith("prefill") else S
    lengths = torch.randint(max(room // 2, 1), room + 1, (B,), generator=gen)
    inputs[0] = torch.randint(0, manifest.model.vocab_size, (B, T), generator=gen)
    inputs[1] = lengths[:, None] + torch.arange(T)
    n = pool[0].shape[2]
    for cache, src in zip(inputs[2:4], pool):
        for layer, c in enumerate(cache):
            pick = torch.randint(0, n, (B, S), generator=gen)
            c.copy_(src[layer][:, pick].permute(1, 0, 2, 3))
    inputs[4] = lengths
    if name.startswith("prefill"):
        inputs[5] = torch.randint(0, T, (B,), generator=gen)
    return tuple(x.to(manifest.device) if isinstance(x, torch.Tensor) else x for x in inputs)


def rel_err(got, want) -> dict:
    """Median per-token relative error of (logits, new_k, new_v), as defined above."""
    def median(g, w):
        g, w = g.float(), w.float()
        return float(((g - w).norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30)).median())

    return {n: median(g, w) for n, g, w in zip(("logits", "new_k", "new_v"), got, want)}


def compile_graph(model: Transformer, manifest: Manifest, name: str, path: Path) -> None:
    """Export the step ``name`` and compile it to ``path`` with the manifest's backend."""
    ep = export_step(model, manifest, name, manifest.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    if manifest.backend == "aoti":
        # A new dict: Inductor adds its own entries to the one it is given.
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=aoti_options(manifest))
    elif manifest.backend == "tensorrt":
        from magicdec_rt import trt_backend

        trt_backend.compile_exported(ep, step_inputs(model, manifest, name, manifest.device), manifest.torch_dtype, path)
    else:
        raise ValueError(f"backend {manifest.backend!r} compiles nothing")


def load_graph(model: Transformer, manifest: Manifest, name: str, path: Path):
    if manifest.backend == "aoti":
        return load_aoti_graph(path, step_module(model, name))
    from magicdec_rt import trt_backend

    return trt_backend.load(path)


def build_graph(model: Transformer, reference: Transformer, manifest: Manifest, name: str, out: Path, pool,
                bound: float) -> dict:
    """Compile, validate and record the graph of step ``name``; returns its manifest entry.
    ``reference`` is the model in float32 (``model`` itself for float32 engines)."""
    t0 = time.perf_counter()
    path = out / "graphs" / f"{name}.pt2"
    compile_graph(model, manifest, name, path)
    seconds = time.perf_counter() - t0
    graph = load_graph(model, manifest, name, path)
    inputs = validation_inputs(model, manifest, name, pool, seed=len(name))
    flat = [t for x in inputs for t in (x if isinstance(x, list) else [x])]

    def f32(x):
        return [f32(t) for t in x] if isinstance(x, list) else x.float() if x.is_floating_point() else x

    with torch.no_grad():
        got = graph(*flat)
        eager = step_module(model, name)(*inputs)
        if reference is not model:
            ref = step_module(reference, name)(*[f32(x) for x in inputs])
        elif name == "draft" and manifest.draft_int8:
            # A float32 engine's int8 draft is held to the draft in the model's own weights, as a
            # bf16 engine's is to its float32 reference: a float32 input differing in its last bit
            # can quantize to another int8 value, so compiled and eager int8 drafts are not equal.
            ref = DecodeStep(model)(*inputs)
        else:
            ref = eager
    compiled_err, eager_err = rel_err(got, ref), rel_err(eager, ref)
    allowed = {k: 2 * eager_err[k] + bound for k in compiled_err}
    worst = max(compiled_err, key=lambda k: compiled_err[k] - allowed[k])
    if not compiled_err[worst] <= allowed[worst]:  # also catches NaN
        path.unlink()
        bucket = name.partition("@")[2] or f"draft cache of {manifest.draft_slots} slots"
        raise EngineError(
            f"step {name} (context bucket {bucket}) failed validation: compiled {worst} differ from the float32 "
            f"reference by median relative error {compiled_err[worst]:.2e}, above the allowed {allowed[worst]:.2e} "
            f"(2 x eager {manifest.dtype}'s {eager_err[worst]:.2e} + bound {bound:.0e})"
        )
    entry = {
        "file": f"graphs/{name}.pt2",
        "key": graph_key(manifest, name),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "rel_err": compiled_err,
        "eager_rel_err": eager_err,
        "compile_s": round(seconds, 1),
    }
    (out / "graphs" / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")
    return entry
