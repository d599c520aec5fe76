""":class:`MaskedOptimizer`: the CNL mask as a real ``torch.optim.Optimizer``, for any training loop.

Wrap the optimizer you already build (``torch.optim.SGD``, with or without momentum, ``Adam`` or
``AdamW``) and hand the wrapper to your loop, an LR scheduler or a Trainer::

    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1))
    opt.reference = cnl.reference_from(model, mastered_examples)   # and again whenever you like
    ...
    loss.backward(); opt.step(); opt.zero_grad()

Each step is ``θ ← θ − η · [u ⊙ r ≥ 0] ⊙ u``, where ``u`` is the update the wrapped optimizer's own
algorithm would apply and ``r`` the stored reference sign: conflicting elements stay exactly where
they are, every other element moves exactly as the unmasked rule moves it. The arithmetic is
:func:`cnl.optim.apply_update`, the one implementation ``cnl train`` uses too (fused one-pass kernels
on float32 CPU/CUDA tensors, eager torch ops otherwise), so the optimizer state (momentum, Adam's
moments) is built from the *unmasked* gradient, as SPEC §4 says, and nothing is copied: no parameter
snapshot, no full-size temporary on the fused path.

Why a wrapper rather than a new optimizer class: users (and Trainers) configure torch's optimizers;
reading the hyperparameters from the wrapped optimizer's ``param_groups`` at every step keeps every
tool that edits them (LR schedulers, warm-up, per-group learning rates) working unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch

from .distributed import local
from .mask import SignReference
from .optim import UpdateRule, apply_update, make_rule

__all__ = ["MaskedOptimizer", "rule_spec"]

#: Per-parameter state keys of cnl's rules (:mod:`cnl.optim`): Adam's ``step``, ``m``, ``v``; momentum's ``v``.
_TORCH_TO_CNL = {"exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "v"}


def _scalar(x: Any) -> float:
    """A hyperparameter as a float (torch allows 1-element tensors for lr and betas)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def rule_spec(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The cnl rule (name and :func:`cnl.optim.make_rule` keyword arguments) that computes the same
    update as ``optimizer`` does for ``group``, or a ValueError naming what cnl cannot reproduce.

    Only options that change the mathematics are checked; ``foreach``, ``fused`` and ``capturable``
    select one of torch's implementations, which cnl's own kernels replace.
    """
    name = type(optimizer).__name__
    if isinstance(optimizer, MaskedOptimizer):
        raise ValueError("the optimizer is already a MaskedOptimizer")
    if group.get("maximize", False):
        raise ValueError(f"{name}(maximize=True) is not supported by MaskedOptimizer")
    if group.get("differentiable", False):
        raise ValueError(f"{name}(differentiable=True) is not supported by MaskedOptimizer")
    if isinstance(optimizer, torch.optim.SGD):
        if _scalar(group.get("weight_decay", 0.0)) != 0.0:
            raise ValueError(
                "torch.optim.SGD with weight_decay (an L2 term added to the gradient) is not supported by "
                "MaskedOptimizer; use weight_decay=0 (or AdamW for decoupled weight decay)"
            )
        momentum = _scalar(group.get("momentum", 0.0))
        if momentum == 0.0:
            return "sgd", {}
        if _scalar(group.get("dampening", 0.0)) != 0.0 or group.get("nesterov", False):
            raise ValueError(
                f"torch.optim.SGD(dampening={group.get('dampening')}, nesterov={group.get('nesterov')}) is not "
                "supported by MaskedOptimizer: momentum needs dampening=0 and nesterov=False"
            )
        return "momentum", {"momentum": momentum}
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass of Adam in torch >= 2.6
        if group.get("amsgrad", False):
            raise ValueError(f"{name}(amsgrad=True) is not supported by MaskedOptimizer")
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        kwargs = {"beta1": beta1, "beta2": beta2, "eps": _scalar(group["eps"])}
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        weight_decay = _scalar(group.get("weight_decay", 0.0))
        if decoupled:
            return "adamw", {**kwargs, "adamw_weight_decay": weight_decay}
        if weight_decay != 0.0:
            raise ValueError(
                "torch.optim.Adam with weight_decay (an L2 term added to the gradient) is not supported by "
                "MaskedOptimizer; use torch.optim.AdamW for decoupled weight decay"
            )
        return "adam", kwargs
    raise ValueError(
        f"MaskedOptimizer wraps torch.optim.SGD (with or without momentum), Adam and AdamW; got {name}. "
        "Wrap the torch optimizer itself (e.g. accelerate's AcceleratedOptimizer.optimizer)"
    )


def _cnl_state(kind: str, state: dict[str, Any]) -> dict[str, Any] | None:
    """Per-parameter state in cnl's layout, converted from torch's (``exp_avg``, ``momentum_buffer``, a
    tensor ``step``) when needed, so that an optimizer that already took steps can be wrapped, and a
    plain optimizer's checkpoint loaded. None when nothing is worth keeping."""
    if kind == "sgd":
        return None
    out: dict[str, Any] = {}
    for k, v in state.items():
        k = _TORCH_TO_CNL.get(k, k)
        if v is None:
            continue
        if k == "step":
            out[k] = int(_scalar(v))
        elif k in ("m", "v") and isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.float32).contiguous()  # cnl keeps moments in float32
    needed = ("v",) if kind == "momentum" else ("step", "m", "v")
    return out if all(k in out for k in needed) else None


class MaskedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim`` optimizer whose every update is masked by a CNL sign reference.

    Args:
        optimizer: a ``torch.optim.SGD`` (momentum 0, or momentum with dampening 0 and nesterov
            False), ``Adam`` (weight_decay 0, amsgrad False) or ``AdamW`` (its weight_decay is cnl's
            decoupled λ in ``u = m̂/(√v̂+ε) + λθ``: masked with the rest of the update). Anything cnl
            cannot reproduce exactly is refused with a ValueError. The wrapper *shares* its
            ``param_groups`` list, so schedulers and code holding either object see the same learning
            rates. The wrapped optimizer's own ``step`` is never called again; state it already has is
            taken over.
        reference: the sign reference (:class:`cnl.mask.SignReference`, keyed by the parameters, e.g.
            from :func:`cnl.reference_from`). ``None``: no mask, the plain update (identical to cnl's
            unmasked rule). Replace it between steps with ``opt.reference = new_reference``; parameters
            without a stored sign are updated unmasked.
        fused: use cnl's fused kernels where they apply (bit-identical to the eager rules; False forces
            the eager torch ops).

    ``state`` is this optimizer's own per-parameter state (cnl's layout: ``step``, ``m``, ``v`` for
    Adam(W), ``v`` for momentum), so ``state_dict()`` / ``load_state_dict()`` checkpoint it, together
    with the reference's signs under ``"cnl_reference"``.

    Arithmetic: the same mathematics as torch's implementation, evaluated as ``cnl train`` evaluates
    it (bias-corrected ``m̂ / (√v̂ + ε)`` with a correctly rounded square root, weight decay inside
    ``u``), so an unmasked step agrees with torch's to float rounding, and with ``cnl train``'s rules
    bit for bit.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reference: SignReference | None = None,
        *,
        fused: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MaskedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        kinds = [rule_spec(optimizer, g)[0] for g in optimizer.param_groups]  # refuse before touching anything
        groups = optimizer.param_groups
        # Optimizer.__init__ validates the groups and sets up the hook registries; the group dicts it
        # keeps are the wrapped optimizer's own, and the list itself is then shared as well.
        super().__init__(groups, optimizer.defaults)
        self.param_groups = groups
        self.optimizer = optimizer
        self.reference = reference
        self.fused = fused
        for kind, group in zip(kinds, groups, strict=True):
            for p in group["params"]:
                st = _cnl_state(kind, optimizer.state.get(p, {}))
                if st is not None:
                    self.state[p] = st
        self._last_masked: int | torch.Tensor = 0
        self._last_elements = 0
        self._window_masked: int | torch.Tensor = 0
        self._window_elements = 0

    def __repr__(self) -> str:
        ref = "None" if self.reference is None else f"SignReference({len(self.reference)} tensors)"
        return f"MaskedOptimizer({self.optimizer!r}, reference={ref})"

    # ------------------------------------------------------------------------------------------ step
    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        """The group's rule with its *current* hyperparameters, reading and writing ``self.state``."""
        kind, kwargs = rule_spec(self.optimizer, group)
        rule = make_rule(kind, **kwargs)
        rule.state = self.state  # the rules key their state by whatever key they are given: the parameter
        return rule

    def _params(self) -> Iterator[torch.Tensor]:
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One masked update of every parameter that has a gradient; returns ``closure()``'s loss.

        Elements where the update ``u`` disagrees in sign with the reference stay frozen; the state
        (momentum, moments, Adam's step count) advances from the unmasked gradient for all of them.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reference = self.reference
        masked: int | torch.Tensor = 0
        elements = 0
        with torch.no_grad():
            for group in self.param_groups:
                rule = self._rule(group)
                lr = _scalar(group["lr"])
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    if grad.is_sparse:
                        grad = grad.to_dense()
                    if p in self.state and not self.state[p]:
                        del self.state[p]  # an empty entry (a defaultdict lookup by someone) means "no state yet"
                    n = apply_update(rule, p, p, grad, lr, reference, fused=self.fused)
                    if n is not None:
                        masked = masked + n
                        elements += local(p).numel()
        self._last_masked, self._last_elements = masked, elements
        self._window_masked = self._window_masked + masked
        self._window_elements += elements
        return loss

    # ------------------------------------------------------------------------------------------ logging
    @property
    def last_masked(self) -> int:
        """Elements frozen by the mask in the last step (0 without a reference)."""
        return int(self._last_masked)

    @property
    def last_masked_fraction(self) -> float:
        """Share of the referenced elements frozen in the last step (0.0 when none was updated)."""
        return int(self._last_masked) / self._last_elements if self._last_elements else 0.0

    def pop_masked_fraction(self) -> float | None:
        """Share of the referenced elements frozen over all steps since the previous call (for logging:
        frozen element-updates / element-updates), and reset; None when no masked update happened.

        Counts stay on the device between calls, so logging every N steps costs one sync per N steps.
        """
        if not self._window_elements:
            return None
        fraction = int(self._window_masked) / self._window_elements
        self._window_masked, self._window_elements = 0, 0
        return fraction

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (parameters by index), plus ``"cnl_reference"``: the storage and,
        for each parameter with a stored sign, its index, packed signs and shape."""
        sd = super().state_dict()
        ref = self.reference
        if ref is not None:
            index = {p: i for i, p in enumerate(self._params())}
            entries = [
                (index[k], data, list(shape))
                for k, (data, shape) in zip(ref.keys(), ref.state_dict()["signs"], strict=True)
                if k in index
            ]
            sd["cnl_reference"] = {
                "storage": ref.storage,
                "params": [i for i, _, _ in entries],
                "signs": [d for _, d, _ in entries],
                "shapes": [s for _, _, s in entries],
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (or a plain torch SGD/Adam/AdamW state dict of the same parameters,
        whose state is converted). The reference is restored when the dict holds one, else kept."""
        state_dict = dict(state_dict)
        saved_ref = state_dict.pop("cnl_reference", None)
        groups = self.param_groups
        super().load_state_dict(state_dict)
        # torch rebuilds the group dicts: copy the loaded values into the shared ones instead
        for group, loaded in zip(groups, self.param_groups, strict=True):
            group.update(loaded)
        self.param_groups = groups
        # torch casts floating state to the parameter's dtype; cnl keeps its moments in float32
        params = list(self._params())
        kinds = [rule_spec(self.optimizer, g)[0] for g in groups]
        kind_of = {p: kind for kind, g in zip(kinds, groups, strict=True) for p in g["params"]}
        for pid, saved in state_dict["state"].items():
            if isinstance(pid, int) and 0 <= pid < len(params):
                p = params[pid]
                st = _cnl_state(kind_of[p], saved)
                if st is None:
                    self.state.pop(p, None)
                else:
                    self.state[p] = {
                        k: v.to(local(p).device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()
                    }
        if saved_ref is not None:
            ref = SignReference(saved_ref["storage"])
            keys = [params[i] for i in saved_ref["params"]]
            signs = [
                (data.to(local(p).device), torch.Size(shape))
                for p, data, shape in zip(keys, saved_ref["signs"], saved_ref["shapes"], strict=True)
            ]
            ref.load_state_dict({"storage": saved_ref["storage"], "signs": signs}, keys)
            self.reference = ref
