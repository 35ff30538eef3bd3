"""An engine directory: ``manifest.json`` + an HF-format model directory + the step backends.

The manifest says what was built (model, dtype, batch, lengths, gamma set, draft configuration,
context buckets, backend); loading checks it and explains any problem in one sentence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model_dir
from .errors import EngineError
from .model import DecodeStep, ModelConfig, PrefillStep
from .parallel import Shard, init_from_env

FORMAT = "magicdec-rt-engine"
FORMAT_VERSION = 1
BACKENDS = ("eager",)
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def max_gamma(self) -> int:
        return max(self.gammas)

    def bucket(self, length: int) -> int:
        """The smallest context bucket holding ``length`` cache slots."""
        return next(b for b in self.context_buckets if b >= length)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "backend": self.backend,
            "device": "cpu",
            "dtype": self.dtype,
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
                "positions": "original",
            },
            "context_buckets": self.context_buckets,
            "model": {"config": self.model.to_dict(), "sha256": self.model_sha256},
            "vocab_size": self.model.vocab_size,
            "eos_token_ids": self.eos_token_ids,
            "versions": self.versions,
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
        if self.dtype not in DTYPES:
            bad(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.max_batch < 1:
            bad(f"max_batch {self.max_batch} must be >= 1")
        if not 1 <= self.max_seq_len <= self.model.max_position_embeddings:
            bad(f"max_seq_len {self.max_seq_len} must be in [1, {self.model.max_position_embeddings}] (the model's context)")
        if not 1 <= self.world_size <= self.model.num_kv_heads:
            bad(f"world_size {self.world_size} must be in [1, {self.model.num_kv_heads}] (the model's KV heads)")
        if self.prefill_chunk < 1:
            bad(f"prefill_chunk {self.prefill_chunk} must be >= 1")
        if not self.gammas or min(self.gammas) < 0 or self.default_gamma not in self.gammas:
            bad(f"gammas {self.gammas} must be non-negative and include default_gamma {self.default_gamma}")
        if not 0 <= self.draft_sinks < self.draft_budget:
            bad(f"draft sinks {self.draft_sinks} must be in [0, budget {self.draft_budget})")
        if self.context_buckets != sorted(self.context_buckets) or self.context_buckets[-1:] != [self.max_seq_len]:
            bad(f"context_buckets {self.context_buckets} must be increasing and end at max_seq_len {self.max_seq_len}")


def default_buckets(max_seq_len: int, smallest: int = 512) -> list[int]:
    """Powers of two from ``smallest`` up to, and ending at, ``max_seq_len``."""
    buckets, b = [], smallest
    while b < max_seq_len:
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


class EagerSteps:
    """The reference backend: the model's step modules, run directly."""

    def __init__(self, directory: Path, manifest: Manifest, shard: Shard):
        for f in ("config.json", "model.safetensors"):
            if not (directory / f).is_file():
                raise EngineError(f"engine {str(directory)!r} is missing {f}; rebuild it")
        # Each rank slices its shard from the one checkpoint at load: for eager, that slice is
        # the per-rank engine.
        self.model = load_model_dir(directory, manifest.torch_dtype, shard)
        if ModelConfig.from_hf(json.loads((directory / "config.json").read_text())) != manifest.model:
            raise EngineError(f"engine {str(directory)!r}: config.json does not match the manifest's model; rebuild it")
        self._prefill = PrefillStep(self.model)
        self._decode = DecodeStep(self.model)

    @torch.inference_mode()
    def prefill(self, tokens, positions, cache_k, cache_v, lengths, last):
        return self._prefill(tokens, positions, cache_k, cache_v, lengths, last)

    @torch.inference_mode()
    def decode(self, tokens, positions, cache_k, cache_v, lengths):
        return self._decode(tokens, positions, cache_k, cache_v, lengths)


def load_steps(directory: Path, manifest: Manifest):
    return EagerSteps(directory, manifest, init_from_env(manifest.world_size))
