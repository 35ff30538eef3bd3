"""Bad input: a clear error naming the value and the allowed range, and the runtime keeps serving."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from builders import build
from magicdec_rt import EngineError, RequestError, Runtime, cli

from .conftest import copy_engine, edit_manifest

GOOD = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def baseline(tiny_runtime):
    return [r.token_ids for r in tiny_runtime.generate(GOOD, max_new_tokens=10)]


REQUEST_CASES = [
    (dict(prompts=[""]), "prompt 0 is empty; a prompt needs at least 1 token"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 99]]), "prompt 0: token id 99 is out of range [0, 16)"),
    (dict(prompts=[3.5]), "prompt 0 is a float; a prompt is a string, a list of token ids, or a list of chat messages"),
    (dict(prompts=[[1] * 100], max_new_tokens=29),
     "prompt 0 has 100 tokens; with max_new_tokens=29 that is 129, beyond the engine's max_seq_len 128"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is out of range: must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature=-0.5 is out of range: must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature=nan is out of range"),
    (dict(top_p=0.0), "top_p=0.0 is out of range: must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 is out of range: must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 is out of range: must be an integer >= 0 (0 disables it)"),
    (dict(gamma=5), "gamma=5 is not one the engine was built for: allowed [0, 1, 2, 3, 4]"),
    (dict(gamma=-1), "gamma=-1 is not one the engine was built for"),
    (dict(seed=-3), "seed=-3 is out of range: must be an integer in [0, 2**63) or None"),
    (dict(stop=[""]), "stop=[''] is invalid: must be a non-empty string or a list of them"),
]


@pytest.mark.parametrize("kwargs,message", REQUEST_CASES, ids=[m[:40] for _, m in REQUEST_CASES])
def test_bad_request_is_rejected_and_next_request_is_served(tiny_runtime, baseline, kwargs, message):
    kw = dict(prompts=GOOD, max_new_tokens=10)
    kw.update(kwargs)
    with pytest.raises(RequestError) as err:
        tiny_runtime.generate(**kw)
    assert message in str(err.value)
    with pytest.raises(RequestError):  # streaming validates before its first event, too
        tiny_runtime.stream(**kw)
    assert [r.token_ids for r in tiny_runtime.generate(GOOD, max_new_tokens=10)] == baseline


def test_more_prompts_than_the_batch_are_all_served(tiny_runtime, baseline):
    prompts = GOOD * 9  # 18 prompts, engine batch 8
    out = tiny_runtime.generate(prompts, max_new_tokens=10)
    assert [r.index for r in out] == list(range(18))
    assert [r.token_ids for r in out] == baseline * 9


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    return copy_engine(tiny_engine, tmp_path)


def test_unknown_engine_directory(tmp_path):
    with pytest.raises(EngineError, match="engine directory .*nope' does not exist; build one with magicdec-build"):
        Runtime.load(tmp_path / "nope")


def test_directory_without_manifest(tmp_path):
    with pytest.raises(EngineError, match="has no manifest.json; it is not an engine directory"):
        Runtime.load(tmp_path)


def test_corrupted_manifest(engine_copy):
    (engine_copy / "manifest.json").write_text('{"format": "magicdec-rt-engine", "max_b')
    with pytest.raises(EngineError, match="is corrupted: not valid JSON"):
        Runtime.load(engine_copy)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(format_version=99), "has format_version 99; this runtime reads version 2: rebuild"),
        (lambda d: d.update(format="other"), "is not a magicdec-rt engine manifest"),
        (lambda d: d.update(backend="onnx"), "backend 'onnx' is not available; this runtime has eager, aoti, tensorrt"),
        (lambda d: d.update(backend="aoti"), "no compiled graph for step 'prefill@16'"),
        (lambda d: d.update(context_buckets=[64, 16, 128]), "context_buckets [64, 16, 128] must be increasing"),
        (lambda d: d.update(gammas=[1, 2, 3]), "gammas [1, 2, 3] must be increasing, start at 0"),
        (lambda d: d.pop("max_batch"), "is incomplete or malformed (KeyError: 'max_batch')"),
        (lambda d: d.update(max_seq_len=100000), "max_seq_len 100000 must be in [1, 256] (the model's context)"),
        (lambda d: d["draft"].update(sinks=9), "draft sinks 9 must be in [0, budget 8)"),
        (lambda d: d["model"]["config"].update(num_layers=3), "config.json does not match the manifest's model"),
    ],
    ids=["version", "format", "backend", "no-graphs", "buckets", "gammas", "missing-key", "seq-len", "sinks",
         "model-mismatch"],
)
def test_incompatible_manifest(engine_copy, edit, message):
    edit_manifest(engine_copy, edit)
    with pytest.raises(EngineError) as err:
        Runtime.load(engine_copy)
    assert message in str(err.value)


def test_missing_weights(engine_copy):
    (engine_copy / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="is missing model.safetensors; rebuild it"):
        Runtime.load(engine_copy)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/no/such/model.gguf"], "model path '/no/such/model.gguf' does not exist"),
        (["--draft-sinks", "300"], "draft_sinks=300 is out of range: must be in [0, draft_budget=256)"),
        (["--max-batch", "0"], "max_batch=0 is out of range: must be >= 1"),
        (["--gamma", "9"], "default_gamma=9 is not one of the built gammas [0, 1, 2, 3, 4, 5, 6]"),
        (["--gammas", "2", "-1"], "gammas=[-1, 0, 2] is out of range: each gamma must be >= 0"),
        (["--buckets", "0", "512"], "buckets=[0, 512] is out of range: each bucket must be >= 1"),
        pytest.param(["--backend", "tensorrt", "--device", "cuda"], "backend 'tensorrt' needs torch-tensorrt, which is not installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is not None, reason="installed")),
        pytest.param(["--device", "cuda"], "device 'cuda' was requested but this machine has no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
        (["--backend", "aoti", "--world-size", "2"], "backend 'aoti' with world_size=2 is not supported: compiled graphs cannot run torch's collectives here"),
        (["--backend", "onnx"], "argument --backend: invalid choice: 'onnx'"),
        (["--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
        (["--draft-weights", "int4"], "argument --draft-weights: invalid choice: 'int4'"),
        (["--cpu-isa", "avx512"], "argument --cpu-isa: invalid choice: 'avx512'"),
        (["--cpu-isa", "avx2", "--device", "cuda"], "cpu_isa 'avx2' is not supported on cuda; choose one of native"),
        (["--cpu-isa", "avx2", "--dtype", "bfloat16"], "dtype bfloat16 needs a CPU that multiplies it natively "
         "(AVX512-BF16 or AMX) and cpu_isa avx2 builds for CPUs with AVX2 only, which emulate it: use --dtype float32 or auto"),
        (["--dtype", "float16", "--draft-weights", "int8"], "draft_weights int8 needs a CPU with AVX2 and FMA for a "
         "float32 engine, AVX512-VNNI and AVX512-BF16 for a bfloat16 one, and no AMX; this is float16 on cpu"),
    ],
)
def test_build_cli_errors_are_one_line_exit_2(argv, message, capsys, tmp_path):
    try:
        code = build.main(argv + ["--out", str(tmp_path / "e"), "--quiet"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("magicdec-build: error: ") and message in err, err


def test_build_refuses_to_overwrite_a_directory_that_is_not_an_engine(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert build.main(["--out", str(tmp_path), "--quiet"]) == 2
    assert "is not empty and not an engine directory; refusing to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1", "w1 w2"], "temperature=-1.0 is out of range: must be a finite number >= 0"),
        (["--top-p", "2", "w1"], "top_p=2.0 is out of range: must be in (0, 1]"),
        (["--gamma", "7", "w1"], "gamma=7 is not one the engine was built for: allowed [0, 1, 2, 3, 4]"),
        ([""], "prompt 0 is empty"),
        ([], "no prompts: give them as arguments or with --prompts-file"),
        (["--prompts-file", "/no/file"], "prompts file '/no/file' does not exist"),
        (["--max-new-tokens", "500", "w1"], "beyond the engine's max_seq_len 128"),
        (["--draft-policy", "snapkv", "--draft-recent", "6", "w1"], "recent >= 1 with sinks + recent < budget (2 + 6 vs 8)"),
    ],
)
def test_generate_cli_errors_are_one_line_exit_2(tiny_engine, args, message, capsys):
    code = cli.main(["--engine", str(tiny_engine), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("magicdec-generate: error: ") and message in err, err


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"role": "user"', "is not valid JSON: Expecting ',' delimiter at line 1, column 17"),
        ('[\n  "w1",\n  "w2" "w3"\n]', "is not valid JSON: Expecting ',' delimiter at line 3, column 8"),
        ("[2024]", "prompt 0 is an int; a prompt is a string"),
        (None, "is a directory"),
    ],
    ids=["truncated-json", "json-line-3", "an-int", "directory"],
)
def test_prompts_file_errors(tiny_engine, tmp_path, content, message, capsys):
    path = tmp_path / "prompts"
    path.mkdir() if content is None else path.write_text(content)
    code = cli.main(["--engine", str(tiny_engine), "--prompts-file", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err


def test_plain_text_prompts_file_is_one_prompt_per_line(tiny_engine, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("w1 w2\n\n2024\n")
    assert cli.main(["--engine", str(tiny_engine), "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "2",
                     "--json"]) == 0
    # Two prompts (the blank line is skipped): "w1 w2" and the text "2024" (one unknown word).
    assert [r["prompt_tokens"] for r in json.loads(capsys.readouterr().out)["results"]] == [2, 1]


@pytest.mark.parametrize("main,defaults", [
    (cli.main, ["(default: 128)", "(default: 0.0)", "(default: 1.0)", "(default: 0)", "(default: random)",
                "(default: auto on a calibrated engine"]),
    (build.main, ["(default: auto)", "(default: 8)", "(default: 256)", "(default: 16)"]),
])
def test_help_shows_defaults(main, defaults, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and all(d in out for d in defaults), out


def test_generate_cli_bad_engine_no_traceback(tmp_path):
    """A real process: exit status 2, exactly one line on stderr, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "magicdec_rt.cli", "--engine", str(tmp_path / "missing"), "hello"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist; build one with magicdec-build" in lines[0], proc.stderr


