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


def test_bench_continual_prints_the_cost_per_size_and_the_sign_agreement(tmp_path):
    from cnl.testing import make_open_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl

    tok = make_tiny_tokenizer("chatml")
    make_tiny_model("qwen2", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = make_open_rows(10, seed=3)
    p, i = write_jsonl(tmp_path / "p.jsonl", rows[:6]), write_jsonl(tmp_path / "i.jsonl", rows[6:])
    out = run(str(BENCH / "bench_continual.py"), "--start", str(tmp_path / "model"), "--protected", str(p),
              "--injection", str(i), "--sizes", "2,4", "--samples", "2,6")  # fmt: skip
    sizes = re.findall(r"^\s+(\d+)\s+\d+\.\d \(\s*\d+\.\d+/q\)", out, re.M)
    assert sizes == ["2", "4"], out
    agree = re.findall(r"^\s+(\d+)\s+(\d)\s+(\d+\.\d)%", out, re.M)
    assert [(n, e) for n, e, _ in agree] == [("2", "1"), ("2", "2"), ("6", "1"), ("6", "2")], out
    assert all(float(a) == 100.0 for n, _, a in agree if n == "6"), out  # the whole set: the same sign
