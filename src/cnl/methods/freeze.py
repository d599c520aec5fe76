"""``freeze``: train the model with its bottom decoder layers (and its embedding) frozen, the simple strategy that
Zheng et al. 2025 ("Spurious Forgetting in Continual Learning of Language Models", ICLR 2025) found strong: much
of the forgetting of sequential fine-tuning is a loss of task alignment, not of knowledge, and freezing the
bottom layers keeps it down.

What the paper's code freezes (repository zzz47zzz/spurious-forgetting, ``code_for_realworld_scenarios``): its
``Freeze`` runs list the input embedding and the bottom 3 decoder layers,
``SEQ_freeze_component_list: ['embed_tokens', 'layers.0', 'layers.1', 'layers.2']``
(``config/CIT/TRACE_task8/Freeze.yaml``, a Llama-family model; ablations freeze 1, 2 and 6 layers,
``Freeze-{1,2,6}layers*.yaml``), and its 12-layer Pythia-160M biography runs freeze the embedding and the
same 3 layers (``config/CIT/biography_qa_task6/SurFGT_*_freeze_embed_in_bottom3_layers.yaml``). Hence the
defaults here: ``--freeze-bottom`` 3 layers whatever the model's depth (the paper's count for both of its
models), the embedding frozen with them. A model of 3 layers or fewer (the tiny test models) cannot lose 3: the
default is then all its layers but the top one. (``utils/optimizer.py`` there matches those names as
substrings of the parameter names, so on a model of more than 10 layers ``layers.1`` also catches layers 10-19
and ``layers.2`` layers 20-29; this method freezes exactly the bottom K layers, as the paper describes.)

``--freeze-top K`` freezes the top K decoder layers instead (``--freeze-bottom`` then defaults to 0) or as
well; at least one layer must train. ``--no-freeze-embeddings`` lets the input embedding train. A tied
output head is the embedding's tensor and is frozen with it; an untied one, like the final norm, always trains.

A frozen parameter is out of training entirely, as LoRA's base weights are: it does not require grad, so no
gradient is computed for it (frozen bottom layers also end the backward pass early), the optimizer holds neither
it nor any state for it, a checkpoint does not store it, and run.json's ``trainable_parameters`` counts only the
others. ``masked_fraction`` counts the trainable elements an update held back, so it stays 0 (as LoRA's); the
frozen share is ``1 - trainable_parameters / parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..params import classify_parameter, decoder_layers
from .base import Method, register

#: Decoder layers the paper freezes (with the embedding) by default.
PAPER_BOTTOM = 3


@dataclass
class FreezeOptions(MethodOptions):
    """Freeze's own options."""

    bottom: int | None = None
    """Number of bottom decoder layers frozen (default: the paper's 3, or all layers but the top one on a model
    of 3 layers or fewer; 0 when --freeze-top is given)."""
    top: int = 0
    """Number of top decoder layers frozen (instead of the bottom ones, or as well)."""
    embeddings: bool = True
    """Freeze the input embedding (and an output head tied to it), as the paper freezes it with the bottom layers."""

    def validate(self) -> None:
        if self.bottom is not None and self.bottom < 0:
            raise ConfigError(f"freeze_bottom must be >= 0, got {self.bottom}")
        if self.top < 0:
            raise ConfigError(f"freeze_top must be >= 0, got {self.top}")
        if self.bottom == 0 and self.top == 0 and not self.embeddings:
            raise ConfigError(
                "--method freeze with --freeze-bottom 0, --freeze-top 0 and --no-freeze-embeddings freezes nothing; "
                "use --method ft"
            )

    def frozen_layers(self, n_layers: int) -> list[int]:
        """The indices of the frozen decoder layers of a model of ``n_layers``; a ConfigError naming the model's
        layer count when they would leave none to train."""
        bottom = self.bottom
        if bottom is None:
            bottom = 0 if self.top else min(PAPER_BOTTOM, n_layers - 1)
        if bottom + self.top >= n_layers:
            given = (
                " and ".join(f"--freeze-{side} {k}" for side, k in (("bottom", self.bottom), ("top", self.top)) if k)
                or f"--freeze-bottom {bottom}"
            )
            raise ConfigError(
                f"{given} would freeze {bottom + self.top} decoder layers, but this model has {n_layers}: "
                f"freeze at most {n_layers - 1}, at least one layer must train"
            )
        frozen = sorted({*range(bottom), *range(n_layers - self.top, n_layers)})
        if not frozen and not self.embeddings:
            raise ConfigError(f"--method freeze freezes nothing of this {n_layers}-layer model; use --method ft")
        return frozen


@register
class Freeze(Method):
    name = "freeze"
    summary = "freeze the bottom decoder layers and the embedding (Spurious Forgetting, ICLR 2025: 3 layers)"
    options_class = FreezeOptions

    def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        opts: FreezeOptions = self.options(cfg)
        try:
            n_layers = len(decoder_layers(model))
        except ValueError as e:
            raise ConfigError(f"--method freeze: {e}") from None
        frozen = set(opts.frozen_layers(n_layers))
        for name, p in model.named_parameters():
            layer, kind = classify_parameter(name)
            p.requires_grad_(not (layer in frozen or (opts.embeddings and kind == "embedding")))
        return model
