"""Tests for :mod:`cnl.analyze` (SPEC §5): neuron statistics and gradient distance on the tiny models.

The library computes mean gradients in padded batches and d_m inside backward hooks; every quantity is
also computed here the plain way -- one unpadded prompt at a time, ``model(input_ids).logits[0, -1]``,
``F.cross_entropy`` -- and the results are compared.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnl.analyze import (
    MODULE_KINDS,
    ClassCounts,
    classify_parameter,
    distance_table,
    gradient_distance,
    neuron_statistics,
    quantile_bins,
    thirds_follow_up,
    write_neuron_outputs,
)
from cnl.data import rows_from_dicts
from cnl.scoring import Encoded, PromptEncoder
from cnl.testing import DEFAULT_TEMPLATE_FOR_ARCH, make_mc_rows, make_tiny_model, make_tiny_tokenizer

# ------------------------------------------------------------------------------- helpers (independent)


def _setup(arch: str, tie: bool, n: int = 14, seed: int = 0) -> tuple[torch.nn.Module, list[Encoded], int]:
    """A tiny model (all parameters trainable), ``n`` encoded questions and the pad id."""
    tok = make_tiny_tokenizer(DEFAULT_TEMPLATE_FOR_ARCH[arch])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    model = make_tiny_model(arch, vocab_size=len(tok), seed=seed, tie_word_embeddings=tie, pad_token_id=pad_id)
    for p in model.parameters():
        p.requires_grad_(True)
    enc = PromptEncoder(tok).encode_all(rows_from_dicts(make_mc_rows(n, seed=seed)))
    return model, enc, pad_id


def _loss(model: torch.nn.Module, e: Encoded) -> torch.Tensor:
    """SPEC §2 loss of one question: full-vocabulary cross-entropy at the last prompt position."""
    logits = model(torch.tensor([list(e.input_ids)])).logits[0, -1]
    return F.cross_entropy(logits, torch.tensor(e.target))


def _sample_grad(model: torch.nn.Module, e: Encoded) -> tuple[dict[str, torch.Tensor], float]:
    """Per-parameter gradient (float64) of one question's loss, and the loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss = _loss(model, e)
    loss.backward()
    g = {
        n: (p.grad.double().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64))
        for n, p in named
    }
    model.zero_grad(set_to_none=True)
    return g, float(loss.detach())


def _mean_grad(model: torch.nn.Module, encoded: list[Encoded]) -> tuple[dict[str, torch.Tensor], float]:
    """Mean of one-at-a-time per-sample gradients, and the mean loss."""
    acc: dict[str, torch.Tensor] = {}
    total = 0.0
    for e in encoded:
        g, loss = _sample_grad(model, e)
        total += loss
        for k, v in g.items():
            acc[k] = acc[k] + v if k in acc else v
    return {k: v / len(encoded) for k, v in acc.items()}, total / len(encoded)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------- classify_parameter


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.embed_tokens.weight", (None, "embedding")),
        ("model.layers.0.self_attn.q_proj.weight", (0, "q_proj")),
        ("model.layers.3.self_attn.q_proj.bias", (3, "q_proj")),
        ("model.layers.1.self_attn.k_proj.weight", (1, "k_proj")),
        ("model.layers.1.self_attn.k_proj.bias", (1, "k_proj")),
        ("model.layers.1.self_attn.v_proj.bias", (1, "v_proj")),
        ("model.layers.27.self_attn.o_proj.weight", (27, "o_proj")),
        ("model.layers.12.mlp.gate_proj.weight", (12, "gate_proj")),
        ("model.layers.2.mlp.up_proj.weight", (2, "up_proj")),
        ("model.layers.2.mlp.down_proj.weight", (2, "down_proj")),
        ("model.layers.4.input_layernorm.weight", (4, "norm")),
        ("model.layers.4.post_attention_layernorm.weight", (4, "norm")),
        ("model.norm.weight", (None, "norm")),
        ("lm_head.weight", (None, "output_head")),
        ("layers.5.mlp.gate_proj.weight", (5, "gate_proj")),  # no "model." prefix
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", (0, "q_proj")),  # PEFT
        ("model.some_new_thing.weight", (None, "other")),
    ],
)
def test_classify_parameter_names(name: str, expected: tuple[int | None, str]) -> None:
    assert classify_parameter(name) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
