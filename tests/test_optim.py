"""Tests for :mod:`cnl.optim`: every update rule of SPEC §4, driven through :class:`cnl.MaskedOptimizer`
(:func:`cnl.optimizer.build_optimizer`, as ``cnl train`` builds it).

Expected values are computed in the tests from SPEC's formulas (in float64, from the same inputs),
never with the code under test.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from cnl.mask import SignReference
from cnl.optim import OPTIMIZERS, AdamRule, MomentumRule, SGDRule, UpdateHooks, make_rule
from cnl.optimizer import MaskedOptimizer, build_optimizer
from cnl.testing import make_tiny_model

LR = 0.05
ATOL = 1e-6


def linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 3)


def rand_like_with_zeros(t: torch.Tensor, gen: torch.Generator, zero_frac: float = 0.15) -> torch.Tensor:
    x = torch.randn(t.shape, generator=gen)
    return x.masked_fill(torch.rand(t.shape, generator=gen) < zero_frac, 0.0)


class Spec:
    """SPEC §4's update rules, written out independently (float64)."""

    def __init__(self, kind: str, lr: float = LR):
        self.kind, self.lr = kind, lr
        self.t = 0
        self.v: dict[str, torch.Tensor] = {}
        self.m: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}

    def u(self, name: str, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = g.double()
        theta = theta.double()
        if self.kind == "sgd":
            return g
        if self.kind == "momentum":
            self.v[name] = 0.9 * self.v.get(name, torch.zeros_like(g)) + g  # unmasked g
            return self.v[name]
        self.m[name] = 0.9 * self.m.get(name, torch.zeros_like(g)) + 0.1 * g
        self.s[name] = 0.999 * self.s.get(name, torch.zeros_like(g)) + 0.001 * g * g
        m_hat = self.m[name] / (1 - 0.9**self.t)
        s_hat = self.s[name] / (1 - 0.999**self.t)
        u = m_hat / (s_hat.sqrt() + 1e-8)
        if self.kind == "adamw":
            u = u + 0.1 * theta
        return u

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], ref=None):
        """New parameters; ``ref`` maps names to reference tensors (None: no mask)."""
        self.t += 1
        out = {}
        for name, theta in params.items():
            u = self.u(name, theta, grads[name])
            if ref is not None:
                u = u * ((u * ref[name].double()) >= 0).double()
            out[name] = theta.double() - self.lr * u
        return out


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def make_opt(module, kind, ref_tensors=None, storage="bits", lr=LR, fused=True) -> MaskedOptimizer:
    """``cnl train``'s optimizer over ``module``'s parameters, masked by the signs of ``ref_tensors`` (by name)."""
    opt = build_optimizer(module.named_parameters(), kind, lr, fused=fused)
    if ref_tensors is not None:
        opt.reference = SignReference.from_tensors(
            ((p, ref_tensors[n]) for n, p in module.named_parameters()), storage=storage
        )
    return opt


def set_grads(module, grads):
    for n, p in module.named_parameters():
        p.grad = grads[n].clone()


def step(opt: MaskedOptimizer) -> None:
    """A whole step after the backward pass, then the gradients freed (``step`` itself keeps them)."""
    opt.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------- one step
