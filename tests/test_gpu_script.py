"""bench/gpu.sh, the one command for a lent GPU machine: on a machine without CUDA it stops at once
with one line (what CI can check); its helpers that need no GPU are checked here too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_gpu_script_refuses_cleanly_without_cuda():
    proc = subprocess.run(["bash", "bench/gpu.sh", "--phase", "exact"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "bench/gpu.sh: error: no CUDA device here (or no torch): run it on a GPU machine"


def test_cpu_acceptance_turns_unconditional_rates_into_conditional_ones(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    points = [dict(temperature=0.0, gamma=0, per_position_acceptance=[]),
              dict(temperature=0.0, gamma=2, per_position_acceptance=[0.9, 0.5]),
              dict(temperature=0.0, gamma=3, per_position_acceptance=[0.8, 0.6, 0.3]),
              dict(temperature=0.7, gamma=4, per_position_acceptance=[0.5, 0.1, 0.1, 0.1]),
              dict(temperature=0.0, gamma="auto", per_position_acceptance=[0.8, 0.6, 0.3])]
    (tmp_path / "sweep.json").write_text(json.dumps({"points": points}))
    assert gpu.cpu_acceptance(tmp_path / "sweep.json")[:5] == pytest.approx([0.8, 0.75, 0.5, 0.5, 0.5])