def test_classify_every_parameter_of_real_models(arch: str, tie: bool) -> None:
    model = make_tiny_model(arch, tie_word_embeddings=tie)
    n_layers = model.config.num_hidden_layers
    seen: dict[str, int] = {}
    for name, _ in model.named_parameters():
        layer, kind = classify_parameter(name)
        assert kind in MODULE_KINDS and kind != "other", name
        if ".layers." in name:
            assert layer == int(name.split(".layers.")[1].split(".")[0])
            assert 0 <= layer < n_layers
        else:
            assert layer is None, name
        seen[kind] = seen.get(kind, 0) + 1
    assert seen["embedding"] == 1
    assert seen["norm"] == 2 * n_layers + 1
    for kind in ("q_proj", "k_proj", "v_proj"):  # qwen2 adds a bias to each
        assert seen[kind] == n_layers * (2 if arch == "qwen2" else 1)
    for kind in ("o_proj", "gate_proj", "up_proj", "down_proj"):
        assert seen[kind] == n_layers
    assert seen.get("output_head", 0) == (0 if tie else 1)  # a tied head is the embedding parameter


# ---------------------------------------------------------------------------------- neuron_statistics


def _check_row(row: dict[str, Any]) -> None:
    assert row["collaborative"] + row["conflicting"] == row["elements"]
    assert row["collaborative"] >= 0 and row["conflicting"] >= 0
    assert math.isclose(row["collaborative_fraction"] + row["conflicting_fraction"], 1.0, abs_tol=1e-12)
    assert math.isclose(row["conflicting_fraction"], row["conflicting"] / row["elements"], rel_tol=1e-12)
    assert 0.0 <= row["conflicting_grad_share"] <= 1.0 + 1e-12
    assert 0.0 <= row["collaborative_grad_share"] <= 1.0 + 1e-12
    assert math.isclose(row["collaborative_grad_share"] + row["conflicting_grad_share"], 1.0, abs_tol=1e-9)