@pytest.mark.parametrize("how", ["step", "step_parameter"])
@pytest.mark.parametrize("masked", [False, True], ids=["ft", "cnl"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_one_step_equals_spec(kind: str, masked: bool, how: str):
    gen = torch.Generator().manual_seed(1)
    lin = linear()
    grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()} if masked else None
    opt = make_opt(lin, kind, ref)
    spec = Spec(kind)
    expected = spec.step(snapshot(lin), grads, ref)
    set_grads(lin, grads)
    if how == "step":
        opt.step()
        assert all(p.grad is not None for p in lin.parameters())  # torch's contract: step() keeps .grad
    else:
        for p in lin.parameters():
            opt.step_parameter(p)
            assert p.grad is None  # the per-parameter update frees the gradient at once
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
    n_masked, n_elements = opt.pop_counts()
    assert n_elements == 18  # every updated element is counted, masked or not (5·3 weights + 3 biases)
    if masked:
        assert n_masked > 0
        assert opt.pop_counts() == (0, 0)  # popped
    else:
        assert n_masked == 0


def test_masked_count_is_number_of_conflicting_elements():
    gen = torch.Generator().manual_seed(4)
    lin = linear()
    grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    opt = make_opt(lin, "sgd", ref)
    set_grads(lin, grads)
    opt.step()
    expected = sum(int((grads[n].double() * ref[n].double() < 0).sum()) for n in grads)
    assert opt.last_masked == expected
    assert opt.pop_counts() == (expected, 18)


@pytest.mark.parametrize("storage", ["bits", "int8"])
def test_momentum_state_is_unmasked_over_three_steps(storage: str):
    gen = torch.Generator().manual_seed(2)
    lin = linear()
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    opt = make_opt(lin, "momentum", ref, storage)
    spec = Spec("momentum")
    expected = snapshot(lin)
    v_unmasked = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in lin.named_parameters()}
    for _ in range(3):
        grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
        expected = spec.step(expected, grads, ref)
        set_grads(lin, grads)
        step(opt)
        for n, p in lin.named_parameters():
            v_unmasked[n] = 0.9 * v_unmasked[n] + grads[n].double()
            torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
            assert set(opt.state[p]) == {"momentum_buffer"}  # torch's layout
            state_v = opt.state[p]["momentum_buffer"]
            assert state_v.dtype == torch.float32
            torch.testing.assert_close(state_v.double(), v_unmasked[n], rtol=0, atol=ATOL)
    # the state really differs from a masked buffer: some masked elements carry a nonzero v
    assert any(bool(((v_unmasked[n] * ref[n].double()) < 0).any()) for n in ref)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_bias_correction_at_steps_one_and_two(kind: str):
    gen = torch.Generator().manual_seed(3)
    lin = linear()
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    opt = make_opt(lin, kind, ref)
    expected = snapshot(lin)
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in lin.named_parameters()}
    s = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in lin.named_parameters()}
    for t in (1, 2):
        grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
        new = {}
        for n, theta in expected.items():
            g = grads[n].double()
            m[n] = 0.9 * m[n] + 0.1 * g
            s[n] = 0.999 * s[n] + 0.001 * g * g
            m_hat = m[n] / (1 - 0.9**t)
            s_hat = s[n] / (1 - 0.999**t)
            u = m_hat / (torch.sqrt(s_hat) + 1e-8)
            if kind == "adamw":
                u = u + 0.1 * theta.double()
            u = u * ((u * ref[n].double()) >= 0)
            new[n] = theta.double() - LR * u
        expected = new
        set_grads(lin, grads)
        step(opt)
        for n, p in lin.named_parameters():
            torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
            st = opt.state[p]
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"}  # torch's layout
            # torch keeps Adam's step as a float32 scalar tensor on the CPU
            assert isinstance(st["step"], torch.Tensor) and st["step"].dim() == 0
            assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"
            assert st["step"] == t
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
            torch.testing.assert_close(st["exp_avg"].double(), m[n], rtol=0, atol=ATOL)  # unmasked moments
            torch.testing.assert_close(st["exp_avg_sq"].double(), s[n], rtol=0, atol=1e-8)


def test_adamw_decay_term_is_inside_the_masked_update():
    """g and g_M agree, but 0.1·θ flips the sign of u: SPEC masks u (decay included), so θ stays."""
    p = torch.nn.Parameter(torch.tensor([-50.0, 50.0, -50.0, 50.0]))
    g = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ref_t = torch.tensor([1.0, -1.0, -1.0, 1.0])
    # step 1: m̂/(√v̂+ε) = sign(g) (up to ε), so u = sign(g) + 0.1 θ = [-4, 4, -4, 4]
    opt = build_optimizer([("p", p)], "adamw", 0.01)
    opt.reference = SignReference.from_tensors([(p, ref_t)])
    p.grad = g.clone()
    opt.step()
    # elements 0, 1: g agrees with g_M but u (decay included) conflicts -> frozen
    # elements 2, 3: g conflicts with g_M but u agrees -> updated by -lr * u
    expected = torch.tensor([-50.0, 50.0, -50.0 + 0.01 * 4, 50.0 - 0.01 * 4])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    assert opt.pop_counts() == (2, 4)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_all_agreeing_equals_ft_and_all_conflicting_is_frozen(kind: str):
    gen = torch.Generator().manual_seed(5)
    base = linear()
    with torch.no_grad():
        for p in base.parameters():  # no exact zeros in u
            p.add_(0.01 * torch.sign(p) + (p == 0).float())
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in base.named_parameters()}
    grads = {n: g + 0.1 * torch.sign(g) for n, g in grads.items()}
    # the update direction u at step 1 (SPEC), to build a reference that agrees / conflicts everywhere
    spec = Spec(kind)
    spec.t = 1
    u = {n: spec.u(n, theta, grads[n]) for n, theta in snapshot(base).items()}
    assert all(bool((v != 0).all()) for v in u.values())

    ft, agree, conflict = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    opts = {
        "ft": make_opt(ft, kind),
        "agree": make_opt(agree, kind, {n: u[n].float() for n in u}),
        "conflict": make_opt(conflict, kind, {n: -u[n].float() for n in u}),
    }
    for name, mod in (("ft", ft), ("agree", agree), ("conflict", conflict)):
        set_grads(mod, grads)
        step(opts[name])
    n_elements = sum(p.numel() for p in base.parameters())
    assert opts["ft"].pop_counts() == (0, n_elements)
    assert opts["agree"].pop_counts() == (0, n_elements)
    assert opts["conflict"].pop_counts() == (n_elements, n_elements)
    for (n, p_ft), p_ag, p_cf, p0 in zip(
        ft.named_parameters(), agree.parameters(), conflict.parameters(), base.parameters(), strict=True
    ):
        assert torch.equal(p_ag, p_ft), n
        assert not torch.equal(p_ft, p0)
        assert torch.equal(p_cf, p0), n  # every element frozen: unchanged, bit for bit


