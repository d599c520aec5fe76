"""The CNL mask: update an element only where the update direction agrees with the reference.

This module is the method's core and knows nothing of data, models or the command line. The rule
(SPEC §4) compares a *direction* d (the gradient for SGD, the momentum buffer, or Adam's update) with
a *reference* gradient r (the mean gradient over the mastered set) element by element:

    keep where d · r >= 0,  freeze where d · r < 0

so an element where either factor is exactly zero is updated. Only the sign of r matters, so
:class:`SignReference` stores it as 2-bit codes (1/4 byte per element; ``"int8"`` storage is one
byte) instead of a 4-byte float, and reproduces the full-precision rule exactly,
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

and :class:`cnl.MaskedOptimizer` (:mod:`cnl.optimizer`, built on this module) applies the rule to the
update of torch's SGD, Adam and AdamW as a real ``torch.optim.Optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SIGN_STORAGES", "cnl_conflict", "cnl_masked", "SignReference"]

#: How a :class:`SignReference` stores signs: 2-bit codes (0.25 byte per element) or one int8 each.
SIGN_STORAGES = ("bits", "int8")

#: Elements handled per slice when masking on the CPU: temporaries stay small (cache-friendly, and
#: the peak memory of a masked update does not grow with the size of the largest parameter). A
#: multiple of :data:`BLOCK`. On a GPU a whole tensor is one slice (a fixed number of launches).
CHUNK = 1 << 20

#: The ``bits`` storage packs 2-bit codes (0 -> 0, 1 -> +1, 2 -> -1) in blocks of BLOCK elements held
#: by BLOCK // 4 bytes: byte j of a block carries elements j, 64 + j, 128 + j and 192 + j in its bit
#: pairs 0-1, 2-3, 4-5 and 6-7, so that a fused kernel decodes 64 consecutive elements with one
#: vector shift (:mod:`cnl.kernels`).
BLOCK = 256
_BYTES = BLOCK // 4
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)
_CODE_TO_SIGN = torch.tensor([0, 1, -1, 0], dtype=torch.int8)
_DEVICE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding table and the shifts on ``device``, copied there once (no host sync per call)."""
    tables = _DEVICE_TABLES.get(device)
    if tables is None:
        tables = _DEVICE_TABLES[device] = (_CODE_TO_SIGN.to(device), _SHIFTS.to(device))
    return tables


def _chunk(t: torch.Tensor) -> int:
    return max(t.numel(), 1) if t.device.type != "cpu" else CHUNK


