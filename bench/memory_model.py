"""cnl's memory model: bytes per parameter per rank, what fits on 80 GB GPUs, and a check against
measured peaks.

    .venv/bin/python bench/memory_model.py             # the tables (README "Scaling out")
    .venv/bin/python bench/memory_model.py --measure   # + measured peaks of the embedded model, 1 and 2 ranks

Per rank, with N ranks (N = 1: one process), fp32 weights, batch size 1:

- persistent: weights 4/N, optimizer state (sgd 0, momentum 4, adam/adamw 8)/N, reference signs 0.25/N;
- the reference phase: the accumulated mean gradient, 4/N (``--ref-chunks K``: 4/(N·K) with one process);
- transient with N > 1 (FSDP2): the unsharded root (embeddings, head) and one decoder layer's weights
  and gradient while it runs, 4 · (root + 2 · layer) bytes;
- activations, largest in the reference phase (a batch of ``--ref-batch-size`` prompts, per rank):
  about 4 bytes x tokens x layers x (10 hidden + 3 intermediate) (fitted on the embedded model, where it
  matches the measured peaks to 0.01 GB; eager attention, SwiGLU MLP);
- not counted: the CUDA context and fragmentation (a 2 GB allowance in the table).

With ``--cpu-offload`` the persistent and reference terms live in CPU memory; the GPU holds the
transient term (and activations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STATE = {"sgd": 0.0, "momentum": 4.0, "adam": 8.0}
#: parameters, root (embedding + untied head), largest decoder layer, hidden, intermediate, layers
MODELS = {
    "Qwen2.5-1.5B": (1.544e9, 233.4e6, 46.8e6, 1536, 8960, 28),
    "Qwen2.5-7B": (7.616e9, 1089.9e6, 233.1e6, 3584, 18944, 28),
    "Qwen2.5-32B": (32.76e9, 1557.1e6, 487.6e6, 5120, 27648, 64),
}
SMOLLM2 = (134.5e6, 28.3e6, 3.5e6, 576, 1536, 30)
PROMPT_TOKENS = 100
REF_BATCH = 8
GPU_GB = 80.0
OVERHEAD_GB = 2.0  # activations, CUDA context, fragmentation: an allowance, not a measurement


def activations(hidden: int, inter: int, layers: int, tokens: float) -> float:
    return 4 * tokens * layers * (10 * hidden + 3 * inter)


def per_rank_bytes(
    model: tuple, n: int, optimizer: str, offload: bool, ref_batch: int = REF_BATCH, prompt: int = PROMPT_TOKENS
) -> float:
    """Peak bytes of one rank (GPU memory; with ``offload`` only what stays on the GPU), as the model above says."""
    params, root, layer, hidden, inter, layers = model
    persistent = params * (4 + STATE[optimizer] + 0.25) / n + 4 * params / n
    transient = 4 * (root + 2 * layer) if n > 1 else 0.0
    acts = activations(hidden, inter, layers, ref_batch * prompt)
    return transient + acts if offload else persistent + transient + acts


def tables() -> None:
    print("bytes per parameter per rank (persistent + reference phase), fp32, batch size 1:\n")
    print(f"{'optimizer':<10} " + " ".join(f"{f'N={n}':>8}" for n in (1, 2, 4, 8)))
    for opt, st in STATE.items():
        print(f"{opt:<10} " + " ".join(f"{(8.25 + st) / n:>8.2f}" for n in (1, 2, 4, 8)))
    print(
        f"\nGB per rank on {GPU_GB:.0f} GB GPUs (+{OVERHEAD_GB:.0f} GB allowance; --ref-batch-size {REF_BATCH}, "
        f"{PROMPT_TOKENS}-token prompts); 'no' = does not fit\n"
    )
    header = f"{'model':<13} {'optimizer':<9} {'offload':<8} " + " ".join(f"{f'{n} GPU':>9}" for n in (1, 2, 4, 8))
    print(header + "\n" + "-" * len(header))
    for name, spec in MODELS.items():
        for opt in STATE:
            for offload in (False, True):
                cells = []
                for n in (1, 2, 4, 8):
                    if offload and n == 1:
                        cells.append(f"{'-':>9}")
                        continue
                    gb = per_rank_bytes(spec, n, opt, offload) / 1e9 + OVERHEAD_GB
                    cells.append(f"{gb:>6.1f}{'' if gb <= GPU_GB else ' no':<3}")
                print(f"{name:<13} {opt:<9} {'yes' if offload else 'no':<8} " + " ".join(cells))


def measure() -> None:
    """Peak memory per rank of the embedded model on the CPU, 1 and 2 ranks, against the model above."""
    from cnl.data import read_mc_jsonl, take_limit
    from cnl.io import atomic_write_jsonl

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "csqa.jsonl"
    rows = take_limit(read_mc_jsonl(shared), 24)
    env = {**os.environ, "CNL_MALLOC": "system", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        m, i = Path(tmp) / "m.jsonl", Path(tmp) / "i.jsonl"
        atomic_write_jsonl(m, [r.raw for r in rows[:8]])
        atomic_write_jsonl(i, [r.raw for r in rows[8:]])
        probe = "import cnl.train, transformers, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        runtime = (
            int(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout) * 1024
        )
        print("\nmeasured on the CPU (embedded SmolLM2-135M, 2 epochs, resident-set peak per rank from the start of")
        print(f"training), against the model plus the Python/torch runtime ({runtime / 1e9:.2f} GB, measured):\n")
        print(f"{'optimizer':<10} {'ranks':>5} {'measured GB':>12} {'model GB':>9}")
        for opt in ("sgd", "adam"):
            for n in (1, 2):
                out = Path(tmp) / f"{opt}-{n}"
                argv = ["train", "--mastered", str(m), "--injection", str(i), "--out", str(out), "--device", "cpu"]
                # two epochs: from the second on the reference phase runs while the optimizer state exists
                argv += ["--optimizer", opt, "--epochs", "2", "--lr", "1e-6", "--method", "cnl"]
                cmd = [sys.executable, "-m", "cnl", *argv]
                if n > 1:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                    cmd += ["-m", "cnl", *argv]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(proc.stderr[-2000:])
                peaks = json.loads((out / "run.json").read_text())["peak_memory_bytes"]
                # 8 reference questions (~90 tokens each), split over the ranks
                model = per_rank_bytes(SMOLLM2, n, opt, False, ref_batch=8 // n, prompt=90) + runtime
                print(f"{opt:<10} {n:>5} {max(peaks) / 1e9:>12.2f} {model / 1e9:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true")
    args = ap.parse_args()
    tables()
    if args.measure:
        measure()


if __name__ == "__main__":
    main()