# --------------------------------------------------------------------------------- in the backward pass
def tiny_loss(model: torch.nn.Module, ids: torch.Tensor, target: int) -> torch.Tensor:
    logits = model(input_ids=ids[None], use_cache=False).logits[0, -1]
    return F.cross_entropy(logits[None].float(), torch.tensor([target]))


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_update_in_backward_equals_backward_then_step(kind: str):
    base = make_tiny_model("qwen2", vocab_size=97, num_hidden_layers=1)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied, like the real small models
    gen = torch.Generator().manual_seed(7)
    samples = [(torch.randint(0, 97, (n,), generator=gen), int(t)) for n, t in ((9, 3), (14, 50), (6, 96))]
    ref_tensors = {n: torch.randn(p.shape, generator=gen) for n, p in base.named_parameters()}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = make_opt(a, kind, ref_tensors, lr=1e-2)
    opt_b = make_opt(b, kind, ref_tensors, lr=1e-2)
    calls: dict[str, int] = {}
    orig = opt_a.step_parameter

    def counting(param):
        if param.grad is not None:
            name = opt_a.names[param]
            calls[name] = calls.get(name, 0) + 1
        return orig(param)

    opt_a.step_parameter = counting  # type: ignore[method-assign]  # what the backward-pass hooks call
    a.train()
    b.train()
    with opt_a.in_backward():
        for ids, target in samples:
            tiny_loss(a, ids, target).backward()  # updated inside backward
            assert all(p.grad is None for p in a.parameters())  # no gradient kept after a hooked backward
            tiny_loss(b, ids, target).backward()
            assert all(p.grad is not None for p in b.parameters())
            step(opt_b)
        # paused: the hooks stay registered but update nothing; the gradient accumulates as usual
        before = snapshot(a)
        with opt_a.paused():
            tiny_loss(a, samples[0][0], 1).backward()
        assert all(p.grad is not None for p in a.parameters())
        assert all(torch.equal(p, before[n]) for n, p in a.named_parameters())
        a.zero_grad(set_to_none=True)
    # every parameter, the tied embedding/head included, was updated exactly once per sample
    assert set(calls) == {n for n, _ in a.named_parameters()}
    assert set(calls.values()) == {len(samples)}
    frozen_a, elements_a = opt_a.pop_counts()
    frozen_b, elements_b = opt_b.pop_counts()
    assert frozen_a == frozen_b > 0
    assert elements_a == elements_b == len(samples) * sum(p.numel() for p in a.parameters())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n  # same numbers, bit for bit
    tiny_loss(a, samples[0][0], 1).backward()  # hooks removed: the gradient accumulates again
    assert all(p.grad is not None for p in a.parameters())
    assert len(calls) == len(dict(a.named_parameters())) and set(calls.values()) == {len(samples)}


class TiedLM(torch.nn.Module):
    """An embedding used twice: as input lookup and as output head (like embed_tokens / lm_head)."""

    def __init__(self, vocab: int = 11, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids).mean(0)))
        return h @ self.emb.weight.t()


