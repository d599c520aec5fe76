"""Tests for :class:`cnl.MaskedOptimizer`: exact against ``cnl train``'s rules, frozen elements frozen and
the others moved as the unmasked update moves them, and a real ``torch.optim.Optimizer`` (schedulers,
clipping, ``zero_grad``, ``state_dict`` round trips with the signs, options cnl cannot reproduce refused).
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from collections.abc import Callable

import pytest
import torch

import cnl
from cnl.mask import SignReference
from cnl.optim import UpdateHooks
from cnl.optimizer import MaskedOptimizer, build_optimizer
from cnl.testing import make_tiny_model

VOCAB = 97
LR = {"sgd": 0.05, "momentum": 0.02, "adam": 1e-3, "adamw": 1e-3}
WEIGHT_DECAY = 0.1

#: torch's optimizer for each cnl rule, with the hyperparameters ``build_optimizer`` uses by default.
TORCH_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "adamw": lambda params, lr: torch.optim.AdamW(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY
    ),
}
KINDS = list(TORCH_OPTIMIZERS)


def tiny() -> torch.nn.Module:
    return make_tiny_model("llama", vocab_size=VOCAB, seed=0, num_hidden_layers=1)


def backward(model: torch.nn.Module, step: int) -> None:
    """The LM loss of a fixed random batch for ``step``, back-propagated (same batch for every model)."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (2, 10), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()


def random_reference(model: torch.nn.Module, storage: str = "bits", seed: int = 0) -> SignReference:
    """Signs of random tensors (with exact zeros), keyed by ``model``'s parameters."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for p in model.parameters():
        t = torch.randn(p.shape, generator=gen)
        items.append((p, t.masked_fill(torch.rand(p.shape, generator=gen) < 0.1, 0.0)))
    return SignReference.from_tensors(items, storage=storage)


def same_reference(ref: SignReference, model: torch.nn.Module, like: torch.nn.Module) -> SignReference:
    """``ref`` re-keyed from ``like``'s parameters to ``model``'s (same order)."""
    keys = dict(zip(like.parameters(), model.parameters(), strict=True))
    pairs = [(keys[k], ref.sign(k)) for k in ref.keys()]  # noqa: SIM118 -- SignReference is not iterable
    return SignReference.from_tensors(pairs, storage=ref.storage)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("kind", KINDS)
def test_bit_identical_to_cnl_train_rules(kind: str, fused: bool) -> None:
    """Five masked steps of MaskedOptimizer(torch.optim.X) after the backward pass == five steps of
    ``cnl train``'s optimizer (``build_optimizer`` from the optimizer's name, updating inside the backward pass)."""
    a, b = tiny(), tiny()
    ref_a = random_reference(a)
    ref_b = same_reference(ref_a, b, a)
    train_opt = build_optimizer(a.named_parameters(), kind, LR[kind], adamw_weight_decay=WEIGHT_DECAY, fused=fused)
    train_opt.reference = ref_a
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](b.parameters(), LR[kind]), ref_b, fused=fused)
    masked = []
    for step in range(5):
        with train_opt.in_backward():
            backward(a, step)
        assert all(p.grad is None for p in a.parameters())  # updated (and freed) inside the backward pass
        backward(b, step)
        opt.step()
        opt.zero_grad()
        masked.append((train_opt.pop_counts()[0], opt.last_masked))
        assert params_equal(a, b), f"{kind}: weights differ after step {step + 1}"
    assert all(x == y > 0 for x, y in masked), masked
    assert not params_equal(a, tiny()), "the weights moved"


@pytest.mark.parametrize("kind", KINDS)
def test_unmasked_is_torchs_own_update(kind: str) -> None:
    """reference=None: the plain optimizer (bit for bit for SGD; Adam's arithmetic differs by rounding)."""
    a, b = tiny(), tiny()
    plain = TORCH_OPTIMIZERS[kind](a.parameters(), LR[kind])
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](b.parameters(), LR[kind]))
    for step in range(5):
        for model, o in ((a, plain), (b, opt)):
            backward(model, step)
            o.step()
            o.zero_grad()
    # every updated element counts now (not only those with a stored sign): 0 of them frozen, not None
    assert opt.last_masked == 0 and opt.pop_masked_fraction() == 0.0
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        if kind == "sgd":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["bits", "int8"])
@pytest.mark.parametrize("kind", KINDS)
def test_conflicting_elements_stay_others_move_as_unmasked(kind: str, storage: str) -> None:
    """At every step: where the unmasked change d agrees in sign with the reference (d = -lr·u, so
    u·r < 0) the element is bit-unchanged; everywhere else it equals the unmasked step's result.

    The unmasked twin starts each step from the masked run's exact state (weights and optimizer state
    through ``state_dict``), so the comparison holds at every step, not only the first."""
    model = tiny()
    ref = random_reference(model, storage)
    signs = {p: ref.sign(p) for p in model.parameters()}
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](model.parameters(), LR[kind]), ref)
    frozen_total = 0
    for step in range(3):
        twin = copy.deepcopy(model)
        twin_opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](twin.parameters(), LR[kind]))
        twin_opt.load_state_dict(opt.state_dict())
        twin_opt.reference = None  # the loaded state dict brought the signs along: drop them for the twin
        before = {p: p.detach().clone() for p in model.parameters()}
        backward(model, step)
        backward(twin, step)
        opt.step()
        twin_opt.step()
        frozen = 0
        for (p, b0), q in zip(before.items(), twin.parameters(), strict=True):
            change = q.detach() - b0
            conflict = change * signs[p] > 0
            assert torch.equal(p[conflict], b0[conflict]), f"step {step}: a conflicting element moved"
            assert torch.equal(p[~conflict], q[~conflict]), f"step {step}: a kept element moved differently"
            frozen += int(conflict.sum())
        assert frozen > 0 and opt.last_masked >= frozen  # some conflicting updates round to no change
        frozen_total += frozen
        opt.zero_grad()
    assert frozen_total > 0


