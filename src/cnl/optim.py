"""Update rules of SPEC §4 for one parameter at a time: the arithmetic under :class:`cnl.MaskedOptimizer`.

- an :class:`UpdateRule` turns a parameter's gradient into an update direction ``u`` (``θ ← θ − η u``)
  and keeps its optimizer state: plain SGD (``u = g``), momentum (``v ← 0.9 v + g``, ``u = v``), Adam
  (bias-corrected, ``u = m̂ / (√v̂ + ε)``) and AdamW (``u = m̂ / (√v̂ + ε) + λ θ``). The state always
  comes from the *unmasked* gradient, and it has torch's own layout (``momentum_buffer``; ``step``,
  ``exp_avg``, ``exp_avg_sq``), so a state dict moves between cnl and ``torch.optim`` unchanged;
- :func:`apply_update` applies the rule, the CNL mask (when a :class:`~cnl.mask.SignReference` is set)
  and a method's filter to ``u``, then ``θ ← θ − η u``: the one implementation of an update;
- :class:`UpdateHooks` is what a training method may change in each update (HFT's frozen half, EWC's
  penalty, MoFO's filter, A-GEM's projection).

:class:`cnl.optimizer.MaskedOptimizer` drives these, after the backward pass or inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import kernels
from .distributed import local
from .mask import SignReference

__all__ = [
    "sparse_embedding_grads",
    "UpdateRule",
    "SGDRule",
    "MomentumRule",
    "AdamRule",
    "make_rule",
    "apply_update",
    "UpdateHooks",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def _new_step() -> torch.Tensor:
    """Adam's step count as torch keeps it: a float32 scalar tensor on the CPU."""
    return torch.tensor(0.0, dtype=torch.float32)


