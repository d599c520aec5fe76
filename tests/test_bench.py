"""The benchmarks must not rot while no GPU is lent: each runs here on a tiny configuration.

These check that the scripts run end to end and print their figures, with consistent results; the
figures themselves are measured by running the scripts on a quiet machine (README "Performance").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_bench_train_runs_on_the_cpu_with_a_tiny_model():
    out = run(str(BENCH / "gpu_bench_train.py"), "--tiny", "--device", "cpu", "--rows", "12", "--mastered", "4")
    assert "tiny config" in out and "updates: cpu" in out
    for phase in ("reference", "train", "eval"):
        assert re.search(rf"^{phase}: speed-up \d+\.\d+x", out, re.M), out
    counts = re.search(r"counts: learned (\d+) vs (\d+), mastered still correct (\d+) vs (\d+)", out)
    assert counts and counts[1] == counts[2] and counts[3] == counts[4], out  # the two loops agree


def test_bench_mask_runs_and_reports_every_variant():
    out = run(str(BENCH / "bench_mask.py"), "--shape", "tiny", "--repeats", "1", "--device", "cpu")
    for opt in ("sgd", "momentum", "adam", "adamw"):
        for variant in ("eager unmasked", "fused unmasked", "fused masked (bits)", "fused masked (int8)"):
            assert re.search(rf"^{opt}\s+{re.escape(variant)}\s+\d+\.\d+", out, re.M), (opt, variant, out)
