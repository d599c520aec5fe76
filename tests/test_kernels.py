"""Tests for :mod:`cnl.kernels`: the fused updates are bit-identical to the eager rules of :mod:`cnl.optim`."""

from __future__ import annotations

import logging

import pytest
import torch

from cnl import kernels
from cnl.kernels import cpu
from cnl.mask import BLOCK, SignReference
from cnl.optimizer import build_optimizer

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
STORAGES = (None, "bits", "int8")
SPECIALS = torch.tensor(
    [0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45, 3e38, -3e38, float("inf"), float("-inf"), 1.0, -1.0, 1e-20, -1e-20]
)

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the fused CPU kernels are not built")


def edge_tensor(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random values over many magnitudes, a fifth of them exact zeros, -0.0, denormals, huge and infinite."""
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    idx = torch.randperm(n, generator=gen)[: max(1, n // 5)]
    x[idx] = SPECIALS[torch.randint(0, len(SPECIALS), (len(idx),), generator=gen)]
    return x


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def run_rule(optimizer: str, storage: str | None, n: int, fused: bool, steps: int = 3, shape=None):
    gen = torch.Generator().manual_seed(n * 7 + steps)
    p = torch.nn.Parameter(edge_tensor(n, gen).view(shape or (n,)))
    reference = None
    if storage is not None:
        reference = SignReference(storage)
        reference.set(p, edge_tensor(n, gen).view_as(p))
    opt = build_optimizer([("p", p)], optimizer, 1e-3, fused=fused)
    opt.reference = reference
    frozen = []
    for _ in range(steps):
        p.grad = edge_tensor(n, gen).view_as(p)
        opt.step_parameter(p)
        assert p.grad is None
        frozen.append(opt.pop_counts())
    return p.detach().clone(), dict(opt.state.get(p, {})), frozen


def assert_identical(a, b) -> None:
    (pa, sa, fa), (pb, sb, fb) = a, b
    assert torch.equal(bits(pa), bits(pb)), f"{int((bits(pa) != bits(pb)).sum())} weights differ"
    assert fa == fb
    assert set(sa) == set(sb)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(bits(sa[k]), bits(sb[k])), k
        else:
            assert sa[k] == sb[k], k


SIZES = (1, 3, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 77, 4099)


@pytest.mark.parametrize("storage", STORAGES, ids=str)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("n", SIZES)
def test_fused_equals_eager_bit_for_bit(optimizer, storage, n):
    assert_identical(run_rule(optimizer, storage, n, False), run_rule(optimizer, storage, n, True))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_parallel_ranges_and_flush_denormal(optimizer, monkeypatch):
    """A tensor split over worker threads gives the same bits; workers follow the caller's denormal mode."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            for storage in ("bits", "int8", None):
                n = 3 * 4099
                assert_identical(run_rule(optimizer, storage, n, False), run_rule(optimizer, storage, n, True))
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def test_updates_inside_the_backward_pass_split_only_large_tensors(monkeypatch):
    """MaskedOptimizer's backward-pass hooks run the kernels under cpu.in_backward(): tensors below
    PARALLEL_MIN_IN_BACKWARD stay on the calling thread there, and are split outside it."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 64)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_IN_BACKWARD", 4096)
    submitted: list[int] = []
    real_pool = cpu._pool

    class Counting:
        def __init__(self, pool):
            self.pool = pool

        def submit(self, *args):
            submitted.append(1)
            return self.pool.submit(*args)

    monkeypatch.setattr(cpu, "_pool", lambda size: Counting(real_pool(size)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small, large = torch.nn.Parameter(torch.randn(1000)), torch.nn.Parameter(torch.randn(10_000))
        opt = build_optimizer([("small", small), ("large", large)], "sgd", 0.1)
        reference = SignReference.from_tensors([(small, torch.randn(1000)), (large, torch.randn(10_000))])
        opt.reference = reference
        with opt.in_backward():
            (small.sum() + large.sum()).backward()  # both update inside the backward pass
        assert small.grad is None and large.grad is None  # so they really were updated there
        inside = len(submitted)
        submitted.clear()
        for p in (small, large):
            p.grad = torch.ones_like(p)
        opt.step()  # the same updates outside it
        outside = len(submitted)
    finally:
        torch.set_num_threads(before)
    assert inside == 1, "inside the backward pass only the large tensor is split (one range handed off)"
    assert outside == 2, "outside it both tensors are split"


def test_frozen_elements_do_not_move_and_others_move_like_sgd():
    gen = torch.Generator().manual_seed(0)
    n = 3 * BLOCK + 5
    theta = torch.randn(n, generator=gen)
    grad, ref = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    ref[::9] = 0
    grad[::7] = 0
    for storage in ("bits", "int8"):
        reference = SignReference(storage)
        p = theta.clone()
        reference.set(p, ref)
        frozen = kernels.sgd(p, grad, reference.raw(p), 0.5)
        conflict = ((grad > 0) & (ref < 0)) | ((grad < 0) & (ref > 0))
        assert frozen == int(conflict.sum()) > 0
        assert torch.equal(p[conflict], theta[conflict])
        assert torch.equal(p[~conflict], torch.addcmul(theta, grad, torch.tensor(-0.5))[~conflict])


def test_available_only_for_contiguous_float32_dense():
    p = torch.zeros(8)
    assert kernels.available(p, torch.zeros(8))
    assert not kernels.available(p, torch.zeros(16)[::2])  # not contiguous
    assert not kernels.available(p.double(), torch.zeros(8, dtype=torch.float64))
    assert not kernels.available(p, torch.zeros(4, 2))  # other shape
    assert not kernels.available(p, torch.zeros(8).to_sparse())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_other_dtypes_fall_back_to_the_eager_rule(optimizer):
    """bfloat16 weights have no kernel: the fused updater must give exactly the eager rule's result."""
    results = []
    for fused in (False, True):
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(300, generator=gen).to(torch.bfloat16))
        ref = SignReference.from_tensors([(p, torch.randn(300, generator=gen))])
        opt = build_optimizer([("p", p)], optimizer, 1e-2, fused=fused)
        opt.reference = ref
        p.grad = torch.randn(300, generator=gen).to(torch.bfloat16)
        opt.step_parameter(p)
        results.append((p.detach().clone(), opt.pop_counts()[0], dict(opt.state.get(p, {}))))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert 0 < results[0][1] < 300
    assert results[0][2].keys() == results[1][2].keys()
    for k, v in results[0][2].items():
        assert v.dtype == torch.float32 and torch.equal(v, results[1][2][k]), k  # moments in float32


def test_library_is_cached_and_eager_env_turns_it_off(monkeypatch, tmp_path, caplog):
    lib = cpu.library()
    assert lib is cpu.library()  # built once per process
    assert kernels.describe("cpu") == cpu.NAME
    cpu.library.cache_clear()
    try:
        monkeypatch.setenv("CNL_KERNELS", "eager")
        assert cpu.library() is None and kernels.describe("cpu") == "eager"
        assert not kernels.available(torch.zeros(4), torch.zeros(4))
        cpu.library.cache_clear()
        monkeypatch.delenv("CNL_KERNELS")
        monkeypatch.setenv("CNL_CACHE", str(tmp_path))
        monkeypatch.setattr(cpu, "_compiler", lambda: None)
        with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
            assert cpu.library() is None
        assert "no C compiler" in caplog.text
        cpu.library.cache_clear()
        monkeypatch.setattr(cpu, "_compiler", lambda: "false")  # a "compiler" that always fails
        assert cpu.library() is None
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        cpu.library.cache_clear()
    monkeypatch.undo()
    assert cpu.library() is not None
