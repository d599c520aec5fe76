"""The CUDA kernels of :mod:`cnl.kernels`: Triton versions of ``cpu.c`` (same arithmetic, explicit fma,
IEEE-rounded division and square root), one launch per parameter tensor. Used when ``triton`` is
installed and the tensors are on a CUDA device; otherwise cnl runs its eager rules there."""

from __future__ import annotations

import functools

NAME = "cuda: fused Triton kernel"


@functools.cache
def available() -> bool:
    """Whether the Triton kernels can run (``triton`` importable and CUDA present)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def run(name: str, n: int, tensors: list, storage: int, scalars: list) -> int:  # pragma: no cover - needs CUDA
    from . import triton_kernels

    return triton_kernels.run(name, n, tensors, storage, scalars)
