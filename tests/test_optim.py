"""Tests for :mod:`cnl.optim`: every update rule of SPEC §4 through :class:`ParameterUpdater`.

Expected values are computed in the tests from SPEC's formulas (in float64, from the same inputs),
never with the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cnl.mask import SignReference
from cnl.optim import OPTIMIZERS, AdamRule, MomentumRule, ParameterUpdater, SGDRule, make_rule
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


def make_updater(module, kind, ref_tensors=None, storage="bits", lr=LR) -> ParameterUpdater:
    ref = None
    if ref_tensors is not None:
        ref = SignReference(storage)
        for n, p in module.named_parameters():
            ref.set(p, ref_tensors[n])
    return ParameterUpdater(module.named_parameters(), make_rule(kind), lr, ref)


def set_grads(module, grads):
    for n, p in module.named_parameters():
        p.grad = grads[n].clone()


# --------------------------------------------------------------------------------------------- one step
@pytest.mark.parametrize("masked", [False, True], ids=["ft", "cnl"])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_one_step_equals_spec(kind: str, masked: bool):
    gen = torch.Generator().manual_seed(1)
    lin = linear()
    grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()} if masked else None
    up = make_updater(lin, kind, ref)
    spec = Spec(kind)
    expected = spec.step(snapshot(lin), grads, ref)
    set_grads(lin, grads)
    up.step()
    for n, p in lin.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
        assert p.grad is None  # the gradient is freed by the update
    n_masked = up.pop_masked()
    if masked:
        assert n_masked > 0
        assert up.pop_masked() == 0  # popped
    else:
        assert n_masked == 0


def test_masked_count_is_number_of_conflicting_elements():
    gen = torch.Generator().manual_seed(4)
    lin = linear()
    grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    up = make_updater(lin, "sgd", ref)
    set_grads(lin, grads)
    up.step()
    expected = sum(int((grads[n].double() * ref[n].double() < 0).sum()) for n in grads)
    assert up.pop_masked() == expected


@pytest.mark.parametrize("storage", ["bits", "int8"])
def test_momentum_state_is_unmasked_over_three_steps(storage: str):
    gen = torch.Generator().manual_seed(2)
    lin = linear()
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    up = make_updater(lin, "momentum", ref, storage)
    spec = Spec("momentum")
    expected = snapshot(lin)
    v_unmasked = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in lin.named_parameters()}
    for _ in range(3):
        grads = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
        expected = spec.step(expected, grads, ref)
        set_grads(lin, grads)
        up.step()
        for n, p in lin.named_parameters():
            v_unmasked[n] = 0.9 * v_unmasked[n] + grads[n].double()
            torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
            state_v = up.rule.state[n]["v"]
            torch.testing.assert_close(state_v.double(), v_unmasked[n], rtol=0, atol=ATOL)
    # the state really differs from a masked buffer: some masked elements carry a nonzero v
    assert any(bool(((v_unmasked[n] * ref[n].double()) < 0).any()) for n in ref)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_bias_correction_at_steps_one_and_two(kind: str):
    gen = torch.Generator().manual_seed(3)
    lin = linear()
    ref = {n: rand_like_with_zeros(p, gen) for n, p in lin.named_parameters()}
    up = make_updater(lin, kind, ref)
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
        up.step()
        for n, p in lin.named_parameters():
            torch.testing.assert_close(p.detach().double(), expected[n], rtol=0, atol=ATOL)
            st = up.rule.state[n]
            assert st["step"] == t
            torch.testing.assert_close(st["m"].double(), m[n], rtol=0, atol=ATOL)  # unmasked moments
            torch.testing.assert_close(st["v"].double(), s[n], rtol=0, atol=1e-8)


def test_adamw_decay_term_is_inside_the_masked_update():
    """g and g_M agree, but 0.1·θ flips the sign of u: SPEC masks u (decay included), so θ stays."""
    p = torch.nn.Parameter(torch.tensor([-50.0, 50.0, -50.0, 50.0]))
    g = torch.tensor([1.0, -1.0, 1.0, -1.0])
    ref_t = torch.tensor([1.0, -1.0, -1.0, 1.0])
    # step 1: m̂/(√v̂+ε) = sign(g) (up to ε), so u = sign(g) + 0.1 θ = [-4, 4, -4, 4]
    ref = SignReference.from_tensors([(p, ref_t)])
    up = ParameterUpdater([("p", p)], make_rule("adamw"), 0.01, ref)
    p.grad = g.clone()
    up.step()
    # elements 0, 1: g agrees with g_M but u (decay included) conflicts -> frozen
    # elements 2, 3: g conflicts with g_M but u agrees -> updated by -lr * u
    expected = torch.tensor([-50.0, 50.0, -50.0 + 0.01 * 4, 50.0 - 0.01 * 4])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    assert up.pop_masked() == 2


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
    ups = {
        "ft": make_updater(ft, kind),
        "agree": make_updater(agree, kind, {n: u[n].float() for n in u}),
        "conflict": make_updater(conflict, kind, {n: -u[n].float() for n in u}),
    }
    for name, mod in (("ft", ft), ("agree", agree), ("conflict", conflict)):
        set_grads(mod, grads)
        ups[name].step()
    n_elements = sum(p.numel() for p in base.parameters())
    assert ups["agree"].pop_masked() == 0
    assert ups["conflict"].pop_masked() == n_elements
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
    up_a = make_updater(a, kind, ref_tensors, lr=1e-2)
    up_b = make_updater(b, kind, ref_tensors, lr=1e-2)
    up_a.attach()
    assert up_a.attached
    calls: dict[str, int] = {}
    orig = up_a.update

    def counting(param):
        if param.grad is not None:
            name = up_a.names[param]
            calls[name] = calls.get(name, 0) + 1
        return orig(param)

    up_a.update = counting  # type: ignore[method-assign]
    a.train()
    b.train()
    for ids, target in samples:
        tiny_loss(a, ids, target).backward()  # updated inside backward
        assert all(p.grad is None for p in a.parameters())  # no gradient kept after a hooked backward
        tiny_loss(b, ids, target).backward()
        assert all(p.grad is not None for p in b.parameters())
        up_b.step()
        assert all(p.grad is None for p in b.parameters())
    # every parameter, the tied embedding/head included, was updated exactly once per sample
    assert set(calls) == {n for n, _ in a.named_parameters()}
    assert set(calls.values()) == {len(samples)}
    assert up_a.pop_masked() == up_b.pop_masked() > 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n  # same numbers, bit for bit
    up_a.detach()
    assert not up_a.attached
    tiny_loss(a, samples[0][0], 1).backward()  # hooks removed: the gradient accumulates again
    assert all(p.grad is not None for p in a.parameters())


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

    up = ParameterUpdater(model.named_parameters(), SGDRule(), 0.5)
    assert [n for n, _ in up.params] == ["emb.weight", "mix.weight", "mix.bias"]
    fired: list[str] = []
    orig = up.update

    def spy(p):
        fired.append(up.names[p])
        orig(p)

    up.update = spy  # type: ignore[method-assign]
    if in_backward:
        up.attach()
    loss = F.cross_entropy(model(ids)[None], target[None])
    loss.backward()
    if not in_backward:
        up.step()
    assert fired.count("emb.weight") == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta0[n] - 0.5 * grads[n], rtol=0, atol=1e-7)
        assert p.grad is None


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


def test_frozen_and_gradless_parameters_are_skipped():
    lin = linear()
    lin.bias.requires_grad_(False)
    up = ParameterUpdater(lin.named_parameters(), make_rule("sgd"), LR)
    assert [n for n, _ in up.params] == ["weight"]
    assert up.n_elements == 15
    w0 = lin.weight.detach().clone()
    up.step()  # no gradient at all: nothing happens
    assert torch.equal(lin.weight, w0)


@pytest.mark.parametrize("kind", ["momentum", "adamw"])
def test_rule_state_round_trip_continues_identically(kind: str):
    gen = torch.Generator().manual_seed(9)
    a = linear()
    up_a = make_updater(a, kind)
    grads1 = {n: torch.randn(p.shape, generator=gen) for n, p in a.named_parameters()}
    grads2 = {n: torch.randn(p.shape, generator=gen) for n, p in a.named_parameters()}
    set_grads(a, grads1)
    up_a.step()
    b = copy.deepcopy(a)
    up_b = make_updater(b, kind)
    up_b.rule.load_state_dict(copy.deepcopy(up_a.rule.state_dict()), torch.device("cpu"))
    set_grads(a, grads2)
    set_grads(b, grads2)
    up_a.step()
    up_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


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
