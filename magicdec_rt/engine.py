"""An engine directory: ``manifest.json``, an HF-format model directory (the weights every backend
reads) and, for compiled backends, one compiled graph per step.

The manifest says what was built (model hash, dtype, batch, context buckets, gamma set, draft
configuration, backend, device, versions, and each graph's file and build key); loading checks it
against this machine and explains any mismatch in one sentence.

Steps, by name (``Manifest.step_names``):
* ``prefill@S``: one row's prefill chunk ``[1, prefill_chunk]`` over ``S`` full-cache slots;
* ``draft``: ``[max_batch, 1]`` over the draft cache (``budget + max_gamma`` slots);
* ``verify{g}@S``: ``[max_batch, g + 1]`` over ``S`` full-cache slots (``verify0`` is the plain
  autoregressive step).
``S`` runs over the context buckets: the runtime lays the full cache out at the smallest bucket
covering its live rows, so a step reads what the context needs, not what the engine allows.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import attention, cpu, linear
from .checkpoint import load_model_dir
from .errors import EngineError
from .model import DecodeStep, ModelConfig, ObserveStep, PrefillStep
from .parallel import Shard, init_from_env

FORMAT = "magicdec-rt-engine"
FORMAT_VERSION = 2
BACKENDS = ("eager", "aoti", "tensorrt")
DEVICES = ("cpu", "cuda")
DRAFT_POSITIONS = ("original", "cache")
DRAFT_WEIGHTS = ("auto", "int8", "target")  # magicdec-build --draft-weights
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Manifest:
    name: str
    backend: str
    dtype: str
    max_batch: int
    max_seq_len: int
    prefill_chunk: int
    gammas: list[int]
    default_gamma: int
    draft_sinks: int
    draft_budget: int
    context_buckets: list[int]
    model: ModelConfig
    eos_token_ids: list[int]
    model_sha256: str
    versions: dict
    world_size: int = 1
    device: str = "cpu"
    graphs: dict = field(default_factory=dict)  # step name -> {"file", "key", "bytes", "rel_err"}
    cpu_isa: list = field(default_factory=list)  # instruction sets the CPU graphs were compiled for
    cpu_arch: str = ""  # their -march level ("": none, or compiled for the build CPU, before the field)
    kv_dtype: str = ""  # the KV caches' dtype ("": the engine's dtype)
    packed_linears: int = 0  # CPU graphs call the linear kernel on weights packed in blocks of this many features
    cpu_threads: int = 0  # threads the CPU graphs' own loops were compiled for (0: no compiled CPU graphs)
    draft_model: ModelConfig | None = None  # a standalone draft model in ``draft/`` (None: self-speculation)
    draft_graphs: dict = field(default_factory=dict)  # its compiled steps (``draft_step_names``), as ``graphs``
    draft_positions: str = "original"  # the draft's key positions: "original", or "cache" (StreamingLLM's)
    draft_int8: bool = False  # the draft step runs int8 copies of the linear weights (linear.quantize_linears)

    def __post_init__(self):
        if not self.kv_dtype:
            object.__setattr__(self, "kv_dtype", self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_dtype]

    @property
    def max_gamma(self) -> int:
        return max(self.gammas)

    @property
    def draft_slots(self) -> int:
        """Committed slots, then scratch for a round's draft tokens: a standalone draft model also
        runs its last draft, whose K/V it needs if every draft is accepted."""
        return self.draft_budget + self.max_gamma + (self.draft_model is not None)

    def bucket(self, length: int) -> int:
        """The smallest context bucket holding ``length`` cache slots."""
        return next(b for b in self.context_buckets if b >= length)

    def step_names(self) -> list[str]:
        return self._drafting_steps() + [f"verify{g}@{b}" for g in self.gammas for b in self.context_buckets]

    def draft_step_names(self) -> list[str]:
        """A standalone draft model's steps: its prefill chunks (its own full cache) and its draft step."""
        return self._drafting_steps() if self.draft_model else []

    def _drafting_steps(self) -> list[str]:
        return [f"prefill@{b}" for b in self.context_buckets] + ["draft"]

    def step_shape(self, name: str) -> tuple[int, int, int]:
        """``(batch, block tokens, cache slots)`` of the step ``name``."""
        kind, _, slots = name.partition("@")
        if kind == "prefill":
            return 1, self.prefill_chunk, int(slots)
        if kind == "draft":
            return self.max_batch, 1, self.draft_slots
        return self.max_batch, int(kind.removeprefix("verify")) + 1, int(slots)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "max_batch": self.max_batch,
            "max_seq_len": self.max_seq_len,
            "world_size": self.world_size,
            "prefill_chunk": self.prefill_chunk,
            "gammas": self.gammas,
            "default_gamma": self.default_gamma,
            "draft": {
                "kind": "streaming",
                "sinks": self.draft_sinks,
                "budget": self.draft_budget,
                "positions": self.draft_positions,
                "weights": "int8" if self.draft_int8 else "target",
                "model": None if self.draft_model is None else self.draft_model.to_dict(),
                "graphs": self.draft_graphs,
            },
            "context_buckets": self.context_buckets,
            "model": {"config": self.model.to_dict(), "sha256": self.model_sha256},
            "vocab_size": self.model.vocab_size,
            "eos_token_ids": self.eos_token_ids,
            "versions": self.versions,
            "cpu_isa": self.cpu_isa,
            "cpu_arch": self.cpu_arch,
            "packed_linears": self.packed_linears,
            "cpu_threads": self.cpu_threads,
            "graphs": self.graphs,
        }

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EngineError(f"{where} is not a magicdec-rt engine manifest (no \"format\": \"{FORMAT}\")")
        if d.get("format_version") != FORMAT_VERSION:
            raise EngineError(
                f"{where} has format_version {d.get('format_version')!r}; this runtime reads version "
                f"{FORMAT_VERSION}: rebuild the engine with magicdec-build"
            )
        try:
            m = cls(
                name=str(d["name"]),
                backend=d["backend"],
                dtype=d["dtype"],
                kv_dtype=d.get("kv_dtype", d["dtype"]),
                max_batch=int(d["max_batch"]),
                max_seq_len=int(d["max_seq_len"]),
                prefill_chunk=int(d["prefill_chunk"]),
                gammas=[int(g) for g in d["gammas"]],
                default_gamma=int(d["default_gamma"]),
                draft_sinks=int(d["draft"]["sinks"]),
                draft_budget=int(d["draft"]["budget"]),
                context_buckets=[int(b) for b in d["context_buckets"]],
                model=ModelConfig(**d["model"]["config"]),
                eos_token_ids=[int(t) for t in d["eos_token_ids"]],
                model_sha256=str(d["model"]["sha256"]),
                versions=dict(d.get("versions", {})),
                world_size=int(d["world_size"]),
                device=d["device"],
                graphs=dict(d.get("graphs", {})),
                cpu_isa=[str(x) for x in d.get("cpu_isa", [])],
                cpu_arch=str(d.get("cpu_arch") or ""),
                # true: written before the block width was recorded, when it was 64
                packed_linears=64 if d.get("packed_linears") is True else int(d.get("packed_linears") or 0),
                cpu_threads=int(d.get("cpu_threads") or 0),
                draft_model=None if d["draft"].get("model") is None else ModelConfig(**d["draft"]["model"]),
                draft_graphs=dict(d["draft"].get("graphs") or {}),
                draft_positions=d["draft"].get("positions", "original"),
                draft_int8=d["draft"].get("weights") == "int8",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{where} is incomplete or malformed ({type(e).__name__}: {e}); rebuild the engine") from None
        m.check(where)
        return m

    def check(self, where: str) -> None:
        def bad(msg):
            raise EngineError(f"{where}: {msg}")

        if self.backend not in BACKENDS:
            bad(f"backend {self.backend!r} is not available; this runtime has {', '.join(BACKENDS)}")
        if self.device not in DEVICES:
            bad(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            bad(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_dtype not in DTYPES:
            bad(f"kv_dtype {self.kv_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_dtype != self.dtype and self.device != "cpu":
            bad(f"kv_dtype {self.kv_dtype} differs from dtype {self.dtype}: only the CPU attention kernel reads a "
                f"cache of another dtype; use kv_dtype {self.dtype} on {self.device}")
        if self.max_batch < 1:
            bad(f"max_batch {self.max_batch} must be >= 1")
        if not 1 <= self.max_seq_len <= self.model.max_position_embeddings:
            bad(f"max_seq_len {self.max_seq_len} must be in [1, {self.model.max_position_embeddings}] (the model's context)")
        if not 1 <= self.world_size <= self.model.num_kv_heads:
            bad(f"world_size {self.world_size} must be in [1, {self.model.num_kv_heads}] (the model's KV heads)")
        if self.prefill_chunk < 1:
            bad(f"prefill_chunk {self.prefill_chunk} must be >= 1")
        if self.gammas != sorted(set(self.gammas)) or self.gammas[:1] != [0] or self.default_gamma not in self.gammas:
            bad(f"gammas {self.gammas} must be increasing, start at 0 and include default_gamma {self.default_gamma}")
        if not 0 <= self.draft_sinks < self.draft_budget:
            bad(f"draft sinks {self.draft_sinks} must be in [0, budget {self.draft_budget})")
        if (self.context_buckets != sorted(set(self.context_buckets)) or self.context_buckets[0] < 1
                or self.context_buckets[-1] != self.max_seq_len):
            bad(f"context_buckets {self.context_buckets} must be increasing, positive and end at max_seq_len {self.max_seq_len}")
        if self.draft_positions not in DRAFT_POSITIONS:
            bad(f"draft positions {self.draft_positions!r} are not one of {', '.join(DRAFT_POSITIONS)}")
        if self.draft_model is not None and self.world_size > 1:
            bad("a standalone draft model runs on one process only (world_size 1)")
        missing = [n for n in self.step_names() if n not in self.graphs]
        missing += [f"draft/{n}" for n in self.draft_step_names() if n not in self.draft_graphs]
        if self.backend != "eager" and missing:
            bad(f"no compiled graph for step {missing[0]!r} ({len(missing)} missing); rebuild the engine")


def default_buckets(max_seq_len: int, smallest: int = 512) -> list[int]:
    """Powers of two from ``smallest`` up to ``max_seq_len``, which ends the list; a power of two
    within 20% of ``max_seq_len`` is dropped (it would save little and cost graphs)."""
    buckets, b = [], smallest
    while b < 0.8 * max_seq_len:
        buckets.append(b)
        b *= 2
    return buckets + [max_seq_len]


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise EngineError(f"engine directory {str(directory)!r} does not exist; build one with magicdec-build")
    path = directory / "manifest.json"
    if not path.is_file():
        raise EngineError(f"{str(directory)!r} has no manifest.json; it is not an engine directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{str(path)!r} is corrupted: not valid JSON ({e})") from None
    return Manifest.from_json(data, repr(str(path)))


def check_environment(directory: Path, m: Manifest) -> None:
    """Can this process run the engine? One sentence per reason it cannot."""
    where = f"engine {str(directory)!r}"
    built = m.versions.get("torch")
    if m.backend != "eager" and built != torch.__version__:
        raise EngineError(
            f"{where} was compiled with torch {built} and this is torch {torch.__version__}: compiled graphs "
            f"only load in the torch that built them; install torch=={built} or rebuild the engine"
        )
    lacking = cpu.missing(m.cpu_isa) if m.backend == "aoti" and m.device == "cpu" else []
    if lacking:
        raise EngineError(
            f"{where} needs {', '.join(lacking)}, which this CPU ({cpu.model_name()}) lacks: its graphs (compiled "
            f"for {m.cpu_arch or 'the build CPU'}) would stop on an illegal instruction; rebuild the engine here"
            + (", or on any machine with --cpu-isa avx2" if not cpu.missing(list(cpu.ARCH_LEVELS[256][1])) else "")
        )
    threads = torch.get_num_threads()
    if m.backend == "aoti" and m.device == "cpu" and m.cpu_threads != threads:
        # Inductor fixed its loops' thread count at compile time (engines before cpu_threads: 1).
        built = m.cpu_threads or 1
        warnings.warn(f"{where}'s graphs were compiled for {built} thread{'s' * (built > 1)} and this process runs "
                      f"{threads}: their own loops (norms, RoPE, SiLU) use {built}; rebuild the engine with "
                      f"magicdec-build in a process with the threads it will run with", RuntimeWarning, stacklevel=3)
    if m.backend != "eager" and m.packed_linears and m.packed_linears != linear.BLOCK:
        raise EngineError(
            f"{where}'s graphs read linear weights packed in blocks of {m.packed_linears} features; this "
            f"magicdec-rt's linear kernel packs {linear.BLOCK}: rebuild the engine with magicdec-build"
        )
    if m.device == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"{where} was built for CUDA and this machine has no CUDA device; build one with --device cpu")
    if m.backend == "tensorrt":
        from . import trt_backend

        trt_backend.check_versions(where, m.versions)


def graph_inputs(inputs) -> list[torch.Tensor]:
    """A step's inputs flattened as the compiled graph takes them; they must be dense, because
    compiled graphs index their inputs as if they were (AOTInductor does not check)."""
    flat = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]
    bad = next((i for i, t in enumerate(flat) if not t.is_contiguous()), None)
    if bad is not None:
        raise RuntimeError(f"step input {bad} (shape {list(flat[bad].shape)}) is not contiguous")
    return flat


def step_module(model, name: str) -> torch.nn.Module:
    """The module of step ``name``: the draft step reads the model's int8 weights where it holds them."""
    return PrefillStep(model) if name.startswith("prefill") else DecodeStep(model, int8=name == "draft")


def _not_cpu_isa(record: logging.LogRecord) -> bool:
    return "mismatch for AOTI_CPU_ISA" not in record.getMessage()


def load_aoti_graph(path: Path, module: torch.nn.Module):
    """A compiled AOTInductor package whose weights are ``module``'s own tensors: packages are built
    without their weights, so every graph of an engine shares the one copy loaded from
    ``model.safetensors`` (no copy is made; ``module`` must outlive the graph)."""
    attention.kernel_available()  # CPU graphs call torch.ops.magicdec.attention: register it first
    # check_environment has held the graphs' instruction sets to this CPU's; torch warns at any
    # difference, also at graphs for fewer of them (an --cpu-isa avx2 engine on an AVX-512 CPU).
    torch_log = logging.getLogger("torch.export.pt2_archive._package")
    torch_log.addFilter(_not_cpu_isa)
    try:
        graph = torch._inductor.aoti_load_package(str(path))
    except RuntimeError as e:
        if "magicdec::attention" not in str(e):
            raise
        raise EngineError(
            f"compiled graph {str(path)!r} calls the CPU attention kernel, which could not be built "
            "here (see the warning above); install a C++ compiler (g++)"
        ) from None
    finally:
        torch_log.removeFilter(_not_cpu_isa)
    tensors = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    names = graph.get_constant_fqns()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise EngineError(f"compiled graph {str(path)!r} needs weights the model lacks ({missing[0]}); rebuild the engine")
    graph.load_constants({n: tensors[n] for n in names}, check_full_update=True, user_managed=True)
    return graph


class Steps:
    """The engine's steps, called by name: ``steps(name, tokens, positions, cache_k, cache_v,
    lengths[, last])`` -> ``(logits, new_k, new_v)``. ``eager`` runs the model's modules (the
    reference); compiled backends run the graph built for ``name``."""

    def __init__(self, directory: Path, manifest: Manifest, shard: Shard):
        for f in ("config.json", "model.safetensors"):
            if not (directory / f).is_file():
                raise EngineError(f"engine {str(directory)!r} is missing {f}; rebuild it")
        # Under tensor parallelism each rank reads its own weights file.
        self.model = load_model_dir(directory, manifest.torch_dtype, shard)
        if ModelConfig.from_hf(json.loads((directory / "config.json").read_text())) != manifest.model:
            raise EngineError(f"engine {str(directory)!r}: config.json does not match the manifest's model; rebuild it")
        self.device = torch.device(manifest.device)
        self.model.to(self.device)
        if manifest.draft_int8:  # eager: where this CPU can run them (aoti: the manifest's cpu_isa said so)
            linear.quantize_linears(self.model)
        if manifest.backend == "eager" or manifest.packed_linears:  # compiled graphs take the weights they were built with
            linear.pack_linears(self.model)
        self.backend = manifest.backend
        self._modules = {kind: step_module(self.model, kind) for kind in ("prefill", "draft", "verify")}
        # SnapKV's observation runs once per long prompt: eager on every backend.
        self._observe = ObserveStep(self.model)
        self._graphs = {}
        for name, entry in manifest.graphs.items():
            path = directory / entry["file"]
            if not path.is_file():
                raise EngineError(f"engine {str(directory)!r} is missing {entry['file']} (step {name}); rebuild it")
            module = self._module(name)
            if self.backend == "aoti":
                self._graphs[name] = load_aoti_graph(path, module)
            else:
                from . import trt_backend

                self._graphs[name] = trt_backend.load(path)

    def _module(self, name: str) -> torch.nn.Module:
        kind = name.partition("@")[0]  # as step_module decides
        return self._modules["prefill" if kind == "prefill" else "draft" if kind == "draft" else "verify"]

    @torch.inference_mode()
    def __call__(self, name: str, *inputs):
        if name.startswith("observe"):
            return self._observe(*inputs)
        if self.backend == "eager":
            return self._module(name)(*inputs)
        graph = self._graphs.get(name)
        if graph is None:
            raise RuntimeError(f"the engine has no graph for step {name!r}")
        return tuple(graph(*graph_inputs(inputs)))


def load_steps(directory: Path, manifest: Manifest) -> Steps:
    check_environment(directory, manifest)
    return Steps(directory, manifest, init_from_env(manifest.world_size))


def load_draft_steps(directory: Path, manifest: Manifest) -> Steps | None:
    """The standalone draft model's steps (its HF directory ``draft/``), or None: the target drafts
    over its sparse cache (self-speculation)."""
    if manifest.draft_model is None:
        return None
    return Steps(directory / "draft", draft_manifest(manifest), Shard())


def draft_manifest(manifest: Manifest) -> Manifest:
    """The manifest as the standalone draft model's steps see it: its config and its graphs."""
    return replace(manifest, model=manifest.draft_model, graphs=manifest.draft_graphs)
