"""``agem``: Averaged Gradient Episodic Memory (Chaudhry et al. 2019) with the reference set as memory.

At the start of every epoch, g_ref = the mean gradient of the reference set (like CNL's reference, but
kept in full precision: 4 bytes per parameter). At every step, when the step's gradient g points against
it (g · g_ref < 0, over all parameters), g is projected onto the half-space that does not:
g ← g − (g · g_ref / g_ref · g_ref) g_ref; then the optimizer's rule applies. The dot product needs the
whole gradient, so the update runs after the backward pass (another 4 bytes per parameter at the step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..optim import UpdateHooks
from ..reference import accumulate_mean_gradient
from ..scoring import mc_batches, spec_loss
from . import register
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..train import Run


class Projection(UpdateHooks):
    """Projects a step's gradient off the reference gradient when they conflict."""

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] = {}
        self.norm_sq = 0.0
        self.projected = 0
        self.steps = 0

    def before_step(self, params: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.steps += 1
        grads = [(n, p.grad) for n, p in params if p.grad is not None and n in self.reference]
        dot = float(
            sum(
                ((g.to_dense() * self.reference[n]).sum(dtype=torch.float64) for n, g in grads),
                torch.zeros((), dtype=torch.float64),
            )
        )
        if dot < 0 and self.norm_sq > 0:
            scale = dot / self.norm_sq
            for n, p in params:
                if n in self.reference:  # a parameter without a gradient has g = 0 there, and g' = -scale g_ref
                    g = p.grad.to_dense() if p.grad is not None else torch.zeros_like(self.reference[n])
                    p.grad = g.sub_(self.reference[n], alpha=scale)
            self.projected += 1


@register
class AGEM(Method):
    name = "agem"
    summary = "A-GEM: a step's gradient is projected off the reference gradient when they conflict"
    uses_reference = True
    updates_in_backward = False  # the projection needs the whole gradient first
    supports_sharding = False

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks:
        return Projection()

    def begin_epoch(self, run: Run, epoch: int) -> None:
        hooks = run.updater.hooks
        assert isinstance(hooks, Projection)
        params = run.updater.params
        for _, p in params:
            p.grad = None
        questions = run.encoded[run.roles.reference]
        accumulate_mean_gradient(
            run.model,
            mc_batches(questions, run.cfg.ref_batch_size),
            spec_loss(run.pad_id),
            n=len(questions),
            progress=False,
        )
        hooks.reference = {n: (p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)) for n, p in params}
        hooks.norm_sq = float(
            sum((g.double().pow(2).sum() for g in hooks.reference.values()), torch.zeros((), dtype=torch.float64))
        )
        for _, p in params:
            p.grad = None
        if hooks.steps:
            run.say(f"agem: {hooks.projected} of {hooks.steps} steps projected")
        hooks.projected = hooks.steps = 0