def test_parameters_without_a_sign_update_unmasked() -> None:
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(4))
    ref = SignReference.from_tensors([(a, -torch.ones(4))])  # every positive update of a conflicts
    opt = MaskedOptimizer(torch.optim.SGD([a, b], lr=0.1), ref)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    assert torch.equal(a.detach(), a0)
    assert torch.equal(b.detach(), b0 - 0.1 * torch.ones(4))
    # the fraction's denominator is every updated element (a's and b's), no longer only those with a sign
    assert opt.last_masked == 4 and opt.last_masked_fraction == 0.5
    assert opt.pop_counts() == (4, 8)


def test_reference_can_be_replaced_and_fractions_are_counted() -> None:
    model = tiny()
    n = sum(p.numel() for p in model.parameters())
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), random_reference(model, seed=1))
    counts = []
    for step in range(2):
        backward(model, step)
        opt.step()
        opt.zero_grad()
        counts.append(opt.last_masked)
        assert opt.last_masked_fraction == pytest.approx(opt.last_masked / n)
    assert opt.pop_masked_fraction() == pytest.approx(sum(counts) / (2 * n))
    assert opt.pop_masked_fraction() is None  # reset by the read
    opt.reference = None
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 2)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    # without a reference the elements still count as updated (denominator: every updated element)
    assert opt.last_masked == 0 and opt.pop_masked_fraction() == 0.0
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b.sub(g, alpha=0.01))


# ------------------------------------------------------------------------------------------ a real Optimizer


def test_is_a_torch_optimizer_sharing_param_groups() -> None:
    model = tiny()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = cnl.MaskedOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert inner.param_groups[0]["lr"] == 0.5
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.1})
    assert inner.param_groups[-1]["params"] == [extra]
    assert MaskedOptimizer is cnl.MaskedOptimizer
    assert opt.names[extra] == str(len(list(model.parameters())))  # a later group's parameters get names too
    assert "MaskedOptimizer(AdamW" in repr(opt)


