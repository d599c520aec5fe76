"""``replay``: plain SGD on I ∪ M1, shuffled once before epoch 1 (SPEC §4).

The reference implementation's shuffle is unseeded; cnl uses ``--replay-seed`` (42) so that a run is
reproducible, which means its order differs from any particular published run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import MethodOptions, TrainConfig
from .base import Method, register


@dataclass
class ReplayOptions(MethodOptions):
    """Replay's own options."""

    seed: int = 42
    """Seed of the one-time shuffle of I ∪ M1 (the reference's shuffle was unseeded)."""


@register
class Replay(Method):
    name = "replay"
    summary = "plain SGD on I and half of M (M1), shuffled once; forgetting measured on M2"
    options_class = ReplayOptions
    optimizers = ("sgd",)  # SPEC §4: replay is plain SGD
    fixed_setting = "replay"

    def training_order(self, n: int, cfg: TrainConfig) -> list[int]:
        order = list(range(n))
        random.Random(self.options(cfg).seed).shuffle(order)
        return order
