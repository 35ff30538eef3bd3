"""One Llama-family decoder for every step and every backend.

A step is a pure function ``(tokens [B,T], positions [B,T], cache_k, cache_v, lengths [B])
-> (logits, new_k, new_v)``. Caches are sequences of one ``[B, kv_heads, S, head_dim]`` tensor per
layer (separate contiguous inputs, as compiled engines need them) holding the post-RoPE keys of
earlier tokens; ``lengths[b]`` says how many cache slots of row ``b`` are valid.
A query attends to the valid cache slots of its row and, causally, to the ``T`` tokens of its own
block. Nothing is written: the step returns the K/V of its ``T`` tokens and the runtime decides
where they go (full cache, sparse draft cache, or nowhere if rejected).

The same function at different static shapes is the prefill chunk (``T = chunk`` over the full
cache), the draft step (``T = 1`` over the sparse draft cache, with int8 copies of the linear
weights where ``linear.quantize_linears`` made them) and the verify step (``T = gamma + 1`` over the
full cache).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from .linear import Linear
from .parallel import Shard

# Off the CPU, blocks of at least this many tokens use the fused SDPA kernel (see Attention).
SDPA_MIN_BLOCK = 16


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf["rms_norm_eps"],
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weights' dtype, as the reference implementation does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """This rank's KV heads and their query heads (all of them when not sharded)."""

    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        k0, k1 = shard.span(cfg.num_kv_heads)
        self.kv, self.group, self.d = k1 - k0, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        h, kv, d = self.kv * self.group, self.kv, self.d
        self.q_proj = Linear(cfg.hidden_size, h * d)
        self.k_proj = Linear(cfg.hidden_size, kv * d)
        self.v_proj = Linear(cfg.hidden_size, kv * d)
        self.o_proj = Linear(h * d, cfg.hidden_size)

    def forward(self, x, cos, sin, cache_k, cache_v, lengths, cache_bias, causal_bias, scores=None, int8=False):
        B, T, _ = x.shape
        kv, d, group = self.kv, self.d, self.group
        q = self.q_proj(x, int8).view(B, T, kv, group, d).permute(0, 2, 3, 1, 4)  # [B,kv,G,T,d]
        k = self.k_proj(x, int8).view(B, T, kv, d).transpose(1, 2)  # [B,kv,T,d]
        v = self.v_proj(x, int8).view(B, T, kv, d).transpose(1, 2)
        q = q * cos[:, None, None] + rotate_half(q) * sin[:, None, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        if cache_k.dtype != k.dtype:
            # A cache of another dtype (bf16 KV under float32 weights): the block attends to its own
            # keys and values as the cache will hold them, as the same tokens decoded one at a time
            # would read them back, so speculation stays exact.
            k, v = k.to(cache_k.dtype).to(k.dtype), v.to(cache_v.dtype).to(v.dtype)
        if scores is not None:
            scores.append(attention.window_scores(q, k, cache_k, cache_bias, causal_bias))
        # Three attention paths, one math (tests/test_steps.py and tests/test_attention.py hold them
        # to the same reference). On the CPU every step uses the kernel: it never reads slots past
        # a row's length, so a prefill chunk also skips the empty part of its bucket (2.3x the fused
        # SDPA kernel on 256-token chunks of a 4k prompt, measured). Elsewhere long blocks
        # (prefill) use fused SDPA and short ones (decode, draft, verify) batched GEMMs.
        if attention.use_kernel(q):
            # The kernel computes in float32; the casts are written here, not left to the op, so a
            # compiled graph fuses them into the kernels that make q/k/v and read the output.
            o = torch.ops.magicdec.attention(
                q.reshape(B, kv, group * T, d).float(), cache_k, cache_v, lengths, k.float().contiguous(),
                v.float().contiguous(), d**-0.5
            ).to(q.dtype).view(B, kv, group, T, d)
        elif T >= SDPA_MIN_BLOCK:
            o = self._attend_fused(q, k, v, cache_k.to(q.dtype), cache_v.to(q.dtype), cache_bias, causal_bias)
        else:
            o = attention.split_attention(
                q.reshape(B, kv, group * T, d), k, v, cache_k.to(q.dtype), cache_v.to(q.dtype), cache_bias, causal_bias
            ).view(B, kv, group, T, d)
        o = o.permute(0, 3, 1, 2, 4).reshape(B, T, kv * group * d)  # [B,kv,G,T,d] -> [B,T,heads*d]
        return self.shard.all_reduce(self.o_proj(o, int8)), k, v

    @staticmethod
    def _attend_fused(q, k, v, cache_k, cache_v, cache_bias, causal_bias):
        """Long blocks (prefill): compute-bound, where the fused SDPA kernel is ~4x faster on CPU
        than materialising the scores, and copying the cache once per chunk is cheap."""
        B, kv, group, T, d = q.shape
        S = cache_k.shape[2]
        bias = torch.cat((cache_bias.expand(B, 1, T, S), causal_bias.expand(B, 1, T, T)), dim=-1)
        o = F.scaled_dot_product_attention(
            q.reshape(B, kv * group, T, d),
            torch.cat((cache_k, k), dim=2),
            torch.cat((cache_v, v), dim=2),
            attn_mask=bias,
            enable_gqa=True,
        )
        return o.view(B, kv, group, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.shard = shard
        i0, i1 = shard.span(cfg.intermediate_size)
        self.gate_proj = Linear(cfg.hidden_size, i1 - i0)
        self.up_proj = Linear(cfg.hidden_size, i1 - i0)
        self.down_proj = Linear(i1 - i0, cfg.hidden_size)

    def forward(self, x, int8=False):
        return self.shard.all_reduce(self.down_proj(F.silu(self.gate_proj(x, int8)) * self.up_proj(x, int8), int8))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard):
        super().__init__()
        self.self_attn = Attention(cfg, shard)
        self.mlp = MLP(cfg, shard)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache_k, cache_v, lengths, cache_bias, causal_bias, scores=None, int8=False):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, cache_k, cache_v, lengths, cache_bias, causal_bias,
                                 scores, int8)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), int8), k, v


