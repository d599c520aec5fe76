"""What the method tests share: tiny models and sets, hand-computed gradients, and ``train`` on a tiny model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import train_tiny

import cnl.train as T
from cnl.data import rows_from_dicts
from cnl.methods import get_method
from cnl.optim import OPTIMIZERS
from cnl.scoring import Encoded, PromptEncoder, batch_losses
from cnl.testing import make_tiny_model, make_tiny_tokenizer

NEW = ("mofo", "hft", "agem", "ewc", "l2", "freeze", "asft", "osf", "cnl-lora")
ALLOWED = {
    "mofo": ("momentum", "adam", "adamw"),
    "hft": OPTIMIZERS,
    "agem": OPTIMIZERS,
    "ewc": OPTIMIZERS,
    "l2": OPTIMIZERS,
    "freeze": OPTIMIZERS,
    "asft": OPTIMIZERS,
    "osf": ("sgd", "momentum"),  # only these keep the update orthogonal to the frozen subspace
    "cnl-lora": ("sgd", "momentum", "adamw"),  # LoRA's
}
LR = {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3, "adamw": 1e-3}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
N_INJECTION = 4

Weights = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers
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
    return train_tiny(out, files, model=model, tokenizer=tok, resume=resume, **cfg)


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


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
    """Make the training loop's 2nd loss of epoch 2 raise (losses of training steps only: the model is in
    train mode there, and in eval mode in the reference and Fisher passes); returns the undo."""
    orig, calls = T.batch_losses, [0]

    def crash(model: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += model.training
        if calls[0] == N_INJECTION + 2:
            raise RuntimeError("simulated crash in epoch 2")
        return orig(model, *args, **kwargs)

    monkeypatch.setattr(T, "batch_losses", crash)
    return lambda: monkeypatch.setattr(T, "batch_losses", orig)


def named_state(run: T.Run) -> dict[str, dict[str, Any]]:
    """The run's optimizer state by parameter name."""
    return {run.optimizer.names[p]: st for p, st in run.optimizer.state.items()}
