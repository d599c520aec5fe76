"""``mofo``: Momentum-Filtered Optimizer (Chen et al. 2024, "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning").

Adam's (or momentum's) state is updated from every element's gradient; then only the elements whose
first moment |m| is among the largest ``--mofo-fraction`` of their tensor move (the others keep their
value, like CNL's frozen elements). Norm and bias tensors (1-D) always move. Defaults: AdamW (MoFO is an
AdamW variant) and a fraction of 0.15, the value of MoFO's own runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..optim import UpdateHooks
from .base import Method, register


@dataclass
class MoFOOptions(MethodOptions):
    """MoFO's own options."""

    fraction: float = 0.15
    """Share of each tensor's elements stepped: those with the largest |first moment| (MoFO's runs: 15%)."""

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"mofo_fraction must be in (0, 1], got {self.fraction}")


class MomentumFilter(UpdateHooks):
    """Zeroes the update outside each tensor's top ``fraction`` by |first moment|."""

    freezes = True

    def __init__(self, fraction: float, always: set[str]) -> None:
        self.fraction = fraction
        self.always = always

    def select(self, key: Any, param: torch.Tensor, u: torch.Tensor, state: dict[str, Any] | None) -> int:
        if key in self.always or state is None:
            return 0
        moment = state["exp_avg"] if "exp_avg" in state else state["momentum_buffer"]  # Adam's m; momentum's v
        flat = moment.detach().abs().reshape(-1)
        n = flat.numel()
        k = math.ceil(self.fraction * n)
        if k >= n:
            return 0
        threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest |m|
        drop = flat < threshold  # ties at the threshold all move
        u.view(-1).masked_fill_(drop, 0)
        return int(drop.sum())


@register
class MoFO(Method):
    name = "mofo"
    summary = "Momentum-Filtered Optimizer: each step moves only the top 15% of every tensor by |momentum|"
    options_class = MoFOOptions
    defaults = {"optimizer": "adamw"}  # MoFO filters AdamW's update
    optimizers = ("momentum", "adam", "adamw")  # it needs a first moment
    sharding_refusal = "the top-k of a tensor needs the whole tensor, not one process's shard"

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        always = {n for n, p in params if p.dim() <= 1}
        return MomentumFilter(self.options(cfg).fraction, always)
