"""The CNL mask: update an element only where the update direction agrees with the reference.

This module is the method's core and knows nothing of data, models or the command line. The rule
(SPEC §4) compares a *direction* d (the gradient for SGD, the momentum buffer, or Adam's update) with
a *reference* gradient r (the mean gradient over the mastered set) element by element:

    keep where d · r >= 0,  freeze where d · r < 0

so an element where either factor is exactly zero is updated. Only the sign of r matters, so
:class:`SignReference` stores it in two bit-planes (1/4 byte per element; ``"int8"`` storage is one
byte and faster to read) instead of a 4-byte float, and reproduces the full-precision rule exactly,
zeros included.

Use it in any training loop, with any parameter set::

    ref = SignReference()
    for p in model.parameters():          # after accumulating the mastered-set gradient in p.grad
        ref.set(p, p.grad)
    model.zero_grad()
    loss.backward()                         # gradient of a new sample
    for p in model.parameters():
        ref.mask_(p, p.grad)                # plain SGD: the direction is the gradient
    optimizer.step()

and :class:`MaskedOptimizer` applies the rule to the update of any ``torch.optim`` optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["cnl_conflict", "cnl_masked", "SignReference", "MaskedOptimizer"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def cnl_conflict(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Boolean tensor, True where ``direction · reference < 0`` (the element stays frozen).

    Written with comparisons rather than a product so that it is exact for any magnitudes (a float
    product of two tiny values can underflow to zero and flip the decision).
    """
    return ((direction > 0) & (reference < 0)) | ((direction < 0) & (reference > 0))


def cnl_masked(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[direction · reference >= 0] ⊙ direction``: the full-precision CNL rule, as a new tensor."""
    return direction.masked_fill(cnl_conflict(direction, reference), 0)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8 (8 elements per byte)."""
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, numel: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_pack`."""
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(1) & weights) != 0
    return bits.reshape(-1)[:numel].view(shape)


class SignReference:
    """Sign (-1, 0, +1) of a reference gradient for a set of tensors, stored compactly.

    Keys are the parameter tensors themselves (any hashable key works), so one object serves a
    whole model, a LoRA adapter or a hand-picked subset.

    Args:
        storage: ``"bits"`` (two bit-planes: 0.25 byte per element) or ``"int8"`` (one byte per
            element, a little faster to read).
    """

    def __init__(self, storage: str = "bits") -> None:
        if storage not in ("bits", "int8"):
            raise ValueError(f"storage must be 'bits' or 'int8', got {storage!r}")
        self.storage = storage
        self._signs: dict[Any, tuple[Any, ...]] = {}

    @classmethod
    def from_tensors(cls, items: Iterable[tuple[Any, torch.Tensor]], storage: str = "bits") -> SignReference:
        """Build from ``(key, reference tensor)`` pairs."""
        ref = cls(storage)
        for key, t in items:
            ref.set(key, t)
        return ref

    def set(self, key: Any, reference: torch.Tensor) -> None:
        """Store the sign of ``reference`` under ``key`` (the tensor itself is not kept)."""
        if self.storage == "int8":
            self._signs[key] = (torch.sign(reference).to(torch.int8),)
        else:
            self._signs[key] = (
                _pack(reference > 0),
                _pack(reference < 0),
                reference.numel(),
                reference.shape,
            )

    def __contains__(self, key: Any) -> bool:
        return key in self._signs

    def __len__(self) -> int:
        return len(self._signs)

    def keys(self) -> list[Any]:
        """The keys with a stored sign."""
        return list(self._signs)

    def positive_negative(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean tensors ``(reference > 0, reference < 0)`` for ``key``."""
        entry = self._signs[key]
        if self.storage == "int8":
            s = entry[0]
            return s > 0, s < 0
        pos, neg, numel, shape = entry
        return _unpack(pos, numel, shape), _unpack(neg, numel, shape)

    def sign(self, key: Any) -> torch.Tensor:
        """The stored sign as an int8 tensor of -1, 0, +1."""
        pos, neg = self.positive_negative(key)
        return pos.to(torch.int8) - neg.to(torch.int8)

    def conflict(self, key: Any, direction: torch.Tensor) -> torch.Tensor:
        """True where ``direction · reference < 0``, exactly as :func:`cnl_conflict`."""
        pos, neg = self.positive_negative(key)
        return ((direction > 0) & neg) | ((direction < 0) & pos)

    def mask_(self, key: Any, direction: torch.Tensor) -> torch.Tensor:
        """Zero, in place, the elements of ``direction`` that conflict; return how many (a 0-d tensor).

        The count stays on the tensor's device so that callers can sum it without a sync per call.
        """
        conflict = self.conflict(key, direction)
        direction.masked_fill_(conflict, 0)
        return conflict.sum()

    def nbytes(self) -> int:
        """Bytes held by the stored signs."""
        total = 0
        for entry in self._signs.values():
            total += sum(t.numel() * t.element_size() for t in entry if isinstance(t, torch.Tensor))
        return total

    def state_dict(self) -> dict[str, Any]:
        """Signs in a form ``torch.save`` can store; keys are replaced by their insertion index."""
        return {"storage": self.storage, "signs": [self._signs[k] for k in self._signs]}

    def load_state_dict(self, state: dict[str, Any], keys: list[Any]) -> None:
        """Restore from :meth:`state_dict` given the keys in the same order."""
        self.storage = state["storage"]
        self._signs = dict(zip(keys, state["signs"], strict=True))


class MaskedOptimizer:
    """Apply the CNL rule to the update of any ``torch.optim`` optimizer.

    The wrapped optimizer steps as usual (its state, e.g. Adam's moments, is built from the
    unmasked gradients, as SPEC §4 says); then every element whose update *u* (the step is
    ``θ ← θ − η u``) satisfies ``u · reference < 0`` is put back to its value before the step.
    Since the step moves ``θ`` by ``−η u``, that is where the change agrees in sign with the
    reference. It costs a copy of the parameters during the step; the built-in rules of
    :mod:`cnl.optim` avoid that and are what ``cnl train`` uses.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, reference: SignReference) -> None:
        self.optimizer = optimizer
        self.reference = reference
        self.last_masked = 0

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step with the conflicting elements left unchanged."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p in self.reference]
        before = [p.detach().clone() for p in params]
        self.optimizer.step()
        masked = 0
        for p, old in zip(params, before, strict=True):
            change = p - old  # = -lr * u
            conflict = self.reference.conflict(p, -change)
            p.copy_(torch.where(conflict, old, p))
            masked += int(conflict.sum())
        self.last_masked = masked

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forward to the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