def test_lr_scheduler_drives_the_learning_rate() -> None:
    model = tiny()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(3):
            lr = sched.get_last_lr()[0]
            assert lr == pytest.approx(0.1 * 0.5**step)
            before = [p.detach().clone() for p in model.parameters()]
            backward(model, step)
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            sched.step()
            for p, b, g in zip(model.parameters(), before, grads, strict=True):
                assert torch.equal(p.detach(), b.sub(g, alpha=lr))
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_gradient_clipping_and_zero_grad() -> None:
    model = tiny()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(model, 0)
    raw = [p.grad.clone() for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    assert norm > 1e-3
    clipped = [p.grad.clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(raw, clipped, strict=True))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b, g in zip(model.parameters(), before, clipped, strict=True):
        assert torch.equal(p.detach(), b.sub(g, alpha=0.1))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # no gradient: nothing moves, nothing fails
    assert params_equal(model, model)


def test_closure_is_evaluated_with_grad() -> None:
    model = tiny()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ids = torch.arange(8).view(1, 8)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_with_signs(kind: str) -> None:
    a = tiny()
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](a.parameters(), LR[kind]), random_reference(a, "int8"))
    for step in range(2):
        backward(a, step)
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # serializable as is
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "cnl_reference" in saved and saved["cnl_reference"]["storage"] == "int8"

    b = copy.deepcopy(a)
    restored = MaskedOptimizer(TORCH_OPTIMIZERS[kind](b.parameters(), 123.0))
    inner_groups = restored.param_groups
    restored.load_state_dict(saved)
    assert restored.param_groups is inner_groups is restored.optimizer.param_groups  # still shared
    assert restored.param_groups[0]["lr"] == LR[kind]
    assert restored.reference is not None and restored.reference.storage == "int8"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(opt.reference.sign(p), restored.reference.sign(q))
        assert opt.state.get(p, {}).keys() == restored.state.get(q, {}).keys()
        for k, v in opt.state.get(p, {}).items():
            w = restored.state[q][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    for step in range(2, 4):
        for model, o in ((a, opt), (b, restored)):
            backward(model, step)
            o.step()
            o.zero_grad()
        assert opt.last_masked == restored.last_masked > 0
        assert params_equal(a, b)


def test_wrapping_an_optimizer_that_already_stepped_continues_it() -> None:
    """State torch's AdamW already built (exp_avg, exp_avg_sq, a tensor step) is taken over."""
    a, b = tiny(), tiny()
    plain = torch.optim.AdamW(a.parameters(), lr=1e-3)
    inner = torch.optim.AdamW(b.parameters(), lr=1e-3)
    for step in range(2):
        for model, o in ((a, plain), (b, inner)):
            backward(model, step)
            o.step()
            o.zero_grad()
    opt = MaskedOptimizer(inner)
    assert all(opt.state[p]["step"] == 2 and opt.state[p]["exp_avg"].dtype == torch.float32 for p in b.parameters())
    backward(a, 2)
    plain.step()
    backward(b, 2)
    opt.step()
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_low_precision_parameters_keep_float32_moments() -> None:
    p = torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16))
    opt = MaskedOptimizer(torch.optim.Adam([p], lr=1e-2), SignReference.from_tensors([(p, torch.randn(300))]))
    p.grad = torch.randn(300, dtype=torch.bfloat16)
    opt.step()
    assert 0 < opt.last_masked < 300
    q = torch.nn.Parameter(p.detach().clone())
    other = MaskedOptimizer(torch.optim.Adam([q], lr=1e-2))
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["exp_avg"].dtype == other.state[q]["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(other.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.1),
        lambda ps: MaskedOptimizer(torch.optim.SGD(ps, lr=0.1)),
    ],
    ids=["nesterov", "dampening", "sgd-l2", "maximize", "amsgrad", "adam-l2", "adamw-amsgrad", "rmsprop", "nested"],
)
def test_unsupported_options_are_refused(make: Callable[..., torch.optim.Optimizer]) -> None:
    with pytest.raises(ValueError, match=r"not supported|wraps torch.optim.SGD|already a MaskedOptimizer"):
        MaskedOptimizer(make([torch.nn.Parameter(torch.zeros(2))]))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MaskedOptimizer(object())  # type: ignore[arg-type]


