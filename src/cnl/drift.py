"""Forgetting while it happens: how far the model's answer distributions drift from the starting model's.

Forgetting is otherwise seen after the run. Its cheap running proxy is the divergence of the model's output
distribution from the start's on prompts it should keep answering as before. A :class:`DriftProbe` stores, once,
the starting model's next-token log-probabilities at the *answer positions* of a fixed set of examples (a
multiple-choice question: the position that predicts the letter; an open-ended one: the positions that
predict the answer's tokens; any Hugging Face example: the positions with a label other than -100), and
:meth:`DriftProbe.kl` returns the mean forward KL divergence of the model's distributions from them:

    KL = mean over examples of ( mean over its answer positions t of  Σ_v p₀(v|t) · (log p₀(v|t) − log p(v|t)) )

with p₀ the start's distribution and p the model's now. It is 0 for an unchanged model and positive once the
answers' distributions move. Memory: (answer positions) × (vocabulary) floats per example.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["ProbeSpec", "parse_probe", "probe_rows", "answer_log_probs", "kl_drift", "DriftProbe", "PROBE_DEFAULT_SIZE"]

#: Prompts a ``--probe SET`` takes when it gives no size.
PROBE_DEFAULT_SIZE = 64


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed ``--probe SET[:N]``: the set (a run's set name, a named set or a file) and the sample size."""

    set: str
    n: int = PROBE_DEFAULT_SIZE


def parse_probe(spec: str) -> ProbeSpec:
    """``SET[:N]`` (N at least 1; default :data:`PROBE_DEFAULT_SIZE`)."""
    name, sep, size = spec.rpartition(":")
    if not sep or not re.fullmatch(r"[-+]?\d+", size):  # no size (a path may hold a colon)
        name, size = spec, str(PROBE_DEFAULT_SIZE)
    if not name.strip():
        raise ConfigError(f"--probe {spec!r}: expected SET[:N], e.g. mastered:64 or mmlu:100")
    if int(size) < 1:
        raise ConfigError(f"--probe {spec}: N must be a number of prompts, at least 1 (SET[:N])")
    return ProbeSpec(name, int(size))


def probe_rows(spec: ProbeSpec, sets: dict[str, Sequence[Any]], fmt: str = "auto") -> tuple[list[Any], str]:
    """The probe's rows and where they come from: one of the run's ``sets`` by name, else a named set or a
    file; ``spec.n`` of them, a fixed-seed sample in source order when there are more."""
    if spec.set in sets:
        rows, source = list(sets[spec.set]), f"the run's {spec.set} set"
    else:
        from .data import DataError, resolve_dataset

        try:
            rows, source = resolve_dataset(spec.set, fmt=fmt)
        except DataError as e:
            raise ConfigError(f"--probe {spec.set}: {e} (or name one of the run's sets: {', '.join(sets)})") from None
    if not rows:
        raise ConfigError(f"--probe {spec.set}: the set is empty")
    if spec.n < len(rows):
        keep = sorted(random.Random(0).sample(range(len(rows)), spec.n))
        rows = [rows[i] for i in keep]
    return rows, source


@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per example, ``[answer positions, vocabulary]`` float32 log-probabilities of the next token at every
    position whose next label is not -100 (HF batches: ``input_ids``, ``attention_mask``, ``labels``), in eval
    mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), use_cache=False)
            logits = logits.logits[:, :-1].float()
            labels = batch["labels"].to(device)[:, 1:]
            for row in range(ids.shape[0]):
                keep = labels[row] != -100
                out.append(torch.log_softmax(logits[row][keep], dim=-1))
    finally:
        model.train(was_training)
    return out


def kl_drift(start: Sequence[torch.Tensor], now: Sequence[torch.Tensor]) -> float:
    """Mean over examples of the mean over their answer positions of KL(p_start ‖ p_now) (log-probabilities in)."""
    if len(start) != len(now) or not start:
        raise ValueError(f"kl_drift: {len(start)} start and {len(now)} current examples")
    total = 0.0
    for a, b in zip(start, now, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"kl_drift: answer positions differ ({list(a.shape)} vs {list(b.shape)})")
        if a.shape[0] == 0:
            continue
        total += float((a.exp() * (a - b)).sum(-1).mean())
    return total / len(start)


class DriftProbe:
    """The starting model's answer distributions on ``examples``, and the model's KL from them later.

    Args:
        model: the model at its start (the distributions are taken now, in eval mode).
        examples: Hugging Face causal-LM examples (``input_ids``, ``labels`` with -100 off the answer; e.g.
            from :func:`cnl.self_reference`, :func:`cnl.answer_examples` or a tokenized dataset), or batches.
        batch_size: examples per forward pass.
        start: the stored distributions (:meth:`state`), instead of computing them (a resumed run).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        examples: Any,
        *,
        batch_size: int = 8,
        start: Sequence[torch.Tensor] | None = None,
    ) -> None:
        from .reference import _materialize, _pad_collate

        self.batches = _materialize(examples, batch_size, _pad_collate)
        self.start = list(start) if start is not None else answer_log_probs(model, self.batches)
        if not self.start:
            raise ValueError("a drift probe needs at least one example")
        if not any(t.shape[0] for t in self.start):
            raise ValueError("the probe's examples have no answer positions (every label is -100)")

    def kl(self, model: torch.nn.Module) -> float:
        """The mean forward KL of ``model``'s answer distributions from the start's (0 when unchanged)."""
        now = answer_log_probs(model, self.batches)
        device = now[0].device
        return kl_drift([s.to(device) for s in self.start], now)

    def state(self) -> dict[str, torch.Tensor]:
        """The stored distributions by name (``start.<i>``), for a file that a resumed run reads back."""
        return {f"start.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.start)}

    @staticmethod
    def start_from_state(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`state`'s tensors in example order."""
        return [state[f"start.{i}"] for i in range(len(state))]
