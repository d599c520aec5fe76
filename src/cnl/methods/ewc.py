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

    def validate(self) -> None:
        if not self.lambda_ >= 0:
            raise ConfigError(f"ewc_lambda must be >= 0, got {self.lambda_}")
        if self.fisher not in ("once", "epoch"):
            raise ConfigError(f"ewc_fisher must be once or epoch, got {self.fisher!r}")


def diagonal_fisher(ctx: TrainingContext) -> dict[str, torch.Tensor]:
    """Mean over the reference set of the squared gradient of each question's loss (this process's shard)."""
    fisher = {n: torch.zeros_like(local(p), dtype=torch.float32) for n, p in ctx.params}
    for count in ctx.example_gradients():
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
        if self.options(ctx.cfg).fisher == "once" and hooks.fisher is not None:
            return  # computed at the start weights (and restored from the checkpoint on --resume)
        hooks.fisher = diagonal_fisher(ctx)
        hooks.set_anchor(ctx.params)