def test_adam_with_decoupled_weight_decay_is_adamw() -> None:
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    opt_a = MaskedOptimizer(torch.optim.Adam([a], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True))
    opt_b = MaskedOptimizer(torch.optim.AdamW([b], lr=0.1, weight_decay=0.5))
    for p, o in ((a, opt_a), (b, opt_b)):
        p.grad = torch.linspace(-1, 1, 5)
        o.step()
    assert torch.equal(a.detach(), b.detach())


# ------------------------------------------------------------------------------------------ state shared with torch

#: The per-parameter state keys of each kind (torch's own), and cnl's former names for them.
STATE_KEYS = {"momentum": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}
FORMER_KEYS = {"momentum": {"momentum_buffer": "v"}, "adam": {"exp_avg": "m", "exp_avg_sq": "v"}}


def family(kind: str) -> str:
    return "momentum" if kind == "momentum" else "adam"


def step_all(*pairs: tuple[torch.nn.Module, torch.optim.Optimizer], step: int) -> None:
    """One step of every ``(model, optimizer)`` on the same batch."""
    for model, o in pairs:
        backward(model, step)
        o.step()
        o.zero_grad()


def all_close(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["momentum", "adam", "adamw"])
def test_state_dict_loads_into_a_plain_torch_optimizer(kind: str) -> None:
    """The layout is torch's own: a MaskedOptimizer's state dict loads into torch.optim.X as it is, and torch's
    next steps from it match the MaskedOptimizer's unmasked steps from the same state (to float rounding)."""
    a = tiny()
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](a.parameters(), LR[kind]), random_reference(a))
    for step in range(2):
        step_all((a, opt), step=step)
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(a.parameters()))
    assert all(set(st) == STATE_KEYS[family(kind)] for st in sd["state"].values())
    b, fresh = copy.deepcopy(a), copy.deepcopy(a)
    plain = TORCH_OPTIMIZERS[kind](b.parameters(), 123.0)
    # torch ignores the extra "cnl_reference" entry; a copy, since torch's load keeps the very tensors it is
    # given (state_dict() returns the live ones), and both optimizers go on updating their state in place
    plain.load_state_dict(copy.deepcopy(sd))
    assert plain.param_groups[0]["lr"] == LR[kind]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert set(plain.state[q]) == STATE_KEYS[family(kind)]
        assert all(torch.equal(plain.state[q][k], v) for k, v in opt.state[p].items())
    opt.reference = None  # the unmasked step: what torch computes
    fresh_opt = TORCH_OPTIMIZERS[kind](fresh.parameters(), LR[kind])  # the same weights, no state
    for step in range(2, 4):
        step_all((a, opt), (b, plain), (fresh, fresh_opt), step=step)
        assert all_close(a, b), f"{kind}: torch from the loaded state differs after step {step + 1}"
    assert opt.last_masked == 0
    if kind != "momentum":
        assert all(plain.state[q]["step"] == 4 for q in b.parameters())
    assert not all_close(a, fresh), "the loaded state mattered"


