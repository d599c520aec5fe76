"""``agem``: Averaged Gradient Episodic Memory (Chaudhry et al. 2019) with the reference set as memory.

At the start of every epoch, g_ref = the mean gradient of the reference set (like CNL's reference, but
kept in full precision: 4 bytes per parameter). At every step, when the step's gradient g points against
it (g · g_ref < 0, over all parameters), g is projected onto the half-space that does not:
g ← g − (g · g_ref / g_ref · g_ref) g_ref; then the optimizer's rule applies. The dot product needs the
whole gradient, so the update runs after the backward pass (another 4 bytes per parameter at the step).
Under torchrun every process keeps g_ref for its own shard, and the two dot products are sums over the
processes' shards (all-reduced scalars).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import local
from ..optim import UpdateHooks
from .base import Method, TrainingContext, register


def _dot(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ a·b over the pairs, in float64."""
    return sum(((a * b).sum(dtype=torch.float64) for a, b in tensors), torch.zeros((), dtype=torch.float64))


class Projection(UpdateHooks):
    """Projects a step's gradient off the reference gradient when they conflict."""

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] = {}
        self.norm_sq = 0.0
        self.projected = 0
        self.steps = 0
        #: Sums a scalar over the processes (identity in one process).
        self.reduce: Callable[[float], float] = float

    def before_step(self, params: list[tuple[Any, torch.nn.Parameter]]) -> None:
        self.steps += 1
        pairs = [
            (local(p.grad).to_dense(), self.reference[n])
            for n, p in params
            if p.grad is not None and n in self.reference
        ]
        dot = self.reduce(float(_dot(pairs)))
        if dot < 0 and self.norm_sq > 0:
            scale = dot / self.norm_sq
            for n, p in params:
                if n in self.reference:  # a parameter without a gradient has g = 0 there, and g' = -scale g_ref
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif p.grad.is_sparse:
                        p.grad = p.grad.to_dense()
                    local(p.grad).sub_(self.reference[n], alpha=scale)
            self.projected += 1


@register
class AGEM(Method):
    name = "agem"
    summary = "A-GEM: a step's gradient is projected off the reference gradient when they conflict"
    uses_reference = True
    updates_in_backward = False  # the projection needs the whole gradient first

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        return Projection()

    def begin_epoch(self, ctx: TrainingContext, epoch: int) -> None:
        hooks = ctx.hooks
        assert isinstance(hooks, Projection)
        hooks.reduce = ctx.dist.sum
        for _, p in ctx.params:
            p.grad = None
        ctx.mean_gradient()
        hooks.reference = {
            n: (local(p.grad).to_dense() if p.grad is not None else torch.zeros_like(local(p))) for n, p in ctx.params
        }
        norm_sq = sum((g.double().pow(2).sum() for g in hooks.reference.values()), torch.zeros((), dtype=torch.float64))
        hooks.norm_sq = ctx.dist.sum(float(norm_sq))
        for _, p in ctx.params:
            p.grad = None
        if hooks.steps:
            ctx.say(f"agem: {hooks.projected} of {hooks.steps} steps projected")
        hooks.projected = hooks.steps = 0
