"""The GPU check to run when a GPU is lent: one script, a few minutes, every figure printed.

    PYTHONPATH=src python bench/gpu_check.py [--quick]

1. Exactness: cnl's fused Triton updates against its eager rules on CUDA, bit for bit, for every
   optimizer and sign storage, on tensors with zeros, -0.0, denormals and huge values (prints the
   number of differing elements per case; 0 everywhere is the claim).
2. ``bench/bench_mask.py`` on CUDA: one full-model update of SmolLM2-135M's shapes, masked against
   unmasked, per optimizer.
3. ``bench/gpu_bench_train.py`` (reduced unless ``--full``): one CNL/SGD epoch against the reference
   implementation's loop on Qwen2.5-1.5B's shape with random weights.
4. With two or more GPUs, ``bench/gpu_dist_smoke.py``: sharded training under torchrun on NCCL.

Only torch, transformers and triton are needed (what the lent machine has); nothing is installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from cnl import kernels  # noqa: E402
from cnl.mask import SignReference  # noqa: E402
from cnl.optimizer import build_optimizer  # noqa: E402

SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0, 1e-20]


def edge(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    idx = torch.randperm(n, generator=gen)[: n // 5]
    x[idx] = torch.tensor(SPECIALS)[torch.randint(0, len(SPECIALS), (len(idx),), generator=gen)]
    return x.cuda()


def exactness() -> bool:
    print(f"1. exactness on {torch.cuda.get_device_name()} ({kernels.describe('cuda')})")
    ok = True
    for n in (1, 255, 257, 1_000_003):
        for opt in ("sgd", "momentum", "adam", "adamw"):
            for storage in (None, "bits", "int8"):
                out = []
                for fused in (False, True):
                    gen = torch.Generator().manual_seed(n)
                    p = torch.nn.Parameter(edge(n, gen))
                    ref = None
                    if storage:
                        ref = SignReference(storage)
                        ref.set(p, edge(n, gen))
                    up = build_optimizer([("p", p)], opt, 1e-3, fused=fused)
                    up.reference = ref
                    for _ in range(3):
                        p.grad = edge(n, gen)
                        up.step_parameter(p)
                    out.append((p.detach().view(torch.int32).clone(), up.pop_counts()[0]))
                diff = int((out[0][0] != out[1][0]).sum())
                ok &= diff == 0 and out[0][1] == out[1][1]
                print(f"   n={n:<8} {opt:<9} {storage!s:<5} differing {diff}, frozen {out[0][1]} vs {out[1][1]}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the full-size epoch benchmark (longer)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    t0 = time.time()
    ok = exactness()
    print(f"   exact: {ok}\n")
    for cmd in (
        [sys.executable, str(HERE / "bench_mask.py"), "--device", "cuda", "--repeats", "5"],
        [sys.executable, str(HERE / "gpu_bench_train.py"), "--device", "cuda"]
        + ([] if args.full else ["--rows", "40", "--mastered", "10"]),
    ):
        print("$ " + " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=False)
    if torch.cuda.device_count() >= 2:  # NCCL needs a device per rank
        print("$ gpu_dist_smoke.py", flush=True)
        subprocess.run([sys.executable, str(HERE / "gpu_dist_smoke.py")], check=False)
    else:
        print("one CUDA device: the sharded smoke test (bench/gpu_dist_smoke.py) needs two; skipped")
    print(f"\ngpu_check done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