@pytest.mark.parametrize("kind", ["momentum", "adam", "adamw"])
def test_plain_torch_state_dict_loads_into_a_masked_optimizer(kind: str) -> None:
    """A torch optimizer that took two steps: its state dict loaded into a MaskedOptimizer (of other
    parameters with the same weights) continues, unmasked, as torch does (to float rounding)."""
    a = tiny()
    plain = TORCH_OPTIMIZERS[kind](a.parameters(), LR[kind])
    for step in range(2):
        step_all((a, plain), step=step)
    b, fresh = copy.deepcopy(a), copy.deepcopy(a)
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](b.parameters(), 123.0))
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == LR[kind] and opt.optimizer.param_groups[0]["lr"] == LR[kind]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert set(opt.state[q]) == STATE_KEYS[family(kind)]
        assert all(torch.equal(opt.state[q][k], v) for k, v in plain.state[p].items())
    fresh_opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](fresh.parameters(), LR[kind]))
    for step in range(2, 5):
        step_all((a, plain), (b, opt), (fresh, fresh_opt), step=step)
        assert all_close(a, b), f"{kind}: differs from torch after step {step + 1}"
    assert not all_close(a, fresh), "the loaded state mattered"


@pytest.mark.parametrize("kind", ["momentum", "adam", "adamw"])
def test_former_cnl_state_layout_still_loads(kind: str) -> None:
    """A checkpoint in cnl's former layout (Adam: ``m``, ``v``, an int ``step``; momentum: ``v``) is converted
    on load, and the run continues bit for bit."""
    a = tiny()
    opt = MaskedOptimizer(TORCH_OPTIMIZERS[kind](a.parameters(), LR[kind]), random_reference(a))
    for step in range(2):
        step_all((a, opt), step=step)
    sd = opt.state_dict()
    rename = FORMER_KEYS[family(kind)]
    former = {
        **sd,
        "state": {
            i: {rename.get(k, k): (int(v) if k == "step" else v.clone()) for k, v in st.items()}
            for i, st in sd["state"].items()
        },
    }
    first = next(iter(former["state"].values()))
    assert set(first) == ({"v"} if kind == "momentum" else {"step", "m", "v"})
    assert kind == "momentum" or type(first["step"]) is int
    b = copy.deepcopy(a)
    restored = MaskedOptimizer(TORCH_OPTIMIZERS[kind](b.parameters(), LR[kind]))
    restored.load_state_dict(former)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        st = restored.state[q]
        assert set(st) == STATE_KEYS[family(kind)]
        for k, v in opt.state[p].items():
            assert st[k].dtype == torch.float32 and torch.equal(st[k], v), k
        if kind != "momentum":
            assert isinstance(st["step"], torch.Tensor) and st["step"].device.type == "cpu"
    for step in range(2, 4):
        step_all((a, opt), (b, restored), step=step)
        assert opt.last_masked == restored.last_masked > 0
        assert params_equal(a, b), f"{kind}: differs after step {step + 1}"


@pytest.mark.parametrize("layout", ["torch", "former"])
def test_state_of_the_wrong_shape_is_refused_naming_the_parameter(layout: str) -> None:
    a = tiny()
    named = list(a.named_parameters())
    opt = build_optimizer(named, "adam", 1e-3)
    step_all((a, opt), step=0)
    sd = copy.deepcopy(opt.state_dict())
    index, (name, param) = next((i, np) for i, np in enumerate(named) if np[1].dim() == 2)
    if layout == "former":
        sd["state"] = {i: {FORMER_KEYS["adam"].get(k, k): v for k, v in st.items()} for i, st in sd["state"].items()}
    sd["state"][index]["v" if layout == "former" else "exp_avg_sq"] = torch.zeros(param.shape[0] + 1)
    b = copy.deepcopy(a)
    other = build_optimizer(b.named_parameters(), "adam", 5e-3)
    with pytest.raises(ValueError, match=re.escape(f"'exp_avg_sq' of parameter {name} has shape")):
        other.load_state_dict(sd)
    assert not other.state and other.param_groups[0]["lr"] == 5e-3  # nothing was loaded
    sd["state"][index]["v" if layout == "former" else "exp_avg_sq"] = torch.zeros(param.shape)
    other.load_state_dict(sd)  # the same dict with the right shape loads
    assert len(other.state) == len(named)


# ------------------------------------------------------------------------------------------ a method's hooks


