"""``ewc`` and ``l2`` against hand computations on a tiny model: EWC's Fisher and anchor, both penalties'
pull on a second SGD step, zero strength as plain fine-tuning, and resuming with the penalties' anchors."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from method_helpers import (
    assert_same,
    crash_in_epoch_two,
    encode,
    hand_fisher,
    in_set,
    load_weights,
    mean_grad,
    tiny,
    train,
    watch_epochs,
    weights,
    without_seconds,
)

import cnl.train as T
from cnl.distributed import SINGLE
from cnl.methods.ewc import diagonal_fisher
from cnl.testing import make_mc_rows, write_jsonl


def test_diagonal_fisher_is_the_mean_of_squared_per_question_gradients(sets: dict[str, Any]) -> None:
    model, tok = tiny()
    questions, pad = encode(tok, sets["rows"]["mastered"])
    frozen = "model.norm.weight"
    model.get_parameter(frozen).requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the run's own gradient passes (cnl.train.Run.example_gradients) on a stand-in for the run
    ctx = SimpleNamespace(
        model=model, params=params, encoded={"mastered": questions}, roles=SimpleNamespace(reference="mastered"),
        dist=SINGLE, pad_id=pad,
    )  # fmt: skip
    ctx.example_gradients = lambda which="reference": T.Run.example_gradients(ctx, which)  # type: ignore[arg-type]
    model.train()
    fisher = diagonal_fisher(ctx)  # type: ignore[arg-type]
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())
    assert set(fisher) == {n for n, _ in params} and frozen not in fisher
    model.get_parameter(frozen).requires_grad_(True)
    expected = hand_fisher(model, questions, pad)
    mean = mean_grad(model, questions, pad, training=False)
    for n, f in fisher.items():
        torch.testing.assert_close(f, expected[n], rtol=1e-5, atol=1e-12)
    # the mean of squares, not the square of the mean
    assert any(not torch.allclose(f, mean[n].pow(2), rtol=0.1, atol=0) for n, f in fisher.items())


@pytest.mark.parametrize("when", ["epoch", "once"])
def test_ewc_fisher_and_anchor_per_epoch_or_once(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    def grab(run: T.Run) -> dict[str, Any]:
        hooks = run.hooks
        return {"fisher": copy.deepcopy(hooks.fisher), "anchor": copy.deepcopy(hooks.anchor)}

    seen = watch_epochs(monkeypatch, "ewc", grab)
    model, tok = tiny()
    start = weights(model)
    cfg = {"method": "ewc", "optimizer": "sgd", "epochs": 2, "ewc_fisher": when, "ewc_lambda": 1.0}
    train(tmp_path / "run", in_set(sets), model=model, tok=tok, **cfg)
    ref_q, pad = encode(tok, sets["rows"]["mastered"])
    assert [s["epoch"] for s in seen] == [1, 2]
    first, second = seen
    assert_same(first["start"], start)
    assert_same(first["anchor"], start)  # θ* = the weights the Fisher was computed at
    for n, f in hand_fisher(tiny()[0], ref_q, pad).items():
        torch.testing.assert_close(first["fisher"][n], f, rtol=1e-5, atol=1e-12)
    if when == "once":
        assert_same(second["anchor"], first["anchor"])
        assert_same(second["fisher"], first["fisher"])
        return
    assert_same(second["anchor"], second["start"])  # recomputed at the start of epoch 2
    assert not torch.equal(second["anchor"]["model.norm.weight"], start["model.norm.weight"])
    at_two = hand_fisher(load_weights(tiny()[0], second["start"]), ref_q, pad)
    for n, f in at_two.items():
        torch.testing.assert_close(second["fisher"][n], f, rtol=1e-5, atol=1e-12)
    assert any(not torch.allclose(second["fisher"][n], first["fisher"][n]) for n in at_two)


def test_ewc_and_l2_second_sgd_step_by_hand(tmp_path: Path, sets: dict[str, Any]) -> None:
    """θ1 = θ0 − lr g1 (θ = θ* on the first step: no pull), θ2 = θ1 − lr (g2 + λ F (θ1 − θ*)); L2-SP is
    the same with F = 1 and θ* = θ0."""
    lr, lam, alpha = 0.05, 1.0, 10.0  # max F is about 70 here
    two_rows = make_mc_rows(2, seed=21)
    two = write_jsonl(tmp_path / "two.jsonl", two_rows)
    base, tok = tiny()
    theta0 = weights(base)
    ref_q, pad = encode(tok, sets["rows"]["mastered"])
    (q1, q2), _ = encode(tok, two_rows)
    fisher = hand_fisher(copy.deepcopy(base), ref_q, pad)
    hand = copy.deepcopy(base)
    g1 = mean_grad(hand, [q1], pad, training=True)
    theta1 = {n: theta0[n] - lr * g1[n] for n in theta0}
    g2 = mean_grad(load_weights(hand, theta1), [q2], pad, training=True)
    pulls = {
        "ewc": ({"ewc_lambda": lam}, {n: lam * fisher[n] * (theta1[n] - theta0[n]) for n in theta0}),
        "l2": ({"l2_alpha": alpha}, {n: alpha * (theta1[n] - theta0[n]) for n in theta0}),
    }
    for method, (options, pull) in pulls.items():
        assert max(float((lr * t).abs().max()) for t in pull.values()) > 1e-4, method  # the pull is visible
        model = copy.deepcopy(base)
        train(
            tmp_path / method,
            in_set(sets, injection=two),
            model=model,
            tok=tok,
            method=method,
            optimizer="sgd",
            lr=lr,
            **options,
        )
        for n, p in model.named_parameters():
            expected = theta1[n] - lr * (g2[n] + pull[n])
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=f"{method} {n}")


@pytest.mark.parametrize(("method", "optimizer"), [("l2", "sgd"), ("l2", "adamw"), ("ewc", "sgd"), ("ewc", "adam")])
def test_zero_strength_is_plain_fine_tuning(tmp_path: Path, sets: dict[str, Any], method: str, optimizer: str) -> None:
    ma, tok = tiny()
    mb, _ = tiny()
    ra = train(tmp_path / "ft", in_set(sets), model=ma, tok=tok, method="ft", optimizer=optimizer, epochs=2)
    zero = {"l2": {"l2_alpha": 0.0}, "ewc": {"ewc_lambda": 0.0}}[method]
    rb = train(tmp_path / method, in_set(sets), model=mb, tok=tok, method=method, optimizer=optimizer, epochs=2, **zero)
    assert without_seconds(ra) == without_seconds(rb)
    assert_same(weights(ma), weights(mb))


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ewc", {"ewc_fisher": "once", "ewc_lambda": 1.0}),
        ("ewc", {"ewc_fisher": "epoch", "ewc_lambda": 1.0}),
        ("l2", {"l2_alpha": 10.0}),
    ],
    ids=["ewc-once", "ewc-epoch", "l2"],
)
def test_resume_keeps_the_penalty_and_equals_an_uninterrupted_run(
    tmp_path: Path,
    sets: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    runs: list,
    method: str,
    options: dict[str, Any],
) -> None:
    cfg = {"method": method, "optimizer": "momentum", "epochs": 2, **options}
    a, b = tmp_path / "a", tmp_path / "b"
    ma, tok = tiny()
    theta0 = weights(ma)
    rows_a = train(a, in_set(sets), model=ma, tok=tok, **cfg)
    hooks_a = runs[-1].hooks

    undo = crash_in_epoch_two(monkeypatch)
    mb, _ = tiny()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(b, in_set(sets), model=mb, tok=tok, **cfg)
    undo()
    assert (b / "checkpoint" / "latest.json").exists()
    half_way = weights(mb)  # the model object as the crash left it, half-way through epoch 2
    rows_b = train(b, in_set(sets), model=mb, tok=tok, resume=True, **cfg)
    hooks_b = runs[-1].hooks
    assert without_seconds(rows_a) == without_seconds(rows_b)
    assert_same(weights(mb), weights(ma))
    assert_same(hooks_b.anchor, hooks_a.anchor)
    if method == "l2" or options["ewc_fisher"] == "once":
        assert_same(hooks_b.anchor, theta0)  # the loaded weights, not the resumed ones
        assert not torch.equal(half_way["model.norm.weight"], theta0["model.norm.weight"])
    if method == "ewc":
        assert_same(hooks_b.fisher, hooks_a.fisher)


def test_l2_anchor_is_the_loaded_weights(tmp_path: Path, sets: dict[str, Any], runs: list) -> None:
    model, tok = tiny(seed=3)
    theta0 = weights(model)
    train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="l2", optimizer="sgd", epochs=2)
    assert_same(runs[-1].hooks.anchor, theta0)
    assert runs[-1].hooks.fisher is None
