"""``asft`` against its definition, computed by hand on a tiny model: the objective's value (DFT's
probability-weighted cross-entropy plus λ·KL to the starting model, at the task loss's target positions), its
gradient through the training loop, DFT at the start and at λ = 0, multiple-choice and open-ended answers, the
anchor kept at the original start on --resume, its options, and a run from the command line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import run_cli
from method_helpers import (
    N_INJECTION,
    assert_same,
    encode,
    in_set,
    load_weights,
    tiny,
    train,
    weights,
    without_seconds,
)

from cnl.answers import OpenEncoded
from cnl.errors import ConfigError
from cnl.methods import get_method, validate_train_config
from cnl.methods.asft import AnchoredLoss, asft_losses
from cnl.resolve import resolve_configs, train_config
from cnl.scoring import batch_losses
from cnl.testing import make_open_rows, write_jsonl


@pytest.fixture(scope="module")
def open_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Open-ended facts: M = 2 rows, I = 2 rows."""
    d = tmp_path_factory.mktemp("open")
    rows = make_open_rows(4, seed=3)
    parts = {"mastered": rows[:2], "injection": rows[2:]}
    return {"files": {k: write_jsonl(d / f"{k}.jsonl", v) for k, v in parts.items()}, "rows": parts}


def injection(fmt: str, sets: dict[str, Any], open_sets: dict[str, Any]) -> tuple[dict[str, Path], list[dict]]:
    """Two training questions of the format: the set files and the injection rows."""
    if fmt == "open":
        return dict(open_sets["files"]), open_sets["rows"]["injection"]
    return in_set(sets, injection=sets["files"]["injection1"]), sets["rows"]["injection1"]


#: The hand formula's precision: the implementation's (float64 would differ by 2e-4 of a step where the KL's
#: gradient p − q cancels, which is float32's rounding of p and q, not a difference of definition).
DTYPE = torch.float32


def hand_objective(
    model: torch.nn.Module, anchor: torch.nn.Module, e: Any, lam: float, direction: str = "forward"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One question's ``(ASFT objective, task loss)`` written out: one forward pass of the unpadded prompt (and
    answer) per model, the full logits; at each target position sg(p_y)·(−log p_y) + λ·KL, averaged
    over the question's targets."""
    if isinstance(e, OpenEncoded):
        ids, targets = [*e.input_ids, *e.loss_ids], list(e.loss_ids)
        positions = list(range(len(e.input_ids) - 1, len(ids) - 1))
    else:
        ids, targets, positions = list(e.input_ids), [e.target], [len(e.input_ids) - 1]
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, positions].to(DTYPE)
    with torch.no_grad():
        ref = anchor(input_ids=x).logits[0, positions].to(DTYPE)
    log_p, log_q = logits.log_softmax(-1), ref.log_softmax(-1)
    log_py = log_p[torch.arange(len(targets)), torch.tensor(targets)]
    dft = -log_py.detach().exp() * log_py
    kl = {
        "forward": (log_q.exp() * (log_q - log_p)).sum(-1),  # KL(p_start ‖ p_θ)
        "reverse": (log_p.exp() * (log_p - log_q)).sum(-1),  # KL(p_θ ‖ p_start)
    }[direction]
    return (dft + lam * kl).mean(), -log_py.mean()