class SkipAndSelect(UpdateHooks):
    """Leaves the parameter ``skipped`` alone and zeroes the first ``k`` elements of every other update;
    its state (kept for ``--resume``) is how many updates it filtered."""

    freezes = True

    def __init__(self, skipped: str, k: int = 4) -> None:
        self.skipped, self.k = skipped, k
        self.selected = 0

    def skip(self, key: str) -> bool:
        return key == self.skipped

    def select(self, key: str, param: torch.Tensor, u: torch.Tensor, state: dict | None) -> int:
        k = min(self.k, u.numel())
        u.view(-1)[:k] = 0
        self.selected += 1
        return k

    def state_dict(self) -> dict:
        return {"selected": torch.tensor(self.selected)}

    def load_state_dict(self, state: dict) -> None:
        self.selected = int(state["selected"])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_hooks_skip_and_select_count_as_frozen_in_step_and_in_backward(kind: str) -> None:
    """Frozen count per step = the skipped parameter's elements + the elements ``select`` zeroed, whether
    the update runs in ``step()`` or inside the backward pass; both modes give the same weights."""
    models = {"step": tiny(), "in_backward": tiny()}
    skipped = [n for n, _ in models["step"].named_parameters()][1]
    opts = {
        mode: build_optimizer(
            m.named_parameters(), kind, LR[kind], adamw_weight_decay=WEIGHT_DECAY, hooks=SkipAndSelect(skipped)
        )
        for mode, m in models.items()
    }
    named = dict(models["step"].named_parameters())
    total = sum(p.numel() for p in named.values())
    expected = named[skipped].numel() + 4 * (len(named) - 1)
    for step in range(2):
        for mode, model in models.items():
            opt = opts[mode]
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            if mode == "step":
                backward(model, step)
                opt.step()
                assert opt.last_masked == expected and opt.last_masked_fraction == expected / total
                opt.zero_grad()
            else:
                with opt.in_backward():
                    backward(model, step)
            assert opt.pop_counts() == (expected, total), mode
            for n, p in model.named_parameters():
                if n == skipped:
                    assert torch.equal(p, before[n]), f"{mode}: the skipped parameter moved"
                else:
                    assert torch.equal(p.view(-1)[:4], before[n].view(-1)[:4]), f"{mode}: a selected element moved"
                    assert not torch.equal(p, before[n]), f"{mode}: {n} did not move"
        assert params_equal(models["step"], models["in_backward"])
    for mode, opt in opts.items():
        assert opt.hooks.selected == 2 * (len(named) - 1)
        if kind == "adamw":  # a skipped parameter's state does not advance either
            assert not opt.state.get(dict(models[mode].named_parameters())[skipped])
    sd = opts["in_backward"].state_dict()
    assert set(sd["cnl_hooks"]) == {"selected"} and int(sd["cnl_hooks"]["selected"]) == 2 * (len(named) - 1)
    restored = build_optimizer(
        copy.deepcopy(models["in_backward"]).named_parameters(), kind, LR[kind], hooks=SkipAndSelect(skipped)
    )
    assert restored.hooks.selected == 0
    restored.load_state_dict(sd)
    assert restored.hooks.selected == 2 * (len(named) - 1)


# ------------------------------------------------------------------------------------------ reference_from


