"""``mofo``: Momentum-Filtered Optimizer (Chen et al. 2024, "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning").

Adam's (or momentum's) state is updated from every element's gradient; then only the elements whose
first moment |m| is among the largest ``--mofo-fraction`` of their tensor move (the others keep their
value, like CNL's frozen elements). Norm and bias tensors (1-D) always move. Defaults: AdamW (MoFO is an
AdamW variant) and a fraction of 0.15, the value of MoFO's own runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..optim import UpdateHooks
from . import register
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig


class MomentumFilter(UpdateHooks):
    """Zeroes the update outside each tensor's top ``fraction`` by |first moment|."""

    freezes = True

    def __init__(self, fraction: float, always: set[str]) -> None:
        self.fraction = fraction
        self.always = always
        self.select = self._select

    def _select(self, key: Any, param: torch.Tensor, u: torch.Tensor, state: dict[str, Any] | None) -> int:
        if key in self.always or state is None:
            return 0
        moment = state["m"] if "m" in state else state["v"]  # Adam's m; momentum's velocity
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
    defaults = {"optimizer": "adamw"}  # MoFO filters AdamW's update
    optimizers = ("momentum", "adam", "adamw")  # it needs a first moment
    supports_sharding = False  # the top-k of a tensor needs the whole tensor

    def check(self, cfg: TrainConfig) -> None:
        if not 0 < cfg.mofo_fraction <= 1:
            raise ConfigError(f"mofo_fraction must be in (0, 1], got {cfg.mofo_fraction}")

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks:
        always = {n for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1}
        return MomentumFilter(cfg.mofo_fraction, always)
