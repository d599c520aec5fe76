"""Shared pieces of the benchmarks: a straightforward CNL/SGD epoch and cnl's own, phase by phase.

The straightforward implementation is written here on purpose, independently of cnl's engine, as
the baseline the engine is measured against: the reference gradient is accumulated one sample at a
time into an fp32 copy that stays alive, the mask is applied after the full backward, and questions
are scored one at a time. Both variants implement the same SPEC §4 rule.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnl.optim import ParameterUpdater, SGDRule
from cnl.scoring import Encoded, batch_losses
from cnl.train import evaluate, sign_reference, train_epoch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Both variants run with denormals flushed (cnl's --flush-denormal), so neither gains from it.
torch.set_flush_denormal(True)


# ---------------------------------------------------------------------------------- memory meters
class CpuPeak:
    """Peak resident memory of this process during a phase, from Linux's VmHWM (reset per phase).

    Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the system at
    once (otherwise its dynamic threshold keeps freed blocks resident and inflates later phases).
    """

    def __init__(self) -> None:
        self.ok = Path("/proc/self/clear_refs").exists()

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.ok:
            Path("/proc/self/clear_refs").write_text("5")
        self.base = self._status("VmRSS")

    def stop(self) -> int:
        """Bytes above the resident size at :meth:`start` at the phase's peak."""
        return max(0, self._status("VmHWM") - self.base)


class CudaPeak:
    """Peak CUDA memory allocated above the level at the phase start."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def timed(meter: Any, fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """Run ``fn``; return its result, seconds and peak extra bytes."""
    meter.start()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return out, seconds, meter.stop()


# ---------------------------------------------------------------------------------- straightforward
def _single_logits(model: torch.nn.Module, e: Encoded) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.tensor([e.input_ids], device=device)
    return model(input_ids=ids).logits[0, -1]


def naive_reference(model: torch.nn.Module, ref_set: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """Mean gradient, one backward per sample, kept in full fp32 precision."""
    ref = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    model.eval()
    for e in ref_set:
        model.zero_grad(set_to_none=True)
        logits = _single_logits(model, e)
        loss = F.cross_entropy(logits.float()[None], torch.tensor([e.target], device=logits.device))
        loss.backward()
        for n, p in model.named_parameters():
            ref[n].add_(p.grad, alpha=1 / len(ref_set))
    model.zero_grad(set_to_none=True)
    return ref


def naive_train(model: torch.nn.Module, train_set: Sequence[Encoded], ref: dict[str, torch.Tensor], lr: float) -> float:
    """One epoch: full backward, then the mask built from the gradient and the fp32 reference."""
    model.train()
    total = 0.0
    for e in train_set:
        model.zero_grad(set_to_none=True)
        logits = _single_logits(model, e)
        loss = F.cross_entropy(logits.float()[None], torch.tensor([e.target], device=logits.device))
        loss.backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                mask = (p.grad * ref[n]) >= 0
                p.sub_(lr * p.grad * mask)
        total += float(loss)
    model.zero_grad(set_to_none=True)
    return total / len(train_set)


@torch.no_grad()
def naive_eval(model: torch.nn.Module, sets: Sequence[Sequence[Encoded]]) -> list[int]:
    """Correct answers per set, one question per forward pass."""
    model.eval()
    out = []
    for s in sets:
        n = 0
        for e in s:
            logits = _single_logits(model, e)
            n += int(e.letters[int(torch.argmax(logits[list(e.candidates)]))] == e.label)
        out.append(n)
    return out


# ---------------------------------------------------------------------------------- cnl's engine
# The engine side calls the training loop's own phase functions (cnl.train), so it cannot drift.
def cnl_reference(
    model: torch.nn.Module, ref_set: Sequence[Encoded], batch_size: int, storage: str = "bits", chunks: int = 1
):
    params = [p for p in model.parameters() if p.requires_grad]
    return sign_reference(model, ref_set, params, batch_size=batch_size, storage=storage, chunks=chunks, progress=False)


def cnl_train(model: torch.nn.Module, train_set: Sequence[Encoded], ref: Any, lr: float) -> float:
    updater = ParameterUpdater(model.named_parameters(), SGDRule(), lr, reference=ref)
    with updater.hooked():
        loss, _ = train_epoch(model, train_set, updater, progress=False)
    return loss


def prepare(model: torch.nn.Module, sample: Encoded) -> None:
    """Materialise the weights in anonymous memory (not file-backed pages of the safetensors cache)
    and warm the allocator up with one forward/backward, so phase measurements see only the phase."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    for p in model.parameters():
        p.requires_grad_(True)
    batch_losses(model, [sample])[0].backward()
    model.zero_grad(set_to_none=True)


def cnl_eval(model: torch.nn.Module, sets: Sequence[Sequence[Encoded]], batch_size: int) -> list[int]:
    preds = evaluate(model, {str(i): s for i, s in enumerate(sets)}, batch_size=batch_size, progress=False)
    return [p.n_correct for p in preds.values()]


def weights_digest(model: torch.nn.Module) -> torch.Tensor:
    """All parameters flattened (for comparing the two variants' results)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def env_note() -> str:
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, MALLOC_MMAP_THRESHOLD_=" + os.environ.get(
        "MALLOC_MMAP_THRESHOLD_", "unset"
    )


def run_epoch(
    variant: str,
    model: torch.nn.Module,
    mastered: Sequence[Encoded],
    injection: Sequence[Encoded],
    meter: Any,
    *,
    lr: float,
    ref_batch_size: int = 8,
    eval_batch_size: int = 16,
    ref_chunks: int = 1,
) -> dict[str, Any]:
    """One SPEC epoch (reference over M, training on I, evaluation on I and M) of ``variant``
    (``naive`` or ``cnl``); seconds and peak extra bytes per phase, loss and counts."""
    r: dict[str, Any] = {"variant": variant, "n_params": sum(p.numel() for p in model.parameters())}
    if variant == "naive":
        ref, r["reference_s"], r["reference_peak"] = timed(meter, lambda: naive_reference(model, mastered))
        loss, r["train_s"], r["train_peak"] = timed(meter, lambda: naive_train(model, injection, ref, lr))
        del ref
        counts, r["eval_s"], r["eval_peak"] = timed(meter, lambda: naive_eval(model, [injection, mastered]))
    else:
        sign, r["reference_s"], r["reference_peak"] = timed(
            meter, lambda: cnl_reference(model, mastered, ref_batch_size, chunks=ref_chunks)
        )
        r["sign_bytes"] = sign.nbytes()
        loss, r["train_s"], r["train_peak"] = timed(meter, lambda: cnl_train(model, injection, sign, lr))
        del sign
        counts, r["eval_s"], r["eval_peak"] = timed(
            meter, lambda: cnl_eval(model, [injection, mastered], eval_batch_size)
        )
    r["train_avg_loss"] = loss
    r["learned"], r["mastered_correct"] = counts
    return r
