"""``hft``: Half Fine-Tuning (Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models").

Half of the parameters are frozen by category, as HFT does: in every layer 2 of the 4 attention
projections (q, k, v, o, with their biases); of the feed-forward matrices (gate, up, down) 2 of 3 in
half of the layers and 1 of 3 in the other half; half of the norm tensors. Embeddings and the output
head always train. The frozen half is redrawn at every epoch with the run's seed (``--hft-redraw
never``: one draw for the whole run). A frozen tensor is left out of the step entirely (its optimizer
state does not move either), as in HFT.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..optim import UpdateHooks
from ..params import ATTENTION_KINDS, FFN_KINDS, classify_parameter
from .base import Method, TrainingContext, register


@dataclass
class HFTOptions(MethodOptions):
    """HFT's own options."""

    redraw: str = "epoch"
    """Redraw the frozen half at every epoch (with the run's seed), or never (one draw for the run)."""

    def validate(self) -> None:
        if self.redraw not in ("epoch", "never"):
            raise ConfigError(f"hft_redraw must be epoch or never, got {self.redraw!r}")


class HalfFreeze(UpdateHooks):
    """Skips the tensors of the current frozen half."""

    freezes = True

    def __init__(self, names: list[str]) -> None:
        self.groups: dict[tuple[Any, str], list[str]] = {}
        self.norms: list[str] = []
        for name in names:
            layer, kind = classify_parameter(name)
            if kind in ATTENTION_KINDS or kind in FFN_KINDS:
                self.groups.setdefault((layer, kind), []).append(name)
            elif kind == "norm":
                self.norms.append(name)
        self.frozen: set[str] = set()

    def draw(self, rng: random.Random) -> None:
        """Choose the frozen half (sets :attr:`frozen`)."""
        frozen: set[str] = set()
        layers = sorted({layer for layer, _ in self.groups}, key=lambda x: (x is None, x or 0))
        for layer in layers:
            attention = [k for k in ATTENTION_KINDS if (layer, k) in self.groups]
            for kind in rng.sample(attention, len(attention) // 2):
                frozen.update(self.groups[(layer, kind)])
        ffn_layers = [layer for layer in layers if any((layer, k) in self.groups for k in FFN_KINDS)]
        heavy = set(rng.sample(ffn_layers, (len(ffn_layers) + 1) // 2))  # 2 of 3 frozen here, 1 of 3 elsewhere
        for layer in ffn_layers:
            kinds = [k for k in FFN_KINDS if (layer, k) in self.groups]
            for kind in rng.sample(kinds, min(len(kinds), 2 if layer in heavy else 1)):
                frozen.update(self.groups[(layer, kind)])
        frozen.update(rng.sample(sorted(self.norms), len(self.norms) // 2))
        self.frozen = frozen

    def skip(self, key: Any) -> bool:
        return key in self.frozen


@register
class HalfFineTuning(Method):
    name = "hft"
    summary = "Half Fine-Tuning: half of the parameters frozen by category, redrawn every epoch"
    options_class = HFTOptions

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        return HalfFreeze([n for n, _ in params])

    def begin_epoch(self, ctx: TrainingContext, epoch: int) -> None:
        draw = epoch if self.options(ctx.cfg).redraw == "epoch" else 1
        hooks = ctx.hooks
        assert isinstance(hooks, HalfFreeze)
        hooks.draw(random.Random(f"hft:{ctx.cfg.seed}:{draw}"))
