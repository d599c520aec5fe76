"""Tests for the second wave of methods (``mofo``, ``hft``, ``agem``, ``ewc``, ``l2``), each checked
against a hand computation on a tiny model: which elements a MoFO step moves and by how much, the
structure of HFT's frozen half and that it stays put, A-GEM's projection, EWC's Fisher and penalty,
L2-SP's pull, resuming with the penalties' anchors, and every method from the command line."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from helpers import run_cli

import cnl.train as T
from cnl.config import DataConfig, ModelConfig, TrainConfig
from cnl.data import rows_from_dicts
from cnl.distributed import Dist
from cnl.errors import ConfigError
from cnl.methods import get_method, method_names, validate_train_config
from cnl.methods.agem import Projection
from cnl.methods.ewc import diagonal_fisher
from cnl.optim import OPTIMIZERS, ParameterUpdater, make_rule
from cnl.scoring import Encoded, PromptEncoder, batch_losses
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl

NEW = ("mofo", "hft", "agem", "ewc", "l2")
ALLOWED = {
    "mofo": ("momentum", "adam", "adamw"),
    "hft": OPTIMIZERS,
    "agem": OPTIMIZERS,
    "ewc": OPTIMIZERS,
    "l2": OPTIMIZERS,
}
LR = {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3, "adamw": 1e-3}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
N_INJECTION = 4

Weights = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """M = 4 rows (M1, M2 its halves), I = 4 rows (I1, I2 its halves)."""
    d = tmp_path_factory.mktemp("sets")
    rows = make_mc_rows(8, seed=5)
    m, i = rows[:4], rows[4:]
    parts = {
        "mastered": m,
        "injection": i,
        "mastered1": m[:2],
        "mastered2": m[2:],
        "injection1": i[:2],
        "injection2": i[2:],
    }
    return {"files": {name: write_jsonl(d / f"{name}.jsonl", rs) for name, rs in parts.items()}, "rows": parts}


def in_set(sets: dict[str, Any], **replace: Path) -> dict[str, Path]:
    """The two files of the in-set setting, optionally replaced."""
    return {"mastered": sets["files"]["mastered"], "injection": sets["files"]["injection"], **replace}


def tiny(seed: int = 0, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    tok = make_tiny_tokenizer("chatml")
    return make_tiny_model("qwen2", vocab_size=len(tok), seed=seed, **overrides), tok


def weights(model: torch.nn.Module) -> Weights:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_weights(model: torch.nn.Module, w: Weights) -> torch.nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w[n])
    return model


def assert_same(a: Weights, b: Weights) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def encode(tok: Any, rows: list[dict[str, str]]) -> tuple[list[Encoded], int]:
    enc = PromptEncoder(tok)
    return [enc.encode(r) for r in rows_from_dicts(rows)], enc.pad_id


def mean_grad(model: torch.nn.Module, questions: list[Encoded], pad_id: int, *, training: bool) -> Weights:
    """Mean over ``questions`` of each question's SPEC-loss gradient, one backward pass per question."""
    model.train(training)
    named = list(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in named}
    for e in questions:
        grads = torch.autograd.grad(batch_losses(model, [e], pad_id)[0], [p for _, p in named])
        for (n, _), g in zip(named, grads, strict=True):
            total[n] += g
    return {n: t / len(questions) for n, t in total.items()}


def hand_fisher(model: torch.nn.Module, questions: list[Encoded], pad_id: int) -> Weights:
    """Mean of the squared per-question gradients (eval mode), from a stack of all of them."""
    per = [mean_grad(model, [e], pad_id, training=False) for e in questions]
    return {n: torch.stack([g[n] for g in per]).pow(2).mean(0) for n in per[0]}


def dot(a: Weights, b: Weights) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))


def train(out: Path, files: dict[str, Path], *, model: Any, tok: Any, resume: bool = False, **cfg: Any) -> list:
    cfg.setdefault("epochs", 1)
    cfg.setdefault("lr", LR[cfg.get("optimizer", "sgd")])
    return T.train(
        TrainConfig(**cfg),
        DataConfig(**{k: str(v) for k, v in files.items()}),
        ModelConfig(device="cpu"),
        out,
        resume=resume,
        model=model,
        tokenizer=tok,
        model_tag="tiny",
        progress=False,
        echo=False,
    )


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[T.Run]:
    """Every :class:`cnl.train.Run` that :func:`cnl.train.train` loads during the test."""
    caught: list[T.Run] = []
    orig = T.load

    def spy(*args: Any, **kwargs: Any) -> T.Run:
        run = orig(*args, **kwargs)
        caught.append(run)
        return run

    monkeypatch.setattr(T, "load", spy)
    return caught


