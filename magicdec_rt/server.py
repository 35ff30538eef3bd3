"""``magicdec-serve``: an OpenAI-compatible HTTP server over ``service.Service``.

Endpoints: ``POST /v1/completions`` and ``/v1/chat/completions`` (server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
Errors come in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): 400 bad
parameter, 401 missing or wrong API key, 404 unknown model, 413 body too large, 429 queue full.
A client that disconnects cancels its request. With an API key (``--api-key`` or
``MAGICDEC_API_KEY``) every endpoint but ``/health`` wants ``Authorization: Bearer KEY``.

Beyond OpenAI's parameters a request may give ``top_k`` and ``timeout`` (seconds; the request ends
with ``finish_reason: "deadline"`` when it passes). Needs the ``serve`` extra (FastAPI, uvicorn,
prometheus-client).
"""


import asyncio
import hmac
import json
import math
import os
import time
import uuid

from .cli import OneLineErrors, ShowDefaults, add_draft_policy_args, draft_policy, gamma_arg, run_cli
from .errors import RequestError
from .service import Busy, Service

# OpenAI parameters that change the output and that this server does not implement: refused
# (400) unless they hold their neutral value, rather than silently ignored.
UNSUPPORTED = {"best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "response_format": (None, {"type": "text"})}
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "deadline": "deadline", "cancelled": "cancelled",
          "error": "error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _param(body: dict, name: str, kind, default, check=None, allowed: str = ""):
    """``body[name]`` if of type ``kind`` (and passing ``check``), else a 400 naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                   else (kind,)))
    if not ok or (check is not None and not check(value)):
        raise ApiError(400, f"{name}={json.dumps(value)} is invalid: {allowed}", param=name)
    return value


class Metrics:
    """Prometheus metrics of one server (own registry, so several servers in one process do not mix)."""

    def __init__(self, service: Service):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("magicdec_requests", "Requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("magicdec_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("magicdec_generation_tokens", "Tokens generated", registry=r)
        self.draft_tokens = Counter("magicdec_draft_tokens", "Draft tokens verified (live rows)", registry=r)
        self.accepted_tokens = Counter("magicdec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.row_rounds = Counter("magicdec_row_rounds", "Verify rounds times live rows", registry=r)
        self.rounds = Counter("magicdec_rounds", "Decoding rounds by the gamma chosen", ["gamma"], registry=r)
        self.acceptance = Gauge("magicdec_acceptance_rate", "Accepted / drafted tokens since start", registry=r)
        self.accepted_length = Gauge("magicdec_mean_accepted_length",
                                     "Tokens committed per row per round since start", registry=r)
        Gauge("magicdec_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: service.queue_depth)
        Gauge("magicdec_slots_busy", "Slots holding a request", registry=r).set_function(lambda: service.busy_slots)
        Gauge("magicdec_slots", "Slots (the engine's batch)", registry=r).set(len(service.core.slots))
        buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.step = Histogram("magicdec_step_seconds", "Prefill chunks, decoding rounds and their verify steps",
                              ["step"], buckets=buckets, registry=r)
        self.ttft = Histogram("magicdec_time_to_first_token_seconds", "Arrival to first token", buckets=buckets,
                              registry=r)
        self.itl = Histogram("magicdec_inter_token_latency_seconds", "Time per output token after the first",
                             buckets=buckets, registry=r)
        self._totals = {"drafted": 0, "accepted": 0, "row_rounds": 0}  # the gauges' running sums
        service.core.observer = self.observe

    def observe(self, info: dict) -> None:  # on the core's thread
        if info["kind"] == "prefill":
            self.step.labels("prefill_chunk").observe(info["seconds"])
            return
        self.step.labels("round").observe(info["seconds"])
        self.step.labels("verify").observe(info["verify_seconds"])
        self.rounds.labels(str(info["gamma"])).inc()
        self.draft_tokens.inc(info["drafted"])
        self.accepted_tokens.inc(info["accepted"])
        self.row_rounds.inc(info["live"])
        t = self._totals
        t["drafted"] += info["drafted"]
        t["accepted"] += info["accepted"]
        t["row_rounds"] += info["live"]
        if t["drafted"]:
            self.acceptance.set(t["accepted"] / t["drafted"])
        self.accepted_length.set(1 + t["accepted"] / t["row_rounds"])


def create_app(service: Service, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20):
    from fastapi import Depends, FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app = FastAPI(title="magicdec-rt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(service)
    app.state.metrics, app.state.service = metrics, service
    m = service.runtime.manifest

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                            status_code=e.status)

    def authorized(request: HttpRequest) -> None:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    keyed = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return error_response(e)

    async def read_json(request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "request body must be a JSON object")
        return doc

    def parse(body: dict, chat: bool) -> tuple[object, dict, bool, bool]:
        model = body.get("model")
        if model is not None and model != model_name:
            raise ApiError(404, f"model {json.dumps(model)} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        for name, neutral in UNSUPPORTED.items():
            if name in body and body[name] not in neutral:
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        _param(body, "n", int, 1, lambda n: n == 1, "only n=1 is supported")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
                    for x in msgs):
                raise ApiError(400, "messages must be a non-empty list of {'role': str, 'content': str}",
                               param="messages")
            prompt = [{"role": x["role"], "content": x["content"]} for x in msgs]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
                raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                               param="prompt")
        limit = m.max_seq_len - 1
        # OpenAI's defaults: 16 for completions; for chat, what the context leaves (None).
        max_tokens = _param(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", int,
                            None if chat else 16, lambda x: 1 <= x <= limit, f"must be an integer in [1, {limit}]")
        number = (int, float)
        params = dict(
            max_tokens=max_tokens,
            temperature=_param(body, "temperature", number, 1.0, lambda t: math.isfinite(t) and 0 <= t <= 2,
                               "must be a number in [0, 2]"),
            top_p=_param(body, "top_p", number, 1.0, lambda p: 0 < p <= 1, "must be a number in (0, 1]"),
            top_k=_param(body, "top_k", int, 0, lambda k: k >= 0, "must be an integer >= 0 (0 disables it)"),
            seed=_param(body, "seed", int, None, lambda s: 0 <= s < 2**63, "must be an integer in [0, 2**63)"),
            stop=_param(body, "stop", (str, list), None, lambda s: (isinstance(s, str) and s) or (
                isinstance(s, list) and len(s) <= 4 and all(isinstance(x, str) and x for x in s)),
                        "must be a non-empty string or a list of up to 4 of them"),
            timeout=_param(body, "timeout", number, None, lambda t: 0 < t < math.inf, "must be a number of seconds > 0"),
        )
        stream = _param(body, "stream", bool, False, None, "must be true or false")
        options = _param(body, "stream_options", dict, {}, None, "must be an object")
        return prompt, params, stream, bool(options.get("include_usage"))

    async def submit(prompt, params):
        try:
            return await service.submit_async(prompt, **params)
        except Busy as e:
            metrics.requests.labels("rejected_busy").inc()
            raise ApiError(429, str(e), code="queue_full", kind="rate_limit_error") from None
        except RequestError as e:
            metrics.requests.labels("rejected_invalid").inc()
            message = str(e).replace("max_new_tokens=", "max_tokens=").replace("prompt 0 ", "the prompt ")
            raise ApiError(400, message.replace("prompt 0:", "the prompt:")) from None

    async def events(handle, request: HttpRequest):
        """The request's events; cancels it when the client goes away (or this generator is closed)."""
        r = handle.request
        last, counted = None, False

        def count(outcome: str) -> None:
            metrics.requests.labels(outcome).inc()
            metrics.prompt_tokens.inc(len(r.prompt))
            metrics.generation_tokens.inc(len(r.tokens))

        async def watch():
            while True:
                await asyncio.sleep(0.1)
                if await request.is_disconnected():
                    handle.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            async for ev in handle:
                now = time.monotonic()
                if ev.token_ids:
                    if last is None:
                        metrics.ttft.observe(now - r.submitted)
                        if len(ev.token_ids) > 1:
                            for _ in range(len(ev.token_ids) - 1):
                                metrics.itl.observe(0.0)
                    else:
                        for _ in ev.token_ids:
                            metrics.itl.observe((now - last) / len(ev.token_ids))
                    last = now
                if ev.result is not None:
                    count(ev.result.finish_reason)
                    counted = True
                yield ev
        finally:
            watcher.cancel()
            if not counted:  # the client went away: the request ends (if it has not) uncounted
                handle.cancel()
                count("cancelled" if r.reason in ("", "cancelled") else r.reason)

    def usage(res) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids)}

    async def complete(request: HttpRequest, chat: bool):
        body = await read_json(request)
        prompt, params, stream, include_usage = parse(body, chat)
        handle = await submit(prompt, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            message = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): message, "logprobs": None, "finish_reason": finish}

        if not stream:
            res = None
            async for ev in events(handle, request):
                res = ev.result or res
            return {"id": rid, "object": kind, "created": created, "model": model_name,
                    "choices": [choice(res.text, FINISH[res.finish_reason], False)], "usage": usage(res)}

        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices, **extra) -> str:
            doc = {"id": rid, "object": chunk_kind, "created": created, "model": model_name, "choices": choices}
            return f"data: {json.dumps(doc | extra)}\n\n"

        async def body_iter():
            async for ev in events(handle, request):
                res = ev.result
                if ev.text or res is not None:
                    yield sse([choice(ev.text, None if res is None else FINISH[res.finish_reason], True)])
                if res is not None and include_usage:
                    yield sse([], usage=usage(res))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: HttpRequest):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: HttpRequest):
        return await complete(request, chat=True)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "magicdec-rt", "max_model_len": m.max_seq_len}]}

    @app.get("/health")
    async def health():
        if service.alive:
            return {"status": "ok"}
        return JSONResponse({"status": "error", "detail": "the engine loop has stopped"}, status_code=503)

    @app.get("/metrics", dependencies=keyed)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-serve", formatter_class=ShowDefaults,
                                description="Serve an engine over an OpenAI-compatible HTTP API. A compiled engine "
                                            "holds native code: serve only engines you built or trust.")
    p.add_argument("--engine", required=True, help="engine directory (from magicdec-build)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                      "(default: the environment variable MAGICDEC_API_KEY, else no key)")
    p.add_argument("--model-name", help="the model id clients name (default: the engine directory's name)")
    p.add_argument("--gamma", type=gamma_arg, default=None, help="draft length: an engine gamma or 'auto' (default: auto when "
                                                 "calibrated, else the engine's default)")
    add_draft_policy_args(p)
    p.add_argument("--max-waiting", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--chunks-per-round", type=int, default=1,
                   help="prefill chunks run between decoding rounds: how long live rows stall for a new prompt")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("MAGICDEC_API_KEY") or None

    def run():
        from pathlib import Path

        import uvicorn

        from .runtime import Runtime

        if args.port < 0 or args.port > 65535:
            raise RequestError(f"--port {args.port} is out of range [0, 65535]")
        if args.max_body_bytes < 1:
            raise RequestError(f"--max-body-bytes {args.max_body_bytes} is out of range: must be >= 1")
        runtime = Runtime.load(args.engine, draft_policy=draft_policy(args))
        try:
            service = Service(runtime, max_waiting=args.max_waiting, chunks_per_round=args.chunks_per_round,
                              gamma=args.gamma)
        except ValueError as e:
            raise RequestError(str(e)) from None
        name = args.model_name or Path(args.engine).resolve().name
        app = create_app(service, name, args.api_key, args.max_body_bytes)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
        server = uvicorn.Server(config)

        async def serve():
            task = asyncio.create_task(server.serve())
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                for s in server.servers:
                    for sock in s.sockets:
                        host, port = sock.getsockname()[:2]
                        print(f"magicdec-serve: serving {name!r} on http://{host}:{port} "
                              f"({'API key required' if args.api_key else 'no API key'})", flush=True)
            await task

        try:
            asyncio.run(serve())
        finally:
            service.close()
        return 0

    return run_cli("magicdec-serve", run)


if __name__ == "__main__":
    import sys

    sys.exit(main())
