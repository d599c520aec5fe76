"""Fused masked updates: one pass per parameter over the weights, the gradient, the optimizer state
and the stored reference signs, with no full-size temporaries.

For every rule of :mod:`cnl.optim` (sgd, momentum, adam, adamw) with or without a CNL mask, in both
sign storages. Bit-identical to the eager torch rules, which stay as the reference implementation
and the fallback:

- CPU: ``cpu.c``, compiled once per machine and called through ctypes (:mod:`cnl.kernels.cpu`);
- CUDA: Triton kernels (:mod:`cnl.kernels.gpu`) when ``triton`` is installed;
- anything else (other dtypes, non-contiguous tensors, no compiler): None, and the caller runs the
  eager rule. ``CNL_KERNELS=eager`` in the environment turns the fused path off.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["available", "sgd", "momentum", "adam", "describe"]

_STORAGE = {None: 0, "bits": 1, "int8": 2}


def _backend(device: torch.device) -> Any:
    if device.type == "cpu":
        from . import cpu

        return cpu if cpu.library() is not None else None
    if device.type == "cuda":
        from . import gpu

        return gpu if gpu.available() else None
    return None


def available(param: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether a fused kernel can update ``param`` from ``grad`` (and float32 ``state`` tensors)."""
    tensors = (param, grad, *state)
    return (
        all(t.dtype == torch.float32 and t.is_contiguous() and t.device == param.device for t in tensors)
        and not grad.is_sparse
        and grad.shape == param.shape
        and _backend(param.device) is not None
    )


def describe(device: torch.device | str = "cpu") -> str:
    """Which implementation updates float32 parameters on ``device`` (for logs and benchmarks)."""
    backend = _backend(torch.device(device))
    return "eager" if backend is None else backend.NAME


def _signs(signs: tuple[torch.Tensor, str] | None) -> tuple[torch.Tensor | None, int]:
    if signs is None:
        return None, 0
    data, storage = signs
    return data, _STORAGE[storage]


def sgd(param: torch.Tensor, grad: torch.Tensor, signs: tuple[torch.Tensor, str] | None, lr: float) -> int:
    """θ ← θ − η·u with u = g, frozen where u·reference < 0; returns the frozen count."""
    backend = _backend(param.device)
    data, storage = _signs(signs)
    return backend.run("cnl_sgd", param.numel(), [param, grad, data], storage, [-lr])


def momentum(
    param: torch.Tensor,
    grad: torch.Tensor,
    v: torch.Tensor,
    signs: tuple[torch.Tensor, str] | None,
    lr: float,
    mu: float,
    first: bool,
) -> int:
    """v ← μv + g (v ← g on the first step), u = v, masked step; returns the frozen count."""
    backend = _backend(param.device)
    data, storage = _signs(signs)
    return backend.run("cnl_momentum", param.numel(), [param, grad, v, data], storage, [-lr, mu, int(first)])


def adam(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    signs: tuple[torch.Tensor, str] | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float,
) -> int:
    """Adam(W) moments from the unmasked g, u = m̂/(√v̂+ε) (+ λθ), masked step; returns the frozen count."""
    backend = _backend(param.device)
    data, storage = _signs(signs)
    scalars = [
        -lr,
        beta1,
        1 - beta1,
        beta2,
        1 - beta2,
        1 - beta1**step,
        1 - beta2**step,
        eps,
        weight_decay,
        int(bool(weight_decay)),
    ]
    return backend.run("cnl_adam", param.numel(), [param, grad, m, v, data], storage, scalars)
