"""``replay``: plain SGD on I ∪ M1, shuffled once before epoch 1 (SPEC §4).

The reference implementation's shuffle is unseeded; cnl uses ``--replay-seed`` (42) so that a run is
reproducible, which means its order differs from any particular published run.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from . import register
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig


@register
class Replay(Method):
    name = "replay"
    summary = "plain SGD on I and half of M (M1), shuffled once; forgetting measured on M2"
    optimizers = ("sgd",)  # SPEC §4: replay is plain SGD
    fixed_setting = "replay"

    def training_order(self, n: int, cfg: TrainConfig) -> list[int]:
        order = list(range(n))
        random.Random(cfg.replay_seed).shuffle(order)
        return order
