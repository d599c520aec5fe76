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

:func:`reference_from` wraps all of this for someone else's training loop: HF-style causal-LM batches
or examples in, a :class:`~cnl.mask.SignReference` for :class:`cnl.MaskedOptimizer` out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import torch
from tqdm.auto import tqdm

from .distributed import local
from .mask import SignReference

__all__ = [
    "LossFn",
    "accumulate_mean_gradient",
    "reference_sign",
    "param_chunks",
    "reference_from",
    "causal_lm_losses",
]

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


# ------------------------------------------------------------------------------------------ any training loop


def causal_lm_losses(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Per-example causal-LM loss of an HF-style batch: the mean cross-entropy over each example's
    label tokens (shifted by one: position t predicts token t + 1), ``-100`` labels ignored.

    ``labels`` default to ``input_ids`` with padding (``attention_mask == 0``) ignored. An example
    without any label token contributes a loss of 0 (and still counts as an example). This is the
    loss HF models compute, averaged per example rather than per token, so that every example
    weighs the same in the mean gradient whatever its length.
    """
    if any(k in batch for k in _PACKED_KEYS):
        raise ValueError(
            "padding-free / packed batches hold several examples per row; the per-example mean needs one "
            "example per row (collate the reference data with padding, e.g. SFTConfig(padding_free=False))"
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    shifted = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    counts = (shifted != -100).sum(dim=1)
    return tokens.sum(dim=1) / counts.clamp(min=1)


#: Batch keys passed to the model by :func:`causal_lm_losses` (labels are used for the loss only).
_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
#: Keys of TRL's padding-free collation (several examples flattened into one row).
_PACKED_KEYS = ("cu_seq_lens_q", "seq_idx")


def _rows(value: Any) -> int | None:
    """Number of examples in a batch field (a 2-D tensor or a list of lists), None for an example's field."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() >= 2 else None
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, torch.Tensor)):
        return len(value)
    return None


def _main_field(item: Mapping[str, Any]) -> Any:
    if "input_ids" in item:
        return item["input_ids"]
    return next((v for v in item.values() if isinstance(v, (torch.Tensor, list, tuple))), None)


def _batch_size(batch: Any) -> int:
    """How many examples a batch holds: rows of ``input_ids`` (a dict), or ``len(batch)`` (a sequence)."""
    if isinstance(batch, Mapping):
        n = _rows(_main_field(batch))
        if n is None:
            raise ValueError("cannot tell how many examples a batch holds: its input_ids are not 2-D")
        return n
    if isinstance(batch, Sized):
        return len(batch)
    raise ValueError(f"cannot tell how many examples a batch of type {type(batch).__name__} holds")


def _pad_collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (0), ``attention_mask`` (0, default all ones) and ``labels`` (-100, default
    ``input_ids``) into tensors; other fields are dropped (pass ``collate_fn`` to keep them)."""
    ids = [torch.as_tensor(e["input_ids"], dtype=torch.long).reshape(-1) for e in examples]
    width = max(len(x) for x in ids)
    out = {
        "input_ids": torch.zeros((len(ids), width), dtype=torch.long),
        "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
        "labels": torch.full((len(ids), width), -100, dtype=torch.long),
    }
    for i, (e, x) in enumerate(zip(examples, ids, strict=True)):
        mask = torch.as_tensor(e.get("attention_mask", [1] * len(x)), dtype=torch.long).reshape(-1)
        if "labels" in e:
            labels = torch.as_tensor(e["labels"], dtype=torch.long).reshape(-1)
        else:
            labels = x.masked_fill(mask == 0, -100)
        out["input_ids"][i, : len(x)] = x
        out["attention_mask"][i, : len(x)] = mask
        out["labels"][i, : len(x)] = labels
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def _materialize(data: Any, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None) -> list[Any]:
    """The batches of ``data``: a DataLoader's batches, a list of batches as is, or a list of examples
    collated ``batch_size`` at a time (one Mapping whose fields are 2-D is one batch)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return list(data)
    if isinstance(data, Mapping):
        if _rows(_main_field(data)) is None:
            raise ValueError("reference data is a single example; pass a list of examples")
        return [data]
    items = list(data)
    if not items:
        raise ValueError("the reference data is empty")
    is_example = [isinstance(x, Mapping) and _rows(_main_field(x)) is None for x in items]
    if not any(is_example):
        return items  # batches already (dicts of 2-D tensors, or anything a custom loss_fn understands)
    if not all(is_example):
        raise ValueError("the reference data mixes examples and batches")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    collate = collate_fn or _pad_collate
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def reference_from(
    model: torch.nn.Module,
    data: Any,
    loss_fn: LossFn | None = None,
    *,
    batch_size: int = 8,
    storage: str = "bits",
    chunks: int = 1,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> SignReference:
    """The CNL sign reference of ``model`` on the data to protect, in one call, for any training loop.

    It is the sign of the mean over the *examples* of ``data`` of each example's loss gradient,
    ``g_M = (1/n) Σ_i ∇ loss_i``, for every parameter with ``requires_grad`` (a LoRA/PEFT model gets
    signs for its adapters only, exactly the tensors its optimizer updates). Give it to
    :class:`cnl.MaskedOptimizer` (``opt.reference = reference_from(...)``).

    Args:
        model: the model at the weights to protect (computed in eval mode: no dropout; the mode is
            restored).
        data: a ``DataLoader``; a list of batches (dicts as HF collators build them: ``input_ids``,
            ``attention_mask``, ``labels`` with -100 for ignored positions); or a list (or
            ``datasets.Dataset``) of examples (dicts of lists), collated ``batch_size`` at a time by
            ``collate_fn`` or, by default, right-padded (``labels`` default to ``input_ids``). Batches
            are materialized (to count the examples exactly and to pass over them once per chunk).
        loss_fn: ``loss_fn(model, batch) -> one loss per example``. Default :func:`causal_lm_losses`:
            each example's mean token cross-entropy over its non -100 labels, so long and short
            examples weigh the same (HF's own loss averages over the tokens of a batch instead).
        batch_size: examples per batch when ``data`` holds examples (memory only: the result is the
            same mean up to float rounding).
        storage: ``"bits"`` (2-bit signs, 1/4 byte per element) or ``"int8"``.
        chunks: > 1 computes the gradient for one group of parameters at a time (one more pass over
            the data per group), so the full-precision gradient never covers more than one group.
        device: where batches go; default the device of the model's first trainable parameter.
        progress: a progress bar (None: only on a terminal).
        collate_fn: how a list of examples becomes a batch.

    Every ``.grad`` of the model's trainable parameters is cleared (set to None) before and after:
    call it between optimizer steps, not in the middle of a gradient accumulation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad: nothing to protect")
    if device is None:
        device = params[0].device
    device = torch.device(device)
    batches = [_to_device(b, device) for b in _materialize(data, batch_size, collate_fn)]
    n = sum(_batch_size(b) for b in batches)
    ref, _ = reference_sign(
        model, batches, loss_fn or causal_lm_losses, params, n=n, storage=storage, chunks=chunks, progress=progress
    )
    for p in params:
        p.grad = None
    return ref
