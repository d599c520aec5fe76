"""Mean gradients over a question set, computed in batches, and the CNL sign reference from them.

The reference gradient of SPEC §4 is g_M = mean over the reference set of ∇L. Summing per-sample
losses of a batch, dividing by the set size and back-propagating once per batch accumulates exactly
that mean in ``.grad`` (up to float rounding), at a fraction of the cost of one backward per sample.
Only the sign is kept (:class:`~cnl.mask.SignReference`), and the full-precision buffer is freed at
once. ``chunks > 1`` computes the gradient for one group of parameters at a time (one more forward
pass per group) so that the fp32 buffer never covers more than that group: a memory/time trade-off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .mask import SignReference
from .scoring import Encoded, batch_losses, length_sorted_batches

__all__ = ["accumulate_mean_gradient", "reference_sign", "param_chunks"]


def accumulate_mean_gradient(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str | None = "reference",
    progress: bool | None = None,
) -> float:
    """Add the mean SPEC loss gradient over ``encoded`` to the ``.grad`` of every parameter that
    requires grad; return the mean loss. Gradients already in ``.grad`` are added to, not replaced."""
    n = len(encoded)
    if n == 0:
        raise ValueError("cannot compute a mean gradient over an empty set")
    total = 0.0
    was_training = model.training
    model.eval()  # no dropout in the reference (it is a property of the parameters, not a step)
    bar = tqdm(total=n, desc=desc, unit="q", disable=(progress is False) or None, leave=False)
    try:
        for idx in length_sorted_batches([len(e.input_ids) for e in encoded], batch_size):
            losses = batch_losses(model, [encoded[i] for i in idx], pad_id)
            (losses.sum() / n).backward()
            total += float(losses.detach().sum())
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return total / n


def param_chunks(params: Sequence[torch.nn.Parameter], chunks: int) -> list[list[torch.nn.Parameter]]:
    """Split parameters into ``chunks`` contiguous groups of about equal element count."""
    if chunks <= 1:
        return [list(params)]
    total = sum(p.numel() for p in params)
    target = total / chunks
    groups: list[list[torch.nn.Parameter]] = [[]]
    acc = 0
    for p in params:
        if groups[-1] and acc + p.numel() / 2 > target * len(groups) and len(groups) < chunks:
            groups.append([])
        groups[-1].append(p)
        acc += p.numel()
    return groups


def reference_sign(
    model: torch.nn.Module,
    encoded: Sequence[Encoded],
    params: Sequence[torch.nn.Parameter],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    storage: str = "bits",
    chunks: int = 1,
    progress: bool | None = None,
    on_grad: Callable[[torch.nn.Parameter, torch.Tensor], None] | None = None,
) -> tuple[SignReference, float]:
    """Sign of the mean gradient over ``encoded`` for ``params``; also returns the mean loss.

    ``on_grad(param, mean_grad)`` is called for each parameter while its full-precision mean is
    still available (analyses use it). Every ``.grad`` is freed before returning.
    """
    ref = SignReference(storage)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in params:
        p.grad = None
    mean_loss = 0.0
    groups = param_chunks(params, chunks)
    try:
        for k, group in enumerate(groups):
            if len(groups) > 1:
                members = set(group)
                for p in model.parameters():
                    p.requires_grad_(saved[p] and p in members)
            desc = "reference" if len(groups) == 1 else f"reference {k + 1}/{len(groups)}"
            mean_loss = accumulate_mean_gradient(
                model, encoded, batch_size=batch_size, pad_id=pad_id, desc=desc, progress=progress
            )
            for p in group:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if on_grad is not None:
                    on_grad(p, g)
                ref.set(p, g)
                p.grad = None
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return ref, mean_loss
