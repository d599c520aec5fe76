"""Penalties that pull the weights back to an anchor: the shared piece of ``ewc`` and ``l2``.

The loss gains ``strength/2 · Σ F (θ − θ*)²`` (F = 1 for L2-SP); the loop adds its exact gradient,
``strength · F (θ − θ*)``, to each parameter's gradient before the optimizer's rule, which is the same
update as back-propagating the penalty without building its graph. ``train_avg_loss`` stays the task
loss. The penalty is element-wise, so under torchrun every process keeps the anchor (and F) of its own
shard only. Both travel in checkpoints, so ``--resume`` continues with the same penalty.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import local
from ..optim import UpdateHooks

__all__ = ["Pull"]


class Pull(UpdateHooks):
    """``grad += strength · F (θ − anchor)`` per parameter (this process's shard); F None means 1."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] | None = None
        #: The Fisher was carried from earlier rounds (online EWC): kept for the round, not recomputed.
        self.online = False

    def set_anchor(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.anchor = {n: local(p).detach().to(torch.float32, copy=True) for n, p in named}

    def adjust_grad_(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> None:
        anchor = self.anchor.get(key)
        if anchor is None or not self.strength:
            return
        pull = local(param).detach().float() - anchor
        if self.fisher is not None:
            pull.mul_(self.fisher[key])
        grad.add_(pull.to(grad.dtype), alpha=self.strength)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "fisher": self.fisher, "online": self.online}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor"):
            self.anchor = dict(state["anchor"])
        if state.get("fisher") is not None:
            self.fisher = dict(state["fisher"])
        self.online = bool(state.get("online", self.online))
