"""The README's hand-written training loop with :mod:`cnl.mask`, run as written on a tiny model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnl.mask import MaskedOptimizer, SignReference, cnl_masked


def _loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def test_readme_loop_masks_sgd_and_any_optimizer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    mastered_batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    n_mastered = 8
    new_facts = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(3)]

    # 1. reference, as in the README
    model.zero_grad()
    for batch in mastered_batches:
        (_loss_fn(model, batch).sum() / n_mastered).backward()
    g_m = {p: p.grad.clone() for p in model.parameters()}
    ref = SignReference.from_tensors((p, p.grad) for p in model.parameters())
    model.zero_grad()

    # 2a. plain SGD with the masked gradient equals the full-precision rule of SPEC §4
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in new_facts:
        before = {p: p.detach().clone() for p in model.parameters()}
        _loss_fn(model, batch).sum().backward()
        expected = {p: before[p] - 0.1 * cnl_masked(p.grad, g_m[p]) for p in model.parameters()}
        for p in model.parameters():
            ref.mask_(p, p.grad)
        opt.step()
        opt.zero_grad()
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), expected[p], rtol=0, atol=1e-7)

    # 2b. any optimizer: conflicting elements are left where they were
    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), ref)
    before = {p: p.detach().clone() for p in model.parameters()}
    _loss_fn(model, new_facts[0]).sum().backward()
    opt.step()
    opt.zero_grad()
    moved = 0
    for p in model.parameters():
        change = p.detach() - before[p]
        assert not bool(((-change) * g_m[p] < 0).any())  # no element moved against the reference
        moved += int((change != 0).sum())
    assert moved > 0 and opt.last_masked > 0
