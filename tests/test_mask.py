"""Tests for :mod:`cnl.mask`: the CNL rule, the compact sign reference and the optimizer wrapper.

The reference every test compares against is SPEC §4's rule written literally, ``d * (d * r >= 0)``,
evaluated in float64 so that products of FP32 values never underflow or overflow (a float32 product of
two tiny values rounds to ±0 and would wrongly count as "agreeing").
"""

from __future__ import annotations

import math

import pytest
import torch

from cnl import MaskedOptimizer
from cnl.mask import SignReference, cnl_conflict, cnl_masked


@pytest.fixture(autouse=True)
def _strict_ieee():
    """``cnl train`` may have turned on flush-to-zero for the process (its ``flush_denormal`` option),
    which would zero the denormal test values below before they are compared."""
    torch.set_flush_denormal(False)


def spec_masked(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """SPEC §4: keep an element of ``d`` where ``d * r >= 0`` (exact, in float64), else 0."""
    keep = (d.double() * r.double()) >= 0
    return d * keep.to(d.dtype)


def spec_conflict(d: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (d.double() * r.double()) < 0


def random_with_zeros(shape, gen: torch.Generator, zero_frac: float = 0.2, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(shape, generator=gen) * scale
    zeros = torch.rand(shape, generator=gen) < zero_frac
    return t.masked_fill(zeros, 0.0)


def tricky_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Every sign combination, exact zeros (incl. -0.0) on either side and both, tiny and huge values."""
    vals = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 3e38, -3e38, 2.5, -7.0]
    d = torch.tensor([a for a in vals for _ in vals], dtype=torch.float32)
    r = torch.tensor([b for _ in vals for b in vals], dtype=torch.float32)
    return d, r


# ---------------------------------------------------------------------------------------------- the rule
def test_tricky_pair_really_contains_underflowing_products():
    d, r = tricky_pair()
    assert bool((d == 1e-45).any()) and float(d[d > 0].min()) > 0  # denormals really present
    fp32_prod = d * r
    exact = d.double() * r.double()
    # some products are nonzero in exact arithmetic but zero in float32: the naive rule would fail there
    assert bool(((fp32_prod == 0) & (exact != 0)).any())
    assert bool(((exact < 0) & (fp32_prod >= 0)).any())


def test_conflict_and_masked_on_every_sign_and_magnitude_combination():
    d, r = tricky_pair()
    assert torch.equal(cnl_conflict(d, r), spec_conflict(d, r))
    out = cnl_masked(d, r)
    assert torch.equal(out, spec_masked(d, r))
    # elements where either factor is zero are updated (kept), whatever the sign of the zero
    zero = (d == 0) | (r == 0)
    assert not bool(cnl_conflict(d, r)[zero].any())
    assert torch.equal(out[zero], d[zero])
    # cnl_masked returns a new tensor and leaves the input alone
    d0 = d.clone()
    cnl_masked(d, r)
    assert torch.equal(d, d0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1.0, 1e-25, 1e30])
def test_conflict_matches_spec_on_random_tensors(seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    d = random_with_zeros((37, 11), gen, scale=scale)
    r = random_with_zeros((37, 11), gen, scale=1.0 / scale if scale != 1.0 else 1.0)
    # zeros on both sides at the same position too
    both = torch.rand((37, 11), generator=gen) < 0.05
    d = d.masked_fill(both, 0.0)
    r = r.masked_fill(both, 0.0)
    assert torch.equal(cnl_conflict(d, r), spec_conflict(d, r))
    assert torch.equal(cnl_masked(d, r), spec_masked(d, r))
    assert 0 < int(cnl_conflict(d, r).sum()) < d.numel()


# ------------------------------------------------------------------------------------------ SignReference
SHAPES = [(), (1,), (7,), (8,), (9,), (3, 5), (4, 8), (2, 3, 5), (5, 1, 13), (0, 3), (1023,)]


@pytest.mark.parametrize("storage", ["bits", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sign_reference_sign_and_mask(storage: str, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    ref_t = random_with_zeros(shape, gen, zero_frac=0.25)
    ref = SignReference(storage)
    ref.set("p", ref_t)
    assert "p" in ref and len(ref) == 1 and ref.keys() == ["p"]
    sign = ref.sign("p")
    assert sign.dtype == torch.int8 and sign.shape == ref_t.shape
    assert torch.equal(sign, torch.sign(ref_t).to(torch.int8))
    pos, neg = ref.positive_negative("p")
    assert torch.equal(pos, ref_t > 0) and torch.equal(neg, ref_t < 0)

    d = random_with_zeros(shape, gen, zero_frac=0.25)
    expected = spec_masked(d, ref_t)
    n_expected = int(spec_conflict(d, ref_t).sum())
    assert torch.equal(ref.conflict("p", d), spec_conflict(d, ref_t))
    work = d.clone()
    n = ref.mask_("p", work)
    assert isinstance(n, torch.Tensor) and n.dim() == 0
    assert int(n) == n_expected
    assert torch.equal(work, expected)  # in place, exact, zeros included


@pytest.mark.parametrize("storage", ["bits", "int8"])
def test_sign_reference_exact_for_tiny_and_huge_values(storage: str):
    d, r = tricky_pair()
    ref = SignReference.from_tensors([("k", r)], storage=storage)
    assert torch.equal(ref.sign("k"), torch.sign(r).to(torch.int8))
    work = d.clone()
    n = ref.mask_("k", work)
    assert torch.equal(work, spec_masked(d, r))
    assert int(n) == int(spec_conflict(d, r).sum())


@pytest.mark.parametrize("storage", ["bits", "int8"])
def test_sign_reference_keys_are_tensors_and_mask_returns_count(storage: str):
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    b = torch.nn.Parameter(torch.randn(13, generator=gen))
    ra, rb = torch.randn(5, 3, generator=gen), torch.randn(13, generator=gen)
    ref = SignReference.from_tensors([(a, ra), (b, rb)], storage=storage)
    assert a in ref and b in ref and torch.nn.Parameter(torch.zeros(1)) not in ref
    ga, gb = torch.randn(5, 3, generator=gen), torch.randn(13, generator=gen)
    total = ref.mask_(a, ga.clone()) + ref.mask_(b, gb.clone())
    assert int(total) == int(spec_conflict(ga, ra).sum() + spec_conflict(gb, rb).sum())


def test_sign_reference_rejects_unknown_storage():
    with pytest.raises(ValueError, match="storage"):
        SignReference("float16")


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1000, 4097])
def test_nbytes(numel: int):
    r = torch.randn(numel)
    bits = SignReference.from_tensors([("x", r)], storage="bits")
    int8 = SignReference.from_tensors([("x", r)], storage="int8")
    # 2-bit codes, four per byte, in whole blocks of 256 elements (64 bytes): 0.25 byte per element
    # plus less than 64 bytes of padding per tensor
    assert bits.nbytes() == 64 * math.ceil(numel / 256)
    assert bits.nbytes() < 0.25 * numel + 64
    assert int8.nbytes() == numel


def test_nbytes_many_tensors_is_a_quarter_of_int8():
    ref_b, ref_i = SignReference("bits"), SignReference("int8")
    for k in range(5):
        t = torch.randn(64, 8)
        ref_b.set(k, t)
        ref_i.set(k, t)
    assert ref_i.nbytes() == 5 * 512
    assert ref_b.nbytes() == ref_i.nbytes() // 4


@pytest.mark.parametrize("storage", ["bits", "int8"])
def test_state_dict_round_trip(storage: str):
    gen = torch.Generator().manual_seed(5)
    keys = ["a", "b"]
    ts = [random_with_zeros((3, 7), gen), random_with_zeros((11,), gen)]
    ref = SignReference.from_tensors(zip(keys, ts, strict=True), storage=storage)
    other = SignReference()
    other.load_state_dict(ref.state_dict(), keys)
    assert other.storage == storage
    for k, t in zip(keys, ts, strict=True):
        assert torch.equal(other.sign(k), torch.sign(t).to(torch.int8))


# ---------------------------------------------------------------------------------------- MaskedOptimizer
class SpecMasked:
    """Independent implementation of SPEC §4's masked update (state from the unmasked gradient)."""

    def __init__(self, kind: str, lr: float, ref_sign: list[torch.Tensor]):
        self.kind, self.lr, self.ref = kind, lr, ref_sign
        self.t = 0
        self.v: list[torch.Tensor | None] = [None] * len(ref_sign)
        self.m: list[torch.Tensor | None] = [None] * len(ref_sign)
        self.s: list[torch.Tensor | None] = [None] * len(ref_sign)

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        self.t += 1
        self.last_conflicts = 0
        out = []
        for i, (theta, g) in enumerate(zip(params, grads, strict=True)):
            if self.kind == "sgd":
                u = g
            elif self.kind == "momentum":
                self.v[i] = g.clone() if self.v[i] is None else 0.9 * self.v[i] + g
                u = self.v[i]
            else:
                m_prev = torch.zeros_like(g) if self.m[i] is None else self.m[i]
                s_prev = torch.zeros_like(g) if self.s[i] is None else self.s[i]
                self.m[i] = 0.9 * m_prev + 0.1 * g
                self.s[i] = 0.999 * s_prev + 0.001 * g * g
                m_hat = self.m[i] / (1 - 0.9**self.t)
                s_hat = self.s[i] / (1 - 0.999**self.t)
                u = m_hat / (s_hat.sqrt() + 1e-8)
                if self.kind == "adamw":
                    u = u + 0.1 * theta
            keep = (u * self.ref[i]) >= 0
            self.last_conflicts += int((~keep).sum())
            out.append(theta - self.lr * u * keep.to(u.dtype))
        return out


def make_torch_opt(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("storage", ["bits", "int8"])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("steps", [1, 4])
def test_masked_optimizer_equals_spec_update(kind: str, steps: int, storage: str):
    gen = torch.Generator().manual_seed(11)
    shapes = [(6, 5), (9,), (3, 3, 2)]
    lr = 0.05
    # float32, as cnl keeps its optimizer state (the spec below computes in float32 too)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 3) for s in shapes]
    ref_t = [random_with_zeros(s, gen, zero_frac=0.2) for s in shapes]
    ref = SignReference.from_tensors(zip(params, ref_t, strict=True), storage=storage)
    opt = MaskedOptimizer(make_torch_opt(kind, params, lr), ref)
    spec = SpecMasked(kind, lr, [torch.sign(r) for r in ref_t])
    expected = [p.detach().clone() for p in params]
    masked_any = 0
    for _ in range(steps):
        grads = [random_with_zeros(s, gen, zero_frac=0.1) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        expected = spec.step(expected, grads)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6)
        assert opt.last_masked == spec.last_conflicts
        masked_any += opt.last_masked
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    assert masked_any > 0
    if kind in ("adam", "adamw"):
        # moments come from the unmasked gradient (torch's state layout: step, exp_avg, exp_avg_sq)
        for i, p in enumerate(params):
            st = opt.state[p]
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
            assert st["step"] == steps
            torch.testing.assert_close(st["exp_avg"], spec.m[i], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(st["exp_avg_sq"], spec.s[i], rtol=1e-6, atol=1e-9)
    if kind == "momentum":
        for i, p in enumerate(params):
            assert set(opt.state[p]) == {"momentum_buffer"}
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], spec.v[i], rtol=1e-6, atol=1e-6)


def test_masked_optimizer_leaves_parameters_without_reference_unmasked():
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(4, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, generator=gen))
    ref = SignReference.from_tensors([(a, -torch.ones(4))])  # every positive-direction update of a conflicts
    opt = MaskedOptimizer(torch.optim.SGD([a, b], lr=0.1), ref)
    a.grad = torch.ones(4)
    b.grad = torch.ones(4)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0)
    assert opt.last_masked == 4
    assert opt.pop_counts() == (4, 8)  # every updated element counts, with a stored sign or not (b's too)
    torch.testing.assert_close(b.detach(), b0 - 0.1)
