"""``agem`` against a hand computation on a tiny model: the projection, and one training step."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from method_helpers import Weights, dot, encode, in_set, mean_grad, tiny, train, weights

from cnl.methods.agem import Projection
from cnl.optimizer import MaskedOptimizer
from cnl.testing import make_mc_rows, write_jsonl


def random_weights(model: torch.nn.Module, gen: torch.Generator) -> Weights:
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.mark.parametrize("conflict", [True, False])
def test_agem_projection_by_hand(conflict: bool) -> None:
    model, _ = tiny()
    params = list(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    ref, g = random_weights(model, gen), random_weights(model, gen)
    skipped = params[0][0]  # a parameter without gradient: g = 0 there
    g[skipped] = torch.zeros_like(g[skipped])
    d = dot(g, ref)
    if (d < 0) != conflict:
        g, d = {n: -t for n, t in g.items()}, -d
    # per tensor the dot products have both signs: only the whole-model sum decides
    signs = {dot({n: g[n]}, {n: ref[n]}) < 0 for n in g}
    assert signs == {True, False}
    hooks = Projection()
    hooks.reference = ref
    hooks.norm_sq = float(sum(r.double().pow(2).sum() for r in ref.values()))
    for n, p in params:
        p.grad = None if n == skipped else g[n].clone()
    hooks.before_step(params)
    assert (hooks.steps, hooks.projected) == (1, int(conflict))
    scale = d / hooks.norm_sq if conflict else 0.0
    for n, p in params:
        if not conflict:  # untouched
            assert p.grad is None if n == skipped else torch.equal(p.grad, g[n])
            continue
        expected = g[n].double() - scale * ref[n].double()
        torch.testing.assert_close(p.grad.double(), expected, rtol=0, atol=1e-6)
    if conflict:
        projected = {n: p.grad for n, p in params}
        assert abs(dot(projected, ref)) <= 1e-6 * math.sqrt(dot(projected, projected) * hooks.norm_sq)


@pytest.mark.parametrize("conflict", [True, False])
def test_agem_train_step_is_the_hand_projection(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, runs: list, conflict: bool
) -> None:
    """One SGD step of ``train`` on one question equals θ − lr·g', g' projected off the hand-computed
    mean gradient of the mastered set, although the config asks for the update in the backward pass."""
    lr = 0.1
    model, tok = tiny()
    start = weights(model)
    ref_q, pad = encode(tok, sets["rows"]["mastered"])
    g_ref = mean_grad(copy.deepcopy(model), ref_q, pad, training=False)
    norm_sq = dot(g_ref, g_ref)
    for row in ({**r, "label": letter} for r in make_mc_rows(6, seed=11) for letter in "ABCD"):
        q, _ = encode(tok, [row])
        g = mean_grad(copy.deepcopy(model), q, pad, training=True)
        d = dot(g, g_ref)
        if (d < 0) is conflict:
            break
    else:
        pytest.fail("no candidate question with the wanted sign of g·g_ref")
    one = write_jsonl(tmp_path / "one.jsonl", [row])

    in_backward: list[bool] = []
    orig = MaskedOptimizer.step_parameter  # what the backward-pass hooks call

    def spy(self: MaskedOptimizer, p: torch.Tensor) -> None:
        in_backward.append(True)
        orig(self, p)

    monkeypatch.setattr(MaskedOptimizer, "step_parameter", spy)
    train(
        tmp_path / "run",
        in_set(sets, injection=one),
        model=model,
        tok=tok,
        method="agem",
        optimizer="sgd",
        lr=lr,
        update_in_backward=True,
    )
    assert in_backward == []  # the update ran after the backward pass
    hooks = runs[-1].hooks
    assert (hooks.steps, hooks.projected) == (1, int(conflict))
    for n in g_ref:
        torch.testing.assert_close(hooks.reference[n], g_ref[n], rtol=1e-5, atol=1e-5)  # batched: fp32 noise
    scale = d / norm_sq if conflict else 0.0
    step = {n: g[n].double() - scale * g_ref[n].double() for n in g}
    if conflict:
        assert abs(dot(step, g_ref)) < 1e-6 * math.sqrt(dot(step, step) * norm_sq)
        assert max(float((lr * scale * t).abs().max()) for t in g_ref.values()) > 1e-4  # visible at 1e-6
    for n, p in model.named_parameters():
        expected = (start[n].double() - lr * step[n]).float()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
