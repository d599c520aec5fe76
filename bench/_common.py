"""Shared pieces of the benchmarks: the reference implementation's loop, re-implemented, and cnl's own.

The baseline is the published implementation's training loop (its ``sft`` / ``sft_adamw`` scripts),
re-implemented here operation by operation so that it can be timed beside cnl in one process tree:

- every question is turned into a prompt with the chat template and tokenized at each use;
- one question per forward pass, with the logits of every position (no ``logits_to_keep``);
- the reference gradient: one backward per mastered question in train mode, accumulated in ``.grad``,
  divided by n and cloned into a full fp32 copy that stays alive through the epoch;
- each training step: ``zero_grad``, backward, then per parameter the product mask
  ``g.mul_((g * g_ref).ge(0))`` and ``p.add_(g, alpha=-lr)`` (AdamW: moments, ``u = m̂/(√v̂+ε) + λθ``,
  ``p.add_(u * mask, alpha=-lr)``);
- evaluation one question at a time.

cnl's side calls the training loop's own phase functions (:mod:`cnl.train`), so it cannot drift.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cnl.optimizer import build_optimizer
from cnl.scoring import Encoded, batch_losses
from cnl.train import evaluate, sign_reference, train_epoch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

#: Model shapes for benchmarks that need no weights (random initialisation from the config).
SHAPES = {
    "tiny": dict(
        model_type="llama", vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    ),
}  # fmt: skip


def config_for(shape: str):
    """A transformers config of one of :data:`SHAPES`."""
    from transformers import AutoConfig

    values = dict(SHAPES[shape])
    return AutoConfig.for_model(values.pop("model_type"), **values)


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


# ---------------------------------------------------------------------------------- the reference's loop
def _ref_inputs(model: torch.nn.Module, tok: Any, question: str) -> dict[str, torch.Tensor]:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tok(prompt, return_tensors="pt").to(next(model.parameters()).device)


def _ref_label(model: torch.nn.Module, tok: Any, label: str) -> torch.Tensor:
    return (
        tok(label, add_special_tokens=False, return_tensors="pt").input_ids[0, -1].to(next(model.parameters()).device)
    )


def _ref_loss(model: torch.nn.Module, tok: Any, row: Any) -> torch.Tensor:
    logits = model(**_ref_inputs(model, tok, row.question)).logits[:, -1, :]
    return F.cross_entropy(logits, _ref_label(model, tok, row.label).unsqueeze(0))


def reference_mean_grad(model: torch.nn.Module, tok: Any, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The reference's ``mean_grad_correct``: one backward per question, then a full fp32 copy."""
    model.train()
    model.zero_grad(set_to_none=True)
    for r in rows:
        _ref_loss(model, tok, r).backward()
    grad = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            p.grad.div_(len(rows))
            grad[name] = p.grad.detach().clone()
    return grad


def reference_train(
    model: torch.nn.Module,
    tok: Any,
    rows: Sequence[Any],
    lr: float,
    gref: dict[str, torch.Tensor] | None,
    optimizer: str = "sgd",
    state: dict[str, Any] | None = None,
) -> float:
    """The reference's per-sample training loop (``use_freeze=1`` when ``gref`` is given, else plain)."""
    model.train()
    named = list(model.named_parameters())
    state = {} if state is None else state
    total = 0.0
    for row in rows:
        model.zero_grad(set_to_none=True)
        loss = _ref_loss(model, tok, row)
        loss.backward()
        with torch.no_grad():
            for name, p in named:
                g = p.grad
                if g is None:
                    continue
                ref = gref.get(name) if gref is not None else None
                if optimizer == "sgd":
                    if ref is not None:
                        g.mul_((g * ref).ge(0))
                    p.add_(g, alpha=-lr)
                    continue
                st = state.setdefault(name, {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "t": 0})
                st["t"] += 1
                st["m"].mul_(0.9).add_(g, alpha=0.1)
                st["v"].mul_(0.999).addcmul_(g, g, value=1 - 0.999)
                m_hat = st["m"] / (1 - 0.9 ** st["t"])
                v_hat = st["v"] / (1 - 0.999 ** st["t"])
                u = m_hat / (v_hat.sqrt().add_(1e-8)) + 0.1 * p
                p.add_(u * (u * ref).ge(0) if ref is not None else u, alpha=-lr)
        total += float(loss.detach())
    return total / len(rows)


