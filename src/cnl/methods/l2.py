"""``l2``: L2-SP (Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks"): the loss gains α/2 ||θ − θ₀||², a pull back to the starting weights θ₀ (``--l2-alpha``).

It keeps a copy of the starting weights (4 bytes per parameter). The default α = 1000 is far above the
paper's 0.01, on purpose: what matters is the share of the drift a step pulls back, lr · α; the paper's
runs (lr around 0.01, thousands of steps) pull back 1e-4 per step, which over the few hundred steps of a
knowledge injection at lr 3e-5 would do nothing, while α = 1000 pulls back 3% per step there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..optim import UpdateHooks
from .anchors import Pull
from .base import Method, TrainingContext, register


@dataclass
class L2Options(MethodOptions):
    """L2-SP's own options."""

    alpha: float = 1000.0
    """Strength α of the pull α/2 ||θ − θ₀||² to the starting weights."""
    anchor: str = "start"
    """cnl continual: θ₀ is each round's start weights (start), or the first round's, the original model's
    (original)."""

    def validate(self) -> None:
        if not self.alpha >= 0:
            raise ConfigError(f"l2_alpha must be >= 0, got {self.alpha}")
        if self.anchor not in ("start", "original"):
            raise ConfigError(f"l2_anchor must be start or original, got {self.anchor!r}")


@register
class L2SP(Method):
    name = "l2"
    summary = "L2-SP: a pull α/2 ||θ − θ₀||² back to the starting weights"
    options_class = L2Options

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        hooks = Pull(self.options(cfg).alpha)  # the anchor: the weights as loaded, before any step
        hooks.set_anchor(params)
        return hooks

    # cnl continual: each round's start weights are the anchor (its hooks are made from them), or, with
    # --l2-anchor original, the first round's, carried from round to round
    def round_begin(self, hooks: UpdateHooks, carried: dict[str, Any], cfg: TrainConfig) -> None:
        assert isinstance(hooks, Pull)
        if self.options(cfg).anchor == "original" and carried.get("anchor"):
            hooks.anchor = dict(carried["anchor"])

    def round_end(self, ctx: TrainingContext) -> dict[str, Any]:
        hooks = ctx.hooks
        assert isinstance(hooks, Pull)
        return {"anchor": hooks.anchor} if self.options(ctx.cfg).anchor == "original" else {}
