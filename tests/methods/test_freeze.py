"""``freeze`` against its definition on a tiny model: which layers it freezes, that the frozen ones stay bit for bit
and every other tensor moves exactly as plain SGD moves it, its options refused with clear messages, and a run
from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import cli_error, run_cli
from method_helpers import (
    N_INJECTION,
    assert_same,
    crash_in_epoch_two,
    encode,
    in_set,
    named_state,
    tiny,
    train,
    weights,
    without_seconds,
)

from cnl.errors import ConfigError
from cnl.methods import get_method, validate_train_config
from cnl.methods.freeze import FreezeOptions
from cnl.params import classify_parameter
from cnl.resolve import train_config
from cnl.scoring import batch_losses


def frozen_names(model: torch.nn.Module, layers: set[int], embeddings: bool) -> set[str]:
    """The parameters in ``layers``, and the embedding when ``embeddings``, by their names."""
    out = set()
    for n, _ in model.named_parameters():
        layer, kind = classify_parameter(n)
        if layer in layers or (embeddings and kind == "embedding"):
            out.add(n)
    return out


# ------------------------------------------------------------------------------------------ which layers
@pytest.mark.parametrize(
    ("options", "n_layers", "frozen"),
    [
        ({}, 30, [0, 1, 2]),  # the paper's 3 bottom layers (SmolLM2-135M has 30)
        ({}, 4, [0, 1, 2]),
        ({}, 3, [0, 1]),  # a model of 3 layers or fewer keeps its top layer trainable
        ({}, 2, [0]),
        ({}, 1, []),  # only the embedding
        ({"bottom": 5}, 30, [0, 1, 2, 3, 4]),
        ({"bottom": 0}, 4, []),
        ({"top": 2}, 30, [28, 29]),  # freezing the top instead: no bottom layer by default
        ({"top": 1, "bottom": 1}, 4, [0, 3]),
        ({"top": 1, "bottom": 2}, 4, [0, 1, 3]),
    ],
)
def test_frozen_layers(options: dict[str, int], n_layers: int, frozen: list[int]) -> None:
    assert FreezeOptions(**options).frozen_layers(n_layers) == frozen


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    ("options", "layers", "embeddings"),
    [
        ({}, {0, 1, 2}, True),
        ({"freeze_bottom": 1, "freeze_embeddings": False}, {0}, False),
        ({"freeze_top": 2}, {2, 3}, True),
    ],
)
def test_prepare_model_freezes_exactly_those_tensors(
    tied: bool, options: dict[str, Any], layers: set[int], embeddings: bool
) -> None:
    model, _ = tiny(num_hidden_layers=4, tie_word_embeddings=tied)
    cfg = train_config(method="freeze", **options)
    method = validate_train_config(cfg)
    assert method is get_method("freeze")
    assert method.prepare_model(model, cfg) is model
    frozen = frozen_names(model, layers, embeddings)
    assert frozen and len(frozen) < len(list(model.parameters()))
    for n, p in model.named_parameters():
        assert p.requires_grad is (n not in frozen), n
    names = {n for n, _ in model.named_parameters()}
    if not tied:  # an untied output head and the final norm always train
        assert "lm_head.weight" in names and "lm_head.weight" not in frozen
    assert "model.norm.weight" not in frozen
    if embeddings:  # a tied head is the embedding's tensor: frozen with it
        assert model.get_output_embeddings().weight.requires_grad is (not tied)


# ------------------------------------------------------------------------------------------ training
def hand_sgd(model: torch.nn.Module, questions: list[Any], pad_id: int, trainable: set[str], lr: float) -> None:
    """Plain SGD by hand, one question per step: θ ← θ − lr·g for the ``trainable`` tensors, g from autograd of the
    task loss in train mode (the frozen ones are left alone)."""
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if n in trainable]
    for e in questions:
        grads = torch.autograd.grad(batch_losses(model, [e], pad_id)[0], [p for _, p in named])
        with torch.no_grad():
            for (_, p), g in zip(named, grads, strict=True):
                p.sub_(g, alpha=lr)
    model.eval()


@pytest.mark.parametrize(
    ("options", "layers", "embeddings", "tied", "atol"),
    [
        ({}, {0, 1, 2}, True, True, 0.0),
        ({"freeze_top": 1, "freeze_embeddings": False}, {3}, False, False, 0.0),
        # a tied embedding that trains sums its two gradients in another order (a sparse one): ulps, then carried
        ({"freeze_bottom": 1, "freeze_embeddings": False}, {0}, False, True, 1e-6),
    ],
    ids=["default", "top-untied", "bottom-tied-embedding-trains"],
)
def test_sgd_steps_move_the_rest_exactly_as_plain_sgd(
    tmp_path: Path,
    sets: dict[str, Any],
    runs: list,
    options: dict[str, Any],
    layers: set[int],
    embeddings: bool,
    tied: bool,
    atol: float,
) -> None:
    lr = 0.05
    model, tok = tiny(num_hidden_layers=4, tie_word_embeddings=tied)
    start = weights(model)
    frozen = frozen_names(model, layers, embeddings)
    files = in_set(sets, injection=sets["files"]["injection1"])  # two questions: two steps
    rows = train(tmp_path / "run", files, model=model, tok=tok, method="freeze", lr=lr, epochs=1, **options)
    end = weights(model)

    twin, _ = tiny(num_hidden_layers=4, tie_word_embeddings=tied)
    questions, pad_id = encode(tok, sets["rows"]["injection1"])
    hand_sgd(twin, questions, pad_id, set(start) - frozen, lr)
    expected = weights(twin)
    for n in start:
        if n in frozen:
            assert torch.equal(end[n], start[n]), n
        else:
            assert not torch.equal(end[n], start[n]), n
            torch.testing.assert_close(end[n], expected[n], rtol=0, atol=atol, msg=n)

    sizes = {n: p.numel() for n, p in start.items()}
    info = json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))
    assert info["trainable_parameters"] == sum(sizes[n] for n in start if n not in frozen)
    assert rows[0]["masked_fraction"] == 0  # nothing trainable was held back
    assert {n for n, _ in runs[-1].params} == set(start) - frozen


def test_frozen_tensors_hold_no_optimizer_state(tmp_path: Path, sets: dict[str, Any], runs: list) -> None:
    model, tok = tiny(num_hidden_layers=4)
    start = weights(model)
    train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="freeze", optimizer="adam")
    frozen = frozen_names(model, {0, 1, 2}, True)
    state = named_state(runs[-1])
    assert set(state) == set(start) - frozen
    assert all(int(st["step"]) == N_INJECTION for st in state.values())
    assert all(torch.equal(model.get_parameter(n), start[n]) for n in frozen)


def test_resume_freezes_the_same_layers(tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"method": "freeze", "optimizer": "momentum", "epochs": 2, "freeze_bottom": 1, "freeze_top": 1}
    model, tok = tiny(num_hidden_layers=4)
    full = train(tmp_path / "full", in_set(sets), model=model, tok=tok, **cfg)
    undo = crash_in_epoch_two(monkeypatch)
    crashed, _ = tiny(num_hidden_layers=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "run", in_set(sets), model=crashed, tok=tok, **cfg)
    undo()
    resumed, _ = tiny(num_hidden_layers=4)
    rows = train(tmp_path / "run", in_set(sets), model=resumed, tok=tok, resume=True, **cfg)
    assert without_seconds(rows) == without_seconds(full)
    assert_same(weights(resumed), weights(model))


# ------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"freeze_bottom": -1}, "freeze_bottom must be >= 0, got -1"),
        ({"freeze_top": -2}, "freeze_top must be >= 0, got -2"),
        (
            {"freeze_bottom": 0, "freeze_embeddings": False},
            "freezes nothing; use --method ft",
        ),
    ],
)
def test_bad_options_refused_before_any_work(
    tmp_path: Path, sets: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_train_config(train_config(method="freeze", **fields))
    model, tok = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="freeze", **fields)
    assert not (tmp_path / "run").exists()
    assert_same(weights(model), before)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"freeze_bottom": 2},
            "--freeze-bottom 2 would freeze 2 decoder layers, but this model has 2: freeze at most 1",
        ),
        ({"freeze_top": 3}, "--freeze-top 3 would freeze 3 decoder layers, but this model has 2"),
        (
            {"freeze_bottom": 1, "freeze_top": 1},
            "--freeze-bottom 1 and --freeze-top 1 would freeze 2 decoder layers, but this model has 2",
        ),
    ],
)
def test_every_layer_frozen_is_refused_naming_the_layer_count(
    tmp_path: Path, sets: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    model, tok = tiny()  # 2 layers
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        get_method("freeze").prepare_model(model, train_config(method="freeze", **fields))
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, method="freeze", **fields)
    assert not (tmp_path / "run" / "run.json").exists()
    assert_same(weights(model), before)


def test_one_layer_model_without_embeddings_freezes_nothing() -> None:
    model, _ = tiny(num_hidden_layers=1)
    with pytest.raises(ConfigError, match="freezes nothing of this 1-layer model; use --method ft"):
        get_method("freeze").prepare_model(model, train_config(method="freeze", freeze_embeddings=False))


def test_a_model_without_known_decoder_layers_is_refused() -> None:
    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="--method freeze: cannot find the decoder layers of Bare"):
        get_method("freeze").prepare_model(Bare(), train_config(method="freeze"))


# ------------------------------------------------------------------------------------------ command line
def cli_args(model_dir: Path, sets: dict[str, Any], out: Path, *extra: str) -> list[str]:
    files = [x for name in ("mastered", "injection") for x in (f"--{name}", str(sets["files"][name]))]
    return ["train", "--model", str(model_dir), "--device", "cpu", "--out", str(out), *files, *extra]


@pytest.mark.parametrize(
    ("flags", "section", "layers", "embeddings"),
    [
        ([], {"bottom": None, "top": 0, "embeddings": True}, {0}, True),
        (["--freeze-top", "1", "--no-freeze-embeddings"], {"bottom": None, "top": 1, "embeddings": False}, {1}, False),
    ],
    ids=["default", "top"],
)
def test_cli_trains_with_frozen_layers(
    tmp_path: Path,
    sets: dict[str, Any],
    tiny_qwen2_dir: Path,
    flags: list[str],
    section: dict[str, Any],
    layers: set[int],
    embeddings: bool,
) -> None:
    out = tmp_path / "run"
    argv = cli_args(tiny_qwen2_dir, sets, out, "--method", "freeze", "--epochs", "1", "--lr", "0.01", *flags)
    assert run_cli([*argv, "--save-model"]) == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["status"] == "finished" and info["method"] == "freeze"
    assert yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["train"]["freeze"] == section
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    end = AutoModelForCausalLM.from_pretrained(out / "model")
    frozen = frozen_names(start, layers, embeddings)
    sizes = {n: p.numel() for n, p in start.named_parameters()}
    assert info["trainable_parameters"] == sum(v for n, v in sizes.items() if n not in frozen)
    after = dict(end.named_parameters())
    for n, p in start.named_parameters():
        assert torch.equal(after[n], p) is (n in frozen), n


def test_cli_refuses_freezing_every_layer(
    tmp_path: Path, sets: dict[str, Any], tiny_qwen2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    line = cli_error(capsys, cli_args(tiny_qwen2_dir, sets, out, "--method", "freeze", "--freeze-bottom", "2"))
    assert "this model has 2" in line
    assert not (out / "run.json").exists()
