"""The engine core under a Service: in-flight batching, per-request sampling rules, cancellation,
deadlines, backpressure, and the asyncio API."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from magicdec_rt import RequestError, Runtime
from magicdec_rt.sampling import noise
from magicdec_rt.service import Busy, Service

PROMPTS = [[(3 * i + j) % 16 for j in range(4 + 5 * i)] for i in range(10)]
# Different rules side by side: greedy (with stop lengths), and seeded sampling of every kind.
MIXED_PARAMS = [
    dict(max_tokens=30),
    dict(max_tokens=12),
    dict(max_tokens=40, temperature=0.8, seed=1),
    dict(max_tokens=25, temperature=1.2, top_k=5, seed=2),
    dict(max_tokens=35, temperature=0.7, top_p=0.8, seed=3),
    dict(max_tokens=20, temperature=1.0, seed=4, top_k=3, top_p=0.9),
    dict(max_tokens=33),
    dict(max_tokens=28, temperature=0.5, seed=5),
    dict(max_tokens=30, temperature=0.9, seed=6),
    dict(max_tokens=18),
]


@pytest.fixture
def service(tiny_engine):
    services = []

    def make(**kw):
        s = Service(Runtime.load(tiny_engine), **kw)
        services.append(s)
        return s

    yield make
    for s in services:
        s.close()
        assert not s.alive


def solo(engine, prompt, params, gamma=3):
    """The request run alone through a Runtime (no Service)."""
    kw = dict(params)
    return Runtime.load(engine).generate([prompt], max_new_tokens=kw.pop("max_tokens"), gamma=gamma, **kw)[0]


def test_seeded_sampling_is_the_same_with_and_without_speculation(tiny_runtime):
    """With a seed, every token is plain sampling's token at that position, whatever gamma or the
    planner does: speculative output equals autoregressive output token for token."""
    kw = dict(max_new_tokens=40, temperature=0.9, top_k=8, seed=21)
    ar = [r.token_ids for r in tiny_runtime.generate(PROMPTS[:6], gamma=0, **kw)]
    for gamma in (1, 3, 4):
        spec = tiny_runtime.generate(PROMPTS[:6], gamma=gamma, **kw)
        assert [r.token_ids for r in spec] == ar, gamma
        assert 0 < tiny_runtime.last_stats["acceptance_rate"] < 1
    other = [r.token_ids for r in tiny_runtime.generate(PROMPTS[:6], gamma=3, **dict(kw, seed=22))]
    assert other != ar


def test_noise_depends_on_seed_and_position_only():
    a = noise(5, 17, 100)
    assert torch.equal(a, noise(5, 17, 100)) and not torch.equal(a, noise(5, 18, 100))
    assert not torch.equal(a, noise(6, 17, 100)) and (a > 0).all()


def test_mixed_rules_in_one_batch_each_equal_their_solo_run(service, tiny_engine):
    """Ten requests with different rules through 8 slots, submitted together from threads: each
    output equals the request run alone (greedy, and sampled with a seed)."""
    svc = service(max_waiting=16)
    handles = [None] * len(PROMPTS)

    def go(i):
        handles[i] = svc.submit(PROMPTS[i], **MIXED_PARAMS[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [h.result() for h in handles]
    for i, r in enumerate(results):
        want = solo(tiny_engine, PROMPTS[i], MIXED_PARAMS[i])
        assert r.token_ids == want.token_ids, i
        assert r.finish_reason == "length" and len(r.token_ids) == MIXED_PARAMS[i]["max_tokens"]


def test_cancel_frees_the_slot_for_a_waiting_request(service):
    """8 slots busy with long requests and one waiting: cancelling one mid-stream lets the waiting
    request in while the others are still running."""
    svc = service(max_waiting=4, gamma=0)
    long = [svc.submit(PROMPTS[i][:5], max_tokens=120) for i in range(8)]
    waiting = svc.submit(PROMPTS[8][:5], max_tokens=5)
    first = next(iter(long[0]))
    assert first.token_ids and first.result is None
    long[0].cancel()
    got = waiting.result()
    assert got.finish_reason == "length" and len(got.token_ids) == 5
    assert not all(h.request.done for h in long[1:])  # it got in before the batch drained
    cancelled = long[0].result()
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 120
    for h in long[1:]:
        assert h.result().finish_reason == "length"


def test_deadline_ends_a_request_with_what_it_has(service):
    svc = service()
    r = svc.submit(PROMPTS[0][:5], max_tokens=120, timeout=0.001).result()
    assert r.finish_reason == "deadline" and len(r.token_ids) < 120
    again = svc.submit(PROMPTS[0][:5], max_tokens=6).result()  # and the next is served normally
    assert again.finish_reason == "length" and len(again.token_ids) == 6


def test_a_full_queue_answers_busy_and_recovers(service):
    svc = service(max_waiting=1, gamma=0)
    running = [svc.submit(PROMPTS[i][:5], max_tokens=120) for i in range(9)]  # 8 slots + 1 waiting
    with pytest.raises(Busy, match=r"waiting queue is full \(1 requests wait"):
        svc.submit(PROMPTS[0][:5], max_tokens=5)
    assert [h.result().finish_reason for h in running] == ["length"] * 9
    assert svc.submit(PROMPTS[0][:5], max_tokens=5).result().finish_reason == "length"


def test_bad_requests_are_refused_before_anything_changes(service):
    svc = service()
    for kw, message in [(dict(temperature=-1), "temperature=-1 is out of range"),
                        (dict(max_tokens=0), "max_new_tokens=0 is out of range"),
                        (dict(timeout=0), "timeout=0 is out of range"),
                        (dict(seed=2**63), "seed=9223372036854775808 is out of range")]:
        with pytest.raises(RequestError, match=message):
            svc.submit(PROMPTS[0], **kw)
    with pytest.raises(RequestError, match="beyond the engine's max_seq_len 128"):
        svc.submit(PROMPTS[0], max_tokens=125)
    assert svc.submit(PROMPTS[0], max_tokens=4).result().finish_reason == "length"


def test_without_max_tokens_a_request_fills_the_context(service):
    svc = service()
    r = svc.submit(PROMPTS[1], max_tokens=None).result()
    assert r.finish_reason == "length" and len(PROMPTS[1]) + len(r.token_ids) == 128
    with pytest.raises(RequestError, match="prompt 0 has 128 tokens, leaving no room for new tokens"):
        svc.submit([1] * 128, max_tokens=None)


def test_a_runtime_under_a_service_refuses_direct_calls(service):
    svc = service()
    with pytest.raises(RuntimeError, match="run by a Service"):
        svc.runtime.generate([PROMPTS[0]], max_new_tokens=3)


def test_async_api_streams_and_cancels(service, tiny_engine):
    svc = service(max_waiting=8)

    async def main():
        h = await svc.submit_async(PROMPTS[1], max_tokens=20, temperature=0.8, seed=9)
        tokens = []
        async for ev in h:
            tokens += ev.token_ids
            final = ev.result
        c = await svc.submit_async(PROMPTS[2][:5], max_tokens=120)
        async for ev in c:
            if ev.token_ids:
                c.cancel()
            last = ev
        return tokens, final, last.result

    tokens, final, cancelled = asyncio.run(main())
    assert tokens == final.token_ids == solo(tiny_engine, PROMPTS[1], dict(max_tokens=20, temperature=0.8,
                                                                             seed=9)).token_ids
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 120


def test_prefill_interleaves_with_decoding(tiny_engine):
    """chunks_per_round=1: while a long prompt prefills (5 chunks of 16), the live row keeps
    getting a round after every chunk; with None the prompt prefills before the next round."""
    for budget, most in ((1, 1), (None, 5)):
        rt = Runtime.load(tiny_engine)
        core, log = rt.core, []
        core.observer = lambda info: log.append(info["kind"])
        svc = Service(rt, chunks_per_round=budget, gamma=0)
        try:
            live = svc.submit(PROMPTS[0][:3], max_tokens=100)
            next(iter(live))  # it is decoding
            svc.submit([1] * 70, max_tokens=3).result()  # 70 tokens: 5 chunks
            live.cancel()
        finally:
            svc.close()
        runs = "".join("p" if k == "prefill" else "r" for k in log)
        longest = max(len(run) for run in runs.split("r"))
        assert longest == most, runs


def test_a_failing_turn_ends_its_requests_with_error_and_the_service_goes_on(service, caplog):
    """A step that raises (here: the first verify after a trap is set) ends the requests in the
    core with "error", logs the traceback, and the next request is served normally."""
    svc = service()
    core = svc.core
    real = core.steps

    class Trap:
        """The engine's steps, except that the next verify raises once."""

        armed = True
        device, model = real.device, real.model

        def __call__(self, name, *inputs):
            if name.startswith("verify") and Trap.armed:
                Trap.armed = False
                raise RuntimeError("injected step failure")
            return real(name, *inputs)

    core.steps = Trap()
    r = svc.submit(PROMPTS[0][:5], max_tokens=20).result()
    assert r.finish_reason == "error" and svc.errors == 1 and svc.alive
    assert "injected step failure" in caplog.text
    again = svc.submit(PROMPTS[0][:5], max_tokens=6).result()
    assert again.finish_reason == "length" and len(again.token_ids) == 6
