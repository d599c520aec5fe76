"""``mofo`` against a hand computation on a tiny model: which elements a MoFO step moves and by how much."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from method_helpers import ALLOWED, LR, assert_same, encode, in_set, tiny, train, weights, without_seconds

from cnl.methods import get_method
from cnl.methods.mofo import MoFOOptions
from cnl.optimizer import build_optimizer
from cnl.resolve import train_config
from cnl.scoring import batch_losses
from cnl.testing import make_mc_rows

MOMENT = {"momentum": "momentum_buffer", "adam": "exp_avg", "adamw": "exp_avg"}


@pytest.mark.parametrize("plain_fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("optimizer", ALLOWED["mofo"])
def test_mofo_step_moves_exactly_the_top_fraction_by_first_moment(optimizer: str, plain_fused: bool) -> None:
    """Two steps of MoFO next to the unfiltered rule on a copy of the same weights and state: the top
    ceil(f·n) elements by |first moment| move exactly as the rule moves them, the rest not at all; 1-D
    tensors move as the rule says; the optimizer state is the unfiltered one."""
    fraction, lr = 0.15, LR[optimizer]
    model, tok = tiny()
    questions, pad = encode(tok, make_mc_rows(2, seed=3))
    cfg = train_config(method="mofo", optimizer=optimizer, mofo_fraction=fraction)
    hooks = get_method("mofo").make_hooks(cfg, list(model.named_parameters()))
    filtered = build_optimizer(model.named_parameters(), optimizer, lr, hooks=hooks)
    assert hooks.freezes
    n_elements = sum(p.numel() for p in model.parameters())
    for step, e in enumerate(questions, 1):
        twin = copy.deepcopy(model)
        plain = build_optimizer(twin.named_parameters(), optimizer, lr, fused=plain_fused)
        plain.load_state_dict(filtered.state_dict())  # the same state as the filtered one, on the twin
        before = weights(model)
        for m in (model, twin):
            batch_losses(m, [e], pad)[0].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, p in twin.named_parameters():
            assert torch.equal(p.grad, grads[n])
        for opt in (filtered, plain):
            opt.step()
            opt.zero_grad(set_to_none=True)
        frozen = 0
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
            ours, theirs = filtered.state[p], plain.state[q]
            assert ours.keys() == theirs.keys()
            for key in ours:  # the state comes from every element's gradient
                assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), (n, key)
            assert p.grad is None
            if p.dim() < 2:
                assert torch.equal(p, q), n  # 1-D: the rule's update everywhere
                continue
            moment = theirs[MOMENT[optimizer]]
            if step == 1:  # v = g (momentum), m = (1 - β1) g (Adam)
                expected = grads[n] * (1.0 if optimizer == "momentum" else 1 - 0.9)
                torch.testing.assert_close(moment, expected, rtol=1e-6, atol=0)
            k = math.ceil(fraction * p.numel())
            kth = moment.abs().flatten().topk(k).values[-1]
            top = moment.abs() >= kth
            assert int(top.sum()) == k, n  # no ties in these tensors: exactly the top k
            assert torch.equal(p[top], q[top]), n  # moved by exactly the unfiltered update
            assert torch.equal(p[~top], before[n][~top]), n  # the rest bit-unchanged
            assert int((p[top] != before[n][top]).sum()) >= k * 0.99, n  # and the chosen ones did move
            frozen += p.numel() - k
        assert filtered.pop_counts() == (frozen, n_elements)
        assert 0.8 < frozen / n_elements < 0.85


@pytest.mark.parametrize(("fraction", "optimizer"), [(0.15, "adamw"), (0.5, "momentum")])
def test_mofo_masked_fraction_in_summary_is_the_frozen_share(
    tmp_path: Path, sets: dict[str, Any], fraction: float, optimizer: str
) -> None:
    model, tok = tiny()
    cfg = {"method": "mofo", "optimizer": optimizer, "mofo_fraction": fraction, "epochs": 2}
    rows = train(tmp_path / "run", in_set(sets), model=model, tok=tok, **cfg)
    sizes = [(p.dim(), p.numel()) for p in model.parameters()]
    frozen = sum(n - math.ceil(fraction * n) for d, n in sizes if d >= 2)
    assert [r["masked_fraction"] for r in rows] == [round(frozen / sum(n for _, n in sizes), 6)] * 2


@pytest.mark.parametrize("optimizer", ["adamw", "momentum"])
def test_mofo_fraction_one_is_the_plain_optimizer(tmp_path: Path, sets: dict[str, Any], optimizer: str) -> None:
    ma, tok = tiny()
    mb, _ = tiny()
    ra = train(tmp_path / "ft", in_set(sets), model=ma, tok=tok, method="ft", optimizer=optimizer, epochs=2)
    rb = train(
        tmp_path / "mofo",
        in_set(sets),
        model=mb,
        tok=tok,
        method="mofo",
        optimizer=optimizer,
        epochs=2,
        mofo_fraction=1.0,
    )
    assert without_seconds(ra) == without_seconds(rb)
    assert all(r["masked_fraction"] == 0 for r in rb)
    assert_same(weights(ma), weights(mb))


def test_mofo_defaults_to_adamw() -> None:
    assert get_method("mofo").defaults == {"optimizer": "adamw"}
    assert MoFOOptions().fraction == 0.15 and get_method("mofo").options_class is MoFOOptions


@pytest.mark.parametrize("optimizer", ALLOWED["mofo"])
def test_mofo_fused_selection_is_bit_identical_to_kthvalue(optimizer: str) -> None:
    """The threshold ladder (fused CPU kernels) against the definition (eager rule + torch.kthvalue) over steps
    that hit the ladder, need its wide retry (a gradient 10x larger) and fall back (a 1000x jump), on tensors
    with ties, zeros and one split into ranges between two threads: weights, state and counts bit for bit."""
    from cnl import kernels
    from cnl.methods.mofo import MomentumFilter

    if not kernels.band_available(torch.zeros(1), torch.zeros(1)):
        pytest.skip("no CPU kernels here")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        shapes = [(40, 30), (200,), (70_001,), (64, 96)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        names = [str(i) for i in range(len(params))]
        always = {n for n, p in zip(names, params, strict=True) if p.dim() <= 1}
        fast, slow = MomentumFilter(0.15, always), MomentumFilter(0.15, always)
        slow.fused_select = None  # the definition only
        lr = LR[optimizer]
        opts = [build_optimizer(list(zip(names, ps, strict=True)), optimizer, lr, hooks=h)
                for ps, h in ((params, fast), (twins, slow))]  # fmt: skip
        scale = [1, 1, 1, 10, 1, 1000, 1, 1]
        for step, s in enumerate(scale):
            for p, q in zip(params, twins, strict=True):
                g = torch.randn(p.shape, generator=gen) * s
                if step == 2:
                    g.view(-1)[::3] = 0.0  # zeros in the moments
                if step == 4:
                    g.view(-1)[: g.numel() // 2] = g.view(-1)[0]  # many ties
                p.grad, q.grad = g.clone(), g.clone()
            for o in opts:
                o.step()
            assert opts[0].pop_counts() == opts[1].pop_counts(), step
            for p, q in zip(params, twins, strict=True):
                assert torch.equal(p.view(torch.int32), q.view(torch.int32)), step
                for key, value in opts[0].state[p].items():
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(opts[1].state[q][key])), (step, key)
        assert fast.stats["ladder"] > 0 and fast.stats["wide"] > 0 and fast.stats["fallback"] > 0, fast.stats
    finally:
        torch.set_num_threads(threads)
