"""The planner: MagicDec's cost model of one decoding round, used to choose gamma as the runtime goes.

A round with draft length gamma, its full cache laid out at context bucket S, costs

    C(gamma, S) = gamma * T_D + T_V(gamma, S) + R(gamma)

(T_D: one draft step over the sparse cache, whose size does not depend on the context; T_V: the
verify step over gamma + 1 tokens per row; R: accept/reject and bookkeeping), and commits, per row
and in expectation,

    Omega(gamma) = 1 + sum_{i=1..gamma} prod_{j<=i} alpha_j

tokens, where alpha_j is the probability that draft j is accepted given that drafts 1..j-1 were.
The drafts do not depend on gamma, so one set of alphas serves every gamma. Autoregressive
decoding is gamma = 0: one token per C(0, S). The predicted speedup of gamma at bucket S is

    Omega(gamma) * C(0, S) / C(gamma, S),

and the planner runs the gamma with the largest, 0 where none beats 1. The batch does not appear:
an engine's steps always run its full static batch, so its costs are per engine.

Costs come from a calibration: the engine's own steps timed on this machine
(``Runtime.calibrate``, ``magicdec-calibrate``), stored in the engine directory as
``calibration.json`` with what they depend on (CPU, threads, torch, the CPU kernels' sources and
forced instruction set); a runtime loading one measured under anything else warns that it is
stale (a faster attention kernel made the AR step 17% cheaper than an older calibration said, and
the planner then drafted at a point where that lost 7%). Steps timed alone are not rounds run in the loop, and a shared machine
drifts, so each gamma's calibrated cost is scaled by the running ratio of the round times measured
with it to what the calibration predicted; a gamma not run yet takes the mean ratio of those that
were (drift moves every step alike, and favouring the untried gamma would make the planner flip
on noise). The alphas are learned online from every verify, per
sampling mode (greedy or not), with exponential forgetting so they follow the text being
generated (a position forgets only when it is drafted again), starting from a prior.
While gamma = 0 wins nothing is drafted and nothing is learned, so after ``probe_every`` rounds the
planner drafts once with the smallest gamma, unless even perfect acceptance could not win there.
Each probe after which gamma = 0 still wins doubles the wait (up to 8x), since a probe costs
what speculation loses there (3-4% of throughput at every 32 rounds, B8 / 2k, bench/sweep.py);
a gamma chosen on its merits resets it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import attention, cpu
from .errors import EngineError

CALIBRATION_FILE = "calibration.json"


@dataclass
class Calibration:
    """Milliseconds per step on this machine, for one engine. ``mode`` is ``"greedy"`` or
    ``"sampled"`` (sampling adds a softmax over the vocabulary to drafting and accepting)."""

    draft_ms: dict[str, float]  # mode -> one draft step
    verify_ms: dict[int, dict[int, float]]  # gamma -> bucket -> one verify step
    rest_ms: dict[str, dict[int, float]]  # mode -> gamma -> accept/reject of one round
    host: dict = field(default_factory=dict)

    def changed(self) -> list[str]:
        """What this calibration was measured under that differs here (``host_info``); nothing for
        one that recorded no host (hand-made)."""
        here = host_info()
        return [k for k in here if self.host and self.host.get(k) != here[k]]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Calibration | None":
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(
                draft_ms={m: float(t) for m, t in d["draft_ms"].items()},
                verify_ms={int(g): {int(s): float(t) for s, t in b.items()} for g, b in d["verify_ms"].items()},
                rest_ms={m: {int(g): float(t) for g, t in r.items()} for m, r in d["rest_ms"].items()},
                host=d.get("host", {}),
            )
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise EngineError(f"{path} is unreadable ({e}); rerun `magicdec-calibrate --engine {directory}`") from None


def host_info() -> dict:
    """What step times depend on besides the engine (``kernel_isa``: the CPU ops' instruction set as
    ``MAGICDEC_KERNEL_ISA`` forces it, ``auto`` the CPU's best)."""
    return {"machine": platform.machine(), "cpu": cpu.model_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "kernels": attention.fingerprint(), "kernel_isa": attention.DEFAULT_ISA}


def mode(greedy: bool) -> str:
    return "greedy" if greedy else "sampled"


def omega(alphas) -> float:
    """Expected tokens committed per row by one verify of ``len(alphas)`` drafts."""
    total, run = 1.0, 1.0
    for a in alphas:
        run *= a
        total += run
    return total


class Acceptance:
    """Per-position conditional acceptance, counted with exponential forgetting and a prior."""

    def __init__(self, positions: int, prior: float, prior_weight: float, decay: float):
        self.reached = [0.0] * positions
        self.accepted = [0.0] * positions
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay

    def observe(self, gamma: int, accepted: list[int]) -> None:
        """One verify of ``gamma`` drafts; ``accepted[b]``: how many row ``b`` accepted. Only the
        positions drafted forget: one not drafted keeps what was learned of it, where forgetting it
        every round let the prior back in, and the planner (B8 x 2k, rounds of gamma 2) went back
        to gamma 4 for 21 of 59 rounds to relearn a deep acceptance the text did not give."""
        for j in range(gamma):
            self.reached[j] *= self.decay
            self.accepted[j] *= self.decay
        for a in accepted:
            for j in range(min(a + 1, gamma)):
                self.reached[j] += 1
            for j in range(a):
                self.accepted[j] += 1

    def alphas(self) -> list[float]:
        w, p = self.prior_weight, self.prior
        return [(a + p * w) / (r + w) for a, r in zip(self.accepted, self.reached)]


class Planner:
    def __init__(self, calibration: Calibration, gammas: list[int], buckets: list[int], prior: float = 0.8,
                 prior_weight: float = 4.0, decay: float = 0.97, probe_every: int = 32, cost_weight: float = 0.2,
                 policies: tuple[str, ...] = ("",)):
        missing = [(g, s) for g in gammas for s in buckets if s not in calibration.verify_ms.get(g, {})]
        if missing or not all(m in calibration.draft_ms for m in ("greedy", "sampled")):
            raise EngineError(
                f"calibration.json does not cover this engine (no timing for gamma, bucket {missing[:1]}); "
                "rerun `magicdec-calibrate`"
            )
        self.cal, self.gammas, self.probe_every = calibration, sorted(gammas), probe_every
        # Acceptance per draft policy (several under policy "auto"), then per sampling mode.
        self.learned = {p: {m: Acceptance(max(gammas), prior, prior_weight, decay) for m in ("greedy", "sampled")}
                        for p in policies}
        self.policy = policies[0]  # the policy drafting now
        self.cost_scale: dict[int, float] = {}  # gamma -> measured / calibrated round time, running
        self.cost_weight = cost_weight
        self._since_draft = 0
        self._probe_gap = probe_every  # rounds of gamma = 0 before the next probe

    @property
    def acceptance(self) -> dict:
        """The drafting policy's acceptance, per sampling mode."""
        return self.learned[self.policy]

    def calibrated_ms(self, gamma: int, bucket: int, greedy: bool) -> float:
        m = mode(greedy)
        return gamma * self.cal.draft_ms[m] + self.cal.verify_ms[gamma][bucket] + self.cal.rest_ms[m][gamma]

    def cost_ms(self, gamma: int, bucket: int, greedy: bool) -> float:
        seen = self.cost_scale.values()
        scale = self.cost_scale.get(gamma, sum(seen) / len(seen) if seen else 1.0)
        return scale * self.calibrated_ms(gamma, bucket, greedy)

    def speedup(self, gamma: int, bucket, greedy: bool, alphas=None) -> float:
        """Predicted throughput of ``gamma`` over autoregressive decoding at ``bucket`` (or, a dict,
        each gamma at its own bucket: a round of more drafts may need a larger one)."""
        at = bucket if isinstance(bucket, dict) else {0: bucket, gamma: bucket}
        alphas = self.acceptance[mode(greedy)].alphas() if alphas is None else alphas
        return omega(alphas[:gamma]) * self.cost_ms(0, at[0], greedy) / self.cost_ms(gamma, at[gamma], greedy)

    def choose(self, bucket, greedy: bool) -> int:
        """The gamma to run next; ``bucket`` as for ``speedup``. With several draft policies, first
        the one whose best gamma predicts the most (the policies' steps cost the same): an untried
        policy keeps the prior, so a running one that learns less is left for it, and one left
        keeps what it learned until the running one falls below that."""
        if len(self.learned) > 1:
            def best_speedup(p):
                alphas = self.learned[p][mode(greedy)].alphas()
                return max(self.speedup(g, bucket, greedy, alphas) for g in self.gammas)

            self.policy = max(self.learned, key=best_speedup)
        best = max(self.gammas, key=lambda g: (self.speedup(g, bucket, greedy), -g))
        if best:
            self._probe_gap = self.probe_every
        else:
            self._since_draft += 1
            probe = min((g for g in self.gammas if g), default=0)
            could_win = any(self.speedup(g, bucket, greedy, [1.0] * g) > 1 for g in self.gammas)
            if probe and could_win and self._since_draft >= self._probe_gap:
                best = probe
                self._probe_gap = min(2 * self._probe_gap, 8 * self.probe_every)
        if best:
            self._since_draft = 0
        return best

    def observe(self, gamma: int, accepted: list[int], greedy: bool, bucket: int, round_ms: float) -> None:
        """One round: what its live rows accepted and how long it took."""
        self.learn(gamma, accepted, greedy)
        self.timed(gamma, greedy, bucket, round_ms)

    def learn(self, gamma: int, accepted: list[int], greedy: bool) -> None:
        """What the rows of one sampling mode accepted in a round of ``gamma`` drafts."""
        if gamma and accepted:
            self.acceptance[mode(greedy)].observe(gamma, accepted)

    def timed(self, gamma: int, greedy: bool, bucket: int, round_ms: float) -> None:
        """How long a round planned for ``greedy`` (every row greedy) took."""
        ratio = round_ms / self.calibrated_ms(gamma, bucket, greedy)
        old = self.cost_scale.get(gamma, ratio)
        self.cost_scale[gamma] = old + self.cost_weight * (ratio - old)

    def table(self, greedy: bool) -> dict:
        """Predicted speedup of every gamma at every bucket, with the current alphas."""
        buckets = sorted(self.cal.verify_ms[0])
        return {s: {g: round(self.speedup(g, s, greedy), 3) for g in self.gammas} for s in buckets}