@torch.no_grad()
def reference_eval(model: torch.nn.Module, tok: Any, sets: Sequence[Sequence[Any]]) -> list[int]:
    """The reference's ``infer_and_dump``: one question per forward pass; correct answers per set."""
    model.eval()
    cand = [tok(c, add_special_tokens=False).input_ids[-1] for c in "ABCD"]
    out = []
    for rows in sets:
        ok = 0
        for r in rows:
            logits = model(**_ref_inputs(model, tok, r.question)).logits[:, -1, :][0]
            ok += "ABCD"[int(torch.argmax(logits[cand]))] == r.label
        out.append(ok)
    model.train()
    return out


# ---------------------------------------------------------------------------------- cnl's engine
# The engine side calls the training loop's own phase functions (cnl.train), so it cannot drift.
def cnl_reference(
    model: torch.nn.Module, ref_set: Sequence[Encoded], batch_size: int, storage: str = "bits", chunks: int = 1
):
    params = [p for p in model.parameters() if p.requires_grad]
    return sign_reference(model, ref_set, params, batch_size=batch_size, storage=storage, chunks=chunks, progress=False)


def step_logger(folder: str | Path) -> Any:
    """What ``cnl train``'s loop does after every update besides the update (its ``Watch`` without probes): one
    ``steps.csv`` row (step, loss, masked fraction, learning rate), so the engine is timed as it runs."""
    from cnl.rundir import RunDir

    rundir, columns, step = RunDir(folder), ["step", "epoch", "loss", "masked_fraction", "lr"], [0]
    rundir.root.mkdir(parents=True, exist_ok=True)
    rundir.start_steps(columns, 0)

    def on_step(i: int, steps: int, loss: float, masked: float) -> None:
        step[0] += 1
        rundir.append_step(columns, {"step": step[0], "epoch": 1, "loss": loss, "masked_fraction": masked, "lr": 0})

    return on_step


def cnl_train(
    model: torch.nn.Module,
    train_set: Sequence[Encoded],
    ref: Any,
    lr: float,
    *,
    fused: bool = True,
    optimizer: str = "sgd",
) -> float:
    opt = build_optimizer(model.named_parameters(), optimizer, lr, fused=fused)
    opt.reference = ref
    with tempfile.TemporaryDirectory() as steps, opt.in_backward():
        loss, _ = train_epoch(model, train_set, opt, progress=False, on_step=step_logger(steps))
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
    tok: Any,
    mastered: Sequence[Any],
    injection: Sequence[Any],
    meter: Any,
    *,
    lr: float,
    ref_batch_size: int = 8,
    eval_batch_size: int = 16,
    ref_chunks: int = 1,
) -> dict[str, Any]:
    """One SPEC epoch (reference over M, training on I, evaluation on I and M) of ``variant``:
    ``reference`` (the published loop re-implemented), ``cnl`` (cnl's engine, fused updates) or
    ``cnl-eager`` (cnl's engine, eager rules); seconds and peak extra bytes per phase, loss, counts.
    ``mastered``/``injection`` are :class:`~cnl.data.MCRow` rows."""
    from cnl.scoring import PromptEncoder

    r: dict[str, Any] = {"variant": variant, "n_params": sum(p.numel() for p in model.parameters())}
    if variant == "reference":
        ref, r["reference_s"], r["reference_peak"] = timed(meter, lambda: reference_mean_grad(model, tok, mastered))
        loss, r["train_s"], r["train_peak"] = timed(meter, lambda: reference_train(model, tok, injection, lr, ref))
        del ref
        counts, r["eval_s"], r["eval_peak"] = timed(meter, lambda: reference_eval(model, tok, [injection, mastered]))
    else:
        enc = PromptEncoder(tok)
        m_enc, i_enc = enc.encode_all(mastered), enc.encode_all(injection)
        fused = variant == "cnl"
        sign, r["reference_s"], r["reference_peak"] = timed(
            meter, lambda: cnl_reference(model, m_enc, ref_batch_size, chunks=ref_chunks)
        )
        r["sign_bytes"] = sign.nbytes()
        loss, r["train_s"], r["train_peak"] = timed(meter, lambda: cnl_train(model, i_enc, sign, lr, fused=fused))
        del sign
        counts, r["eval_s"], r["eval_peak"] = timed(meter, lambda: cnl_eval(model, [i_enc, m_enc], eval_batch_size))
    r["train_avg_loss"] = loss
    r["learned"], r["mastered_correct"] = counts
    return r