class UpdateRule:
    """Maps a gradient to an update direction; reads and writes the optimizer state of each parameter.

    ``state`` maps a key (the parameter itself, under :class:`cnl.MaskedOptimizer`) to that parameter's
    entry, in torch's layout; moments are kept in float32 whatever the parameter's dtype.
    """

    #: True when :meth:`direction` returns the gradient tensor itself (no state, may be masked in place).
    returns_grad = False

    def __init__(self) -> None:
        self.state: Any = {}

    def direction(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The update direction ``u`` (a tensor the caller may modify) for one parameter."""
        raise NotImplementedError

    def fused(
        self, key: Any, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        """Update the state and ``param`` in one fused pass (:mod:`cnl.kernels`) and return the frozen
        count, or return None (nothing done) where no kernel applies; the caller then runs the eager rule."""
        return None


class SGDRule(UpdateRule):
    """Plain SGD: ``u = g``."""

    returns_grad = True

    def direction(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def fused(
        self, key: Any, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        if signs is None or not kernels.available(param, grad):
            return None  # unmasked SGD is one torch sub_, already a single pass (and multi-threaded)
        return kernels.sgd(param, grad, signs, lr)


class MomentumRule(UpdateRule):
    """Heavy-ball momentum: ``v ← μ v + g`` (unmasked; torch's ``momentum_buffer``), ``u = v`` (masked copy)."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum

    def direction(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        st = self.state.get(key)
        if st is None:
            # First step: v = g (torch.optim.SGD does the same), in fp32.
            st = self.state[key] = {"momentum_buffer": grad.detach().to(torch.float32, copy=True)}
        else:
            st["momentum_buffer"].mul_(self.momentum).add_(grad)
        return st["momentum_buffer"].clone()

    def fused(
        self, key: Any, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        st = self.state.get(key)
        first = st is None
        v = torch.empty_like(param, dtype=torch.float32) if first else st["momentum_buffer"]
        if not kernels.available(param, grad, v):
            return None
        if first:
            st = self.state[key] = {"momentum_buffer": v}
        return kernels.momentum(param, grad, v, signs, lr, self.momentum, first)


class AdamRule(UpdateRule):
    """Adam (and AdamW with ``weight_decay`` > 0): bias-corrected moments from the unmasked gradient.

    ``u = m̂ / (√v̂ + ε)`` plus ``weight_decay · θ`` for AdamW, so the decay term is masked with the
    rest of the update, as SPEC §4 states. State: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v).
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__()
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    @staticmethod
    def _fresh(param: torch.Tensor) -> dict[str, Any]:
        return {
            "step": _new_step(),
            "exp_avg": torch.zeros_like(param, dtype=torch.float32),
            "exp_avg_sq": torch.zeros_like(param, dtype=torch.float32),
        }

    def direction(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = self._fresh(param)
        st["step"] += 1
        t = int(st["step"])
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bc1 = 1 - self.beta1**t
        bc2 = 1 - self.beta2**t
        denom = _sqrt_correctly_rounded_(v / bc2).add_(self.eps)
        u = (m / bc1).div_(denom)
        if self.weight_decay:
            u.add_(param.detach(), alpha=self.weight_decay)
        return u

    def fused(
        self, key: Any, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        st = self.state.get(key)
        if st is None:
            st = self._fresh(param)
        if not kernels.available(param, grad, st["exp_avg"], st["exp_avg_sq"]):
            return None
        self.state[key] = st
        st["step"] += 1
        return kernels.adam(
            param,
            grad,
            st["exp_avg"],
            st["exp_avg_sq"],
            signs,
            lr=lr,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            step=int(st["step"]),
            weight_decay=self.weight_decay,
        )


def _sqrt_correctly_rounded_(x: torch.Tensor) -> torch.Tensor:
    """IEEE square root in place (the correctly rounded float32 result, as CUDA and C's sqrtf give).

    torch's vectorised CPU sqrt is not correctly rounded (on this project's machines 0.7% of float32
    results are one unit in the last place off, and which ones depends on the CPU's vector width), so
    on the CPU the root is taken in float64 and rounded once to float32, which is exact: the rule is
    then the same on every machine and bit-identical to the fused kernels.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return x.copy_(x.double().sqrt_())
    return x.sqrt_()


def make_rule(
    optimizer: str,
    *,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    adamw_weight_decay: float = 0.1,
) -> UpdateRule:
    """The rule for an optimizer name (``sgd``, ``momentum``, ``adam``, ``adamw``)."""
    if optimizer == "sgd":
        return SGDRule()
    if optimizer == "momentum":
        return MomentumRule(momentum)
    if optimizer == "adam":
        return AdamRule(beta1, beta2, eps, 0.0)
    if optimizer == "adamw":
        return AdamRule(beta1, beta2, eps, adamw_weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r} (choose from {', '.join(OPTIMIZERS)})")


@torch.no_grad()
def apply_update(
    rule: UpdateRule,
    key: Any,
    param: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    reference: SignReference | None = None,
    *,
    fused: bool = True,
    select: Callable[[torch.Tensor, torch.Tensor, dict[str, Any] | None], int] | None = None,
    fused_select: Callable[[UpdateRule, Any, torch.Tensor, torch.Tensor, float], int | None] | None = None,
) -> int | torch.Tensor | None:
    """``θ ← θ − η · mask(u)`` for one parameter: the rule's update ``u`` from ``grad`` (state kept by
    ``rule`` under ``key``), frozen where ``u`` disagrees in sign with ``reference``. Returns how many
    elements were frozen (None when ``param`` has no reference). ``param`` and ``grad`` may be sharded
    (FSDP2 DTensors): the update then works on this rank's shard. This is the one implementation of an
    update; :class:`cnl.optimizer.MaskedOptimizer` calls it for every parameter, in ``cnl train`` too.

    ``select(param, u, state)`` (a method's filter, e.g. MoFO's) zeroes, in place, the elements of ``u``
    that must not move and returns how many; it runs the eager rule, unless ``fused_select(rule, key, param,
    grad, lr)`` (the same filter in fused kernels: MoFO's) takes the whole update and returns the frozen count
    (None: it cannot here)."""
    target, grad = local(param), local(grad)
    masked = reference is not None and param in reference
    n = None
    if fused and select is None:
        n = rule.fused(key, target, grad, reference.raw(param) if masked else None, lr)
    elif fused and fused_select is not None and not masked:
        n = fused_select(rule, key, target, grad, lr)
        if n is not None:
            return n
    if n is None:  # the eager rule: the reference implementation, and the fallback
        u = rule.direction(key, target, grad)
        if masked:
            n = reference.mask_(param, u)
        if select is not None:
            chosen = select(target, u, rule.state.get(key))
            n, masked = (chosen if n is None else n + chosen), True
        target.sub_(u.to(target.dtype), alpha=lr)
    return n if masked else None


class UpdateHooks:
    """What a training method may change in each update, beyond the optimizer's rule and CNL's mask.

    The default changes nothing. :class:`cnl.MaskedOptimizer` asks, for each parameter (``key``: its
    name): ``skip`` (leave it alone entirely: HFT's frozen half), ``adjust_grad_`` (add a penalty's
    gradient: EWC, L2-SP), ``select(key, param, u, state)`` (zero elements of the update in place and
    return how many: MoFO); and before a step taken after the backward pass, ``before_step`` (whole-model
    gradient edits: A-GEM's projection). ``freezes``: the hooks can leave elements unmoved (the
    optimizer's frozen count then means something for a method without a mask).
    """

    freezes: bool = False
    select: Callable[[Any, torch.Tensor, torch.Tensor, dict[str, Any] | None], int] | None = None
    #: ``select`` done inside fused kernels: ``fused_select(name, rule, key, param, grad, lr)`` makes the whole
    #: update and returns the frozen count, bit-identical to the rule followed by ``select``; None: cannot.
    fused_select: Callable[[Any, UpdateRule, Any, torch.Tensor, torch.Tensor, float], int | None] | None = None

    def skip(self, key: Any) -> bool:
        return False

    def adjust_grad_(self, key: Any, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Change ``grad`` (the local shard of ``param``'s gradient) in place before the rule sees it."""

    def before_step(self, params: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Edit the accumulated ``.grad`` of all parameters before they update (not in the backward pass)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for ``--resume`` (tensors allowed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@contextlib.contextmanager
def sparse_embedding_grads(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Let a tied input embedding produce a sparse gradient (only the rows of the prompt's tokens).

    With tied embeddings the output head already holds a dense gradient for the shared weight; the
    embedding's own contribution would be a second dense tensor of the same size. As a sparse
    tensor it is added in place, so the backward pass keeps one embedding-sized buffer instead of
    two. The sum is the same up to float summation order.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(emb, torch.nn.Embedding) and head is not None and head.weight is emb.weight
    # untied: a sparse gradient would only be densified again in the update; frozen (LoRA): no gradient
    if not enabled or not tied or not emb.weight.requires_grad:
        yield
        return
    before = emb.sparse
    emb.sparse = True
    try:
        yield
    finally:
        emb.sparse = before
