"""The first-run experience: `magicdec-demo` (plain decoding vs MagicDec on a long-context batch of
the shipped text) and progress bars for the steps that take a while."""

from __future__ import annotations

import re
import shutil

import pytest

from magicdec_rt import Runtime, demo


def test_demo_compares_plain_decoding_with_magicdec(tiny_engine, capsys):
    assert demo.main(["--engine", str(tiny_engine), "--context", "40", "--new-tokens", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "8 rows x 40 tokens of Macbeth, 6 new tokens each" in out
    # Uncalibrated: the engine's default gamma, as magicdec-generate would run.
    assert "plain decoding:" in out and "MagicDec gamma 3:" in out and "acceptance n/a" in out
    assert "MagicDec / plain decoding: " in out and "The planner chose" not in out
    assert ("Speculation wins here" in out) != ("Speculation does not win at 8 x 40" in out)


def test_demo_runs_the_planner_on_a_calibrated_engine_at_the_longest_context_that_fits(tiny_engine, tmp_path, capsys):
    planned = shutil.copytree(tiny_engine, tmp_path / "planned")
    Runtime.load(planned).calibrate(repeats=1).save(planned)
    assert demo.main(["--engine", str(planned), "--new-tokens", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    # max_seq_len 128 less 6 new tokens: the default context (7680) does not fit this engine.
    assert "8 rows x 122 tokens of Macbeth, 6 new tokens each" in out
    assert "MagicDec, planner:" in out
    chosen = re.search(r"The planner chose gamma (.*) of (\d+) rounds\.", out)
    assert chosen, out
    counts = dict(re.findall(r"(\d) in (\d+)", chosen.group(1)))
    assert sum(map(int, counts.values())) == int(chosen.group(2)) and set(counts) <= {"0", "1", "2", "3", "4"}
    assert demo.main(["--engine", str(planned), "--new-tokens", "6", "--gamma", "2", "--quiet"]) == 0
    assert "MagicDec gamma 2:" in capsys.readouterr().out


def test_demo_text_ships_with_the_package():
    assert demo.TEXT.is_file() and demo.TEXT.stat().st_size > 100_000
    assert [len(w) for w in demo.windows(list(range(1000)), 4, 300)] == [300] * 4


@pytest.mark.parametrize("args,message", [
    (["--batch", "9"], "batch=9 is out of range: must be in [1, 8] (the engine's batch)"),
    (["--context", "0"], "context=0 is out of range: must be in [1, 126] (the engine's max_seq_len 128 less "
                         "--new-tokens 2)"),
    (["--context", "127"], "context=127 is out of range: must be in [1, 126]"),
    (["--gamma", "7"], "gamma=7 is not one the engine was built for"),
    (["--gamma", "auto"], "gamma='auto' needs a calibrated engine"),
    (["--gamma", "x"], "invalid gamma 'x': an integer or 'auto'"),
])
def test_demo_errors_are_one_line_exit_2(tiny_engine, args, message, capsys):
    try:  # argparse's own refusals exit from inside main
        code = demo.main(["--engine", str(tiny_engine), "--context", "20", "--new-tokens", "2", "--quiet", *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("magicdec-demo: error: ") and message in err, err


def test_progress_bars_for_generation_and_calibration(tiny_engine, capsys):
    rt = Runtime.load(tiny_engine, show_progress=True)
    rt.generate(["w1 w2 w3"], max_new_tokens=5)
    assert "generate" in capsys.readouterr().err
    rt.calibrate(repeats=1)
    assert "calibrate" in capsys.readouterr().err
    Runtime.load(tiny_engine).generate(["w1 w2 w3"], max_new_tokens=5)  # off by default
    assert capsys.readouterr().err == ""


def test_readme_use_section_matches_make_demo():
    """The README's first commands build the engine `make demo` builds, and create the prompts file
    they read before reading it."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    engine = re.search(r"^ENGINE := (\S+)$", (root / "Makefile").read_text(), re.M).group(1)
    readme = (root / "README.md").read_text()
    use = readme[readme.index("## Use"):]
    use = use[: use.index("\n## ", 1)]
    assert f"--out {engine}" in use and f"--engine {engine} --chat" in use
    assert use.index("> prompts.txt") < use.index("--prompts-file prompts.txt")
