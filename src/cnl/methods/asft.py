"""``asft``: Anchored Supervised Fine-Tuning (Zhu et al. 2025, "Anchored Supervised Fine-Tuning", arXiv 2509.23753,
ICLR 2026): DFT's probability-weighted token loss plus a KL anchor to the starting model.

Per target token t (the answer's letter of a multiple-choice question; each token of an open-ended answer, the
positions of the task loss, :func:`cnl.answers.answer_logits`), with p_θ the trained model's distribution over
the whole vocabulary at that position and p_0 the frozen starting model's::

    loss_t = sg(p_θ(y_t)) · (−log p_θ(y_t))  +  λ · KL_t,     KL_t = Σ_v p_0(v) (log p_0(v) − log p_θ(v))

sg: stop-gradient (DFT's weight is a constant of the step). A question's objective is the mean of loss_t over
its target tokens, and a step's the mean over its questions, as the loop averages every loss.

Where each choice comes from (read in the official code, ``zhuchichi56/ASFT`` ``train.py``/``train_v2.py``
``EnhancedTrainer.compute_loss``, mode ``asft``; in LLaMA-Factory's ``asft_loss_func`` /
``_asft_cross_entropy`` / ``_kl_divergence`` of ``train/trainer_utils.py``; and in ``unslothai/unsloth``
``unsloth/losses/asft.py``):

- DFT's weight is the target's probability under the current model, detached (official: the softmax gathered at
  the label, ``.detach()``; LLaMA-Factory: ``exp(−CE)`` under ``no_grad``);
- the KL is ``F.kl_div(log_softmax(policy), softmax(reference)).sum(-1)``, i.e. KL(p_0 ‖ p_θ) (the anchor's
  distribution first), over the full vocabulary, at every position whose label is a target token (the
  prompt's positions are masked out). unsloth calls this direction "forward" and notes that the paper's text
  writes the reverse one, KL(p_θ ‖ p_0), while its code computes this one; ``--asft-kl-direction reverse``
  gives the text's;
- averaging: both codes take the mean of DFT + λ·KL over the batch's target tokens. Here a question's mean over
  its tokens comes first and then the mean over the step's questions: the same at batch size 1 (SPEC's) and for
  multiple-choice questions (one token each); with ``--batch-size`` > 1 on open-ended answers of different
  lengths the papers' codes weigh each question by its answer's length;
- λ = 0.1: the official ``train.py``'s ``kl_weight`` default and ``train.sh``'s ``KL_WEIGHT``, LLaMA-Factory's
  ``asft_alpha`` default and its LLaMA-2 medical example ``examples/extras/asft/llama2_full_asft.yaml`` (its
  Qwen2.5 math example and the README's command use 0.05);
- learning rate 2e-5 with AdamW and no weight decay: the paper's medical-knowledge runs (LLaMA-2-7B on 10k
  MedMCQA questions, the closest of its settings to injecting knowledge; ``train.py``'s defaults and the
  LLaMA-Factory example: lr 2e-5, 3 epochs, Hugging Face Trainer's ``adamw_torch`` whose weight decay is 0);
  its math runs use 5e-5. Those defaults replace the preset's lr and optimizer (flags and files still win).

The anchor is a deep copy of the prepared model taken when the run loads, before a checkpoint is restored, in
eval mode without gradients: on ``--resume`` it holds the original start weights again (the loaded model's),
not the resumed ones; in ``cnl continual`` it is each round's start. It costs one more copy of the weights and
one more forward pass (without backward) per step. ``train_avg_loss`` (and ``steps.csv``'s loss) stays the task
loss, the mean cross-entropy of the target tokens (SPEC's letter loss, the answer loss), comparable with the
other methods' runs; the objective itself is :func:`asft_losses`'s first value.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..answers import OpenEncoded, answer_logits
from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..scoring import last_token_logits
from .base import LossFn, Method, register

__all__ = ["ASFTOptions", "ASFT", "AnchoredLoss", "target_logits", "asft_losses", "KL_DIRECTIONS"]

#: ``forward``: KL(p_0 ‖ p_θ), the official code's; ``reverse``: KL(p_θ ‖ p_0), the paper's text's.
KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class ASFTOptions(MethodOptions):
    """ASFT's own options."""

    kl_weight: float = 0.1
    """Weight λ of the KL anchor to the starting model (the official code's and LLaMA-Factory's default 0.1; 0: DFT
    alone)."""
    kl_direction: str = "forward"
    """forward: KL(p_start ‖ p_θ), as the official code and LLaMA-Factory compute it; reverse: KL(p_θ ‖ p_start),
    as the paper's text writes it."""

    def validate(self) -> None:
        if not (self.kl_weight >= 0 and self.kl_weight < float("inf")):
            raise ConfigError(f"asft_kl_weight must be a number >= 0, got {self.kl_weight}")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ConfigError(f"asft_kl_direction must be forward or reverse, got {self.kl_direction!r}")


