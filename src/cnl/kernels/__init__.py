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
    scalars = _adam_scalars(lr, beta1, beta2, eps, step, weight_decay)
    return backend.run("cnl_adam", param.numel(), [param, grad, m, v, data], storage, scalars)


def _adam_scalars(lr: float, beta1: float, beta2: float, eps: float, step: int, weight_decay: float) -> list[Any]:
    """The scalar arguments of ``cnl_adam`` (and ``cnl_adam_band``): −lr, β1, 1−β1, β2, 1−β2, the two bias
    corrections, ε, λ and whether to decay."""
    return [-lr, beta1, 1 - beta1, beta2, 1 - beta2, 1 - beta1**step, 1 - beta2**step, eps, weight_decay,
            int(bool(weight_decay))]  # fmt: skip


# ------------------------------------------------------------------------------- MoFO's top fraction (CPU)
#: Rungs of :func:`moment_ladder`'s threshold ladder.
LADDER = 8


def band_available(param: torch.Tensor, grad: torch.Tensor, *state: torch.Tensor) -> bool:
    """Whether the band kernels (MoFO's exact top fraction in two passes) can update ``param``: the CPU kernels,
    and positions that fit in int32."""
    return param.device.type == "cpu" and param.numel() < 2**31 and available(param, grad, *state)


def moment_ladder(
    grad: torch.Tensor, mom: torch.Tensor, ladder: list[float], *, adam: bool, beta: float, first: bool = False
) -> list[int]:
    """For each rung t of ``ladder`` (:data:`LADDER` increasing thresholds), how many elements will have
    |first moment| >= t after this step (Adam: ``mom`` is m, ``beta`` β1; momentum: ``mom`` is v, ``beta`` μ,
    ``first`` the first step); nothing is written."""
    from . import cpu

    return cpu.moment_ladder(grad, mom, 1 if adam else 2, beta, 1 - beta, first, ladder)


def adam_band(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float,
    lo: float,
    hi: float,
    listed: int,
) -> tuple[int, torch.Tensor] | None:
    """Adam(W)'s fused step (moments from every element) where only elements with |new m| >= ``hi`` move;
    those with ``lo`` <= |m| < ``hi`` (at most ``listed``) are returned unmoved for :func:`adam_settle`.
    ``(moved, positions)``, or None when more than ``listed`` fell in the band."""
    from . import cpu

    scalars = _adam_scalars(lr, beta1, beta2, eps, step, weight_decay)
    return cpu.band("cnl_adam_band", [param, grad, m, v], scalars, lo, hi, listed)


def adam_settle(
    param: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    threshold: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float,
) -> int:
    """Move the elements at ``idx`` (left by :func:`adam_band`) whose |m| >= ``threshold``; how many moved."""
    from . import cpu

    s = _adam_scalars(lr, beta1, beta2, eps, step, weight_decay)
    return cpu.settle("cnl_adam_settle", [param, m, v], idx, [s[0], *s[5:], threshold])


def momentum_band(
    param: torch.Tensor, grad: torch.Tensor, v: torch.Tensor, *, lr: float, mu: float, first: bool, lo: float,
    hi: float, listed: int,
) -> tuple[int, torch.Tensor] | None:  # fmt: skip
    """Momentum's fused step with the band of :func:`adam_band` on |new v|."""
    from . import cpu

    return cpu.band("cnl_momentum_band", [param, grad, v], [-lr, mu, int(first)], lo, hi, listed)


def momentum_settle(param: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, threshold: float, *, lr: float) -> int:
    """Move the elements at ``idx`` (left by :func:`momentum_band`) whose |v| >= ``threshold``."""
    from . import cpu

    return cpu.settle("cnl_momentum_settle", [param, v], idx, [-lr, threshold])
