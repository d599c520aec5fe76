"""``wise``: WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): θ = (1 − α) θ₀ + α θ_ft,
the fine-tuned weights mixed with the start weights θ₀ (``--wise-alpha``).

It trains exactly as ``ft`` (same defaults, same updates, bit for bit); what it evaluates after every epoch,
and what ``--save-model`` saves, is the mixture (1 − α) θ₀ + α θ_t of the start weights and the epoch's
weights θ_t, while training continues from θ_t. θ₀ is kept (4 bytes per parameter) in the method's hooks,
so it travels in checkpoints and ``--resume`` mixes with the same start; evaluating takes one more copy of
the trainable weights for the time of the evaluation. ``cnl interpolate`` (:mod:`cnl.interpolate`) applies
the same mixture to a finished run of any full-weight method, for several α at no training cost.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..distributed import local
from ..errors import ConfigError
from ..optim import UpdateHooks
from .base import Method, TrainingContext, register

__all__ = ["WiseOptions", "WiSE", "StartWeights", "mix"]


@dataclass
class WiseOptions(MethodOptions):
    """WiSE-FT's own options."""

    alpha: float = 0.5
    """Mixing weight α of the evaluated and saved weights (1 − α) θ₀ + α θ (0: the start weights, 1: plain ft;
    0.5: the WiSE-FT paper's recommendation when no held-out set chooses it)."""

    def validate(self) -> None:
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"wise_alpha must be in [0, 1], got {self.alpha}")


def mix(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α) · start + α · end in float32, elementwise (α = 0: start, α = 1: end, exactly)."""
    return start.float() * (1.0 - alpha) + end.float() * alpha


class StartWeights(UpdateHooks):
    """Changes no update; keeps the start weights θ₀ (this process's shards, float32) for the checkpoints."""

    def __init__(self) -> None:
        self.anchor: dict[str, torch.Tensor] = {}

    def set_anchor(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.anchor = {n: local(p).detach().to(torch.float32, copy=True) for n, p in named}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor"):
            self.anchor = dict(state["anchor"])


@register
class WiSE(Method):
    name = "wise"
    # (no hyphenated words: --help may wrap the line there)
    summary = "WiSE fine tuning: trains as ft, but evaluates and saves (1 − α) θ₀ + α θ, θ₀ the start weights"
    options_class = WiseOptions

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        hooks = StartWeights()  # θ₀: the weights as loaded, before any step (a checkpoint restores the same)
        hooks.set_anchor(params)
        return hooks

    @contextlib.contextmanager
    def evaluation_weights(self, ctx: TrainingContext) -> Iterator[None]:
        hooks = ctx.hooks
        assert isinstance(hooks, StartWeights)
        alpha = self.options(ctx.cfg).alpha
        with torch.no_grad():
            trained = {n: local(p).detach().clone() for n, p in ctx.params}
            for n, p in ctx.params:
                t = local(p)
                t.copy_(mix(hooks.anchor[n].to(t.device), t, alpha))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in ctx.params:
                    local(p).copy_(trained[n])
