"""Smoke test of sharded training on N CUDA devices (what tests/test_distributed.py checks on the CPU).

    PYTHONPATH=src python bench/gpu_dist_smoke.py [--nproc N] [--device cuda|cpu]

Builds a tiny offline model and synthetic questions, then runs ``cnl train`` once in one process with
``--batch-size N`` and once under ``torchrun --nproc-per-node N`` with ``--batch-size 1`` (NCCL on CUDA),
each with a checkpoint and ``--save-model``, and prints both summaries and how far apart the saved weights
are (relative to their norm). Then it resumes a finished 1-epoch sharded run for a second epoch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnl.testing import make_mc_rows, save_tiny_model_dir, write_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=max(2, torch.cuda.device_count()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        model = save_tiny_model_dir(t / "tiny", arch="qwen2", seed=0)
        rows = make_mc_rows(8 + 4 * args.nproc, seed=3)
        m, i = write_jsonl(t / "m.jsonl", rows[:8]), write_jsonl(t / "i.jsonl", rows[8:])
        base = ["train", "--model", str(model), "--device", args.device, "--mastered", str(m), "--injection", str(i)]
        base += ["--optimizer", "adamw", "--lr", "1e-3", "--save-model", "--keep-checkpoint"]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
        runs = {
            "one process": [sys.executable, "-m", "cnl", *base, "--batch-size", str(args.nproc), "--epochs", "2"],
            f"{args.nproc} processes": [*torchrun, "-m", "cnl", *base, "--batch-size", "1", "--epochs", "2"],
        }
        outs = {}
        for name, cmd in runs.items():
            out = t / name.replace(" ", "_")
            outs[name] = out
            proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
            print(f"== {name}: exit {proc.returncode}")
            print((out / "summary.csv").read_text() if proc.returncode == 0 else proc.stderr[-3000:])
        from safetensors.torch import load_file

        a, b = (load_file(str(o / "model" / "model.safetensors")) for o in outs.values())
        rel = max(float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(a[k])) for k in a)
        print(f"saved weights: largest relative difference per tensor {rel:.2e}")
        resumed = t / "resumed"
        first = subprocess.run([*runs[f"{args.nproc} processes"][:-2], "--epochs", "1", "--out", str(resumed)], env=env)
        again = subprocess.run(
            [*runs[f"{args.nproc} processes"][:-2], "--epochs", "2", "--out", str(resumed), "--resume"], env=env
        )
        same = (resumed / "summary.csv").read_text().splitlines()[1:] if again.returncode == 0 else None
        print(f"resume: exit {first.returncode}/{again.returncode}; summary rows {same}")


if __name__ == "__main__":
    main()
