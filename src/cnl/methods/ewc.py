"""``ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017) with the reference set as the old task.

The loss gains λ/2 Σ F (θ − θ*)² (``--ewc-lambda``), F the diagonal empirical Fisher of the reference
set: the mean over its questions of the squared per-question gradient (one backward pass per question),
and θ* the weights it was computed at. ``--ewc-fisher epoch`` (default) recomputes both at the start of
every epoch, ``once`` keeps those of the start weights. It holds F and θ* (8 bytes per parameter). Under
torchrun every process keeps F and θ* of its own shard: one question's gradient is a pass of all
processes together (the others add nothing), so the Fisher costs one pass per question there too.

The default λ = 100 comes from a measurement on the embedded model (SmolLM2-135M, its mastered csqa
questions): F has a median of 5e-7 but a maximum of 430, and an SGD step on the penalty alone is stable
only while lr · λ · max F < 2, i.e. λ < 155 at the preset's lr 3e-5; 100 anchors the high-Fisher
elements firmly and leaves the rest free, which is EWC's intent. EWC's papers tune λ per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..distributed import local
from ..errors import ConfigError
from ..optim import UpdateHooks
from .anchors import Pull
from .base import Method, TrainingContext, register


@dataclass
class EWCOptions(MethodOptions):
    """EWC's own options."""

    lambda_: float = 100.0
    """Strength λ of the penalty λ/2 Σ F (θ − θ*)² (F: diagonal Fisher of the reference set); an SGD step is
    stable while lr · λ · max F < 2."""
    fisher: str = "epoch"
    """Recompute the Fisher and the anchor θ* at every epoch, or once (at the start weights)."""
    gamma: float = 1.0
    """cnl continual (online EWC): the weight of the Fisher accumulated over earlier rounds when a round's own is
    added to it (F ← γ F + F_round; 1: every round counts fully)."""

    def validate(self) -> None:
        if not self.lambda_ >= 0:
            raise ConfigError(f"ewc_lambda must be >= 0, got {self.lambda_}")
        if self.fisher not in ("once", "epoch"):
            raise ConfigError(f"ewc_fisher must be once or epoch, got {self.fisher!r}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"ewc_gamma must be in [0, 1], got {self.gamma}")


def diagonal_fisher(ctx: TrainingContext, which: str = "reference") -> dict[str, torch.Tensor]:
    """Mean over the reference set (``which="train"``: the training set) of the squared gradient of each
    question's loss (this process's shard)."""
    fisher = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in ctx.params}
    for count in ctx.example_gradients(which):
        for n, p in ctx.params:
            if p.grad is not None:
                g = local(p.grad).to_dense()
                fisher[n].addcmul_(g, g, value=1.0 / count)
    return fisher


@register
class EWC(Method):
    name = "ewc"
    summary = (
        "Elastic Weight Consolidation: a Fisher-weighted pull λ/2 Σ F (θ − θ*)² towards the reference set's optimum"
    )
    options_class = EWCOptions
    uses_reference = True

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        return Pull(self.options(cfg).lambda_)

    def begin_epoch(self, ctx: TrainingContext, epoch: int) -> None:
        hooks = ctx.hooks
        assert isinstance(hooks, Pull)
        if hooks.online:  # carried from earlier rounds: anchored at this round's start weights
            if not hooks.anchor:
                hooks.set_anchor(ctx.params)
            return
        if hooks.fisher is not None and self.options(ctx.cfg).fisher == "once":
            return  # computed at the start weights (and restored from the checkpoint on --resume)
        hooks.fisher = diagonal_fisher(ctx)
        hooks.set_anchor(ctx.params)

    # online EWC over the rounds of cnl continual: a round's penalty uses the Fisher accumulated over the
    # rounds before it, anchored at the round's start weights; at its end, its own training set's Fisher
    # (at its end weights) is added, the old one weighted by γ (Schwarz et al. 2018, "Progress & Compress")
    def round_begin(self, hooks: UpdateHooks, carried: dict[str, Any], cfg: TrainConfig) -> None:
        assert isinstance(hooks, Pull)
        if carried.get("fisher") is not None:
            hooks.fisher = dict(carried["fisher"])
            hooks.online = True  # the anchor is set at the first epoch's start (the round's start weights)
            hooks.anchor = {}

    def round_end(self, ctx: TrainingContext) -> dict[str, Any]:
        hooks = ctx.hooks
        assert isinstance(hooks, Pull)
        gamma = self.options(ctx.cfg).gamma
        new = diagonal_fisher(ctx, "train")
        old = hooks.fisher or {}
        return {"fisher": {n: f + gamma * old[n] if n in old else f for n, f in new.items()}}
