"""``hft`` against its definition on a tiny model: the structure of the frozen half, its redraws, and that
the frozen half stays put in training."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from method_helpers import (
    ATTENTION,
    FFN,
    N_INJECTION,
    assert_same,
    in_set,
    named_state,
    tiny,
    train,
    watch_epochs,
    weights,
    without_seconds,
)

from cnl.methods import get_method
from cnl.resolve import train_config


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
    hooks = get_method("hft").make_hooks(train_config(method="hft"), list(model.named_parameters()))
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
        cfg = train_config(method="hft", hft_redraw=redraw, seed=seed)
        hooks = method.make_hooks(cfg, list(model.named_parameters()))
        run = SimpleNamespace(cfg=cfg, hooks=hooks)
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
    seen = watch_epochs(monkeypatch, "hft", lambda run: {"frozen": set(run.hooks.frozen)})
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
        state = named_state(runs[-1])
        assert set(state) == set(names) - seen[0]["frozen"]
        assert all(int(st["step"]) == 2 * N_INJECTION for st in state.values())

    # the same seed draws the same halves and ends at the same weights
    first = [s["frozen"] for s in seen]
    seen.clear()
    again, _ = tiny(num_hidden_layers=4)
    assert without_seconds(train(tmp_path / "b", in_set(sets), model=again, tok=tok, **cfg)) == without_seconds(rows)
    assert [s["frozen"] for s in seen] == first
    assert_same(weights(again), weights(model))
