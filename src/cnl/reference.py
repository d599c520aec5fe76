"""Mean gradients over any set of examples, and the CNL sign reference from them.

The reference gradient of SPEC §4 is g_M = mean over the reference set of ∇L. Nothing here knows the
multiple-choice format: ``batches`` is any iterable of batches and ``loss_fn(model, batch)`` returns
one loss per example of the batch (SPEC's loss is :func:`cnl.scoring.spec_loss`; a causal-LM loss
over HF-collated batches works the same way). Summing the per-example losses of a batch, dividing by
the set size and back-propagating once per batch accumulates exactly that mean in ``.grad`` (up to
float rounding), at a fraction of the cost of one backward per example. Only the sign is kept
(:class:`~cnl.mask.SignReference`), and the full-precision buffer is freed at once. ``chunks > 1``
computes the gradient for one group of parameters at a time (one more pass over the batches per
group) so that the fp32 buffer never covers more than that group: a memory/time trade-off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .distributed import local
from .mask import SignReference

__all__ = ["LossFn", "accumulate_mean_gradient", "reference_sign", "param_chunks"]

#: ``loss_fn(model, batch)``: a 1-D tensor with one loss per example of ``batch``.
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def accumulate_mean_gradient(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    n: int,
    desc: str | None = "reference",
    progress: bool | None = None,
) -> float:
    """Add the mean gradient of ``loss_fn`` over ``n`` examples (in ``batches``) to the ``.grad`` of
    every parameter that requires grad; return the mean loss. Gradients already in ``.grad`` are
    added to, not replaced. Runs in eval mode: the reference is a property of the parameters, so
    dropout stays off."""
    if n <= 0:
        raise ValueError("cannot compute a mean gradient over an empty set")
    total = 0.0
    seen = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc=desc, unit="q", disable=(progress is False) or None, leave=False)
    try:
        for batch in batches:
            losses = loss_fn(model, batch)
            (losses.sum() / n).backward()
            total += float(losses.detach().sum())
            seen += losses.numel()
            bar.update(losses.numel())
    finally:
        bar.close()
        model.train(was_training)
    if seen != n:
        raise ValueError(f"the batches held {seen} examples, but n = {n}")
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
    batches: Sequence[Any],
    loss_fn: LossFn,
    params: Sequence[torch.nn.Parameter],
    *,
    n: int,
    storage: str = "bits",
    chunks: int = 1,
    progress: bool | None = None,
    on_grad: Callable[[torch.nn.Parameter, torch.Tensor], None] | None = None,
) -> tuple[SignReference, float]:
    """Sign of the mean gradient over the ``n`` examples of ``batches`` for ``params``; also the mean loss.

    ``batches`` is iterated once per chunk (a list, not a one-shot iterator, when ``chunks > 1``).
    ``on_grad(param, mean_grad)`` is called for each parameter while its full-precision mean is still
    available (analyses use it). Every ``.grad`` is freed before returning.
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
            mean_loss = accumulate_mean_gradient(model, batches, loss_fn, n=n, desc=desc, progress=progress)
            for p in group:
                g = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))  # a shard under FSDP
                if on_grad is not None:
                    on_grad(p, g)
                ref.set(p, g)
                p.grad = None
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return ref, mean_loss
