"""Update rules of SPEC §4, applied one parameter at a time, optionally during the backward pass.

Every method of ``cnl train`` shares these pieces:

- an :class:`UpdateRule` turns a parameter's gradient into an update direction ``u`` (``θ ← θ − η u``)
  and owns its optimizer state: plain SGD (``u = g``), momentum (``v ← 0.9 v + g``, ``u = v``), Adam
  (bias-corrected, ``u = m̂ / (√v̂ + ε)``) and AdamW (``u = m̂ / (√v̂ + ε) + λ θ``). The state always
  comes from the *unmasked* gradient;
- :class:`ParameterUpdater` applies the rule, then the CNL mask (when a
  :class:`~cnl.mask.SignReference` is set) to ``u``, then ``θ ← θ − η u``. Registered as
  post-accumulate-grad hooks, it updates each parameter as soon as its gradient is complete and frees
  that gradient at once, so no full gradient copy ever stays alive (optimizer-in-backward).
  Tied weights (an embedding shared with the output head) are one tensor with one hook that fires
  once, after both uses have added their gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from . import kernels
from .distributed import local
from .kernels.cpu import in_backward
from .mask import SignReference

__all__ = [
    "sparse_embedding_grads",
    "UpdateRule",
    "SGDRule",
    "MomentumRule",
    "AdamRule",
    "make_rule",
    "ParameterUpdater",
    "apply_update",
    "UpdateHooks",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


class UpdateRule:
    """Maps a gradient to an update direction; owns the optimizer state of each parameter."""

    #: True when :meth:`direction` returns the gradient tensor itself (no state, may be masked in place).
    returns_grad = False

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def direction(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The update direction ``u`` (a tensor the caller may modify) for one parameter."""
        raise NotImplementedError

    def fused(
        self, name: str, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        """Update the state and ``param`` in one fused pass (:mod:`cnl.kernels`) and return the frozen
        count, or return None (nothing done) where no kernel applies; the caller then runs the eager rule."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state for checkpoints."""
        return {"state": self.state}

    def load_state_dict(self, sd: dict[str, Any], device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` (tensors moved to ``device``)."""
        self.state = {
            name: {k: (v.to(device) if isinstance(v, torch.Tensor) and device is not None else v) for k, v in s.items()}
            for name, s in sd["state"].items()
        }


class SGDRule(UpdateRule):
    """Plain SGD: ``u = g``."""

    returns_grad = True

    def direction(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def fused(
        self, name: str, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        if signs is None or not kernels.available(param, grad):
            return None  # unmasked SGD is one torch sub_, already a single pass (and multi-threaded)
        return kernels.sgd(param, grad, signs, lr)


class MomentumRule(UpdateRule):
    """Heavy-ball momentum: ``v ← μ v + g`` (unmasked), ``u = v`` (masked copy)."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum

    def direction(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        st = self.state.get(name)
        if st is None:
            # First step: v = g (torch.optim.SGD does the same), in fp32.
            st = self.state[name] = {"v": grad.detach().to(torch.float32, copy=True)}
        else:
            st["v"].mul_(self.momentum).add_(grad)
        return st["v"].clone()

    def fused(
        self, name: str, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        st = self.state.get(name)
        first = st is None
        v = torch.empty_like(param, dtype=torch.float32) if first else st["v"]
        if not kernels.available(param, grad, v):
            return None
        if first:
            st = self.state[name] = {"v": v}
        return kernels.momentum(param, grad, v, signs, lr, self.momentum, first)


class AdamRule(UpdateRule):
    """Adam (and AdamW with ``weight_decay`` > 0): bias-corrected moments from the unmasked gradient.

    ``u = m̂ / (√v̂ + ε)`` plus ``weight_decay · θ`` for AdamW, so the decay term is masked with the
    rest of the update, as SPEC §4 states.
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__()
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay

    def direction(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {
                "step": 0,
                "m": torch.zeros_like(param, dtype=torch.float32),
                "v": torch.zeros_like(param, dtype=torch.float32),
            }
        st["step"] += 1
        t = st["step"]
        m, v = st["m"], st["v"]
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
        self, name: str, param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float
    ) -> int | None:
        st = self.state.get(name)
        if st is None:
            st = {
                "step": 0,
                "m": torch.zeros_like(param, dtype=torch.float32),
                "v": torch.zeros_like(param, dtype=torch.float32),
            }
        if not kernels.available(param, grad, st["m"], st["v"]):
            return None
        self.state[name] = st
        st["step"] += 1
        return kernels.adam(
            param,
            grad,
            st["m"],
            st["v"],
            signs,
            lr=lr,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            step=st["step"],
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
    select: Callable[[Any, torch.Tensor, torch.Tensor, dict[str, Any] | None], int] | None = None,
) -> int | torch.Tensor | None:
    """``θ ← θ − η · mask(u)`` for one parameter: the rule's update ``u`` from ``grad`` (state kept by
    ``rule`` under ``key``), frozen where ``u`` disagrees in sign with ``reference``. Returns how many
    elements were frozen (None when ``param`` has no reference). ``param`` and ``grad`` may be sharded
    (FSDP2 DTensors): the update then works on this rank's shard. This is the one implementation of the
    update that :class:`ParameterUpdater` and :class:`cnl.optimizer.MaskedOptimizer` share.

    ``select(key, param, u, state)`` (another method's filter, e.g. MoFO's) zeroes, in place, the
    elements of ``u`` that must not move and returns how many; it runs the eager rule."""
    target, grad = local(param), local(grad)
    masked = reference is not None and param in reference
    n = None
    if fused and select is None:
        n = rule.fused(key, target, grad, reference.raw(param) if masked else None, lr)
    if n is None:  # the eager rule: the reference implementation, and the fallback
        u = rule.direction(key, target, grad)
        if masked:
            n = reference.mask_(param, u)
        if select is not None:
            chosen = select(key, target, u, rule.state.get(key))
            n, masked = (chosen if n is None else n + chosen), True
        target.sub_(u.to(target.dtype), alpha=lr)
    return n if masked else None


class UpdateHooks:
    """What a training method may change in each update, beyond the optimizer's rule and CNL's mask.

    The default changes nothing. :class:`ParameterUpdater` asks, for each parameter: ``skip`` (leave it
    alone entirely: HFT's frozen half), ``adjust_grad_`` (add a penalty's gradient: EWC, L2-SP),
    ``select`` (zero elements of the update: MoFO); and before a step taken after the backward pass,
    ``before_step`` (whole-model gradient edits: A-GEM's projection). ``freezes``: the hooks can leave
    elements unmoved, so the updater counts them (``masked_fraction``).
    """

    freezes: bool = False
    select: Callable[[Any, torch.Tensor, torch.Tensor, dict[str, Any] | None], int] | None = None

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


class ParameterUpdater:
    """Applies ``θ ← θ − η · mask(u)`` to named parameters, in the backward pass or after it.

    Args:
        named_params: the trainable parameters (names are used as optimizer-state keys).
        rule: the update rule.
        lr: learning rate η.
        reference: the CNL sign reference; ``None`` means no mask (plain fine-tuning, LoRA, replay).
        fused: use the fused kernels of :mod:`cnl.kernels` where they apply (bit-identical to the eager
            rules, which run otherwise).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        rule: UpdateRule,
        lr: float,
        reference: SignReference | None = None,
        fused: bool = True,
    ) -> None:
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        self.fused = fused
        self.names = {p: n for n, p in self.params}
        self.rule = rule
        self.lr = lr
        self.reference = reference
        self.enabled = True
        self.hooks: UpdateHooks | None = None
        self.n_elements = sum(p.numel() for _, p in self.params)
        self._masked: torch.Tensor | None = None
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ the update of one parameter
    @torch.no_grad()
    def update(self, param: torch.Tensor) -> None:
        """Update one parameter from its ``.grad`` and free that gradient."""
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:  # an untied embedding under sparse_embedding_grads
            grad = grad.to_dense()
        name = self.names[param]
        hooks = self.hooks
        if hooks is not None and hooks.skip(name):
            n: Any = local(param).numel()
        else:
            if hooks is not None:
                hooks.adjust_grad_(name, param, local(grad))
            select = hooks.select if hooks is not None else None
            n = apply_update(self.rule, name, param, grad, self.lr, self.reference, fused=self.fused, select=select)
        if n is not None:
            self._masked = n if self._masked is None else self._masked + n
        param.grad = None

    @property
    def counts_frozen(self) -> bool:
        """Whether elements can stay unmoved (CNL's mask, or a method's hooks), so the fraction means something."""
        return self.reference is not None or (self.hooks is not None and self.hooks.freezes)

    def step(self) -> None:
        """Update every parameter from its accumulated ``.grad`` (when not in-backward)."""
        if self.hooks is not None:
            self.hooks.before_step(self.params)
        for _, p in self.params:
            self.update(p)

    # ------------------------------------------------------------------ optimizer-in-backward hooks
    def attach(self) -> None:
        """Register post-accumulate-grad hooks so each parameter updates as its gradient is ready."""
        if self._handles:
            return

        def hook(p: torch.Tensor) -> None:
            if self.enabled:
                with in_backward():  # the fused CPU kernels split fewer tensors across threads here
                    self.update(p)

        for _, p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        """Remove the hooks (gradients then accumulate in ``.grad`` as usual)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @contextlib.contextmanager
    def hooked(self, enabled: bool = True) -> Iterator[ParameterUpdater]:
        """Hooks attached for the block (when ``enabled``), removed afterwards whatever happens."""
        if enabled:
            self.attach()
        try:
            yield self
        finally:
            self.detach()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hooks stay registered but update nothing (e.g. while a reference gradient accumulates)."""
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    def pop_masked(self) -> int:
        """Elements masked since the last call (summed across parameters and steps)."""
        n = 0 if self._masked is None else int(self._masked)
        self._masked = None
        return n


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
