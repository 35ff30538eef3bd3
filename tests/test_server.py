"""magicdec-serve through the real `openai` client and raw HTTP, on 127.0.0.1 at a port the
server picked; every test stops what it started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from builders.build import build_engine
from magicdec_rt import Runtime
from magicdec_rt.server import create_app
from magicdec_rt.service import Service

from .conftest import tiny_hf_model_dir

KEY = "test-key"
MODEL = "tiny"
LONG = 1500  # tokens: several seconds of decoding
PROMPT = "w1 w2 w3 w4 w5"
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w15"


@pytest.fixture(scope="module")
def chat_engine(tmp_path_factory):
    """A tiny engine with room for long generations (so requests are still running when a test
    acts on them) and a chat template (the word-level tokenizer has none)."""
    root = tmp_path_factory.mktemp("chat")
    src = tiny_hf_model_dir(root / "hf", positions=2048)
    engine = build_engine(root / "engine", src, max_batch=8, max_seq_len=2048, max_gamma=3, default_gamma=3,
                          draft_sinks=2, draft_budget=8, prefill_chunk=16, buckets=[64, 512], show_progress=False)
    path = engine / "tokenizer_config.json"
    doc = json.loads(path.read_text())
    doc["chat_template"] = TEMPLATE
    path.write_text(json.dumps(doc))
    return engine


@pytest.fixture
def serve(chat_engine):
    """``serve(**service_kwargs) -> base URL``: a server on a thread, stopped at teardown."""
    import uvicorn

    started = []

    def start(api_key=KEY, max_body_bytes=1 << 16, **kw):
        service = Service(Runtime.load(chat_engine), **kw)
        app = create_app(service, MODEL, api_key, max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread, service))
        for _ in range(500):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread, service in started:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()
        assert not thread.is_alive() and not service.alive


def client(base: str, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def offline(engine, prompt, **kw):
    return Runtime.load(engine).generate([prompt], **kw)[0]


def test_completions_and_chat_match_offline_generate(serve, chat_engine):
    c = client(serve())
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=7, top_p=0.9)):
        want = offline(chat_engine, PROMPT, max_new_tokens=12, **kw)
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **kw)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 12)
        text = "".join(ch.choices[0].text for ch in c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, **kw) if ch.choices)
        assert text == want.text
        messages = [{"role": "user", "content": "w3 w4"}]
        want = offline(chat_engine, messages, max_new_tokens=10, **kw)
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **kw)
        assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
        r = c.chat.completions.create(model=MODEL, messages=messages, stop=want.text.split()[1], **kw)
        assert want.text.startswith(r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
        assert chunks[-1].usage.completion_tokens == 10 and chunks[-2].choices[0].finish_reason == "length"
    assert [m.id for m in c.models.list()] == [MODEL]


def test_stop_strings_and_token_id_prompts(serve, chat_engine):
    c = client(serve())
    full = offline(chat_engine, PROMPT, max_new_tokens=20)
    stop = full.text.split()[3]
    r = c.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert full.text.startswith(r.choices[0].text)


def test_eight_concurrent_clients_each_get_their_solo_output(serve):
    """Different parameters side by side in one batch; each output equals the same request sent
    alone (greedy, and sampled with a seed)."""
    c = client(serve(max_waiting=8))
    jobs = [dict(prompt=f"w{i} w{(5 * i) % 16} w{(7 * i) % 16}", max_tokens=10 + 3 * i,
                 **(dict(temperature=0) if i % 3 == 0 else dict(temperature=0.6 + 0.1 * i, seed=i,
                                                                extra_body={"top_k": 4 + i})))
            for i in range(8)]
    alone = [c.completions.create(model=MODEL, **j).choices[0].text for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda j: c.completions.create(model=MODEL, **j).choices[0].text, jobs))
    assert together == alone


def test_client_disconnect_cancels_and_frees_the_slot(serve):
    """8 slots busy with long streams; one client hangs up mid-stream and a waiting request gets
    its slot while the others still run."""
    base = serve(max_waiting=4, gamma=0)
    c = client(base)
    streams = [c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True)
               for _ in range(8)]
    iters = [iter(s) for s in streams]
    for it in iters:
        next(it)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0))
        streams[0].close()  # the client goes away
        assert waiting.result(timeout=60).choices[0].finish_reason == "length"
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    # The waiting request is the only one done: it got the freed slot while the 7 others run.
    assert 'magicdec_requests_total{outcome="length"} 1.0' in metrics, metrics
    assert 'magicdec_requests_total{outcome="cancelled"} 1.0' in metrics, metrics
    # A client of a non-streamed request that gives up waiting cancels it too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=dict(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    for _ in range(100):
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        if 'magicdec_requests_total{outcome="cancelled"} 2.0' in metrics:
            break
        threading.Event().wait(0.05)
    assert 'magicdec_requests_total{outcome="cancelled"} 2.0' in metrics, metrics
    rest = ["".join(ch.choices[0].text for ch in it) for it in iters[1:]]
    assert all(len(t.split()) == LONG - 1 for t in rest)  # (the first token came with the first chunk)


def test_deadline_is_honoured(serve):
    c = client(serve())
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=120, temperature=0,
                             extra_body={"timeout": 0.001})
    assert r.choices[0].finish_reason == "deadline" and r.usage.completion_tokens < 120


def bad(base, path, body, status, message, headers=None):
    r = httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    return err


@pytest.mark.parametrize("body, message", [
    (dict(temperature=-0.5), "temperature=-0.5 is invalid: must be a number in [0, 2]"),
    (dict(temperature="hot"), 'temperature="hot" is invalid'),
    (dict(top_p=0), "top_p=0 is invalid: must be a number in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 is invalid"),
    (dict(max_tokens=0), "max_tokens=0 is invalid: must be an integer in [1, 2047]"),
    (dict(max_tokens=5000), "max_tokens=5000 is invalid"),
    (dict(max_tokens=2040, prompt="w1 " * 20), "beyond the engine's max_seq_len 2048"),
    (dict(seed=-1), "seed=-1 is invalid"),
    (dict(n=2), "n=2 is invalid: only n=1 is supported"),
    (dict(stop=[""]), "stop=[\"\"] is invalid"),
    (dict(stream="yes"), 'stream="yes" is invalid'),
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt=[1, 99]), "token id 99 is out of range [0, 16)"),
    (dict(prompt={"a": 1}), "prompt must be a string or a list of token ids"),
    (dict(logprobs=3), "logprobs is not supported"),
    (dict(timeout=-2), "timeout=-2 is invalid"),
])
def test_every_bad_parameter_is_a_400_naming_it(serve, body, message):
    base = serve()
    err = bad(base, "/v1/completions", dict(model=MODEL, prompt=PROMPT) | body, 400, message)
    assert err["type"] == "invalid_request_error"
    assert client(base).completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_errors_in_openai_shape_and_the_server_keeps_serving(serve):
    base = serve(max_body_bytes=2000)
    c = client(base)
    bad(base, "/v1/chat/completions", dict(model=MODEL, messages=[{"role": "user"}]), 400, "messages must be")
    bad(base, "/v1/completions", dict(model="gpt-4", prompt=PROMPT), 404, 'model "gpt-4" does not exist')
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    err = bad(base, "/v1/completions", dict(model=MODEL, prompt="w1 " * 1000), 413, "exceeds the limit of 2000 bytes")
    assert err["param"] is None
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        r = httpx.post(f"{base}/v1/completions", json=dict(model=MODEL, prompt=PROMPT), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/metrics", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}  # no key needed
    assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_queue_full_is_429_and_recovers(serve):
    base = serve(max_waiting=0, gamma=0)
    c = client(base)
    streams = [iter(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True))
               for _ in range(8)]
    for s in streams:
        next(s)
    with pytest.raises(openai.RateLimitError, match="waiting queue is full"):
        c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    for s in streams:
        list(s)
    assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("magicdec_requests_total{outcome=\"rejected_busy\"} 1.0", "magicdec_time_to_first_token_seconds_count",
                 "magicdec_inter_token_latency_seconds_bucket", "magicdec_step_seconds_count{step=\"round\"}",
                 "magicdec_queue_depth 0.0", "magicdec_slots 8.0", "magicdec_rounds_total{gamma=\"0\"}",
                 f"magicdec_generation_tokens_total {8 * LONG + 3}.0"):
        assert name in metrics, name


def test_cli_serves_and_refuses_bad_arguments(chat_engine):
    """`magicdec-serve` as users start it: binds 127.0.0.1 by default and says where it listens."""
    exe = [sys.executable, "-m", "magicdec_rt.server"]
    r = subprocess.run(exe + ["--engine", str(chat_engine), "--port", "70000"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "magicdec-serve: error: --port 70000 is out of range [0, 65535]"
    env = dict(os.environ, MAGICDEC_API_KEY="k2")
    proc = subprocess.Popen(exe + ["--engine", str(chat_engine), "--port", "0", "--model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.match(r"magicdec-serve: serving 'tiny' on http://127\.0\.0\.1:(\d+) \(API key required\)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = client(f"http://127.0.0.1:{m.group(1)}", key="k2")
        assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=60)
