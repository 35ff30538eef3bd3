"""Serving: the engine core on a thread of its own, for requests that arrive at any time.

``Service(runtime)`` takes over a loaded ``Runtime``'s core and runs it on one background thread
(the only thread that touches the caches). ``submit`` is thread-safe; ``submit_async`` is its
asyncio twin. A submitted request waits in a bounded queue until a slot frees (``max_waiting``;
past that, ``Busy``: backpressure instead of a queue that grows without end), joins the running
batch between rounds, and leaves it on EOS, a stop string, its length, ``cancel`` or its
deadline; its slot is free for the next round. Prompts prefill ``chunks_per_round`` chunks per
decoding round, so a live row stalls at most that many chunks while a new prompt comes in.

Every request samples by its own rule (greedy, or its own temperature / top-k / top-p / seed),
and a greedy or seeded request's tokens do not depend on which requests share its batch or on
the gamma the planner picks (``sampling.py``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback

from .errors import MagicDecError
from .requests import GenerationResult, Request, StreamEvent, make_requests

log = logging.getLogger("magicdec_rt.service")


class Busy(MagicDecError):
    """The waiting queue is full; try again later."""


class Handle:
    """A submitted request: iterate its events (blocking), wait for its result, or cancel it."""

    def __init__(self, request: Request, service: "Service"):
        self.request, self._service = request, service
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        request.sink = self._events.put

    def cancel(self) -> None:
        self.request.cancel()
        self._service._wake()

    def __iter__(self):
        while True:
            ev = self._events.get()
            yield ev
            if ev.result is not None:
                return

    def result(self) -> GenerationResult:
        for ev in self:
            if ev.result is not None:
                return ev.result


class AsyncHandle:
    """``async for event in handle`` on the event loop that submitted it; ``cancel`` from anywhere."""

    def __init__(self, request: Request, service: "Service", loop: asyncio.AbstractEventLoop):
        self.request, self._service = request, service
        self._events: asyncio.Queue = asyncio.Queue()
        request.sink = lambda ev: loop.call_soon_threadsafe(self._events.put_nowait, ev)

    def cancel(self) -> None:
        self.request.cancel()
        self._service._wake()

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while True:
            ev = await self._events.get()
            yield ev
            if ev.result is not None:
                return

    async def result(self) -> GenerationResult:
        async for ev in self:
            if ev.result is not None:
                return ev.result


class Service:
    def __init__(self, runtime, max_waiting: int = 64, chunks_per_round: int | None = 1, gamma=None):
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting!r} must be an integer >= 0")
        if chunks_per_round is not None and (not isinstance(chunks_per_round, int) or chunks_per_round < 1):
            raise ValueError(f"chunks_per_round={chunks_per_round!r} must be an integer >= 1 or None")
        self.runtime, self.core = runtime, runtime.core
        self.max_waiting = max_waiting
        runtime._take_over()  # end anything a Runtime call left behind, and stop its streams
        runtime.served = True  # the core is driven by this service's thread from now on
        self.core.gamma = runtime.check_gamma(gamma)
        self.core.chunks_per_round = chunks_per_round
        self.core.totals.target_rows = runtime.manifest.max_batch
        self._incoming: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.errors = 0  # turns of the loop that raised (their requests ended with "error")
        self._thread = threading.Thread(target=self._loop, name="magicdec-core", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def _request(self, prompt, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=None,
                 timeout=None) -> Request:
        """Validated; raises RequestError (bad parameters) or Busy (queue full)."""
        [r] = make_requests(self.runtime.tokenizer, self.runtime.manifest, [prompt], max_tokens, temperature, top_p,
                            top_k, seed, stop, timeout)
        return r

    def _enqueue(self, r: Request) -> None:
        with self._cond:
            if self._stopping:
                raise Busy("the service is shutting down")
            if self.queue_depth >= self.max_waiting + self.free_slots:
                raise Busy(f"the waiting queue is full ({self.max_waiting} requests wait for a slot); retry later")
            self._incoming.append(r)
            self._cond.notify()

    def submit(self, prompt, **params) -> Handle:
        """Thread-safe. ``params``: max_tokens, temperature, top_p, top_k, seed, stop, timeout (s)."""
        r = self._request(prompt, **params)
        handle = Handle(r, self)
        self._enqueue(r)
        return handle

    async def submit_async(self, prompt, **params) -> AsyncHandle:
        r = self._request(prompt, **params)
        handle = AsyncHandle(r, self, asyncio.get_running_loop())
        self._enqueue(r)
        return handle

    # ------------------------------------------------------------------ state, for metrics

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot (read without the core's lock: a snapshot)."""
        return len(self._incoming) + len(self.core.waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.core.slots)

    @property
    def free_slots(self) -> int:
        return len(self.core.slots) - self.busy_slots

    # ------------------------------------------------------------------ the loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._cond:
                while not (self._incoming or core.busy or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                for r in self._incoming:
                    core.add(r)
                self._incoming.clear()
            try:
                core.step()
            except Exception:  # noqa: BLE001 -- one bad turn must not take the service down
                self.errors += 1
                log.error("engine core failed; its requests end with 'error'\n%s", traceback.format_exc())
                self._fail_all("error")
        self._fail_all("cancelled")

    def _fail_all(self, reason: str) -> None:
        core = self.core
        with self._cond:
            pending, self._incoming = self._incoming, []
        for r in [*pending, *core.waiting, *(r for r in core.slots if r is not None)]:
            if not r.done:
                r.finish(reason)
            ev = r.event()
            if ev is not None and r.sink is not None:
                r.sink(ev)
        core.waiting.clear()
        core.filling.clear()
        core.slots = [None] * len(core.slots)

    def close(self) -> None:
        """Stop the loop; requests still in flight end with "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Service", "Handle", "AsyncHandle", "Busy", "StreamEvent"]