# ------------------------------------------------------------------------------------------ the objective
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("fmt", ["mcq", "open"])
def test_objective_value_by_hand(sets: dict[str, Any], open_sets: dict[str, Any], fmt: str, direction: str) -> None:
    model, tok = tiny(seed=0)
    start, _ = tiny(seed=1)  # another starting model, so that the KL is not 0
    _, rows = injection(fmt, sets, open_sets)
    questions, pad_id = encode(tok, rows)
    cfg = train_config(method="asft", asft_kl_weight=0.3, asft_kl_direction=direction)
    validate_train_config(cfg)
    loss_fn = get_method("asft").make_loss(cfg, start)
    assert isinstance(loss_fn, AnchoredLoss)
    objective, reported = loss_fn(model, questions, pad_id)  # one batch, left-padded
    assert objective.shape == reported.shape == (len(questions),) and objective.requires_grad
    for i, e in enumerate(questions):
        want, ce = hand_objective(model, start, e, 0.3, direction)
        assert want.item() - hand_objective(model, start, e, 0.0)[0].item() > 1e-3  # the KL term counts
        assert math.isclose(objective[i].item(), want.item(), rel_tol=1e-5, abs_tol=1e-6)
        assert math.isclose(reported[i].item(), ce.item(), rel_tol=1e-5)
    # what the loop reports is the task loss, the other methods' loss
    torch.testing.assert_close(reported, batch_losses(model, questions, pad_id), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("fmt", ["mcq", "open"])
def test_at_the_start_kl_is_zero_and_the_gradient_is_dft(
    sets: dict[str, Any], open_sets: dict[str, Any], fmt: str, direction: str
) -> None:
    model, tok = tiny()
    _, rows = injection(fmt, sets, open_sets)
    (e, _), pad_id = encode(tok, rows)
    loss_fn = AnchoredLoss(model, 0.5, direction)  # the anchor: the model itself, copied
    assert loss_fn.anchor is not model and not any(p.requires_grad for p in loss_fn.anchor.parameters())
    assert not loss_fn.anchor.training
    params = list(model.parameters())
    objective = loss_fn(model, [e], pad_id)[0][0]
    dft = AnchoredLoss(model, 0.0, direction)(model, [e], pad_id)[0][0]
    assert abs(objective.item() - dft.item()) < 1e-7  # KL(p ‖ p) = 0
    g, g_dft = torch.autograd.grad(objective, params), torch.autograd.grad(dft, params)
    for a, b in zip(g, g_dft, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # float32 softmax: p − q ≈ 0
    # and DFT's gradient is p_y times the cross-entropy's: sg(p)·∇(−log p)
    ce = batch_losses(model, [e], pad_id)[0]
    if fmt == "mcq":
        g_ce = torch.autograd.grad(ce, params)
        p_y = math.exp(-ce.item())
        for a, b in zip(g_dft, g_ce, strict=True):
            torch.testing.assert_close(a, p_y * b, rtol=1e-4, atol=1e-8)


def test_asft_losses_by_formula() -> None:
    """Two target tokens over a vocabulary of 3, written out."""
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    anchor = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 2.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2])
    objective, ce = asft_losses(logits, targets, anchor, 0.25, "forward")
    p, q = logits.detach().softmax(-1), anchor.softmax(-1)
    py = p[[0, 1], [1, 2]]
    kl = (q * (q.log() - p.log())).sum(-1)
    assert math.isclose(objective.item(), float((py * -py.log() + 0.25 * kl).mean()), rel_tol=1e-12)
    assert math.isclose(ce.item(), float((-py.log()).mean()), rel_tol=1e-12)
    (grad,) = torch.autograd.grad(objective, logits)
    onehot = torch.nn.functional.one_hot(targets, 3).double()
    # d/dz of sg(p_y)·(−log p_y) = p_y (p − e_y); of KL(q ‖ p) = p − q; halved by the mean over the 2 tokens
    torch.testing.assert_close(grad, (py[:, None] * (p - onehot) + 0.25 * (p - q)) / 2, rtol=1e-12, atol=1e-14)
    reverse, _ = asft_losses(logits, targets, anchor, 0.25, "reverse")
    kl_rev = (p * (p.log() - q.log())).sum(-1)
    assert math.isclose(reverse.item(), float((py * -py.log() + 0.25 * kl_rev).mean()), rel_tol=1e-12)


# ------------------------------------------------------------------------------------------ training
def hand_sgd(model: torch.nn.Module, questions: list[Any], lam: float, lr: float) -> list[float]:
    """ASFT by hand with plain SGD, one question per step, the anchor a frozen copy of the start; returns each
    step's task loss."""
    anchor = load_weights(tiny()[0], weights(model)).eval()
    params = list(model.parameters())
    losses = []
    for e in questions:
        model.train()
        objective, ce = hand_objective(model, anchor, e, lam)
        grads = torch.autograd.grad(objective, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(g.to(p.dtype), alpha=lr)
        losses.append(float(ce))
    model.eval()
    return losses


@pytest.mark.parametrize("lam", [0.0, 2.0])
@pytest.mark.parametrize("fmt", ["mcq", "open"])
def test_sgd_steps_follow_the_hand_written_gradient(
    tmp_path: Path, sets: dict[str, Any], open_sets: dict[str, Any], fmt: str, lam: float
) -> None:
    """Two SGD steps through the loop: the second one's KL to the start is not 0 (λ 2 makes it count)."""
    lr = 0.5
    files, rows = injection(fmt, sets, open_sets)
    model, tok = tiny()
    start = weights(model)
    cfg = {"method": "asft", "optimizer": "sgd", "lr": lr, "asft_kl_weight": lam}
    (row,) = train(tmp_path / "run", files, model=model, tok=tok, **cfg)
    questions, _ = encode(tok, rows)
    twin = load_weights(tiny()[0], start)
    losses = hand_sgd(twin, questions, lam, lr)
    end, expected = weights(model), weights(twin)
    for n in start:  # the same steps, to rounding (another summation order, no padding)
        moved = float((end[n] - start[n]).abs().max())
        assert moved > 0, n
        torch.testing.assert_close(end[n], expected[n], rtol=0, atol=1e-4 * moved, msg=n)
    # train_avg_loss: the task loss before each step, not the objective
    assert math.isclose(row["train_avg_loss"], sum(losses) / len(losses), abs_tol=2e-6)
    # the anchor acted: DFT alone (λ 0) ends elsewhere, far beyond the rounding above; and λ 0 is DFT alone
    dft = load_weights(tiny()[0], start)
    hand_sgd(dft, questions, 0.0, lr)
    gap = max(float((end[n] - w).abs().max() / (end[n] - start[n]).abs().max()) for n, w in weights(dft).items())
    assert (gap > 0.01) is (lam > 0), gap


def test_anchor_is_the_original_start_after_resume(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, runs: list
) -> None:
    cfg = {"method": "asft", "optimizer": "adam", "lr": 1e-2, "epochs": 2, "asft_kl_weight": 1.0}
    model, tok = tiny()
    start = weights(model)
    full = train(tmp_path / "full", in_set(sets), model=model, tok=tok, **cfg)
    assert_same(weights(runs[-1].loss_fn.anchor), start)  # not moved by training

    orig, calls = AnchoredLoss.__call__, [0]

    def crash(self: AnchoredLoss, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] == N_INJECTION + 2:  # the second step of epoch 2
            raise RuntimeError("simulated crash in epoch 2")
        return orig(self, *args)

    monkeypatch.setattr(AnchoredLoss, "__call__", crash)
    crashed, _ = tiny()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "run", in_set(sets), model=crashed, tok=tok, **cfg)
    monkeypatch.setattr(AnchoredLoss, "__call__", orig)
    after_epoch_one = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))["epochs_done"]
    assert after_epoch_one == 1

    resumed, _ = tiny()  # the base model again; the checkpoint brings epoch 1's weights
    rows = train(tmp_path / "run", in_set(sets), model=resumed, tok=tok, resume=True, **cfg)
    run = runs[-1]
    assert_same(weights(run.loss_fn.anchor), start)  # the original start, not the restored weights
    assert without_seconds(rows) == without_seconds(full)
    assert_same(weights(resumed), weights(model))