def test_dtype_auto_follows_the_cpu_and_emulated_bf16_warns(tiny_hf, tmp_path, monkeypatch):
    from builders.build import build_engine
    from magicdec_rt import cpu
    from magicdec_rt.engine import read_manifest

    opts = dict(max_batch=1, max_seq_len=32, max_gamma=1, default_gamma=1, draft_sinks=1, draft_budget=4, prefill_chunk=8,
                show_progress=False)
    assert read_manifest(build_engine(tmp_path / "auto", tiny_hf, dtype="auto", **opts)).dtype == cpu.auto_dtype()
    # A CPU without AMX / AVX-512-BF16 (this one's detection replaced): auto picks float32, and an
    # explicit bfloat16 build says what emulation costs, measured here.
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert read_manifest(build_engine(tmp_path / "auto2", tiny_hf, dtype="auto", **opts)).dtype == "float32"
    with pytest.warns(RuntimeWarning, match=r"has no AMX or AVX-512-BF16, so torch emulates bfloat16: a batch-16 "
                                            r"576x1536 linear ran [0-9.]+x the float32 time here"):
        build_engine(tmp_path / "bf16", tiny_hf, dtype="bfloat16", **opts)


def test_generate_cli_refuses_an_unknown_draft_policy(tiny_engine, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--engine", str(tiny_engine), "--draft-policy", "h2o", "w1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and "argument --draft-policy: invalid choice: 'h2o'" in err