def watch_epochs(
    monkeypatch: pytest.MonkeyPatch, name: str, what: Callable[[T.Run], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per epoch: the weights before the method's ``begin_epoch`` and ``what(run)`` after it."""
    cls = type(get_method(name))
    orig = cls.begin_epoch
    seen: list[dict[str, Any]] = []

    def spy(self: Any, run: T.Run, epoch: int) -> None:
        start = weights(run.model)
        orig(self, run, epoch)
        seen.append({"epoch": epoch, "start": start, **what(run)})

    monkeypatch.setattr(cls, "begin_epoch", spy)
    return seen


def crash_in_epoch_two(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make the training loop's 2nd loss of epoch 2 raise; returns the undo."""
    orig, calls = T.batch_losses, [0]

    def crash(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == N_INJECTION + 2:
            raise RuntimeError("simulated crash in epoch 2")
        return orig(*args, **kwargs)

    monkeypatch.setattr(T, "batch_losses", crash)
    return lambda: monkeypatch.setattr(T, "batch_losses", orig)


# ------------------------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("name", NEW)
def test_declared_properties(name: str) -> None:
    m = get_method(name)
    assert name in method_names() and m.name == name and m.summary
    assert m.optimizers == ALLOWED[name]
    assert m.uses_reference is (name in ("agem", "ewc"))
    assert m.sign_reference is False and m.baseline is False and m.fixed_setting is None
    assert m.updates_in_backward is (name != "agem")
    assert set(m.defaults) <= set(TrainConfig.__dataclass_fields__)
    if name in ("mofo", "agem", "ewc", "l2"):
        assert m.supports_sharding is False
    for optimizer in m.optimizers:
        validate_train_config(TrainConfig(method=name, optimizer=optimizer))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "mofo", "optimizer": "sgd"}, "mofo supports momentum, adam, adamw"),
        ({"method": "mofo", "mofo_fraction": 0.0}, "mofo_fraction must be in"),
        ({"method": "mofo", "mofo_fraction": 1.5}, "mofo_fraction must be in"),
        ({"method": "mofo", "mofo_fraction": math.nan}, "mofo_fraction must be in"),
        ({"method": "hft", "hft_redraw": "sometimes"}, "hft_redraw must be epoch or never"),
        ({"method": "ewc", "ewc_lambda": -1.0}, "ewc_lambda must be >= 0"),
        ({"method": "ewc", "ewc_lambda": math.nan}, "ewc_lambda must be >= 0"),
        ({"method": "ewc", "ewc_fisher": "twice"}, "ewc_fisher must be once or epoch"),
        ({"method": "l2", "l2_alpha": -0.5}, "l2_alpha must be >= 0"),
        ({"method": "l2", "l2_alpha": math.nan}, "l2_alpha must be >= 0"),
    ],
)
def test_bad_options_refused_before_any_work(
    tmp_path: Path, sets: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    fields = {"optimizer": "adamw", **fields}
    with pytest.raises(ConfigError, match=message):
        validate_train_config(TrainConfig(**fields))
    model, tok = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, **fields)
    assert not (tmp_path / "run").exists()
    assert_same(weights(model), before)


# ------------------------------------------------------------------------------------------------ mofo
MOMENT = {"momentum": "v", "adam": "m", "adamw": "m"}


