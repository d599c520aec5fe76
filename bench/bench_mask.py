"""Benchmark: one full-model update, masked (CNL) against unmasked, for every optimizer and sign storage.

    .venv/bin/python bench/bench_mask.py [--shape smollm2-135m] [--repeats 5] [--device cpu|cuda]

The parameters have the shapes of the embedded SmolLM2-135M-Instruct (default; ``--shape
qwen2.5-1.5b`` for a bigger one), filled with random weights, gradients and a random reference. For each
optimizer (sgd, momentum, adam, adamw) it times one update of every parameter, best of
``--repeats``:

- ``torch``: the same optimizer from ``torch.optim`` (foreach, and fused where torch has it), unmasked:
  the limit a masked update is measured against;
- ``eager``: cnl's eager rule (the reference implementation), unmasked and masked;
- ``fused``: cnl's fused kernel (:mod:`cnl.kernels`), unmasked and masked, in both sign storages;
- with adamw, MoFO's update (the top 15% of each tensor by |m|): fused (the threshold ladder, CPU) and eager
  (``torch.kthvalue``, its definition), against the same AdamW update unmasked.

Prints seconds and the ratios masked fused / unmasked fused and masked fused / torch. Runs on CUDA when
``--device cuda`` (or auto with a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl import kernels  # noqa: E402
from cnl.mask import SignReference  # noqa: E402
from cnl.optimizer import build_optimizer  # noqa: E402

LR = 1e-5


def shapes(shape: str) -> list[torch.Size]:
    """Parameter shapes of a model configuration of ``_common.SHAPES`` (nothing is loaded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(C.config_for(shape))
    return [p.shape for p in m.parameters()]


def timed(step, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        step.prepare()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


class CnlStep:
    def __init__(self, params, grads, optimizer: str, reference, fused: bool) -> None:
        self.params, self.grads = params, grads
        self.optimizer = build_optimizer([(str(i), p) for i, p in enumerate(params)], optimizer, LR, fused=fused)
        self.optimizer.reference = reference
        self.prepare()
        self.optimizer.step()  # first step allocates the optimizer state; not timed

    def prepare(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def run(self) -> None:
        self.optimizer.step()


class MoFOStep:
    """One MoFO update (AdamW filtered to the top 15% of every tensor by |m|), fused or eager (``torch.kthvalue``).

    Each timed update gets fresh gradients (a fixed direction plus as much noise: consecutive questions'
    gradients agree only partly), after ``warmup`` such updates, so the first moment and its threshold move
    as they do in training."""

    def __init__(self, params, grads, fused: bool, warmup: int = 8) -> None:
        from cnl.methods.mofo import MomentumFilter

        self.params, self.grads = params, grads
        named = [(str(i), p) for i, p in enumerate(params)]
        self.hooks = MomentumFilter(0.15, {n for n, p in named if p.dim() <= 1})
        if not fused:
            self.hooks.fused_select = None
        self.optimizer = build_optimizer(named, "adamw", LR, hooks=self.hooks)
        self.gen = torch.Generator(device=params[0].device).manual_seed(1)
        for _ in range(warmup):
            self.prepare()
            self.optimizer.step()

    def prepare(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g + torch.randn(g.shape, generator=self.gen, device=g.device) * 1e-3

    def run(self) -> None:
        self.optimizer.step()


class TorchStep:
    def __init__(self, params, grads, optimizer: str, impl: str) -> None:
        self.params, self.grads = params, grads
        kw = {"foreach": impl == "foreach", "fused": impl == "fused"} if impl != "for-loop" else {"foreach": False}
        if optimizer in ("sgd", "momentum"):
            self.opt = torch.optim.SGD(params, lr=LR, momentum=0.9 if optimizer == "momentum" else 0.0, **kw)
        elif optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=LR, **kw)
        else:
            self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.1, **kw)
        self.prepare()
        self.opt.step()

    def prepare(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g

    def run(self) -> None:
        self.opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(C.SHAPES), help="model shape")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--optimizers", default="sgd,momentum,adam,adamw")
    ap.add_argument("--no-mofo", dest="mofo", action="store_false", help="skip MoFO's rows (adamw)")
    args = ap.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    torch.manual_seed(0)
    dims = shapes(args.shape)
    n = sum(s.numel() for s in dims)
    print(f"{args.shape}: {n / 1e6:.1f}M parameters in {len(dims)} tensors on {device}; {C.env_note()}")
    print(f"fused implementation: {kernels.describe(device)}\n")
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in dims]
    grads = [torch.randn(s, device=device) * 1e-3 for s in dims]
    refs = {st: SignReference.from_tensors(((p, torch.randn_like(p)) for p in params), st) for st in ("bits", "int8")}
    header = f"{'optimizer':<10} {'variant':<28} {'seconds':>9} {'vs fused unmasked':>18} {'vs torch best':>14}"
    print(header + "\n" + "-" * len(header))
    for opt in args.optimizers.split(","):
        torch_impls = ["for-loop", "foreach"] + (["fused"] if opt in ("adam", "adamw") or device.type == "cuda" else [])
        results: dict[str, float] = {}
        for impl in torch_impls:
            try:
                results[f"torch {impl}"] = timed(TorchStep(params, grads, opt, impl), args.repeats, device)
            except (RuntimeError, TypeError) as e:  # e.g. no fused kernel for this optimizer/device
                print(f"{opt:<10} torch {impl:<22} unavailable ({str(e)[:40]})")
        results["eager unmasked"] = timed(CnlStep(params, grads, opt, None, False), args.repeats, device)
        results["fused unmasked"] = timed(CnlStep(params, grads, opt, None, True), args.repeats, device)
        for st in ("bits", "int8"):
            results[f"eager masked ({st})"] = timed(CnlStep(params, grads, opt, refs[st], False), args.repeats, device)
            results[f"fused masked ({st})"] = timed(CnlStep(params, grads, opt, refs[st], True), args.repeats, device)
        stats = None
        if opt == "adamw" and args.mofo:  # MoFO filters AdamW: its update against the same unmasked update
            mofo = MoFOStep(params, grads, fused=True)
            results["mofo fused (ladder)"] = timed(mofo, args.repeats, device)
            stats = mofo.hooks.stats
            results["mofo eager (kthvalue)"] = timed(MoFOStep(params, grads, fused=False), 1, device)
        base = results["fused unmasked"]
        best_torch = min(v for k, v in results.items() if k.startswith("torch"))
        for k, v in results.items():
            print(f"{opt:<10} {k:<28} {v:>9.4f} {v / base:>17.2f}x {v / best_torch:>13.2f}x")
        if stats is not None:
            print(f"{'':<10} mofo: per tensor and update, the ladder found the threshold {stats['ladder']} times, "
                  f"its wide retry {stats['wide']}, the kthvalue fallback {stats['fallback']}")  # fmt: skip
        print()


if __name__ == "__main__":
    main()
