"""``ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017) with the reference set as the old task.

The loss gains λ/2 Σ F (θ − θ*)² (``--ewc-lambda``), F the diagonal empirical Fisher of the reference
set: the mean over its questions of the squared per-question gradient (one backward pass per question),
and θ* the weights it was computed at. ``--ewc-fisher epoch`` (default) recomputes both at the start of
every epoch, ``once`` keeps those of the start weights. It holds F and θ* (8 bytes per parameter).

The default λ = 100 comes from a measurement on the embedded model (SmolLM2-135M, its mastered csqa
questions): F has a median of 5e-7 but a maximum of 430, and an SGD step on the penalty alone is stable
only while lr · λ · max F < 2, i.e. λ < 155 at the preset's lr 3e-5; 100 anchors the high-Fisher
elements firmly and leaves the rest free, which is EWC's intent. EWC's papers tune λ per task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..optim import UpdateHooks
from ..scoring import batch_losses
from . import register
from .anchors import Pull
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..train import Run


def diagonal_fisher(run: Run, name: str) -> dict[str, torch.Tensor]:
    """Mean over the questions of set ``name`` of the squared gradient of each question's loss."""
    model, params = run.model, [(n, p) for n, p in run.updater.params]
    questions = run.encoded[name]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()
    try:
        for e in questions:
            for _, p in params:
                p.grad = None
            batch_losses(model, [e], run.pad_id)[0].backward()
            for n, p in params:
                if p.grad is not None:
                    fisher[n].addcmul_(p.grad.to_dense(), p.grad.to_dense(), value=1.0 / len(questions))
    finally:
        for _, p in params:
            p.grad = None
        model.train(was_training)
    return fisher


@register
class EWC(Method):
    name = "ewc"
    summary = (
        "Elastic Weight Consolidation: a Fisher-weighted pull λ/2 Σ F (θ − θ*)² towards the reference set's optimum"
    )
    uses_reference = True
    supports_sharding = False  # per-question gradients of a sharded model are not wired up yet

    def check(self, cfg: TrainConfig) -> None:
        if not cfg.ewc_lambda >= 0:
            raise ConfigError(f"ewc_lambda must be >= 0, got {cfg.ewc_lambda}")
        if cfg.ewc_fisher not in ("once", "epoch"):
            raise ConfigError(f"ewc_fisher must be once or epoch, got {cfg.ewc_fisher!r}")

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks:
        return Pull(cfg.ewc_lambda)

    def begin_epoch(self, run: Run, epoch: int) -> None:
        hooks = run.updater.hooks
        assert isinstance(hooks, Pull)
        if run.cfg.ewc_fisher == "once" and hooks.fisher is not None:
            return  # computed at the start weights (and restored from the checkpoint on --resume)
        hooks.fisher = diagonal_fisher(run, run.roles.reference)
        hooks.set_anchor(run.updater.params)
