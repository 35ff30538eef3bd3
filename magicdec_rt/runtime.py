"""The runtime: an engine loaded for offline use, and the batch and streaming API over its core.

``Runtime.load(engine_dir)`` reads the manifest, loads the steps (eager modules or compiled
graphs) and the calibration, and builds the engine core (``core.py``), which owns the caches, the
slots and the MagicDec loop. ``generate`` and ``stream`` submit one request per prompt and drive the
core on the caller's thread until they are done: up to ``max_batch`` prompts run at once, and a
finished row's slot goes to the next waiting prompt (continuous batching). Prompts prefill in
full before decoding resumes, the best throughput for a batch job; ``service.py`` runs the same
core on a thread of its own for requests that arrive at any time.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .core import EngineCore, Totals
from .engine import Manifest, load_draft_steps, load_steps, read_manifest
from .kv_cache import DraftPolicy
from .errors import EngineError, RequestError
from .planner import CALIBRATION_FILE, Calibration, Planner, host_info
from .requests import GenerationResult, StreamEvent, make_requests
from .sampling import RowRules, SamplingParams, probabilities

__all__ = ["Runtime", "GenerationResult", "StreamEvent"]


class Runtime:
    def __init__(self, directory: Path, manifest: Manifest, steps, tokenizer, show_progress=False, cuda_graphs=None,
                 draft_policy: DraftPolicy | None = None, draft_steps=None):
        self.directory, self.manifest, self.tokenizer = directory, manifest, tokenizer
        self.show_progress = show_progress
        # CUDA graphs (on by default on CUDA; not yet run on a GPU). Forcing them on elsewhere
        # runs the same bookkeeping without capture.
        cuda_graphs = steps.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        calibration = Calibration.load(directory)
        if calibration is not None and (changed := calibration.changed()):
            warnings.warn(f"{directory / CALIBRATION_FILE} was measured with another {', '.join(changed)} than this "
                          f"process has, so the planner may choose badly; rerun `magicdec-calibrate --engine "
                          f"{directory}`", RuntimeWarning, stacklevel=3)
        draft_policy = draft_policy or DraftPolicy()
        policies = ("snapkv", "streaming") if draft_policy.kind == "auto" else (draft_policy.kind,)
        planner = None if calibration is None else Planner(calibration, manifest.gammas, manifest.context_buckets,
                                                           policies=policies)
        try:
            self.core = EngineCore(manifest, steps, tokenizer, planner, manifest.default_gamma, cuda_graphs,
                                   show_progress=show_progress, policy=draft_policy,
                                   draft_steps=draft_steps)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.last_stats: dict = {}
        self._call = 0  # the core serves the newest call; an older stream must stop
        self.served = False  # set when a Service drives the core from its own thread

    # The core's parts, for benchmarks and tests.
    steps = property(lambda self: self.core.steps)
    full = property(lambda self: self.core.full)
    draft = property(lambda self: self.core.draft)
    planner = property(lambda self: self.core.planner)
    device = property(lambda self: self.core.device)

    @property
    def rank(self) -> int:
        """This process's tensor-parallel rank (0 when not sharded)."""
        return self.steps.model.shard.rank

    @classmethod
    def load(cls, engine_dir: str | Path, show_progress: bool = False, cuda_graphs: bool | None = None,
             draft_policy: DraftPolicy | None = None) -> "Runtime":
        """``draft_policy``: how the draft cache is filled (``kv_cache.DraftPolicy``; default
        SnapKV's selection)."""
        from transformers import AutoTokenizer

        directory = Path(engine_dir)
        manifest = read_manifest(directory)
        steps = load_steps(directory, manifest)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(directory, manifest, steps, tokenizer, show_progress, cuda_graphs, draft_policy,
                   load_draft_steps(directory, manifest))

    def check_gamma(self, gamma):
        """The gamma policy to run: an engine gamma, or "auto" (the default once calibrated)."""
        m = self.manifest
        if gamma is None:
            return "auto" if self.planner else m.default_gamma
        if gamma == "auto":
            if self.planner is None:
                raise RequestError(
                    f"gamma='auto' needs a calibrated engine: run `magicdec-calibrate --engine {self.directory}`"
                )
        elif isinstance(gamma, bool) or not isinstance(gamma, int) or gamma not in m.gammas:
            raise RequestError(f"gamma={gamma!r} is not one the engine was built for: allowed {m.gammas} or 'auto'")
        return gamma

    # ------------------------------------------------------------------ public API

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                 stop=None, gamma=None) -> list[GenerationResult]:
        """One result per prompt, in order. Prompts: strings, token-id lists or chat message lists.
        Greedy when ``temperature == 0``; with a ``seed``, prompt ``i`` is sampled with seed
        ``seed + i`` and its tokens are those of plain sampling with that seed, whatever gamma
        and batch (``sampling.py``)."""
        results = {}
        for ev in self.stream(prompts, max_new_tokens, temperature, top_p, top_k, seed, stop, gamma):
            if ev.result is not None:
                results[ev.index] = ev.result
        if self.rank != 0:
            return []  # under tensor parallelism only rank 0 answers; the others did their part
        return [results[i] for i in sorted(results)]

    def stream(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=None,
               stop=None, gamma=None) -> Iterator[StreamEvent]:
        """Yields tokens as they are accepted; each prompt's last event carries its result.
        The request is validated before the first event. Under tensor parallelism every rank
        must iterate its stream (each drives its shard); all ranks see the same events."""
        gamma = self.check_gamma(gamma)
        requests = make_requests(self.tokenizer, self.manifest, prompts, max_new_tokens, temperature, top_p, top_k,
                                 seed, stop)
        return self._drive(requests, gamma)

    def _take_over(self) -> int:
        """End whatever an abandoned stream left in the core; the caller's call is now the one served."""
        if self.served:
            raise RuntimeError("this Runtime's core is run by a Service; submit requests to the Service")
        core = self.core
        for r in [*core.waiting, *core.slots]:
            if r is not None:
                r.cancel()
        while core.busy:
            core.step()
        self._call += 1
        return self._call

    def _drive(self, requests, gamma):
        call, core = self._take_over(), self.core
        core.gamma, core.totals = gamma, Totals(target_rows=min(len(requests), self.manifest.max_batch))
        events = deque()
        for r in requests:
            r.sink = events.append
            core.add(r)
        bar = tqdm(total=sum(r.max_new for r in requests), desc="generate", unit="tok", leave=False,
                   disable=not self.show_progress)
        try:
            while core.busy or events:
                if not events:
                    core.step()
                while events:
                    ev = events.popleft()
                    bar.update(len(ev.token_ids))
                    yield ev
                    if self._call != call:
                        raise RuntimeError(
                            "this stream was abandoned for a later request on the same Runtime, which "
                            "reused its caches; a Runtime serves one call at a time"
                        )
        finally:
            bar.close()
            if self._call == call:  # closed early: its requests end before the core's next turn
                for r in requests:
                    r.cancel()
        self.last_stats = core.totals.summary(requests, gamma)

    def calibrate(self, repeats: int = 5) -> Calibration:
        """Time this engine's steps on this machine for the planner: a draft step, the verify step
        of every gamma at every bucket, and accept/reject, greedy and sampled (temperature 0.7).
        Every step is timed once per round, ``repeats`` rounds after a warm-up one, and each takes
        its median: the planner compares steps with each other, and a shared machine's speed drifts
        over seconds (timed one after the other, 3 calls each, a verify step of gamma 3 once came
        out 26% dearer than gamma 4's). Step costs depend on shapes, not on what the caches hold,
        so this needs no prompts; it leaves the caches' contents undefined. Save the result with
        ``Calibration.save(engine_dir)``; a new Runtime then plans with it."""
        m, dev, B, V = self.manifest, self.device, self.manifest.max_batch, self.manifest.model.vocab_size
        if m.world_size > 1:
            raise EngineError("calibration under tensor parallelism is not supported yet; calibrate a world-size-1 engine")
        self._take_over()  # the caches are overwritten: a stream in flight must stop
        modes = {"greedy": RowRules([None] * B, dev), "sampled": RowRules([(SamplingParams(temperature=0.7), False)] * B, dev)}
        calls = {}  # (kind, key...) -> a call of the step; the verify steps grouped by bucket

        def verify_call(g, bucket):
            L = torch.full((B,), max(bucket - g - 1, 0), device=dev)
            tokens = torch.zeros(B, g + 1, dtype=torch.long, device=dev)
            positions = L[:, None] + torch.arange(g + 1, device=dev)
            return lambda: self.steps(f"verify{g}@{bucket}", tokens, positions, *self.full.view(slice(None)), L)

        for bucket in m.context_buckets:
            for g in m.gammas:
                calls["verify", g, bucket] = verify_call(g, bucket)
        L = torch.full((B,), m.draft_budget, device=dev)
        base = torch.tensor([self.draft.valid(n) for n in L.tolist()], device=dev)
        x, u = torch.zeros(B, dtype=torch.long, device=dev), 1 - torch.rand(B, 2 * m.max_gamma + 1, device=dev)
        # A round of one draft: one draft step, or two with a standalone draft model (its last
        # draft's K/V; at gamma = 0 that step alone); the planner charges gamma draft steps, so
        # the extra one goes into "rest" of every gamma.
        extra = int(m.draft_model is not None)
        for name, rules in modes.items():
            calls["draft", name] = lambda rules=rules: self.core._draft(1, rules, x, L, base, x.new_zeros(0), u)
            for g in m.gammas:
                logits = torch.randn(B, g + 1, V, device=dev)
                q = None if rules.greedy else probabilities(torch.randn(B, g, V, device=dev), SamplingParams(0.7))
                drafts = torch.randint(0, V, (B, g), device=dev)
                calls["rest", name, g] = (lambda rules=rules, g=g, logits=logits, q=q, drafts=drafts:
                                          [t.tolist() for t in rules.accept(drafts, q, logits, None, u[:, :g], u[:, g])])
        times = {key: [] for key in calls}
        bar = tqdm(total=(repeats + 1) * len(calls), desc="calibrate", unit="step", leave=False,
                   disable=not self.show_progress)
        for i in range(repeats + 1):
            for key, fn in calls.items():
                if key[0] == "verify":
                    self.full.resize(key[2])  # untimed; a no-op within a bucket's group
                t = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # round 0 warms up
                    times[key].append(1e3 * (time.perf_counter() - t))
                bar.update()
        bar.close()
        ms = {key: statistics.median(t) for key, t in times.items()}
        verify = {g: {b: ms["verify", g, b] for b in m.context_buckets} for g in m.gammas}
        draft = {name: ms["draft", name] / (1 + extra) for name in modes}
        rest = {name: {g: ms["rest", name, g] + extra * draft[name] for g in m.gammas} for name in modes}
        self.full.resize(m.context_buckets[0])
        return Calibration(draft, verify, rest, host_info())