def cnl_conflict(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Boolean tensor, True where ``direction · reference < 0`` (the element stays frozen).

    Written with comparisons rather than a product so that it is exact for any magnitudes (a float
    product of two tiny values can underflow to zero and flip the decision).
    """
    return ((direction > 0) & (reference < 0)) | ((direction < 0) & (reference > 0))


def cnl_masked(direction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``[direction · reference >= 0] ⊙ direction``: the full-precision CNL rule, as a new tensor."""
    return direction.masked_fill(cnl_conflict(direction, reference), 0)


def _pack_signs(reference: torch.Tensor) -> torch.Tensor:
    """Signs of ``reference`` as blocked 2-bit codes (see :data:`BLOCK`), zero-padded to whole blocks."""
    flat = reference.detach().reshape(-1)
    n_blocks = -(-flat.numel() // BLOCK)
    out = torch.empty(n_blocks * _BYTES, dtype=torch.uint8, device=flat.device)
    shifts = _tables(flat.device)[1]
    step = _chunk(flat)
    for a in range(0, flat.numel(), step):
        part = flat[a : a + step]
        codes = (part > 0).to(torch.uint8) | ((part < 0).to(torch.uint8) << 1)
        pad = (-codes.numel()) % BLOCK
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        packed = (codes.view(-1, 4, _BYTES) << shifts).sum(dim=1, dtype=torch.uint8)
        out[a // 4 : a // 4 + packed.numel()] = packed.view(-1)
    return out


def _unpack_signs(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """int8 signs of elements ``start:stop`` (``start`` a multiple of BLOCK) from :func:`_pack_signs`."""
    lut, shifts = _tables(packed.device)
    rows = packed[start // 4 : -(-stop // BLOCK) * _BYTES].view(-1, 1, _BYTES)
    codes = ((rows >> shifts) & 3).view(-1)[: stop - start]
    return lut[codes.long()]


class SignReference:
    """Sign (-1, 0, +1) of a reference gradient for a set of tensors, stored compactly.

    Keys are the parameter tensors themselves (any hashable key works), so one object serves a
    whole model, a LoRA adapter or a hand-picked subset.

    Args:
        storage: ``"bits"`` (2-bit codes: 0.25 byte per element) or ``"int8"`` (one byte per
            element, no decoding).
    """

    def __init__(self, storage: str = "bits") -> None:
        if storage not in SIGN_STORAGES:
            raise ValueError(f"storage must be one of {', '.join(SIGN_STORAGES)}, got {storage!r}")
        self.storage = storage
        self._signs: dict[Any, tuple[torch.Tensor, torch.Size]] = {}

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
            data = torch.sign(reference.detach()).to(torch.int8).reshape(-1)
        else:
            data = _pack_signs(reference)
        self._signs[key] = (data, reference.shape)

    def __contains__(self, key: Any) -> bool:
        return key in self._signs

    def __len__(self) -> int:
        return len(self._signs)

    def keys(self) -> list[Any]:
        """The keys with a stored sign."""
        return list(self._signs)

    def _slice(self, key: Any, start: int, stop: int) -> torch.Tensor:
        data, _ = self._signs[key]
        if self.storage == "int8":
            return data[start:stop]
        return _unpack_signs(data, start, stop)

    def sign(self, key: Any) -> torch.Tensor:
        """The stored sign as an int8 tensor of -1, 0, +1 in the reference's shape."""
        data, shape = self._signs[key]
        n = shape.numel()
        return self._slice(key, 0, n).view(shape).clone()

    def positive_negative(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean tensors ``(reference > 0, reference < 0)`` for ``key``."""
        s = self.sign(key)
        return s > 0, s < 0

    def conflict(self, key: Any, direction: torch.Tensor) -> torch.Tensor:
        """True where ``direction · reference < 0``, exactly as :func:`cnl_conflict`."""
        flat = direction.detach().reshape(-1)
        out = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
        step = _chunk(flat)
        for a in range(0, flat.numel(), step):
            b = min(a + step, flat.numel())
            s = self._slice(key, a, b)
            out[a:b] = cnl_conflict(flat[a:b], s)
        return out.view(direction.shape)

    def mask_(self, key: Any, direction: torch.Tensor) -> torch.Tensor:
        """Zero, in place, the elements of ``direction`` that conflict; return how many (a 0-d tensor).

        Works slice by slice, so the temporaries stay a few megabytes whatever the tensor's size.
        The count stays on the tensor's device so that callers can sum it without a sync per call.
        """
        if not direction.is_contiguous():
            raise ValueError("mask_ needs a contiguous tensor (it zeroes elements in place)")
        flat = direction.view(-1)
        count = torch.zeros((), dtype=torch.int64, device=flat.device)
        step = _chunk(flat)
        for a in range(0, flat.numel(), step):
            b = min(a + step, flat.numel())
            part = flat[a:b]
            # d·s < 0 with s in {-1, 0, 1} is exact in floating point (a sign flip or a zero)
            conflict = (part * self._slice(key, a, b)) < 0
            part.masked_fill_(conflict, 0)
            count += conflict.sum()
        return count

    def raw(self, key: Any) -> tuple[torch.Tensor, str]:
        """The stored data of ``key`` (blocked 2-bit codes or int8 signs, flat) and the storage name,
        for the fused kernels of :mod:`cnl.kernels`."""
        return self._signs[key][0], self.storage

    def nbytes(self) -> int:
        """Bytes held by the stored signs."""
        return sum(data.numel() * data.element_size() for data, _ in self._signs.values())

    def state_dict(self) -> dict[str, Any]:
        """Signs in a form ``torch.save`` can store; keys are replaced by their insertion index."""
        return {"storage": self.storage, "signs": [self._signs[k] for k in self._signs]}

    def load_state_dict(self, state: dict[str, Any], keys: list[Any]) -> None:
        """Restore from :meth:`state_dict` given the keys in the same order."""
        self.storage = state["storage"]
        self._signs = dict(zip(keys, state["signs"], strict=True))
