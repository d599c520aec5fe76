""":class:`MaskedOptimizer`: the CNL mask as a real ``torch.optim.Optimizer``, for any training loop,
and the one optimizer of ``cnl train``.

Wrap the optimizer you already build (``torch.optim.SGD``, with or without momentum, ``Adam`` or
``AdamW``) and hand the wrapper to your loop, an LR scheduler or a Trainer::

    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1))
    opt.reference = cnl.reference_from(model, mastered_examples)   # and again whenever you like
    ...
    loss.backward(); opt.step(); opt.zero_grad()

Each step is ``θ ← θ − η · [u ⊙ r ≥ 0] ⊙ u``, where ``u`` is the update the wrapped optimizer's own
algorithm would apply and ``r`` the stored reference sign: conflicting elements stay exactly where
they are, every other element moves exactly as the unmasked rule moves it. The arithmetic is
:func:`cnl.optim.apply_update` (fused one-pass kernels on float32 CPU/CUDA tensors, eager torch ops
otherwise), so the optimizer state (momentum, Adam's moments) is built from the *unmasked* gradient, as
SPEC §4 says, and nothing is copied: no parameter snapshot, no full-size temporary on the fused path.

``cnl train`` uses this same class, in the way torchtune runs an optimizer in the backward pass:
:meth:`MaskedOptimizer.in_backward` registers post-accumulate-grad hooks that update each parameter as
soon as its gradient is complete and free that gradient at once (no full gradient copy stays alive),
with ordinary per-parameter optimizer state. So there is one state layout (torch's own keys:
``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``, moments in float32), one ``state_dict`` (a
run's checkpoint loads into a ``MaskedOptimizer`` of your own, and back), one count of frozen elements,
and a training method's :class:`~cnl.optim.UpdateHooks` (HFT, MoFO, EWC, A-GEM) work with both.

Why a wrapper rather than a new optimizer class: users (and Trainers) configure torch's optimizers;
reading the hyperparameters from the wrapped optimizer's ``param_groups`` at every step keeps every
tool that edits them (LR schedulers, warm-up, per-group learning rates) working unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

import torch

from .distributed import local
from .kernels.cpu import in_backward as kernels_in_backward
from .mask import SignReference
from .optim import OPTIMIZERS, UpdateHooks, UpdateRule, apply_update, make_rule

__all__ = ["MaskedOptimizer", "rule_spec", "build_optimizer"]

#: Torch's per-parameter state keys, and the keys cnl's rules used before they took torch's layout
#: (old checkpoints): Adam's ``m``/``v``, momentum's ``v``.
_OLD_KEYS = {"adam": {"m": "exp_avg", "v": "exp_avg_sq"}, "momentum": {"v": "momentum_buffer"}}
_NEEDED = {"momentum": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq")}


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
    for base in (torch.optim.SGD, torch.optim.Adam):  # AdamW is an Adam with Adam's step
        # (torch wraps a class's step for its profiler once an instance exists: compare what is wrapped)
        if isinstance(optimizer, base) and inspect.unwrap(type(optimizer).step) is not inspect.unwrap(base.step):
            cls = type(optimizer)
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} overrides step(), which MaskedOptimizer would not run (it "
                f"applies torch's own {base.__name__} rule); wrap a torch.optim.{base.__name__} instead"
            )
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


def _cnl_state(kind: str, state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Per-parameter state in the shared layout (torch's keys; moments in float32; ``step`` a float32
    scalar tensor on the CPU), from torch's own state, a run's checkpoint, or cnl's former layout
    (``m``/``v``, an int step), so that an optimizer that already took steps can be wrapped and any of
    these state dicts loaded. None when nothing is worth keeping (plain SGD has no state)."""
    if kind == "sgd":
        return None
    family = "momentum" if kind == "momentum" else "adam"
    rename = _OLD_KEYS[family]
    out: dict[str, Any] = {}
    for k, v in state.items():
        k = rename.get(k, k)
        if v is None:
            continue
        if k == "step":
            out[k] = torch.tensor(float(_scalar(v)), dtype=torch.float32)
        elif k in _NEEDED[family] and isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.float32).contiguous()  # moments are kept in float32
    return out if all(k in out for k in _NEEDED[family]) else None


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
        hooks: a training method's per-update changes (:class:`cnl.optim.UpdateHooks`: HFT's frozen
            half, MoFO's filter, EWC's or L2-SP's penalty, A-GEM's projection), called with each
            parameter's name.
        names: each parameter's name for ``hooks`` (default: its index in the param groups, as a string).

    ``state`` is this optimizer's own per-parameter state, in torch's layout (``step``, ``exp_avg``,
    ``exp_avg_sq`` for Adam(W), ``momentum_buffer`` for momentum; moments in float32), so
    ``state_dict()`` / ``load_state_dict()`` checkpoint it, together with the reference's signs under
    ``"cnl_reference"`` and the hooks' state under ``"cnl_hooks"``.

    Arithmetic: the same mathematics as torch's implementation, evaluated as ``cnl train`` evaluates
    it (bias-corrected ``m̂ / (√v̂ + ε)`` with a correctly rounded square root, weight decay inside
    ``u``), so an unmasked step agrees with torch's to float rounding, and with ``cnl train`` bit for bit.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        reference: SignReference | None = None,
        *,
        fused: bool = True,
        hooks: UpdateHooks | None = None,
        names: Mapping[torch.Tensor, str] | None = None,
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
        self.hooks = hooks
        params = list(self._params())
        self.names: dict[torch.Tensor, str] = (
            {p: str(i) for i, p in enumerate(params)} if names is None else {p: names[p] for p in params}
        )
        self._group_of = {p: g for g in groups for p in g["params"]}
        for kind, group in zip(kinds, groups, strict=True):
            for p in group["params"]:
                st = _cnl_state(kind, optimizer.state.get(p, {}))
                if st is not None:
                    self.state[p] = st
        #: False while paused (:meth:`paused`): the backward-pass hooks then update nothing.
        self.enabled = True
        self._handles: list[Any] = []
        self._last: tuple[int | torch.Tensor, int] = (0, 0)
        self._window: tuple[int | torch.Tensor, int] = (0, 0)

    def __repr__(self) -> str:
        ref = "None" if self.reference is None else f"SignReference({len(self.reference)} tensors)"
        return f"MaskedOptimizer({self.optimizer!r}, reference={ref})"

    def _params(self) -> Iterator[torch.Tensor]:
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (the group is shared with the wrapped optimizer); the new parameters
        are named by their index."""
        super().add_param_group(param_group)
        if hasattr(self, "names"):  # not while Optimizer.__init__ adds the first groups
            for i, p in enumerate(self._params()):
                self.names.setdefault(p, str(i))
            self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` for every parameter, in the param groups' order."""
        return [(self.names[p], p) for p in self._params()]

    # ------------------------------------------------------------------------------------------ step
    def _rule(self, group: dict[str, Any]) -> UpdateRule:
        """The group's rule with its *current* hyperparameters, reading and writing ``self.state``."""
        kind, kwargs = rule_spec(self.optimizer, group)
        rule = make_rule(kind, **kwargs)
        rule.state = self.state  # the rules key their state by the key they are given: the parameter
        return rule

    def _update(self, p: torch.Tensor, rule: UpdateRule, lr: float) -> tuple[int | torch.Tensor, int]:
        """Update one parameter from its ``.grad``; ``(frozen elements, elements)`` of its (local) tensor."""
        grad = p.grad
        if grad.is_sparse:  # an embedding's sparse gradient (cnl train's tied embeddings)
            grad = grad.to_dense()
        if p in self.state and not self.state[p]:
            del self.state[p]  # an empty entry (a defaultdict lookup by someone) means "no state yet"
        elements = local(p).numel()
        hooks, name = self.hooks, self.names[p]
        if hooks is not None and hooks.skip(name):
            return elements, elements
        select = fused_select = None
        if hooks is not None:
            hooks.adjust_grad_(name, p, local(grad))
            if hooks.select is not None:
                select = functools.partial(hooks.select, name)
            if hooks.fused_select is not None:
                fused_select = functools.partial(hooks.fused_select, name)
        n = apply_update(
            rule, p, p, grad, lr, self.reference, fused=self.fused, select=select, fused_select=fused_select
        )
        return (0 if n is None else n), elements

    def _count(self, frozen: int | torch.Tensor, elements: int) -> None:
        f, e = self._window
        self._window = (f + frozen, e + elements)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One masked update of every parameter that has a gradient; returns ``closure()``'s loss.

        Elements where the update ``u`` disagrees in sign with the reference stay frozen; the state
        (momentum, moments, Adam's step count) advances from the unmasked gradient for all of them.
        With hooks, ``before_step`` sees every parameter first (A-GEM's projection).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.hooks is not None:
            self.hooks.before_step(self.named_parameters())
        frozen: int | torch.Tensor = 0
        elements = 0
        for group in self.param_groups:
            rule = self._rule(group)
            lr = _scalar(group["lr"])
            for p in group["params"]:
                if p.grad is not None:
                    f, e = self._update(p, rule, lr)
                    frozen, elements = frozen + f, elements + e
        self._last = (frozen, elements)
        self._count(frozen, elements)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Update one parameter from its ``.grad`` and free that gradient (the backward-pass hook's work)."""
        if p.grad is None:
            return
        group = self._group_of[p]
        self._count(*self._update(p, self._rule(group), _scalar(group["lr"])))
        p.grad = None

    # ------------------------------------------------------------------------------------------ in the backward pass
    @contextlib.contextmanager
    def in_backward(self, enabled: bool = True) -> Iterator[MaskedOptimizer]:
        """For the block, update each parameter inside the backward pass, as soon as its gradient is complete
        (post-accumulate-grad hooks; the gradient is freed at once), instead of in :meth:`step`. Tied
        weights (an embedding shared with the output head) are one tensor whose hook fires once, after both
        uses added their gradient. ``enabled=False``: nothing is attached (``step`` after the backward pass)."""
        if enabled and not self._handles:

            def hook(p: torch.Tensor) -> None:
                if self.enabled:
                    with kernels_in_backward():  # the fused CPU kernels split fewer tensors across threads here
                        self.step_parameter(p)

            self._handles = [p.register_post_accumulate_grad_hook(hook) for p in self._params() if p.requires_grad]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The backward-pass hooks stay registered but update nothing (while a reference gradient accumulates)."""
        before = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = before

    # ------------------------------------------------------------------------------------------ counting
    @property
    def last_masked(self) -> int:
        """Elements frozen in the last :meth:`step` (by the mask, or a method's hooks)."""
        return int(self._last[0])

    @property
    def last_masked_fraction(self) -> float:
        """Share of the elements updated in the last :meth:`step` that stayed frozen (0.0 when none was updated)."""
        frozen, elements = self._last
        return int(frozen) / elements if elements else 0.0

    def pop_counts(self) -> tuple[int, int]:
        """``(frozen, updated)`` element-updates since the previous call (every step and backward-pass
        update counted once per parameter), and reset. Counts stay on the device between calls, so
        reading them every N steps costs one sync per N steps."""
        frozen, elements = self._window
        self._window = (0, 0)
        return int(frozen), elements

    def pop_masked_fraction(self) -> float | None:
        """Share of the element-updates frozen since the previous call (for logging), and reset; None when
        no element was updated."""
        frozen, elements = self.pop_counts()
        return frozen / elements if elements else None

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (parameters by index, torch's keys), plus ``"cnl_reference"`` (the
        storage and, for each parameter with a stored sign, its index, packed signs and shape) and
        ``"cnl_hooks"`` (the hooks' state, when there are hooks)."""
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
        if self.hooks is not None:
            sd["cnl_hooks"] = self.hooks.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (or a plain torch SGD/Adam/AdamW state dict of the same parameters).
        The reference and the hooks' state are restored when the dict holds them, else kept. Every
        state tensor must have its parameter's (local) shape: a ValueError names the one that does not."""
        state_dict = dict(state_dict)
        saved_ref = state_dict.pop("cnl_reference", None)
        saved_hooks = state_dict.pop("cnl_hooks", None)
        params = list(self._params())
        kinds = [rule_spec(self.optimizer, g)[0] for g in self.param_groups]
        kind_of = {p: kind for kind, g in zip(kinds, self.param_groups, strict=True) for p in g["params"]}
        converted: dict[torch.Tensor, dict[str, Any] | None] = {}
        for pid, saved in state_dict.get("state", {}).items():
            i = int(pid)
            if not 0 <= i < len(params):
                raise ValueError(f"optimizer state for parameter index {i}, but there are {len(params)} parameters")
            p = params[i]
            if not isinstance(saved, Mapping):
                raise ValueError(
                    f"optimizer state of parameter {self.names[p]} is {type(saved).__name__}, not a mapping"
                )
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and not value.is_floating_point() and key != "step":
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {self.names[p]} is {value.dtype}, not floating point"
                    )
                if key == "step" and not (isinstance(value, int | float) or getattr(value, "numel", lambda: 0)() == 1):
                    raise ValueError(f"optimizer state 'step' of parameter {self.names[p]} is not one number")
            st = _cnl_state(kind_of[p], saved)
            for key, value in (st or {}).items():
                if key != "step" and tuple(value.shape) != tuple(local(p).shape):
                    raise ValueError(
                        f"optimizer state {key!r} of parameter {self.names[p]} has shape {list(value.shape)}, "
                        f"the parameter {list(local(p).shape)}"
                    )
            converted[p] = st
        groups = self.param_groups
        super().load_state_dict({**state_dict, "state": {}})
        # torch rebuilds the group dicts: copy the loaded values into the shared ones instead
        for group, loaded in zip(groups, self.param_groups, strict=True):
            group.update(loaded)
        self.param_groups = groups
        self._group_of = {p: g for g in groups for p in g["params"]}
        for p, st in converted.items():
            if st is None:
                self.state.pop(p, None)
            else:
                self.state[p] = {k: (v if k == "step" else v.to(local(p).device, copy=True)) for k, v in st.items()}
        if saved_ref is not None:
            ref = SignReference(saved_ref["storage"])
            keys = [params[i] for i in saved_ref["params"]]
            signs = [
                (data.to(local(p).device), torch.Size(shape))
                for p, data, shape in zip(keys, saved_ref["signs"], saved_ref["shapes"], strict=True)
            ]
            ref.load_state_dict({"storage": saved_ref["storage"], "signs": signs}, keys)
            self.reference = ref
        if saved_hooks is not None and self.hooks is not None:
            self.hooks.load_state_dict(saved_hooks)


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    kind: str,
    lr: float,
    *,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    adamw_weight_decay: float = 0.1,
    fused: bool = True,
    hooks: UpdateHooks | None = None,
) -> MaskedOptimizer:
    """The :class:`MaskedOptimizer` of ``cnl train``: torch's optimizer of kind ``kind`` (sgd, momentum,
    adam, adamw: SPEC §4) over the named parameters, wrapped, with no reference yet."""
    named = list(named_params)
    params = [p for _, p in named]
    if kind == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    elif kind == "momentum":
        inner = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif kind == "adam":
        inner = torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps)
    elif kind == "adamw":
        inner = torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=adamw_weight_decay)
    else:
        raise ValueError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")
    return MaskedOptimizer(inner, fused=fused, hooks=hooks, names={p: n for n, p in named})
