"""Shared fixtures: tiny random-weight Llama engines (built through the real HF-directory path) and
the embedded SmolLM2 engine for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builders.build import build_engine
from magicdec_rt import Runtime

LONGCTX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longctx"


def tiny_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` words ``w0 .. w{vocab-1}`` with no EOS, so sampled
    sequences are never cut short."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def tiny_hf_model_dir(path: Path, vocab=16, layers=2, hidden=32, heads=4, kv_heads=2, seed=0, head_dim=64,
                      positions=256, **rope):
    """Head dim 64 (as SmolLM2's), so the tiny engines run the CPU attention kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **rope,
    )
    model = LlamaForCausalLM(cfg)
    # Larger logits than the default init gives peaked, varied distributions: a better test.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return tiny_hf_model_dir(tmp_path_factory.mktemp("tiny-hf"))


# The tiny engine's settings (tests build variants of it in other dtypes): a draft budget
# (2 sinks + 6 recent) far smaller than its contexts.
TINY = dict(max_batch=8, max_seq_len=128, max_gamma=4, default_gamma=3, draft_sinks=2, draft_budget=8,
            prefill_chunk=16, buckets=[16, 32, 64], show_progress=False)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory, tiny_hf):
    return build_engine(tmp_path_factory.mktemp("tiny") / "engine", tiny_hf, **TINY)


@pytest.fixture(scope="session")
def tiny_runtime(tiny_engine):
    return Runtime.load(tiny_engine)


@pytest.fixture(scope="session")
def drafter_dir(tmp_path_factory, tiny_hf):
    """A standalone draft model for the tiny engine: its first layer, then its norm and head."""
    from builders.draft_model import cut_layers

    return cut_layers(tiny_hf, 1, tmp_path_factory.mktemp("cut") / "draft")


@pytest.fixture(scope="session")
def dm_engine(tmp_path_factory, tiny_hf, drafter_dir):
    return build_engine(tmp_path_factory.mktemp("dm") / "engine", tiny_hf, draft_model=drafter_dir, **TINY)


# The tiny model compiled with AOTInductor: two context buckets (so generation crosses one) and
# gammas {0, 2}: 7 graphs, about a minute to build on 2 cores.
TINY_AOTI = dict(max_batch=8, max_seq_len=128, gammas=[2], default_gamma=2, draft_sinks=2, draft_budget=8,
                 prefill_chunk=16, buckets=[32], show_progress=False)


@pytest.fixture(scope="session")
def tiny_aoti_engine(tmp_path_factory, tiny_hf):
    return build_engine(tmp_path_factory.mktemp("tiny-aoti") / "engine", tiny_hf, backend="aoti", **TINY_AOTI)


@pytest.fixture(scope="session")
def smol_engine(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct in float32, sized for CI."""
    return build_engine(
        tmp_path_factory.mktemp("smol") / "engine", max_batch=4, max_seq_len=2048,
        draft_sinks=16, draft_budget=256, show_progress=False,
    )


@pytest.fixture(scope="session")
def smol_runtime(smol_engine):
    return Runtime.load(smol_engine)


def copy_engine(engine: Path, tmp_path: Path) -> Path:
    """A scratch copy of a session engine, for tests that damage it."""
    import shutil

    dst = tmp_path / "engine"
    shutil.copytree(engine, dst)
    return dst


def edit_manifest(engine: Path, fn) -> None:
    import json

    path = engine / "manifest.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def longctx_texts() -> list[str]:
    if not LONGCTX.is_dir():
        pytest.skip(f"long-context corpus {LONGCTX} is not present")
    return [p.read_text() for p in sorted(LONGCTX.glob("*.txt"))]
