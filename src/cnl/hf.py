"""CNL inside Hugging Face's ``transformers.Trainer`` and TRL's ``SFTTrainer``: one call protects a data set.

::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=new_facts)
    cnl.protect(trainer, mastered)        # the examples the model must not forget
    trainer.train()

:func:`protect` adds a :class:`CNLCallback`, which

- wraps the Trainer's torch optimizer in a :class:`cnl.MaskedOptimizer` when training begins (the
  optimizer keeps its param groups, so the LR scheduler, gradient clipping, gradient accumulation and
  checkpoints work as before, and every optimizer step is masked: with gradient accumulation the mask
  applies once per optimizer step, to the update from the accumulated gradient);
- recomputes the sign reference with :func:`cnl.reference_from` at the start of every epoch (or every
  ``refresh`` optimizer steps), on the Trainer's model as it is then (a PEFT/LoRA model: the adapters);
- adds ``cnl_masked_fraction`` (share of the updated elements the mask froze since the previous log) to
  the Trainer's logs and ``trainer.state.log_history``.

Nothing here imports TRL: an ``SFTTrainer`` is recognised by its dataset preparation method, which
:func:`protect` uses to tokenize raw reference data (messages, prompt/completion) the way the training
data was tokenized. Tested with transformers 5.24, accelerate 1.15 and trl 1.16 in one process; under
several processes every rank computes the same reference from the whole reference set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.trainer_callback import TrainerCallback, TrainerControl, TrainerState
from transformers.training_args import TrainingArguments

from .optimizer import MaskedOptimizer
from .reference import LossFn, _materialize, reference_from

__all__ = ["CNLCallback", "protect", "LOG_KEY", "KL_KEY"]

#: The key of the masked fraction in the Trainer's logs.
LOG_KEY = "cnl_masked_fraction"
#: The key of the probe's KL drift from the starting model in the Trainer's logs (``probe=...``).
KL_KEY = "cnl_kl_drift"


def _numeric(value: Any) -> bool:
    """Whether a field can go through a collator: a tensor, a number, or (nested) lists of numbers."""
    while isinstance(value, (list, tuple)):
        if not value:
            return True
        value = value[0]
    return isinstance(value, (torch.Tensor, int, float, bool))


def _trainer_collate(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """``collate`` given only the numeric fields of each example: the Trainer removes the columns its
    model does not take (text, messages) before its collator sees them, and so must we."""

    def run(examples: list[Any]) -> Any:
        return collate([{k: v for k, v in e.items() if _numeric(v)} if isinstance(e, Mapping) else e for e in examples])

    return run


def wrap_trainer_optimizer(optimizer: Any) -> MaskedOptimizer:
    """Make the optimizer a Trainer steps a :class:`MaskedOptimizer` (with no reference yet), in place.

    transformers 5 hands accelerate's ``AcceleratedOptimizer`` around; its ``.optimizer`` is the torch
    optimizer, which is replaced by the wrapper (sharing its param groups, so the LR scheduler, which
    holds the ``AcceleratedOptimizer``, keeps driving the learning rates). With a gradient scaler (fp16)
    accelerate's patched step is re-pointed at the wrapper too.
    """
    if isinstance(optimizer, MaskedOptimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, MaskedOptimizer):
        return inner
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"cannot mask the Trainer's optimizer {type(optimizer).__name__}: CNLCallback expects accelerate's "
            "AcceleratedOptimizer around a torch SGD, Adam or AdamW (DeepSpeed and other wrappers are not supported)"
        )
    masked = MaskedOptimizer(inner)
    optimizer.optimizer = masked
    if getattr(optimizer, "scaler", None) is not None and hasattr(optimizer, "_optimizer_original_step_method"):
        from accelerate.optimizer import patch_optimizer_step

        optimizer._optimizer_original_step_method = masked.step
        optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, masked.step)
    return masked


class CNLCallback(TrainerCallback):
    """Masks every optimizer step of a Trainer with the CNL reference of ``reference_data``.

    Add it with :func:`protect` (first in the callback list, see there) rather than ``callbacks=[...]``.

    Args:
        reference_data: the examples to protect, tokenized like the training data (dicts with
            ``input_ids`` and optionally ``labels`` with -100 on ignored tokens, ``attention_mask``), a
            list of collated batches, or a ``DataLoader`` (anything :func:`cnl.reference_from` takes).
        loss_fn: per-example loss (default: each example's mean causal-LM loss over its label tokens, so
            the reference is the mean over examples of their gradients).
        refresh: ``"epoch"`` recomputes the reference at the start of every epoch; an int ``k``, every
            ``k`` optimizer steps (at step 0, k, 2k, ...).
        storage: sign storage, ``"bits"`` (1/4 byte per element) or ``"int8"``.
        batch_size: reference examples per forward pass (memory only).
        collate_fn: how reference examples become a batch; default the Trainer's own collator
            (``train_dataloader.collate_fn``), given only the examples' numeric fields.
        chunks: compute the reference gradient for 1/chunks of the parameters at a time (memory).
        progress: show a progress bar while the reference is computed.
        probe: examples (tokenized, ``labels`` -100 off the answer: e.g. :func:`cnl.self_reference`'s) whose
            answer distributions are taken when training begins; every log then gets ``cnl_kl_drift``, the mean
            forward KL of the model's distributions from those (:class:`cnl.drift.DriftProbe`).

    Attributes:
        optimizer: the :class:`cnl.MaskedOptimizer` once training began.
        refreshes: the ``global_step`` of every (re)computation of the reference.
        drift: the :class:`cnl.drift.DriftProbe` once training began (with ``probe``).
    """

    def __init__(
        self,
        reference_data: Any,
        *,
        loss_fn: LossFn | None = None,
        refresh: str | int = "epoch",
        storage: str = "bits",
        batch_size: int = 8,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        chunks: int = 1,
        progress: bool | None = False,
        probe: Any = None,
    ) -> None:
        if refresh != "epoch" and not (isinstance(refresh, int) and not isinstance(refresh, bool) and refresh >= 1):
            raise ValueError(f"refresh must be 'epoch' or a number of optimizer steps >= 1, got {refresh!r}")
        self.reference_data = reference_data
        self.loss_fn = loss_fn
        self.refresh = refresh
        self.storage = storage
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.chunks = chunks
        self.progress = progress
        self.optimizer: MaskedOptimizer | None = None
        self.refreshes: list[int] = []
        self._batches: list[Any] | None = None
        self.probe = probe
        self.drift: Any = None

    # ------------------------------------------------------------------------------------------ the reference
    def _reference_batches(self, train_dataloader: Any) -> list[Any]:
        """The reference data as batches, collated once (by the Trainer's collator unless told otherwise)."""
        if self._batches is None:
            collate = self.collate_fn
            if collate is None and getattr(train_dataloader, "collate_fn", None) is not None:
                collate = _trainer_collate(train_dataloader.collate_fn)
            self._batches = _materialize(self.reference_data, self.batch_size, collate)
        return self._batches

    def recompute(self, model: torch.nn.Module, state: TrainerState, train_dataloader: Any = None) -> None:
        """Compute the reference on ``model`` as it is now and hand it to the optimizer.

        Runs between optimizer steps (epoch or step begin), where the Trainer has already zeroed the
        gradients: :func:`cnl.reference_from` clears ``.grad``.
        """
        if self.optimizer is None:
            raise RuntimeError("CNLCallback: training has not begun (no optimizer to mask yet)")
        self.optimizer.reference = reference_from(
            model,
            self._reference_batches(train_dataloader),
            self.loss_fn,
            storage=self.storage,
            chunks=self.chunks,
            progress=self.progress,
        )
        self.refreshes.append(state.global_step)

    # ------------------------------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.optimizer = wrap_trainer_optimizer(kwargs.get("optimizer"))
        self.optimizer.reference = None  # a new train() call: recompute on the weights it starts from
        self.refreshes = []
        if self.probe is not None and self.drift is None:  # the weights this training starts from
            from .drift import DriftProbe

            self.drift = DriftProbe(kwargs["model"], self.probe, batch_size=self.batch_size)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.refresh == "epoch":
            self.recompute(kwargs["model"], state, kwargs.get("train_dataloader"))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # on_step_begin fires once per optimizer step, before its first micro-batch (gradients are zero)
        due = isinstance(self.refresh, int) and (
            not self.refreshes or state.global_step - self.refreshes[-1] >= self.refresh
        )
        if due or self.optimizer is not None and self.optimizer.reference is None:
            self.recompute(kwargs["model"], state, kwargs.get("train_dataloader"))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or self.optimizer is None:
            return
        added = {}
        fraction = self.optimizer.pop_masked_fraction()
        if fraction is not None:
            added[LOG_KEY] = fraction
        if self.drift is not None and kwargs.get("model") is not None:
            added[KL_KEY] = self.drift.kl(kwargs["model"])
        if not added:
            return
        # Trainer.log appended a copy of these logs (plus "step") to log_history just before this event
        last = state.log_history[-1] if state.log_history else None
        if last is not None and all(last.get(k) == v for k, v in logs.items()):
            last.update(added)
        logs.update(added)


def _needs_tokenizing(data: Any) -> bool:
    """Raw examples (a list or ``datasets.Dataset`` of dicts without ``input_ids``)."""
    if isinstance(data, (Mapping, torch.utils.data.DataLoader)):
        return False
    columns = getattr(data, "column_names", None)
    if columns is not None:
        return "input_ids" not in columns
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        return "input_ids" not in data[0]
    return False


def protect(
    trainer: Any,
    reference_data: Any,
    *,
    prompts: Any = None,
    max_new_tokens: int | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> CNLCallback:
    """Protect ``reference_data`` during ``trainer.train()``: add a :class:`CNLCallback` and return it.

    ``reference_data="self"`` protects the model's own present answers to ``prompts`` (strings, or questions
    as :func:`cnl.self_reference` takes them), generated now by ``trainer.model`` with ``trainer.processing_class``
    (greedy, at most ``max_new_tokens`` tokens each; ``tokenizer=`` when the Trainer was given none): no labelled
    data is needed. Their loss is over the answers' tokens only, collated by cnl (the Trainer's collator could
    recompute the labels over the prompt too).

    The callback goes *first* in ``trainer.callback_handler.callbacks``: Trainer calls its callbacks in
    order with one ``logs`` dict, so ``cnl_masked_fraction``, added in ``on_log``, reaches the reporting
    callbacks (TensorBoard, W&B, ... which ``report_to`` appends right after the default flow callback)
    only if CNL runs before them. (``Trainer(callbacks=[CNLCallback(...)])`` appends it last: masking
    works the same, but those reporters miss the key.)

    With TRL's ``SFTTrainer``, ``reference_data`` may be raw examples in any format the trainer
    accepts without a ``formatting_func`` (``messages``, ``prompt``/``completion``, ``text``): they are
    tokenized by the trainer's own dataset preparation, so the reference sees exactly the tokens and
    loss mask the training data gets. With ``transformers.Trainer``, tokenize them as the training
    data is tokenized. ``kwargs`` go to :class:`CNLCallback`.
    """
    handler = trainer.callback_handler
    if any(isinstance(cb, CNLCallback) for cb in handler.callbacks):
        raise ValueError("this trainer is already protected by a CNLCallback")
    if isinstance(reference_data, str):
        if reference_data != "self":
            raise ValueError(f"reference_data: expected examples or 'self', got {reference_data!r}")
        if not prompts:
            raise ValueError("protect(trainer, 'self', prompts=[...]): the model answers these prompts; give some")
        from .reference import _pad_collate
        from .selfref import SELF_MAX_NEW_TOKENS, self_reference

        tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        if tokenizer is None:
            raise ValueError(
                "protect(trainer, 'self', ...) generates with the model's tokenizer: give the Trainer one "
                "(processing_class=tokenizer) or pass tokenizer=tokenizer"
            )
        reference_data = self_reference(
            trainer.model, tokenizer, prompts, max_new_tokens=max_new_tokens or SELF_MAX_NEW_TOKENS
        )
        kwargs.setdefault("collate_fn", _pad_collate)
    elif prompts is not None or tokenizer is not None:
        raise ValueError("prompts= and tokenizer= go with protect(trainer, 'self', prompts=...)")
    if _needs_tokenizing(reference_data):
        prepare = getattr(trainer, "_prepare_dataset", None)  # TRL's SFTTrainer
        if prepare is None:
            raise ValueError(
                "the reference examples have no input_ids: tokenize them like the training data "
                "(only TRL's SFTTrainer can tokenize raw examples itself)"
            )
        import datasets

        if not isinstance(reference_data, datasets.Dataset):
            reference_data = datasets.Dataset.from_list(list(reference_data))
        reference_data = prepare(reference_data, trainer.processing_class, trainer.args, False, None, "reference")
    callback = CNLCallback(reference_data, **kwargs)
    handler.callbacks.insert(0, callback)
    return callback