def _sum_rows(rows: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(r["elements"] for r in rows), sum(r["conflicting"] for r in rows)


@pytest.mark.parametrize(("arch", "tie"), [("qwen2", True), ("qwen2", False), ("llama", False)])
def test_neuron_statistics_matches_independent_computation(arch: str, tie: bool) -> None:
    model, enc, pad_id = _setup(arch, tie)
    mastered, injection = enc[:6], enc[6:13]
    before = _snapshot(model)

    stats = neuron_statistics(model, mastered, injection, batch_size=4, pad_id=pad_id, progress=False)

    # parameters untouched, no gradient left behind
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.grad is None, n

    g_m, loss_m = _mean_grad(model, mastered)
    g_i, loss_i = _mean_grad(model, injection)
    assert stats.mastered_loss == pytest.approx(loss_m, rel=1e-5)
    assert stats.injection_loss == pytest.approx(loss_i, rel=1e-5)

    named = dict(model.named_parameters())
    assert set(stats.per_parameter) == set(named)  # every trainable parameter, a tied one once
    assert ("lm_head.weight" in stats.per_parameter) == (not tie)

    total_ambiguous = 0
    for name, p in named.items():
        c = stats.per_parameter[name]
        gm, gi = g_m[name], g_i[name]
        s = gm * gi
        conflict = s < 0  # collaborative: s >= 0 (a zero factor collaborates)
        # Batched and one-at-a-time means differ by float rounding: an element whose |g| is tiny next to
        # the parameter's largest may flip sign. Exact zeros stay exact zeros in both.
        tiny_m = (gm != 0) & (gm.abs() < 1e-7 * gm.abs().max())
        tiny_i = (gi != 0) & (gi.abs() < 1e-7 * gi.abs().max())
        ambiguous = tiny_m | tiny_i
        total_ambiguous += int(ambiguous.sum())
        sure, possible = conflict & ~ambiguous, conflict | ambiguous

        assert c.elements == p.numel()
        assert int(sure.sum()) <= c.conflicting <= int(possible.sum()), name

        a = gi.abs()
        abs_total = float(a.sum())
        assert c.abs_total == pytest.approx(abs_total, rel=1e-4), name
        lo, hi = float((a * sure).sum()), float((a * possible).sum())
        slack = 1e-4 * abs_total + 1e-30
        assert lo - slack <= c.abs_conflicting <= hi + slack, name

    n_elements = sum(p.numel() for p in named.values())
    assert total_ambiguous < 5e-3 * n_elements  # so the comparison above is nearly exact
    overall = stats.overall()
    assert isinstance(overall, ClassCounts)
    assert overall.elements == n_elements
    assert 0 < overall.conflicting < n_elements  # random models: both classes are populated

    # ---- groupings: consistent totals everywhere
    grouped = stats.grouped()
    o = grouped["overall"]
    _check_row(o)
    assert o["elements"] == n_elements
    assert o["conflicting"] == sum(c.conflicting for c in stats.per_parameter.values())
    abs_total = sum(c.abs_total for c in stats.per_parameter.values())
    abs_conf = sum(c.abs_conflicting for c in stats.per_parameter.values())
    assert o["conflicting_grad_share"] == pytest.approx(abs_conf / abs_total, rel=1e-12)

    for table in ("per_layer", "per_kind", "per_layer_kind"):
        rows = grouped[table]
        assert _sum_rows(rows) == (o["elements"], o["conflicting"]), table
        for row in rows:
            _check_row(row)
        assert sum(r["collaborative"] for r in rows) == o["collaborative"]

    kinds = [r["kind"] for r in grouped["per_kind"]]
    assert kinds == [k for k in MODULE_KINDS if k in kinds]  # report order
    assert ("output_head" in kinds) == (not tie)
    layers = [r["layer"] for r in grouped["per_layer"]]
    assert layers == [0, 1, None]

    # each grouped row equals the sum of its parameters (grouped independently here)
    for row in grouped["per_layer_kind"]:
        members = [n for n in named if classify_parameter(n) == (row["layer"], row["kind"])]
        assert members
        assert row["elements"] == sum(named[n].numel() for n in members)
        assert row["conflicting"] == sum(stats.per_parameter[n].conflicting for n in members)
        share = sum(stats.per_parameter[n].abs_conflicting for n in members) / sum(
            stats.per_parameter[n].abs_total for n in members
        )
        assert row["conflicting_grad_share"] == pytest.approx(share, rel=1e-9)
    for row in grouped["per_kind"]:
        members = [n for n in named if classify_parameter(n)[1] == row["kind"]]
        assert row["elements"] == sum(named[n].numel() for n in members)
        assert row["conflicting"] == sum(stats.per_parameter[n].conflicting for n in members)


def test_neuron_statistics_is_independent_of_batch_size() -> None:
    model, enc, pad_id = _setup("qwen2", True, n=10, seed=1)
    a = neuron_statistics(model, enc[:5], enc[5:], batch_size=1, pad_id=pad_id, progress=False)
    b = neuron_statistics(model, enc[:5], enc[5:], batch_size=8, pad_id=pad_id, progress=False)
    ga, gb = a.grouped()["overall"], b.grouped()["overall"]
    assert abs(ga["conflicting"] - gb["conflicting"]) <= 1e-4 * ga["elements"]
    assert ga["conflicting_grad_share"] == pytest.approx(gb["conflicting_grad_share"], abs=1e-4)


def test_neuron_statistics_identical_sets_never_conflict() -> None:
    """g_M = g_I: s = g² >= 0 everywhere, so nothing conflicts and the collaborative share is 100%."""
    model, enc, pad_id = _setup("llama", False, n=5)
    stats = neuron_statistics(model, enc, enc, batch_size=3, pad_id=pad_id, progress=False)
    o = stats.grouped()["overall"]
    assert o["conflicting"] == 0
    assert o["collaborative_fraction"] == 1.0
    assert o["collaborative_grad_share"] == 1.0


def test_neuron_statistics_only_trainable_parameters() -> None:
    model, enc, pad_id = _setup("qwen2", True, n=6)
    frozen = [n for n, _ in model.named_parameters() if ".layers.0." in n]
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    stats = neuron_statistics(model, enc[:3], enc[3:], batch_size=4, pad_id=pad_id, progress=False)
    assert not set(frozen) & set(stats.per_parameter)
    assert [r["layer"] for r in stats.grouped()["per_layer"]] == [1, None]
    for n, p in model.named_parameters():
        assert p.requires_grad == (n not in frozen)
        assert p.grad is None


def test_class_counts_empty_group() -> None:
    row = ClassCounts().as_row()
    assert row["elements"] == 0 and row["conflicting_fraction"] == 0.0 and row["conflicting_grad_share"] == 0.0


# ---------------------------------------------------------------------------------- gradient_distance


@pytest.mark.parametrize(("arch", "tie"), [("llama", True), ("qwen2", False)])
def test_gradient_distance_matches_independent_computation(arch: str, tie: bool) -> None:
    model, enc, pad_id = _setup(arch, tie, n=15)
    mastered, still_wrong = enc[:9], enc[9:]
    model.train()  # the mode must be restored afterwards
    before = _snapshot(model)

    dots = gradient_distance(model, mastered, still_wrong, batch_size=4, pad_id=pad_id, progress=False)

    assert model.training
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p.detach(), before[n]), n
    model.eval()

    g_i, _ = _mean_grad(model, still_wrong)  # g_I' = mean of per-sample gradients
    expected = []
    for e in mastered:
        g, _ = _sample_grad(model, e)
        expected.append(float(sum((g[k] * g_i[k]).sum() for k in g)))
    assert len(dots) == len(mastered)
    scale = max(abs(x) for x in expected)
    for d, x in zip(dots, expected, strict=True):
        assert d == pytest.approx(x, rel=1e-4, abs=1e-6 * scale)

    # hooks are gone: a backward now accumulates plain gradients, twice = double
    e = mastered[0]
    g_ref, _ = _sample_grad(model, e)
    _loss(model, e).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad.double(), g_ref[n], rtol=1e-5, atol=1e-7)
    _loss(model, e).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), 2 * g_ref[n], rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_gradient_distance_same_set_is_positive() -> None:
    """With one question as I' and as m, d = |∇L|² > 0."""
    model, enc, pad_id = _setup("qwen2", True, n=3)
    dots = gradient_distance(model, enc[:1], enc[:1], pad_id=pad_id, progress=False)
    g, _ = _sample_grad(model, enc[0])
    sq = float(sum((v * v).sum() for v in g.values()))
    assert dots[0] > 0
    assert dots[0] == pytest.approx(sq, rel=1e-4)


