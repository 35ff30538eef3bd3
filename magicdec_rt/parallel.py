"""Tensor parallelism by KV head, over torch.distributed (gloo on CPUs, NCCL on GPUs).

Rank ``r`` of ``world`` holds a contiguous range of KV heads with their query heads (the K/V/Q
projections split by rows, the output projection by columns), a contiguous range of the MLP's
intermediate features (gate/up by rows, down by columns), and a slice of the vocabulary for the LM
head. One all-reduce follows the attention output projection and one the MLP in every layer; the
logits are all-gathered, so every rank takes the same accept/reject decisions and each rank's
caches hold only its own KV heads.

When the head count does not divide by the world size the split is uneven: with SmolLM2's 3 KV
heads and 2 ranks, rank 0 holds heads 0-1 and rank 1 holds head 2. A world larger than the KV-head
count is an error. The vocabulary is split into equal padded slices so the logits can be gathered
with one collective; the padding is cut after the gather.

The collectives are torch's functional collectives, which ``torch.export`` traces into the graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import EngineError

# A rank whose peer died waits this long in a collective before failing, instead of forever.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def span(self, n: int) -> tuple[int, int]:
        """This rank's contiguous part of ``n`` units, as even as possible (earlier ranks get the
        remainder)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def vocab_span(self, vocab: int) -> tuple[int, int, int]:
        """(start, end, padded size): equal padded slices, so one all-gather rebuilds the logits."""
        per = -(-vocab // self.world)
        start = min(self.rank * per, vocab)
        return start, min(start + per, vocab), per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        from torch.distributed import _functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(x, "sum", _group()))

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        if self.world == 1:
            return logits
        from torch.distributed import _functional_collectives as funcol

        # Gathered along dim 0, the one every backend's all-gather supports, then moved back.
        full = funcol.wait_tensor(funcol.all_gather_single(logits.movedim(-1, 0).contiguous(), 0, _group()))
        return full.movedim(0, -1)[..., :vocab]


def _group():
    import torch.distributed as dist

    return dist.group.WORLD


def shard_state(state: dict, config: dict, shard: Shard) -> dict:
    """Slice an HF-named state dict (the ``model.`` prefix already removed) to one rank."""
    if shard.world == 1:
        return state
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv
    k0, k1 = shard.span(kv)
    q0, q1 = k0 * group, k1 * group
    i0, i1 = shard.span(config["intermediate_size"])
    v0, v1, per = shard.vocab_span(config["vocab_size"])
    out = {}
    for name, w in state.items():
        if name.endswith("q_proj.weight"):
            w = w[q0 * d : q1 * d]
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w[k0 * d : k1 * d]
        elif name.endswith("o_proj.weight"):
            w = w[:, q0 * d : q1 * d]
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            w = w[i0:i1]
        elif name.endswith("down_proj.weight"):
            w = w[:, i0:i1]
        out[name] = w.contiguous()
    head = state["lm_head.weight"] if "lm_head.weight" in state else state["embed_tokens.weight"]
    rows = head[v0:v1]
    out["lm_head.weight"] = torch.cat((rows, rows.new_zeros(per - rows.shape[0], rows.shape[1])))
    return out


def init_from_env(world_size: int) -> Shard:
    """The shard of this process. With ``world_size > 1`` the process must have been started by
    ``torchrun`` (or have RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set)."""
    import torch.distributed as dist

    if world_size == 1:
        return Shard()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world_size and not dist.is_initialized():
        raise EngineError(
            f"the engine is built for world size {world_size} but this is 1 of {env_world} processes; "
            f"start it with `torchrun --nproc-per-node {world_size} ...`"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    if dist.get_world_size() != world_size:
        raise EngineError(
            f"the engine is built for world size {world_size} but the process group has {dist.get_world_size()} ranks"
        )
    return Shard(dist.get_rank(), world_size)


def shutdown() -> None:
    """Leave the process group together. A rank that exits while its gloo threads still run can
    abort ("terminate called without an active exception"), so every rank waits for the others,
    then tears the group down."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