def lm_examples(n: int = 7, seed: int = 0, answer_tokens: int = 3) -> list[dict[str, list[int]]]:
    """Examples of different lengths whose labels ignore (-100) all but the last ``answer_tokens`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length - answer_tokens) + ids[length - answer_tokens :]})
    return out


def hand_mean_gradient(model: torch.nn.Module, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The mean over examples of each example's mean label-token cross-entropy gradient, one example at a time."""
    model = copy.deepcopy(model)
    model.zero_grad()
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
        (loss / len(examples)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def signs_by_name(model: torch.nn.Module, ref: SignReference) -> dict[str, torch.Tensor]:
    return {n: ref.sign(p) for n, p in model.named_parameters() if p in ref}


def same_signs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_from_equals_a_per_example_hand_computation() -> None:
    model = tiny()
    examples = lm_examples()
    ref = cnl.reference_from(model, examples, batch_size=3)
    hand = hand_mean_gradient(model, examples)
    got = signs_by_name(model, ref)
    assert got.keys() == hand.keys()
    for name, g in hand.items():
        assert torch.equal(got[name], torch.sign(g).to(torch.int8)), name
    assert all(p.grad is None for p in model.parameters()), "reference_from clears .grad"
    assert not model.training  # tiny() is in eval mode, and stays so
    # the -100 labels matter: with every token labelled, the signs differ
    full = [{"input_ids": e["input_ids"]} for e in examples]
    assert not same_signs(signs_by_name(model, cnl.reference_from(model, full)), got)


def test_reference_from_accepts_every_data_form_and_chunks() -> None:
    import datasets

    from cnl.reference import _pad_collate

    model = tiny()
    model.train()
    examples = lm_examples()
    expected = signs_by_name(model, cnl.reference_from(model, examples, batch_size=2))
    batches = [_pad_collate(examples[i : i + 4]) for i in range(0, len(examples), 4)]
    loader = torch.utils.data.DataLoader(examples, batch_size=5, collate_fn=_pad_collate)
    forms = {
        "batches": batches,
        "dataloader": loader,
        "dataset": datasets.Dataset.from_list(examples),
        "one batch": _pad_collate(examples),
        "collate_fn": examples,
    }
    for form, data in forms.items():
        kw = {"collate_fn": _pad_collate} if form == "collate_fn" else {}
        assert same_signs(signs_by_name(model, cnl.reference_from(model, data, **kw)), expected), form
    chunked = cnl.reference_from(model, examples, chunks=2, storage="int8")
    assert chunked.storage == "int8" and same_signs(signs_by_name(model, chunked), expected)
    assert model.training, "the model's mode is restored"


def test_reference_from_custom_loss_and_trainable_subset() -> None:
    """A custom per-example loss over any batch type; frozen parameters get no sign (LoRA: adapters only)."""
    model = tiny()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn(model: torch.nn.Module, batch: list[list[int]]) -> torch.Tensor:
        return torch.stack([model(input_ids=torch.tensor([ids])).logits[0, -1, ids[0]] for ids in batch])

    ref = cnl.reference_from(model, [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]], loss_fn)
    assert set(signs_by_name(model, ref)) == trainable
    assert all(p.grad is None for p in model.parameters())


def test_reference_from_refuses_what_it_cannot_average() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="empty"):
        cnl.reference_from(model, [])
    ex = lm_examples(2)
    from cnl.reference import _pad_collate

    with pytest.raises(ValueError, match="mixes"):
        cnl.reference_from(model, [ex[0], _pad_collate(ex)])
    packed = {**_pad_collate(ex), "cu_seq_lens_q": torch.tensor([0, 5, 11])}
    with pytest.raises(ValueError, match="padding-free"):
        cnl.reference_from(model, [packed])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        cnl.reference_from(model, ex)


def test_in_backward_leaves_frozen_parameters_alone() -> None:
    """torch optimizers accept parameters that require no gradient (a LoRA base model): in the backward pass
    they get no hook and do not move; the others update as ``step()`` would update them."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    for lin in (a, b):
        lin.bias.requires_grad_(False)
    x = torch.randn(2, 5)
    opt_a = MaskedOptimizer(torch.optim.SGD(a.parameters(), lr=0.1))
    opt_b = MaskedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1))
    bias, weight = a.bias.detach().clone(), a.weight.detach().clone()
    with opt_a.in_backward():
        a(x).sum().backward()
    b(x).sum().backward()
    opt_b.step()
    assert torch.equal(a.bias, bias) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, weight)  # it did move
    assert a.weight.grad is None  # freed in the backward pass
