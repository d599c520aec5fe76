"""``l2``: L2-SP (Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks"): the loss gains α/2 ||θ − θ₀||², a pull back to the starting weights θ₀ (``--l2-alpha``).

It keeps a copy of the starting weights (4 bytes per parameter). The default α = 1000 is far above the
paper's 0.01, on purpose: what matters is the share of the drift a step pulls back, lr · α; the paper's
runs (lr around 0.01, thousands of steps) pull back 1e-4 per step, which over the few hundred steps of a
knowledge injection at lr 3e-5 would do nothing, while α = 1000 pulls back 3% per step there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..optim import UpdateHooks
from . import register
from .anchors import Pull
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig


@register
class L2SP(Method):
    name = "l2"
    summary = "L2-SP: a pull α/2 ||θ − θ₀||² back to the starting weights"
    supports_sharding = False  # the anchor is not wired into sharded checkpoints yet

    def check(self, cfg: TrainConfig) -> None:
        if not cfg.l2_alpha >= 0:
            raise ConfigError(f"l2_alpha must be >= 0, got {cfg.l2_alpha}")

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks:
        hooks = Pull(cfg.l2_alpha)  # the anchor: the weights as loaded, before any step
        hooks.set_anchor([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        return hooks