class Recorder(UpdateHooks):
    """Hooks that change nothing and record which parameter (by name) each update was for."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def adjust_grad_(self, key, param, grad) -> None:
        self.seen.append(key)


@pytest.mark.parametrize("in_backward", [True, False])
def test_tied_weight_gets_one_update_with_the_summed_gradient(in_backward: bool):
    model = TiedLM()
    ids, target = torch.tensor([1, 4, 4, 7]), torch.tensor(4)
    # reference: autograd sums both uses' gradients
    theta0 = snapshot(model)
    loss = F.cross_entropy(model(ids)[None], target[None])
    grads = dict(zip(theta0, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    # the summed gradient differs from either use's gradient alone
    emb_only = torch.autograd.grad(
        F.cross_entropy((torch.tanh(model.mix(model.emb(ids).mean(0))) @ theta0["emb.weight"].t())[None], target[None]),
        model.emb.weight,
    )[0]
    assert not torch.allclose(emb_only, grads["emb.weight"])

    recorder = Recorder()  # the hooks see every update, in both modes
    opt = build_optimizer(model.named_parameters(), "sgd", 0.5, hooks=recorder)
    assert [n for n, _ in opt.named_parameters()] == ["emb.weight", "mix.weight", "mix.bias"]
    with opt.in_backward(in_backward):
        loss = F.cross_entropy(model(ids)[None], target[None])
        loss.backward()
    if not in_backward:
        opt.step()
    assert recorder.seen.count("emb.weight") == 1
    assert sorted(recorder.seen) == sorted(theta0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] - 0.5 * grads[n], rtol=0, atol=1e-7)
        assert (p.grad is None) == in_backward  # freed by the backward-pass update; step() keeps it


# ------------------------------------------------------------------------------------------- odds and ends
def test_make_rule():
    assert isinstance(make_rule("sgd"), SGDRule)
    assert isinstance(make_rule("momentum"), MomentumRule)
    adam, adamw = make_rule("adam"), make_rule("adamw")
    assert isinstance(adam, AdamRule) and adam.weight_decay == 0.0
    assert isinstance(adamw, AdamRule) and adamw.weight_decay == 0.1
    assert make_rule("momentum", momentum=0.5).momentum == 0.5
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_rule("rmsprop")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(linear().named_parameters(), "rmsprop", LR)


def test_frozen_and_gradless_parameters_are_left_alone_and_not_counted():
    """A parameter without a gradient (frozen, or simply unused) neither moves nor counts as updated.

    (The former ParameterUpdater dropped ``requires_grad=False`` parameters when built; ``cnl train`` now
    passes only the trainable ones to ``build_optimizer``, and a frozen one given anyway is skipped.)"""
    lin = linear()
    lin.bias.requires_grad_(False)
    opt = build_optimizer(lin.named_parameters(), "sgd", LR)
    assert [n for n, _ in opt.named_parameters()] == ["weight", "bias"]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    opt.step()  # no gradient at all: nothing happens
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    assert opt.pop_counts() == (0, 0) and opt.pop_masked_fraction() is None
    lin(torch.randn(2, 5)).sum().backward()
    assert lin.bias.grad is None
    step(opt)
    assert not torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)
    assert opt.pop_counts() == (0, 15)  # only the weight (5·3) was updated


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(kind: str, fused: bool):
    """MaskedOptimizer.state_dict() (through torch.save) into a fresh optimizer: it continues bit for bit."""
    gen = torch.Generator().manual_seed(9)
    a = linear()
    ref = {n: rand_like_with_zeros(p, gen) for n, p in a.named_parameters()}
    opt_a = make_opt(a, kind, ref, fused=fused)
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in a.named_parameters()} for _ in range(4)]
    for g in grads[:2]:
        set_grads(a, g)
        step(opt_a)
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    b, fresh = copy.deepcopy(a), copy.deepcopy(a)
    opt_b = make_opt(b, kind, fused=fused)  # no reference, no state: both come from the state dict
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt_b.reference is not None and len(opt_b.reference) == 2
    keys = {"sgd": set(), "momentum": {"momentum_buffer"}}.get(kind, {"step", "exp_avg", "exp_avg_sq"})
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert set(opt_b.state.get(q, {})) == set(opt_a.state.get(p, {})) == keys
        assert all(torch.equal(v, opt_b.state[q][k]) for k, v in opt_a.state.get(p, {}).items())
    opt_fresh = make_opt(fresh, kind, fused=fused)  # what b would be without the state dict
    masked = []
    for g in grads[2:]:
        for mod, opt in ((a, opt_a), (b, opt_b), (fresh, opt_fresh)):
            set_grads(mod, g)
            step(opt)
        masked.append((opt_a.last_masked, opt_b.last_masked))
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
    assert all(x == y > 0 for x, y in masked), masked
    assert not all(torch.equal(x, y) for x, y in zip(fresh.parameters(), b.parameters(), strict=True))


def test_sparse_embedding_grads_only_for_tied_embeddings_same_gradient() -> None:
    from cnl.optim import sparse_embedding_grads
    from cnl.testing import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer("chatml")
    ids = torch.tensor([tok("Question: which one? A: x B: y", add_special_tokens=False)["input_ids"]])
    for tied in (True, False):
        model = make_tiny_model("qwen2", vocab_size=len(tok), tie_word_embeddings=tied)
        emb = model.get_input_embeddings()
        grads = []
        for sparse in (False, True):
            model.zero_grad(set_to_none=True)
            with sparse_embedding_grads(model, enabled=sparse):
                assert emb.sparse == (sparse and tied)
                model(input_ids=ids).logits[0, -1].logsumexp(-1).backward()
            assert emb.sparse is False  # restored
            g = emb.weight.grad
            grads.append(g.to_dense() if g.is_sparse else g.clone())
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