@pytest.mark.parametrize("plain_fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("optimizer", ALLOWED["mofo"])
def test_mofo_step_moves_exactly_the_top_fraction_by_first_moment(optimizer: str, plain_fused: bool) -> None:
    """Two steps of MoFO next to the unfiltered rule on a copy of the same weights and state: the top
    ceil(f·n) elements by |first moment| move exactly as the rule moves them, the rest not at all; 1-D
    tensors move as the rule says; the optimizer state is the unfiltered one."""
    fraction, lr = 0.15, LR[optimizer]
    model, tok = tiny()
    questions, pad = encode(tok, make_mc_rows(2, seed=3))
    cfg = TrainConfig(method="mofo", optimizer=optimizer, mofo_fraction=fraction)
    filtered = ParameterUpdater(model.named_parameters(), make_rule(optimizer), lr)
    filtered.hooks = get_method("mofo").make_hooks(cfg, model)
    assert filtered.counts_frozen
    for step, e in enumerate(questions, 1):
        twin = copy.deepcopy(model)
        plain = ParameterUpdater(twin.named_parameters(), copy.deepcopy(filtered.rule), lr, fused=plain_fused)
        before = weights(model)
        for m in (model, twin):
            batch_losses(m, [e], pad)[0].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, p in twin.named_parameters():
            assert torch.equal(p.grad, grads[n])
        filtered.step()
        plain.step()
        frozen = 0
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
            ours, theirs = filtered.rule.state[n], plain.rule.state[n]
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
        assert filtered.pop_masked() == frozen
        assert 0.8 < frozen / filtered.n_elements < 0.85


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
    assert TrainConfig().mofo_fraction == 0.15


# ------------------------------------------------------------------------------------------------ hft
def check_draw(frozen: set[str], names: list[str], layers: int) -> None:
    """HFT's half: per layer 2 of 4 attention projections (with their biases), FFN 2 of 3 in half of
    the layers and 1 of 3 in the others, half of the norms (rounded down), no embedding or head."""
    assert frozen <= set(names)
    ffn_counts = []
    kinds_seen: set[str] = set()
    for layer in range(layers):

        def frozen_kinds(group: tuple[str, ...], layer: int = layer) -> set[str]:
            out = set()
            for kind in group:
                members = [n for n in names if f"layers.{layer}." in n and f".{kind}." in n]
                assert members, (layer, kind)
                kinds_seen.update(members)
                hit = [n in frozen for n in members]
                assert all(hit) or not any(hit), members  # a bias goes with its projection
                if all(hit):
                    out.add(kind)
            return out

        assert len(frozen_kinds(ATTENTION)) == 2, layer
        ffn_counts.append(len(frozen_kinds(FFN)))
    assert sorted(ffn_counts) == [1] * (layers // 2) + [2] * (layers // 2)
    norms = [n for n in names if "norm" in n]
    assert len(norms) == 2 * layers + 1
    assert len(frozen & set(norms)) == len(norms) // 2
    assert frozen <= kinds_seen | set(norms)  # nothing else: no embedding, no output head
    assert not any("embed" in n or "lm_head" in n for n in frozen)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hft_draw_structure(tied: bool) -> None:
    model, _ = tiny(num_hidden_layers=4, tie_word_embeddings=tied)
    names = [n for n, _ in model.named_parameters()]
    assert ("lm_head.weight" in names) is not tied
    hooks = get_method("hft").make_hooks(TrainConfig(method="hft"), model)
    draws = []
    for seed in range(6):
        hooks.draw(random.Random(seed))
        check_draw(hooks.frozen, names, 4)
        assert all(hooks.skip(n) == (n in hooks.frozen) for n in names)
        draws.append(frozenset(hooks.frozen))
    hooks.draw(random.Random(0))
    assert hooks.frozen == draws[0]  # one seed, one draw
    assert len(set(draws)) > 1  # the draw is random


@pytest.mark.parametrize("redraw", ["epoch", "never"])
def test_hft_redraw_per_epoch_from_the_run_seed(redraw: str) -> None:
    model, _ = tiny(num_hidden_layers=4)
    names = [n for n, _ in model.named_parameters()]
    method = get_method("hft")

    def draws(seed: int) -> list[frozenset[str]]:
        cfg = TrainConfig(method="hft", hft_redraw=redraw, seed=seed)
        hooks = method.make_hooks(cfg, model)
        run = SimpleNamespace(cfg=cfg, updater=SimpleNamespace(hooks=hooks))
        out = []
        for epoch in (1, 2, 3):
            method.begin_epoch(run, epoch)  # type: ignore[arg-type]
            check_draw(hooks.frozen, names, 4)
            out.append(frozenset(hooks.frozen))
        return out

    a = draws(0)
    assert draws(0) == a  # deterministic for a seed
    assert draws(1)[0] != a[0]  # another seed, another draw
    if redraw == "epoch":
        assert len(set(a)) == 3
    else:
        assert len(set(a)) == 1


@pytest.mark.parametrize(("redraw", "optimizer"), [("epoch", "sgd"), ("never", "adam")])
def test_hft_training_leaves_the_frozen_half_untouched(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, runs: list, redraw: str, optimizer: str
) -> None:
    seen = watch_epochs(monkeypatch, "hft", lambda run: {"frozen": set(run.updater.hooks.frozen)})
    cfg = {"method": "hft", "optimizer": optimizer, "epochs": 2, "hft_redraw": redraw, "seed": 7}
    model, tok = tiny(num_hidden_layers=4)
    rows = train(tmp_path / "a", in_set(sets), model=model, tok=tok, **cfg)
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert [s["epoch"] for s in seen] == [1, 2]
    for s, end, row in zip(seen, [seen[1]["start"], weights(model)], rows, strict=True):
        check_draw(s["frozen"], names, 4)
        for n in names:
            if n in s["frozen"]:
                assert torch.equal(end[n], s["start"][n]), n
            else:
                assert not torch.equal(end[n], s["start"][n]), n
        frozen = sum(sizes[n] for n in s["frozen"])
        assert row["masked_fraction"] == round(frozen / sum(sizes.values()), 6)
        assert 0.3 < row["masked_fraction"] < 0.7
    assert (seen[0]["frozen"] != seen[1]["frozen"]) is (redraw == "epoch")
    if optimizer == "adam":  # a frozen tensor's optimizer state does not move either
        state = runs[-1].updater.rule.state
        assert set(state) == set(names) - seen[0]["frozen"]
        assert all(st["step"] == 2 * N_INJECTION for st in state.values())

    # the same seed draws the same halves and ends at the same weights
    first = [s["frozen"] for s in seen]
    seen.clear()
    again, _ = tiny(num_hidden_layers=4)
    assert without_seconds(train(tmp_path / "b", in_set(sets), model=again, tok=tok, **cfg)) == without_seconds(rows)
    assert [s["frozen"] for s in seen] == first
    assert_same(weights(again), weights(model))


# ------------------------------------------------------------------------------------------------ agem
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

    attached: list[bool] = []
    orig_attach = ParameterUpdater.attach

    def attach(self: ParameterUpdater) -> None:
        attached.append(True)
        orig_attach(self)

    monkeypatch.setattr(ParameterUpdater, "attach", attach)
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
    assert attached == []  # the update ran after the backward pass
    hooks = runs[-1].updater.hooks
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


# ------------------------------------------------------------------------------------------------ ewc
def test_diagonal_fisher_is_the_mean_of_squared_per_question_gradients(sets: dict[str, Any]) -> None:
    model, tok = tiny()
    questions, pad = encode(tok, sets["rows"]["mastered"])
    frozen = "model.norm.weight"
    model.get_parameter(frozen).requires_grad_(False)
    updater = ParameterUpdater(model.named_parameters(), make_rule("sgd"), 1.0)
    run = SimpleNamespace(model=model, updater=updater, encoded={"mastered": questions}, pad_id=pad)
    model.train()
    fisher = diagonal_fisher(run, "mastered")  # type: ignore[arg-type]
    assert model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())
    assert set(fisher) == {n for n, _ in updater.params} and frozen not in fisher
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
        hooks = run.updater.hooks
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
    hooks_a = runs[-1].updater.hooks

    undo = crash_in_epoch_two(monkeypatch)
    mb, _ = tiny()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(b, in_set(sets), model=mb, tok=tok, **cfg)
    undo()
    assert (b / "checkpoint" / "latest.json").exists()
    half_way = weights(mb)  # the model object as the crash left it, half-way through epoch 2
    rows_b = train(b, in_set(sets), model=mb, tok=tok, resume=True, **cfg)
    hooks_b = runs[-1].updater.hooks
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
    assert_same(runs[-1].updater.hooks.anchor, theta0)
    assert runs[-1].updater.hooks.fisher is None


# ------------------------------------------------------------------------------------------------ cli
EXTRA = {
    "mofo": ["--mofo-fraction", "0.5"],
    "hft": ["--hft-redraw", "never"],
    "agem": [],
    "ewc": ["--ewc-lambda", "1", "--ewc-fisher", "once"],
    "l2": ["--l2-alpha", "10"],
}
EXTRA_FIELDS = {
    "mofo": {"mofo_fraction": 0.5},
    "hft": {"hft_redraw": "never"},
    "agem": {},
    "ewc": {"ewc_lambda": 1.0, "ewc_fisher": "once"},
    "l2": {"l2_alpha": 10.0},
}
OOD = [
    ("mofo", "momentum", "ood-correct"),
    ("hft", "sgd", "ood-wrong"),
    ("agem", "adam", "ood-correct"),
    ("ewc", "momentum", "ood-wrong"),
    ("l2", "adamw", "ood-correct"),
    ("ewc", "sgd", "ood-correct"),
]
CLI_COMBOS = [(m, o, "in-set") for m in NEW for o in ALLOWED[m]] + OOD
REFERENCE = {"in-set": "mastered", "ood-correct": "mastered1", "ood-wrong": "mastered"}


def cli_args(model_dir: Path, sets: dict[str, Any], out: Path, *extra: str) -> list[str]:
    files = [x for name, path in sets["files"].items() for x in (f"--{name}", str(path))]
    return ["train", "--model", str(model_dir), "--device", "cpu", "--out", str(out), *files, *extra]


@pytest.mark.parametrize(("method", "optimizer", "setting"), CLI_COMBOS, ids=["/".join(c) for c in CLI_COMBOS])
def test_cli_runs_every_new_method(
    tmp_path: Path, sets: dict[str, Any], tiny_qwen2_dir: Path, method: str, optimizer: str, setting: str
) -> None:
    out = tmp_path / "run"
    flags = ["--method", method, "--optimizer", optimizer, "--setting", setting, "--epochs", "1"]
    assert run_cli(cli_args(tiny_qwen2_dir, sets, out, *flags, "--lr", str(LR[optimizer]), *EXTRA[method])) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["status"] == "finished" and info["epochs_done"] == 1
    assert (info["method"], info["optimizer"], info["setting"]) == (method, optimizer, setting)
    assert info["roles"]["reference"] == (REFERENCE[setting] if get_method(method).uses_reference else None)
    resolved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train"]
    for k, v in EXTRA_FIELDS[method].items():
        assert resolved[k] == v
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert (float(row["masked_fraction"]) > 0) is (method in ("mofo", "hft"))


def test_cli_refuses_sgd_for_mofo(
    tmp_path: Path, sets: dict[str, Any], tiny_qwen2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    capsys.readouterr()
    assert run_cli(cli_args(tiny_qwen2_dir, sets, out, "--method", "mofo", "--optimizer", "sgd")) == 2
    err = capsys.readouterr().err
    assert "mofo supports momentum, adam, adamw" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_train_help_shows_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--mofo-fraction", "--hft-redraw", "--ewc-lambda", "--ewc-fisher", "--l2-alpha"):
        assert flag in text


@pytest.mark.parametrize("method", NEW)
def test_sharding_refused_unless_supported(tmp_path: Path, sets: dict[str, Any], method: str) -> None:
    data = DataConfig(**{k: str(v) for k, v in sets["files"].items()})
    cfg = TrainConfig(method=method, optimizer=ALLOWED[method][0])
    single = T.plan_run(cfg, data, ModelConfig(device="cpu"), tmp_path / "one")
    assert single.dist.world == 1

    def sharded() -> T.RunPlan:
        return T.plan_run(cfg, data, ModelConfig(device="cpu"), tmp_path / "two", dist=Dist(rank=0, world=2))

    if get_method(method).supports_sharding:
        assert sharded().dist.world == 2
    else:
        with pytest.raises(ConfigError, match=f"--method {method} does not run sharded"):
            sharded()
        assert not (tmp_path / "two").exists()


@pytest.fixture(autouse=True)
def _no_leftover_patches() -> Iterator[None]:
    """The method objects are process-wide: a test must not leave an instance attribute on them."""
    yield
    for name in NEW:
        assert "begin_epoch" not in vars(get_method(name))
