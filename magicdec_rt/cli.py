"""``magicdec-generate``: generate from an engine directory.

Errors the caller can fix print one line on stderr and exit with status 2. An engine built with
``--world-size N`` runs under ``torchrun --nproc-per-node N -m magicdec_rt.cli ...``; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import MagicDecError


class OneLineErrors(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):
        error_line(f"{self.prog}: error: {message}")
        sys.exit(2)


def error_line(text: str) -> None:
    """One line on stderr in one write: under torchrun every rank reports the same error into one
    pipe, and print's separate newline let two ranks' lines interleave."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except where the help already explains it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def run_cli(prog: str, fn) -> int:
    try:
        code = fn()
    except MagicDecError as e:
        error_line(f"{prog}: error: {e}")
        code = 2
    except BaseException:
        _leave_group(None)
        raise
    _leave_group(code)
    return code


def _leave_group(code: int | None) -> None:
    """Under tensor parallelism (torchrun), wait for the other ranks; then, when the command is
    done (``code``), exit at once: tearing gloo's process group down at exit can abort a rank
    ("terminate called without an active exception"; seen about once in 20 runs even after a
    barrier), which would fail a command that succeeded. With an exception in flight the group
    is destroyed normally and the exception propagates."""
    if "torch" not in sys.modules:  # else no process group can exist
        return
    from .parallel import shutdown

    if code is None:
        shutdown()
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def gamma_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid gamma {text!r}: an integer or 'auto'") from None


def add_draft_policy_args(p) -> None:
    p.add_argument("--draft-policy", choices=["streaming", "snapkv", "auto"], default="snapkv",
                   help="what the draft cache keeps: SnapKV's per-head selection of the prompt + sinks + a "
                        "recent ring, or StreamingLLM's sinks + recent window; auto keeps both and the gamma "
                        "planner drafts with the one it predicts best (SnapKV without a calibration)")
    p.add_argument("--draft-recent", type=int, help="snapkv: ring slots for the newest tokens (default: half the "
                   "draft budget)")
    p.add_argument("--draft-window", type=int, default=16, help="snapkv: prompt tokens whose attention selects")
    p.add_argument("--draft-reselect", type=int, default=0,
                   help="snapkv: select again every this many generated tokens (0: keep the prompt's selection)")


def draft_policy(args):
    from .kv_cache import DraftPolicy

    return DraftPolicy(args.draft_policy, window=args.draft_window, recent=args.draft_recent,
                       reselect=args.draft_reselect)


def read_prompts_file(name: str) -> list:
    """One prompt per line, or (a file starting with ``[`` or ``{``) JSON: a list of prompts or one."""
    path = Path(name)
    if path.is_dir():
        raise MagicDecError(f"prompts file {name!r} is a directory")
    if not path.is_file():
        raise MagicDecError(f"prompts file {name!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MagicDecError(f"prompts file {name!r} cannot be read as text ({e})") from None
    if not text.lstrip().startswith(("[", "{")):
        return [line for line in text.splitlines() if line.strip()]
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as e:
        raise MagicDecError(f"prompts file {name!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return loaded if isinstance(loaded, list) else [loaded]


def main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-generate", description="Generate text with MagicDec speculative decoding.",
                      formatter_class=ShowDefaults)
    p.add_argument("--engine", required=True, help="engine directory written by magicdec-build")
    p.add_argument("prompts", nargs="*", help="prompts (one generation each)")
    p.add_argument("--prompts-file", help="a file with one prompt per line, or a JSON list of prompts")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt, at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="prompt i is sampled with seed + i (default: random)")
    p.add_argument("--gamma", type=gamma_arg, default=None,
                   help="draft length; 0 = autoregressive; auto = the planner chooses each round "
                        "(default: auto on a calibrated engine, else the engine's default)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    add_draft_policy_args(p)
    p.add_argument("--json", action="store_true", help="print results and statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars (none either when stderr is not a terminal)")
    args = p.parse_args(argv)

    def run():
        prompts = list(args.prompts)
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
        if not prompts:
            raise MagicDecError("no prompts: give them as arguments or with --prompts-file")
        if args.chat:
            prompts = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in prompts]
        from .runtime import Runtime

        rt = Runtime.load(args.engine, show_progress=sys.stderr.isatty() and not args.quiet,
                          draft_policy=draft_policy(args))
        results = rt.generate(
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            gamma=args.gamma,
        )
        if rt.rank != 0:
            return 0  # tensor parallelism: rank 0 prints
        if args.json:
            out = {"results": [r.__dict__ for r in results], "stats": rt.last_stats}
            print(json.dumps(out, indent=2))
        else:
            for r in results:
                print(f"--- [{r.index}] {r.finish_reason}, {len(r.token_ids)} tokens")
                print(r.text)
            s = rt.last_stats
            rate = s["acceptance_rate"]
            print(
                f"--- gamma {s['gamma']}: {s['new_tokens']} tokens, decode {s['decode_tokens_per_s']:.1f} tok/s, "
                f"acceptance {'n/a' if rate is None else f'{rate:.2f}'}, "
                f"mean accepted length {s['mean_accepted_length'] or 0:.2f}",
                file=sys.stderr,
            )
        return 0

    return run_cli(p.prog, run)


def calibrate_main(argv=None) -> int:
    p = OneLineErrors(prog="magicdec-calibrate",
                      description="Time an engine's steps on this machine for the gamma planner (writes ENGINE/calibration.json).",
                      formatter_class=ShowDefaults)
    p.add_argument("--engine", required=True, help="engine directory written by magicdec-build")
    p.add_argument("--repeats", type=int, default=5, help="rounds of timed calls, every step once per round (median)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (none either when stderr is not a terminal)")
    args = p.parse_args(argv)

    def run():
        if args.repeats < 1:
            raise MagicDecError(f"repeats={args.repeats} is out of range: must be >= 1")
        calibrate(args.engine, args.repeats, show_progress=not args.quiet)
        return 0

    return run_cli(p.prog, run)


def calibrate(engine, repeats: int = 5, show_progress: bool = True) -> None:
    """Calibrate ``engine`` and store the result in it; prints what the planner now predicts
    (a progress bar on a terminal, unless ``show_progress`` is off)."""
    import time

    from .planner import CALIBRATION_FILE, Planner
    from .runtime import Runtime

    t = time.perf_counter()
    # The calibration this replaces is set aside while the engine loads without it: stale, unreadable
    # or not covering the engine's gammas, it must not stop its replacement (it comes back on failure).
    old = Path(engine) / CALIBRATION_FILE
    kept = old.with_name(CALIBRATION_FILE + ".old")
    if old.is_file():
        old.replace(kept)
    try:
        rt = Runtime.load(engine, show_progress=show_progress and sys.stderr.isatty())
        cal = rt.calibrate(repeats)
    except BaseException:
        if kept.is_file():
            kept.replace(old)
        raise
    kept.unlink(missing_ok=True)
    path = cal.save(engine)
    m = rt.manifest
    planner = Planner(cal, m.gammas, m.context_buckets)
    print(f"calibrated {engine} in {time.perf_counter() - t:.1f} s: draft step {cal.draft_ms['greedy']:.1f} ms; "
          f"written {path}", file=sys.stderr)
    for bucket, row in planner.table(greedy=True).items():
        best = max(row, key=row.get)
        print(f"  context bucket {bucket}: decode step {cal.verify_ms[0][bucket]:.1f} ms, verify step "
              f"{', '.join(f'g{g} {cal.verify_ms[g][bucket]:.1f}' for g in m.gammas if g)} ms; "
              f"at the prior acceptance the planner picks gamma {best} ({row[best]:.2f}x)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