def target_logits(model: torch.nn.Module, batch: Sequence[Any], pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per question, ``(logits [n, vocab] in float32, target ids [n])`` at the positions of the task loss: the last
    prompt position for a multiple-choice question (target: the label's letter token), the positions before each
    of an open-ended answer's loss tokens (:func:`cnl.answers.answer_logits`)."""
    if batch and isinstance(batch[0], OpenEncoded):
        return answer_logits(model, batch, pad_id)
    logits = last_token_logits(model, [e.input_ids for e in batch], pad_id).float()
    return [(logits[i : i + 1], torch.tensor([e.target], device=logits.device)) for i, e in enumerate(batch)]


def asft_losses(
    logits: torch.Tensor, targets: torch.Tensor, anchor_logits: torch.Tensor, kl_weight: float, direction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One question's ``(ASFT objective, task loss)``: the means over its target tokens of
    ``sg(p) · (−log p) + λ · KL`` and of ``−log p`` (p: the target's probability under ``logits``; KL between the
    distributions of ``anchor_logits`` and ``logits`` in ``direction``, over the whole vocabulary)."""
    log_p = F.log_softmax(logits, dim=-1)
    ce = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    dft = ce.detach().neg().exp() * ce
    log_q = F.log_softmax(anchor_logits, dim=-1)
    first, second = (log_q, log_p) if direction == "forward" else (log_p, log_q)  # KL(first ‖ second)
    kl = (first.exp() * (first - second)).sum(-1)
    return (dft + kl_weight * kl).mean(), ce.mean()


class AnchoredLoss:
    """The ASFT objective of a run (:data:`cnl.methods.base.LossFn`): the frozen anchor copy and λ."""

    def __init__(self, model: torch.nn.Module, kl_weight: float, direction: str) -> None:
        self.kl_weight = kl_weight
        self.direction = direction
        #: The starting model: a copy, in eval mode, that no gradient reaches.
        self.anchor = copy.deepcopy(model).eval().requires_grad_(False)

    def __call__(self, model: torch.nn.Module, batch: Sequence[Any], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        current = target_logits(model, batch, pad_id)
        with torch.no_grad():
            anchored = target_logits(self.anchor, batch, pad_id)
        pairs = [
            asft_losses(logits, targets, anchor, self.kl_weight, self.direction)
            for (logits, targets), (anchor, _) in zip(current, anchored, strict=True)
        ]
        return torch.stack([o for o, _ in pairs]), torch.stack([r for _, r in pairs])


@register
class ASFT(Method):
    name = "asft"
    summary = "Anchored SFT: DFT's loss (weighted by the target's probability) plus λ 0.1 · KL to the starting model"
    options_class = ASFTOptions
    # the paper's medical-knowledge runs (official train.py and LLaMA-Factory's llama2_full_asft.yaml): AdamW at
    # lr 2e-5, the Hugging Face Trainer's weight decay 0
    defaults = {"optimizer": "adamw", "lr": 2e-5, "adamw_weight_decay": 0.0}
    sharding_refusal = "the starting model's copy would be a whole model on every process"

    def make_loss(self, cfg: TrainConfig, model: torch.nn.Module) -> LossFn:
        opts: ASFTOptions = self.options(cfg)
        return AnchoredLoss(model, opts.kl_weight, opts.kl_direction)