def test_gradient_distance_empty_i_prime_refused() -> None:
    model, enc, pad_id = _setup("qwen2", True, n=2)
    with pytest.raises(ValueError, match="empty"):
        gradient_distance(model, enc, [], pad_id=pad_id, progress=False)


def test_gradient_distance_no_mastered_questions() -> None:
    model, enc, pad_id = _setup("qwen2", True, n=2)
    assert gradient_distance(model, [], enc, pad_id=pad_id, progress=False) == []
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------ distance_table


def test_distance_table_groups_and_ratios() -> None:
    dots = [-2.0, 5.0, -0.5, 0.0, 1.0, -0.0, 3.0]
    forgotten = [True, True, False, True, False, False, False]
    table = distance_table(dots, forgotten)
    assert [r["group"] for r in table] == ["dot < 0", "dot >= 0"]
    neg, pos = table
    assert (neg["total"], neg["forgotten"]) == (2, 1)
    assert neg["forgotten_ratio"] == pytest.approx(0.5)
    # exact zeros (also -0.0) are in the dot >= 0 group
    assert (pos["total"], pos["forgotten"]) == (5, 2)
    assert pos["forgotten_ratio"] == pytest.approx(2 / 5)


def test_distance_table_empty_group_has_no_ratio() -> None:
    table = distance_table([1.0, 2.0, 0.0], [True, False, False])
    assert table[0] == {"group": "dot < 0", "total": 0, "forgotten": 0, "forgotten_ratio": None}
    assert table[1]["total"] == 3 and table[1]["forgotten"] == 1
    table = distance_table([], [])
    assert all(r["total"] == 0 and r["forgotten_ratio"] is None for r in table)


@pytest.mark.parametrize("n_neg", [0, 1, 2])
def test_thirds_follow_up_needs_three_negatives(n_neg: int) -> None:
    dots = [1.0, 2.0] + [-(i + 1.0) for i in range(n_neg)]
    res = thirds_follow_up(dots, [True] * len(dots))
    assert res["available"] is False
    assert res["negatives"] == n_neg
    assert "3" in res["reason"] and str(n_neg) in res["reason"]


def test_thirds_follow_up_three_negatives() -> None:
    dots = [-3.0, 0.5, -1.0, -2.0, 0.0]
    forgotten = [False, True, True, True, True]
    res = thirds_follow_up(dots, forgotten)
    assert res["available"] is True
    assert res["negatives"] == 3 and res["third_size"] == 1
    s, lg = res["smallest_abs_third"], res["largest_abs_third"]
    assert s == {"max_abs_dot": 1.0, "forgotten": 1, "forgotten_ratio": 1.0}
    assert lg == {"min_abs_dot": 3.0, "forgotten": 0, "forgotten_ratio": 0.0}


