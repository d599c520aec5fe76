"""``cnl-lora`` against a hand computation on a tiny model: LoRA's adapters with CNL's mask, the frozen adapter
elements exactly those whose update disagrees in sign with the reference set's mean gradient."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from method_helpers import encode, in_set, tiny, train, watch_epochs

from cnl.methods import get_method, validate_train_config
from cnl.methods.lora import LoRA
from cnl.resolve import train_config
from cnl.scoring import batch_losses
from cnl.testing import write_jsonl


def test_declared_as_lora_with_cnls_reference() -> None:
    method, lora = get_method("cnl-lora"), get_method("lora")
    assert isinstance(method, LoRA) and method.uses_reference and method.sign_reference
    assert (method.optimizers, method.defaults, method.options_class) == (
        lora.optimizers,
        lora.defaults,
        lora.options_class,
    )
    cfg = train_config(method="cnl-lora", cnl_lora_r=4, cnl_lora_targets="q_proj,v_proj")
    validate_train_config(cfg)
    assert (cfg.options.r, cfg.options.target_list()) == (4, ["q_proj", "v_proj"])


def grads(model: torch.nn.Module, questions: list[Any], pad: int) -> list[dict[str, torch.Tensor]]:
    """Each question's gradient with respect to the trainable (adapter) parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for q in questions:
        gs = torch.autograd.grad(batch_losses(model, [q], pad)[0], [p for _, p in named])
        out.append({n: g for (n, _), g in zip(named, gs, strict=True)})
    return out


def test_first_step_freezes_exactly_the_adapter_elements_in_conflict_with_g_m(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, runs: list
) -> None:
    lr = 0.5
    seen = watch_epochs(monkeypatch, "cnl-lora", lambda run: {})
    one = write_jsonl(tmp_path / "one.jsonl", sets["rows"]["injection"][:1])
    base, tok = tiny()
    model = copy.deepcopy(base)
    options = {"cnl_lora_r": 4, "cnl_lora_dropout": 0.0}
    rows = train(
        tmp_path / "run", in_set(sets, injection=one), model=model, tok=tok, method="cnl-lora", lr=lr, **options
    )
    run = runs[-1]
    start = seen[0]["start"]  # the adapters as initialised (A random, B zero), before the one step
    after = {n: p.detach().clone() for n, p in run.model.named_parameters()}

    hand = get_method("cnl-lora").prepare_model(copy.deepcopy(base), train_config(method="cnl-lora", **options))
    with torch.no_grad():
        for n, p in hand.named_parameters():
            p.copy_(start[n])
    (q,), pad = encode(tok, sets["rows"]["injection"][:1])
    ref_q, _ = encode(tok, sets["rows"]["mastered"])
    hand.eval()
    per_m = grads(hand, ref_q, pad)
    g_m = {n: torch.stack([g[n] for g in per_m]).mean(0) for n in per_m[0]}
    hand.train()
    (g,) = grads(hand, [q], pad)
    assert {n for n in g if ".lora_" in n} == set(g) and len(g) == 2 * 7 * 2  # A and B of 7 modules, 2 layers

    conflicts = frozen = n_elements = n_ambiguous = 0
    for n, gi in g.items():
        gm = g_m[n]
        # where g_M is ~0 next to the per-question gradients, summation order may decide its sign
        scale = torch.stack([x[n] for x in per_m]).abs().amax(0)
        ambiguous = (gm.abs() <= 1e-5 * scale) & (scale > 0)
        if ".lora_A." in n:  # B = 0: no gradient reaches A yet, nor its reference; A is not masked and does not move
            assert not gi.any() and not gm.any()
            assert torch.equal(after[n], start[n]), n
        conflict = (gi * gm) < 0
        expected = start[n] - lr * (~conflict) * gi
        torch.testing.assert_close(after[n][~ambiguous], expected[~ambiguous], rtol=0, atol=1e-6, msg=n)
        moved = after[n] != start[n]
        assert not (moved & conflict & ~ambiguous).any(), n  # frozen: exactly the conflicting elements
        assert (moved | (gi == 0) | ambiguous | conflict).all(), n
        conflicts += int(conflict.sum())
        frozen += int((conflict & ~ambiguous).sum())
        n_elements += gi.numel()
        n_ambiguous += int(ambiguous.sum())
    assert frozen > 0.05 * n_elements  # the mask really freezes something
    assert n_ambiguous < 0.01 * n_elements
    assert float(rows[0]["masked_fraction"]) * n_elements == pytest.approx(conflicts, abs=n_ambiguous + 0.1)
    for n, w in start.items():  # the base model does not move
        if ".lora_" not in n:
            assert torch.equal(after[n], w), n