def test_other_methods_keep_the_task_loss(tmp_path: Path, sets: dict[str, Any], runs: list) -> None:
    model, tok = tiny()
    train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="ft")
    assert runs[-1].loss_fn is None and get_method("ft").make_loss(train_config(method="ft"), model) is None


# ------------------------------------------------------------------------------------------ options and defaults
def test_defaults_and_their_layering(tiny_qwen2_dir: Path) -> None:
    cfg = train_config(method="asft")
    validate_train_config(cfg)
    assert (cfg.options.kl_weight, cfg.options.kl_direction) == (0.1, "forward")
    m = get_method("asft")
    assert m.defaults == {"optimizer": "adamw", "lr": 2e-5, "adamw_weight_decay": 0.0}
    assert not m.supports_sharding and not m.uses_reference and m.optimizers == ("sgd", "momentum", "adam", "adamw")
    c = resolve_configs(model={"model": str(tiny_qwen2_dir)}, train={"method": "asft"})
    assert (c.train.optimizer, c.train.lr, c.train.adamw_weight_decay) == ("adamw", 2e-5, 0.0)
    c = resolve_configs(model={"model": str(tiny_qwen2_dir)}, train={"method": "asft", "optimizer": "sgd", "lr": 0.1})
    assert (c.train.optimizer, c.train.lr) == ("sgd", 0.1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"asft_kl_weight": -0.1}, "asft_kl_weight must be a number >= 0, got -0.1"),
        ({"asft_kl_weight": math.nan}, "asft_kl_weight must be a number >= 0, got nan"),
        ({"asft_kl_weight": math.inf}, "asft_kl_weight must be a number >= 0, got inf"),
        ({"asft_kl_direction": "sideways"}, "asft_kl_direction must be forward or reverse, got 'sideways'"),
    ],
)
def test_bad_options_refused_before_any_work(
    tmp_path: Path, sets: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_train_config(train_config(method="asft", **fields))
    model, tok = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="asft", **fields)
    assert not (tmp_path / "run").exists()
    assert_same(weights(model), before)


# ------------------------------------------------------------------------------------------ command line
def test_cli_trains_with_asft(tmp_path: Path, sets: dict[str, Any], tiny_qwen2_dir: Path) -> None:
    out = tmp_path / "run"
    files = [x for name in ("mastered", "injection") for x in (f"--{name}", str(sets["files"][name]))]
    argv = ["train", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--out", str(out), *files]
    argv += ["--method", "asft", "--epochs", "2", "--lr", "1e-3", "--asft-kl-weight", "0.2"]
    assert run_cli([*argv, "--asft-kl-direction", "reverse"]) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["status"] == "finished" and (info["method"], info["optimizer"]) == ("asft", "adamw")
    resolved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train"]
    assert resolved["asft"] == {"kl_weight": 0.2, "kl_direction": "reverse"}
    assert (resolved["lr"], resolved["adamw_weight_decay"]) == (1e-3, 0.0)
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["train_avg_loss"])) for r in rows)
    assert float(rows[1]["train_avg_loss"]) < float(rows[0]["train_avg_loss"])
