"""Triton versions of ``cpu.c`` for CUDA: one launch per parameter tensor, same arithmetic.

Every rounding step of the eager CUDA rules is repeated explicitly: the fmas that PyTorch's kernels
perform (``sub_``/``add_`` with alpha, ``addcmul_``) are ``tl.fma``; separate torch operations
(``mul_`` by a scalar, then ``add_``) stay separate roundings because the kernels are launched with
``enable_fp_fusion=False``; division and square root are the IEEE round-to-nearest ones
(``div_rn``, ``sqrt_rn``), as CUDA's defaults are, except that torch divides a CUDA tensor by a Python
number as a product with the number's reciprocal (computed in double, rounded to float32: Adam's bias
corrections), so the kernel does too.
The frozen count is accumulated on the device
(one atomic add per program), so an update never waits for the GPU.

Importing this module needs ``triton``; :mod:`cnl.kernels.gpu` falls back to the eager rules without it.
``TRITON_INTERPRET=1`` runs the kernels on the CPU (for tests of their logic; the interpreter does not
reproduce the GPU's fma, so it is not bit-exact).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

#: Elements per program.
BLOCK_SIZE = 1024


@triton.jit
def _frozen(u, signs_ptr, offs, mask, STORAGE: tl.constexpr):
    """1 where u·reference < 0 for the sign storage (0 none, 1 blocked 2-bit codes, 2 int8)."""
    if STORAGE == 1:
        byte = tl.load(signs_ptr + (offs // 256) * 64 + (offs % 64), mask=mask, other=0).to(tl.int32)
        code = (byte >> (2 * ((offs % 256) // 64))) & 3
    elif STORAGE == 2:
        s = tl.load(signs_ptr + offs, mask=mask, other=0).to(tl.int32)
        code = tl.where(s > 0, 1, tl.where(s < 0, 2, 0))
    else:
        code = tl.zeros_like(offs)
    return ((code == 2) & (u > 0.0)) | ((code == 1) & (u < 0.0))


@triton.jit
def _step(theta_ptr, u, signs_ptr, count_ptr, offs, mask, neg_lr, STORAGE: tl.constexpr):
    f = _frozen(u, signs_ptr, offs, mask, STORAGE) & mask
    theta = tl.load(theta_ptr + offs, mask=mask)
    masked = tl.where(f, 0.0, u)
    tl.store(theta_ptr + offs, tl.fma(masked, neg_lr, theta), mask=mask)
    if STORAGE != 0:
        tl.atomic_add(count_ptr, tl.sum(f.to(tl.int64), axis=0))


@triton.jit
def _sgd(theta_ptr, grad_ptr, signs_ptr, count_ptr, n, neg_lr, STORAGE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    _step(theta_ptr, u, signs_ptr, count_ptr, offs, mask, neg_lr, STORAGE)


@triton.jit
def _momentum(
    theta_ptr, grad_ptr, v_ptr, signs_ptr, count_ptr, n, neg_lr, mu, FIRST: tl.constexpr, STORAGE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if FIRST:  # noqa: SIM108 - a compile-time branch of the kernel
        u = g
    else:
        u = tl.load(v_ptr + offs, mask=mask, other=0.0) * mu + g
    tl.store(v_ptr + offs, u, mask=mask)
    _step(theta_ptr, u, signs_ptr, count_ptr, offs, mask, neg_lr, STORAGE)


@triton.jit
def _adam(
    theta_ptr, grad_ptr, m_ptr, v_ptr, signs_ptr, count_ptr, n, neg_lr, beta1, one_minus_beta1, beta2,
    one_minus_beta2, inv_bc1, inv_bc2, eps, wd, DECAY: tl.constexpr, STORAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    mm = tl.fma(g, one_minus_beta1, tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1)
    # torch's CUDA addcmul_ computes v + value * (g * g) (its CPU kernel: v + (value * g) * g)
    vv = tl.fma(one_minus_beta2, g * g, tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2)
    tl.store(m_ptr + offs, mm, mask=mask)
    tl.store(v_ptr + offs, vv, mask=mask)
    # torch divides a CUDA tensor by a Python number as a product with its float32 reciprocal (run() passes them)
    denom = tl.sqrt_rn(vv * inv_bc2) + eps
    u = tl.div_rn(mm * inv_bc1, denom)
    if DECAY:
        u = tl.fma(tl.load(theta_ptr + offs, mask=mask, other=0.0), wd, u)
    _step(theta_ptr, u, signs_ptr, count_ptr, offs, mask, neg_lr, STORAGE)


def run(name: str, n: int, tensors: list[Any], storage: int, scalars: list[Any]) -> torch.Tensor:
    """Launch kernel ``name`` (the C names of ``cpu.c``) on ``n`` elements; return the frozen count as a
    0-d tensor on the device (no synchronisation)."""
    param = tensors[0]
    count = torch.zeros((), dtype=torch.int64, device=param.device)
    signs = tensors[-1] if tensors[-1] is not None else count  # any valid pointer when unmasked
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    common = {"STORAGE": storage, "BLOCK": BLOCK_SIZE, "enable_fp_fusion": False}
    if name == "cnl_sgd":
        _sgd[grid](tensors[0], tensors[1], signs, count, n, scalars[0], **common)
    elif name == "cnl_momentum":
        neg_lr, mu, first = scalars
        _momentum[grid](tensors[0], tensors[1], tensors[2], signs, count, n, neg_lr, mu, FIRST=bool(first), **common)
    elif name == "cnl_adam":
        *floats, decay = scalars
        for i in (5, 6):  # bc1, bc2 -> their reciprocals as torch's CUDA division by a number takes them:
            floats[i] = float(np.float32(1.0 / floats[i]))  # 1/b in double, rounded once to float32
        _adam[grid](
            tensors[0], tensors[1], tensors[2], tensors[3], signs, count, n, *floats, DECAY=bool(decay), **common
        )
    else:  # pragma: no cover - the names come from cnl.kernels
        raise ValueError(f"no Triton kernel {name!r}")
    return count
