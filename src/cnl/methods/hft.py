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
from typing import TYPE_CHECKING, Any

import torch

from ..analyze import classify_parameter
from ..errors import ConfigError
from ..optim import UpdateHooks
from . import register
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..train import Run

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


class HalfFreeze(UpdateHooks):
    """Skips the tensors of the current frozen half."""

    freezes = True

    def __init__(self, names: list[str]) -> None:
        self.groups: dict[tuple[Any, str], list[str]] = {}
        self.norms: list[str] = []
        for name in names:
            layer, kind = classify_parameter(name)
            if kind in ATTENTION or kind in FFN:
                self.groups.setdefault((layer, kind), []).append(name)
            elif kind == "norm":
                self.norms.append(name)
        self.frozen: set[str] = set()

    def draw(self, rng: random.Random) -> None:
        """Choose the frozen half (sets :attr:`frozen`)."""
        frozen: set[str] = set()
        layers = sorted({layer for layer, _ in self.groups}, key=lambda x: (x is None, x or 0))
        for layer in layers:
            attention = [k for k in ATTENTION if (layer, k) in self.groups]
            for kind in rng.sample(attention, len(attention) // 2):
                frozen.update(self.groups[(layer, kind)])
        ffn_layers = [layer for layer in layers if any((layer, k) in self.groups for k in FFN)]
        heavy = set(rng.sample(ffn_layers, (len(ffn_layers) + 1) // 2))  # 2 of 3 frozen here, 1 of 3 elsewhere
        for layer in ffn_layers:
            kinds = [k for k in FFN if (layer, k) in self.groups]
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

    def check(self, cfg: TrainConfig) -> None:
        if cfg.hft_redraw not in ("epoch", "never"):
            raise ConfigError(f"hft_redraw must be epoch or never, got {cfg.hft_redraw!r}")

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks:
        return HalfFreeze([n for n, p in model.named_parameters() if p.requires_grad])

    def begin_epoch(self, run: Run, epoch: int) -> None:
        draw = epoch if run.cfg.hft_redraw == "epoch" else 1
        hooks = run.updater.hooks
        assert isinstance(hooks, HalfFreeze)
        hooks.draw(random.Random(f"hft:{run.cfg.seed}:{draw}"))