class Transformer(nn.Module):
    """Parameter names follow the Hugging Face Llama layout (minus the ``model.`` prefix), so an
    HF checkpoint loads with a plain ``load_state_dict`` (after ``parallel.shard_state`` when
    sharded). The embedding is replicated on every rank; the LM head holds this rank's vocabulary
    slice."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor, rope_scaling: float = 1.0, shard: Shard = Shard()):
        super().__init__()
        self.cfg, self.shard = cfg, shard
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, shard.vocab_span(cfg.vocab_size)[2])
        if cfg.tie_word_embeddings and shard.world == 1:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.rope_scaling = rope_scaling

    @property
    def kv_heads(self) -> int:
        """KV heads held here: the width of this rank's caches."""
        return self.layers[0].self_attn.kv

    def logits(self, h: torch.Tensor, int8: bool = False) -> torch.Tensor:
        return self.shard.gather_vocab(self.lm_head(h, int8), self.cfg.vocab_size).float()

    def hidden(self, tokens, positions, cache_k, cache_v, lengths, scores=None, int8=False):
        """Final-norm hidden states [B,T,H] and the new K/V [layers,B,kv,T,d] of the block; with a
        list ``scores``, each layer also appends its ``attention.window_scores``; ``int8``: the
        linears use their int8 weights where they hold them (``linear.quantize_linears``)."""
        T = tokens.shape[1]
        S = cache_k[0].shape[2]
        x = self.embed_tokens(tokens)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(x.dtype)
        sin = (emb.sin() * self.rope_scaling).to(x.dtype)
        # Masks as additive biases (0 or -inf), built once per step for all layers.
        slots = torch.arange(S, device=tokens.device)
        neg = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)  # on the device: CUDA graphs copy no CPU scalar
        cache_bias = torch.where(slots[None, :] < lengths[:, None], zero, neg)[:, None, None, :]  # [B,1,1,S]
        idx = torch.arange(T, device=tokens.device)
        causal_bias = torch.where(idx[None, :] <= idx[:, None], zero, neg)  # [T,T]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, cache_k[i], cache_v[i], lengths, cache_bias, causal_bias, scores, int8)
            new_k.append(k)
            new_v.append(v)
        return self.norm(x), torch.stack(new_k), torch.stack(new_v)


class DecodeStep(nn.Module):
    """Draft step (T=1 over the draft cache) and verify step (T=gamma+1 over the full cache):
    logits for every token of the block. ``int8``: the draft step's weights (``linear.py``: its
    proposals need only be likely; the verify, in the model's own weights, decides)."""

    def __init__(self, model: Transformer, int8: bool = False):
        super().__init__()
        self.model, self.int8 = model, int8

    def forward(self, tokens, positions, cache_k, cache_v, lengths):
        h, k, v = self.model.hidden(tokens, positions, cache_k, cache_v, lengths, int8=self.int8)
        return self.model.logits(h, self.int8), k, v


class PrefillStep(nn.Module):
    """Prefill of a fixed-size chunk: logits only at ``last[b]``, the index of row b's last real
    token in the chunk (the LM head over a whole chunk would cost more than the chunk itself)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, cache_k, cache_v, lengths, last):
        h, k, v = self.model.hidden(tokens, positions, cache_k, cache_v, lengths)
        h_last = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
        return self.model.logits(h_last), k, v


class ObserveStep(nn.Module):
    """SnapKV's observation (``kv_cache.DraftPolicy``): the block (a prompt's last tokens, over the
    cache of the tokens before them) and how much its queries attend to every key,
    ``[layers, B, kv, S + T]`` (cache slots, then the block's own tokens)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, cache_k, cache_v, lengths):
        scores = []
        self.model.hidden(tokens, positions, cache_k, cache_v, lengths, scores)
        return torch.stack(scores)
