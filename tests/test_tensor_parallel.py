"""Tensor parallelism over gloo: two processes on this CPU give the single-process tokens, each rank
holds only its share of the caches, and a bad request fails cleanly on every rank."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from builders.build import build_engine, build_like
from magicdec_rt import RequestError, Runtime
from magicdec_rt.parallel import shutdown

from .conftest import copy_engine, edit_manifest, tiny_hf_model_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, engine, prompts, new_tokens, out_dir, export_step_name):
    """One rank: what torchrun would start. Writes what it saw to rank{rank}.json."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rt = Runtime.load(engine)
    report = {"rank": rank, "full_k": list(rt.full.k.shape), "draft_k": list(rt.draft.k.shape),
              "cache_bytes": rt.full.nbytes() + rt.draft.nbytes()}
    try:
        rt.generate(prompts, max_new_tokens=new_tokens, temperature=-1.0)
    except RequestError as e:
        report["error"] = str(e)
    report["greedy"] = [r.token_ids for r in rt.generate(prompts, max_new_tokens=new_tokens, gamma=3)]
    report["sampled"] = [r.token_ids for r in rt.generate(prompts, max_new_tokens=new_tokens, temperature=0.8, seed=4)]
    report["stream_events"] = sum(1 for _ in rt.stream(prompts, max_new_tokens=new_tokens))
    if export_step_name:
        from builders.export import export_step

        graph = export_step(rt.steps.model, rt.manifest, export_step_name).graph
        report["exported_collectives"] = sorted({str(n.target) for n in graph.nodes if "c10d" in str(n.target)})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    shutdown()


def run_world(engine, prompts, new_tokens, tmp_path, world=2, export_step_name=None):
    mp.spawn(_rank_main, args=(world, _free_port(), str(engine), prompts, new_tokens, str(tmp_path), export_step_name),
             nprocs=world, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def with_world_size(engine: Path, dst: Path, world: int) -> Path:
    return build_like(engine, dst, world_size=world)


@pytest.mark.parametrize("kv_heads", [2, 3], ids=["even-2-kv-heads", "uneven-3-kv-heads"])
def test_tiny_model_world_2_equals_world_1(tmp_path, kv_heads):
    src = tiny_hf_model_dir(tmp_path / "hf", heads=2 * kv_heads, kv_heads=kv_heads, hidden=48, seed=5)
    one = build_engine(tmp_path / "w1", src, max_batch=4, max_seq_len=96, draft_sinks=2, draft_budget=8,
                       prefill_chunk=16, max_gamma=3, show_progress=False)
    two = with_world_size(one, tmp_path / "w2", 2)
    # Each rank's weights file holds its KV heads' projections and its share of the MLP.
    d = 64  # head dim
    parts = [load_file(two / f"rank{r}.safetensors") for r in range(2)]
    assert [p["layers.0.self_attn.k_proj.weight"].shape[0] // d for p in parts] == [kv_heads - kv_heads // 2, kv_heads // 2]
    assert sum(p["layers.0.mlp.up_proj.weight"].shape[0] for p in parts) == 96
    prompts = [[int(t) for t in torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))] for n in (30, 7, 19)]
    rt = Runtime.load(one)
    want_greedy = [r.token_ids for r in rt.generate(prompts, max_new_tokens=24, gamma=3)]
    want_sampled = [r.token_ids for r in rt.generate(prompts, max_new_tokens=24, temperature=0.8, seed=4)]
    r0, r1 = run_world(two, prompts, 24, tmp_path, export_step_name="verify3@96")
    assert r0["greedy"] == want_greedy and r0["sampled"] == want_sampled
    assert r1["greedy"] == [] and r1["sampled"] == []  # only rank 0 returns results
    assert r0["stream_events"] == r1["stream_events"] > 0  # every rank drives the same loop
    # Each rank's caches hold only its KV heads: 1+1 of 2, or 2+1 of 3.
    heads = [r0["full_k"][2], r1["full_k"][2]]
    assert sum(heads) == kv_heads and heads == [kv_heads - kv_heads // 2, kv_heads // 2]
    assert [r0["draft_k"][2], r1["draft_k"][2]] == heads
    full_bytes = rt.full.nbytes() + rt.draft.nbytes()
    assert r0["cache_bytes"] + r1["cache_bytes"] == full_bytes
    for r in (r0, r1):
        assert r["error"] == "temperature=-1.0 is out of range: must be a finite number >= 0"
        # The exported verify step carries its collectives in the graph.
        assert any("all_reduce" in t for t in r["exported_collectives"])
        assert any("all_gather" in t for t in r["exported_collectives"])


def test_world_size_beyond_kv_heads_is_rejected(tiny_engine, tmp_path):
    with pytest.raises(Exception, match=r"world_size=3 is out of range: must be in \[1, 2\] \(the model's KV heads\)"):
        with_world_size(tiny_engine, tmp_path / "w3", 3)
    eng = copy_engine(tiny_engine, tmp_path)
    edit_manifest(eng, lambda d: d.update(world_size=3))
    with pytest.raises(Exception, match=r"world_size 3 must be in \[1, 2\] \(the model's KV heads\)"):
        Runtime.load(eng)


def test_engine_for_two_ranks_in_one_process_says_how_to_start(tiny_engine, tmp_path):
    eng = with_world_size(tiny_engine, tmp_path / "w2", 2)
    with pytest.raises(Exception, match=r"built for world size 2 but this is 1 of 1 processes; start it with `torchrun --nproc-per-node 2"):
        Runtime.load(eng)


def test_embedded_model_world_2_equals_world_1(smol_engine, smol_runtime, tmp_path):
    """SmolLM2 has 3 KV heads: rank 0 takes 2 (with 6 query heads), rank 1 takes 1 (3 query heads)."""
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. ") * 12
    prompts = [smol_runtime.tokenizer(text).input_ids[:n] for n in (260, 200)]
    want = [r.token_ids for r in smol_runtime.generate(prompts, max_new_tokens=12, gamma=3)]
    two = with_world_size(smol_engine, tmp_path / "w2", 2)
    r0, r1 = run_world(two, prompts, 12, tmp_path)
    assert r0["greedy"] == want
    assert [r0["full_k"][2], r1["full_k"][2]] == [2, 1]


def test_torchrun_cli_prints_once_and_fails_cleanly(tiny_engine, tmp_path):
    """The documented command: `torchrun --nproc-per-node 2 -m magicdec_rt.cli ...`."""
    import subprocess
    import sys

    eng = with_world_size(tiny_engine, tmp_path / "w2", 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(_free_port()), "-m", "magicdec_rt.cli", "--engine", str(eng)]
    ok = subprocess.run(torchrun + ["--json", "--max-new-tokens", "6", "w1 w2 w3"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)  # one JSON document: only rank 0 printed
    want = Runtime.load(tiny_engine).generate(["w1 w2 w3"], max_new_tokens=6)[0].token_ids
    assert out["results"][0]["token_ids"] == want
    bad = subprocess.run(torchrun + ["--top-k", "-2", "w1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    ours = [line for line in bad.stderr.splitlines() if line.startswith("magicdec-generate: error:")]
    assert ours == ["magicdec-generate: error: top_k=-2 is out of range: must be an integer >= 0 (0 disables it)"] * 2