def test_thirds_follow_up_seven_negatives() -> None:
    # negatives sorted by |d|: 0.1 0.2 0.3 1 3 4 5 -> k = 7 // 3 = 2; small {0.1, 0.2}, large {4, 5}
    dots = [-5.0, 2.0, -0.1, -3.0, -0.2, 7.0, -1.0, -4.0, -0.3, 0.0]
    forgotten = [True, True, True, False, False, True, True, False, True, True]
    res = thirds_follow_up(dots, forgotten)
    assert res["available"] is True
    assert res["negatives"] == 7 and res["third_size"] == 2
    s, lg = res["smallest_abs_third"], res["largest_abs_third"]
    assert s["max_abs_dot"] == pytest.approx(0.2)
    assert s["forgotten"] == 1 and s["forgotten_ratio"] == pytest.approx(0.5)
    assert lg["min_abs_dot"] == pytest.approx(4.0)
    assert lg["forgotten"] == 1 and lg["forgotten_ratio"] == pytest.approx(0.5)
    # flip the two largest |d| to forgotten: only the large third changes
    forgotten2 = list(forgotten)
    forgotten2[7] = True
    res2 = thirds_follow_up(dots, forgotten2)
    assert res2["largest_abs_third"]["forgotten_ratio"] == 1.0
    assert res2["smallest_abs_third"] == s


@pytest.mark.parametrize(("n", "bins"), [(0, 10), (1, 10), (5, 10), (10, 10), (23, 10), (100, 7), (9, 1)])
def test_quantile_bins_partition(n: int, bins: int) -> None:
    dots = [math.sin(i * 1.7) * (i + 1) for i in range(n)]
    forgotten = [i % 3 == 0 for i in range(n)]
    out = quantile_bins(dots, forgotten, bins=bins)
    if n == 0:
        assert out == []
        return
    assert len(out) == min(bins, n)
    assert sum(b["count"] for b in out) == n
    assert max(b["count"] for b in out) - min(b["count"] for b in out) <= 1  # equal-count bins
    means = [b["mean_dot"] for b in out]
    assert means == sorted(means)
    assert sum(b["forgotten_ratio"] * b["count"] for b in out) == pytest.approx(sum(forgotten))
    assert sum(b["mean_dot"] * b["count"] for b in out) == pytest.approx(sum(dots))


# -------------------------------------------------------------------------------- write_neuron_outputs


def test_write_neuron_outputs(tmp_path: Path) -> None:
    model, enc, pad_id = _setup("qwen2", False, n=8)
    stats = neuron_statistics(model, enc[:4], enc[4:], batch_size=4, pad_id=pad_id, progress=False)
    grouped = stats.grouped()
    meta = {"model": "tiny", "mastered": {"file": "m.jsonl", "count": 4}}
    out = tmp_path / "neurons"
    content = write_neuron_outputs(stats, out, meta)

    data = json.loads((out / "neurons.json").read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(content))
    assert data["model"] == "tiny" and data["mastered"]["count"] == 4
    assert data["mastered_loss"] == pytest.approx(stats.mastered_loss)
    assert data["injection_loss"] == pytest.approx(stats.injection_loss)
    assert data["overall"] == pytest.approx(grouped["overall"])
    assert [r["layer"] for r in data["per_layer"]] == [0, 1, None]

    with open(out / "neurons.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    numeric = [
        "elements",
        "collaborative",
        "conflicting",
        "collaborative_fraction",
        "conflicting_fraction",
        "collaborative_grad_share",
        "conflicting_grad_share",
    ]
    assert list(rows[0]) == ["scope", "layer", "kind", *numeric]
    by_scope: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_scope.setdefault(r["scope"], []).append(r)
    assert len(by_scope["overall"]) == 1
    assert len(by_scope["layer"]) == len(data["per_layer"])
    assert len(by_scope["kind"]) == len(data["per_kind"])
    assert len(by_scope["layer_kind"]) == len(data["per_layer_kind"])

    def same(csv_row: dict[str, str], json_row: dict[str, Any]) -> None:
        for c in numeric:
            assert float(csv_row[c]) == pytest.approx(json_row[c], rel=1e-9), c

    same(by_scope["overall"][0], data["overall"])
    for cr, jr in zip(by_scope["layer"], data["per_layer"], strict=True):
        assert cr["layer"] == ("outside" if jr["layer"] is None else str(jr["layer"]))
        same(cr, jr)
    for cr, jr in zip(by_scope["kind"], data["per_kind"], strict=True):
        assert cr["kind"] == jr["kind"]
        same(cr, jr)
    for cr, jr in zip(by_scope["layer_kind"], data["per_layer_kind"], strict=True):
        assert cr["kind"] == jr["kind"]
        assert cr["layer"] == ("outside" if jr["layer"] is None else str(jr["layer"]))
        same(cr, jr)
    assert {r["kind"] for r in by_scope["layer_kind"] if r["layer"] == "outside"} == {
        "embedding",
        "norm",
        "output_head",
    }

    png = out / "neurons_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size[0] > 100 and im.size[1] > 100
    assert not [p for p in out.iterdir() if p.name not in {"neurons.json", "neurons.csv", "neurons_heatmap.png"}]
