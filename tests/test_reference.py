"""Tests for :mod:`cnl.reference`: the batched mean gradient g_M and the CNL sign reference from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnl.data import rows_from_dicts
from cnl.reference import accumulate_mean_gradient, param_chunks, reference_sign
from cnl.scoring import PromptEncoder, mc_batches, spec_loss
from cnl.testing import make_mc_rows


@pytest.fixture
def setup(tiny_qwen2):
    model, tok = tiny_qwen2
    rows = rows_from_dicts(make_mc_rows(7, seed=3))
    enc = PromptEncoder(tok).encode_all(rows)
    lengths = [len(e.input_ids) for e in enc]
    assert len(set(lengths)) >= 3  # short, medium and long prompts: batches need padding
    return model, tok, enc


def one_at_a_time_mean(model, tok, enc) -> tuple[dict[str, torch.Tensor], float]:
    """SPEC §4's g_M written plainly: mean over samples of ∇L_i, one unpadded forward each."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in params}
    loss_sum = 0.0
    model.eval()
    for e in enc:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        loss = F.cross_entropy(logits[None], torch.tensor([e.target]))
        grads = torch.autograd.grad(loss, [p for _, p in params])
        for (n, _), g in zip(params, grads, strict=True):
            total[n] += g
        loss_sum += float(loss.detach())
    return {n: t / len(enc) for n, t in total.items()}, loss_sum / len(enc)


def test_batched_mean_gradient_equals_mean_of_single_gradients(setup):
    model, tok, enc = setup
    expected, expected_loss = one_at_a_time_mean(model, tok, enc)
    for p in model.parameters():
        p.grad = None
    loss_fn = spec_loss(tok.pad_token_id)
    mean_loss = accumulate_mean_gradient(model, mc_batches(enc, 4), loss_fn, n=len(enc), progress=False)
    assert mean_loss == pytest.approx(expected_loss, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)
    assert not model.training  # the fixture's eval mode is kept


def test_accumulate_adds_to_existing_gradients_and_restores_train_mode(setup):
    model, tok, enc = setup
    model.train()
    loss_fn = spec_loss(tok.pad_token_id)
    accumulate_mean_gradient(model, mc_batches(enc[:3], 2), loss_fn, n=3, progress=False)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    accumulate_mean_gradient(model, mc_batches(enc[:3], 3), loss_fn, n=3, progress=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-4, atol=1e-6)
    assert model.training
    with pytest.raises(ValueError, match="empty"):
        accumulate_mean_gradient(model, [], loss_fn, n=0, progress=False)
    with pytest.raises(ValueError, match="held 3 examples, but n = 4"):
        accumulate_mean_gradient(model, mc_batches(enc[:3], 2), loss_fn, n=4, progress=False)


def test_mean_gradient_of_any_loss_over_any_batches():
    """Nothing multiple-choice about it: a regression model, tensor batches and an MSE loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2: a short last batch

    def loss_fn(m, batch):
        bx, by = batch
        return ((m(bx) - by) ** 2).mean(dim=1)

    accumulate_mean_gradient(model, batches, loss_fn, n=10, progress=False)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ((model(x) - y) ** 2).mean(dim=1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)


def test_reference_sign_chunks_on_grad_and_cleanup(setup):
    model, tok, enc = setup
    names = {p: n for n, p in model.named_parameters()}
    frozen = model.model.norm.weight
    frozen.requires_grad_(False)  # a parameter that is not trained keeps requires_grad False
    params = [p for p in model.parameters() if p.requires_grad]
    expected, _ = one_at_a_time_mean(model, tok, enc)

    results = {}
    for chunks in (1, 3):
        seen: dict[str, torch.Tensor] = {}
        ref, mean_loss = reference_sign(
            model,
            mc_batches(enc, 4),
            spec_loss(tok.pad_token_id),
            params,
            n=len(enc),
            chunks=chunks,
            progress=False,
            on_grad=lambda p, g, seen=seen: seen.__setitem__(names[p], g.clone()),
        )
        assert len(param_chunks(params, chunks)) == chunks
        assert set(seen) == {names[p] for p in params}
        for n, g in seen.items():  # on_grad receives the full-precision mean gradient
            torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6, msg=n)
        for p in params:
            assert p in ref
            assert torch.equal(ref.sign(p), torch.sign(seen[names[p]]).to(torch.int8))
        assert frozen not in ref
        # every .grad freed, requires_grad as before
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in params)
        assert not frozen.requires_grad
        results[chunks] = (ref, mean_loss, seen)

    ref1, loss1, seen1 = results[1]
    ref3, loss3, seen3 = results[3]
    for p in params:
        assert torch.equal(ref1.sign(p), ref3.sign(p)), names[p]
    assert loss1 == pytest.approx(loss3, rel=1e-6)


def test_param_chunks_cover_every_parameter_once():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 5, 5, 40, 60, 1, 90)]
    for chunks in (1, 2, 3, 7, 20):
        groups = param_chunks(params, chunks)
        assert 1 <= len(groups) <= min(chunks, len(params))
        flat = [p for g in groups for p in g]
        assert len(flat) == len(params) and all(a is b for a, b in zip(flat, params, strict=True))
        assert all(g for g in groups)
