"""Tests for :mod:`cnl.methods`: the registry, what each method declares, and that a new method needs
nothing but its own registered class (the training loop and the config layering pick it up)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import SPEC_OPTIMIZERS, train_tiny

import cnl.methods
import cnl.models
import cnl.presets
import cnl.train as T
from cnl.config import DataConfig, ModelConfig, TrainConfig
from cnl.errors import ConfigError
from cnl.methods import Method, get_method, is_baseline, method_names, register, validate_train_config
from cnl.methods.base import registry
from cnl.models import resolve_model_source
from cnl.optim import OPTIMIZERS
from cnl.resolve import resolve_configs, train_config
from cnl.scoring import PromptEncoder
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl

FOUR = ("cnl", "ft", "lora", "replay")
PLAIN_SETTINGS = ("in-set", "ood-correct", "ood-wrong")


# ------------------------------------------------------------------------------------ registry
def test_method_names_and_unknown_method() -> None:
    names = method_names()
    assert names[:4] == FOUR  # the seed's four first, as the docs list them
    assert len(set(names)) == len(names)
    for name in names:
        assert get_method(name).name == name and isinstance(get_method(name), Method)
    with pytest.raises(ConfigError) as err:
        get_method("nope")
    message = str(err.value)
    assert "'nope'" in message
    for name in FOUR:
        assert name in message
    with pytest.raises(ConfigError, match="unknown method"):
        validate_train_config(TrainConfig(method="nope"))


def test_register_refuses_nameless_and_duplicate_methods() -> None:
    method_names()  # load every shipped method first, so that "ft" is taken
    before = dict(registry())

    class Nameless(Method):
        pass

    with pytest.raises(TypeError, match="no name"):
        register(Nameless)

    class AnotherFt(Method):
        name = "ft"

    with pytest.raises(TypeError, match="registered twice"):
        register(AnotherFt)
    after = dict(registry())
    assert after == before
    assert type(get_method("ft")).__name__ == "FineTuning"


@pytest.mark.parametrize("name", FOUR)
def test_declared_properties(name: str) -> None:
    method = get_method(name)
    assert method.optimizers == SPEC_OPTIMIZERS[name]
    assert set(method.optimizers) <= set(OPTIMIZERS)
    assert method.uses_reference is (name == "cnl")
    assert method.baseline is (name == "ft")
    assert is_baseline(name) is (name == "ft")
    assert method.fixed_setting == ("replay" if name == "replay" else None)
    assert method.summary  # shown in --help
    assert set(method.defaults) <= set(TrainConfig.__dataclass_fields__)


def test_is_baseline_of_unknown_name() -> None:
    assert is_baseline("nope") is False


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", FOUR)
def test_validate_accepts_own_optimizers(name: str) -> None:
    method = get_method(name)
    for optimizer in method.optimizers:
        cfg = TrainConfig(method=name, optimizer=optimizer)
        method.validate(cfg)
        assert validate_train_config(cfg) is method


@pytest.mark.parametrize(
    ("name", "optimizer"),
    [(n, o) for n in FOUR for o in OPTIMIZERS if o not in SPEC_OPTIMIZERS[n]],
)
def test_validate_rejects_other_optimizers(name: str, optimizer: str) -> None:
    with pytest.raises(ConfigError) as err:
        get_method(name).validate(TrainConfig(method=name, optimizer=optimizer))
    message = str(err.value)
    assert name in message and optimizer in message


@pytest.mark.parametrize("name", FOUR)
def test_validate_rejects_unknown_optimizer_and_setting(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        get_method(name).validate(TrainConfig(method=name, optimizer="lion"))
    with pytest.raises(ConfigError, match="unknown setting 'sideways'"):
        get_method(name).validate(TrainConfig(method=name, setting="sideways"))


@pytest.mark.parametrize("name", ["cnl", "ft", "lora"])
def test_resolve_setting_of_methods_without_own_setting(name: str) -> None:
    method = get_method(name)
    for setting in PLAIN_SETTINGS:
        assert method.resolve_setting(setting) == setting
        method.validate(TrainConfig(method=name, setting=setting))
    with pytest.raises(ConfigError) as err:
        method.resolve_setting("replay")
    assert "--method replay" in str(err.value) and name in str(err.value)
    with pytest.raises(ConfigError, match="--method replay"):
        method.validate(TrainConfig(method=name, setting="replay"))


def test_resolve_setting_of_replay() -> None:
    method = get_method("replay")
    assert method.resolve_setting("in-set") == "replay"  # the default --setting means "not given"
    assert method.resolve_setting("replay") == "replay"
    for setting in ("ood-correct", "ood-wrong"):
        with pytest.raises(ConfigError) as err:
            method.resolve_setting(setting)
        assert "replay" in str(err.value) and f"--setting {setting}" in str(err.value)
        with pytest.raises(ConfigError):
            method.validate(TrainConfig(method="replay", setting=setting))


@pytest.mark.parametrize("targets", ["", " , ", ",", "  "])
def test_lora_empty_targets_rejected_by_validate(targets: str) -> None:
    with pytest.raises(ConfigError, match="lora_targets names no module"):
        get_method("lora").validate(train_config(method="lora", lora_targets=targets))


def test_lora_targets_with_spaces_accepted() -> None:
    """Spaces and a trailing comma are tolerated: the adapters go on exactly the named modules."""
    cfg = train_config(method="lora", lora_targets=" q_proj , v_proj ,")
    get_method("lora").validate(cfg)
    assert cfg.options.target_list() == ["q_proj", "v_proj"]
    model = get_method("lora").prepare_model(make_tiny_model("qwen2"), cfg)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}


def test_lora_unknown_target_rejected_by_prepare_model() -> None:
    model = make_tiny_model("qwen2")
    with pytest.raises(ConfigError) as err:
        get_method("lora").prepare_model(model, train_config(method="lora", lora_targets="q_proj,nonexistent"))
    assert "nonexistent" in str(err.value) and "q_proj" not in str(err.value)


# ------------------------------------------------------------------------------------ sets and training
@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("sets")
    rows = make_mc_rows(10, seed=5)
    assert len({r["question"] for r in rows}) == 10
    parts = {"mastered": rows[:4], "injection": rows[4:]}
    files = {name: write_jsonl(d / f"{name}.jsonl", rs) for name, rs in parts.items()}
    return {"files": files, "rows": parts}


def data_config(sets: dict[str, Any]) -> DataConfig:
    return DataConfig(**{name: str(path) for name, path in sets["files"].items()})


def test_lora_empty_targets_fail_before_any_model_work(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cnl.models, "load_from_config", no_model)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="lora_targets"):
        T.train(
            train_config(method="lora", lora_targets=" , ", epochs=1),
            data_config(sets),
            ModelConfig(device="cpu"),
            out,
            progress=False,
            echo=False,
        )
    assert not out.exists()


def _is_norm(module: torch.nn.Module) -> bool:
    return "Norm" in type(module).__name__


@pytest.fixture
def reversed_ft() -> Iterator[type[Method]]:
    """A method registered by this test only: reversed file order, norm parameters frozen."""

    @register
    class ReversedFineTuning(Method):
        name = "reversed-ft"
        summary = "fine-tuning in reversed file order with frozen norms (test only)"
        defaults = {"lr": 0.25, "epochs": 3}

        def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
            model = super().prepare_model(model, cfg)
            for module in model.modules():
                if _is_norm(module):
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(False)
            return model

        def training_order(self, n: int, cfg: TrainConfig) -> list[int]:
            return list(reversed(range(n)))

    try:
        yield ReversedFineTuning
    finally:
        registry().pop("reversed-ft", None)
        assert "reversed-ft" not in method_names()


def record_training(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every sample the training loop computes a loss for (batch_losses is only used there)."""
    seen: list[Any] = []
    orig = T.batch_losses

    def spy(model: Any, batch: Any, pad_id: int = 0) -> Any:
        seen.extend(batch)
        return orig(model, batch, pad_id)

    monkeypatch.setattr(T, "batch_losses", spy)
    return seen


def test_registered_method_is_used_by_train(
    tmp_path: Path, sets: dict[str, Any], monkeypatch: pytest.MonkeyPatch, reversed_ft: type[Method]
) -> None:
    assert "reversed-ft" in method_names() and method_names()[:4] == FOUR
    assert isinstance(get_method("reversed-ft"), reversed_ft) and not is_baseline("reversed-ft")
    trained = record_training(monkeypatch)
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm_names = {n for n in before if "norm" in n}
    assert norm_names
    out = tmp_path / "run"
    rows = train_tiny(out, sets["files"], model=model, tokenizer=tok, method="reversed-ft", lr=1e-2, epochs=2)
    assert len(rows) == 2

    # trained in reversed file order, every epoch
    encoder = PromptEncoder(tok)
    ids = [encoder.prompt_ids(r["question"]) for r in sets["rows"]["injection"]]
    expected = list(reversed(ids))
    assert [list(e.input_ids) for e in trained] == expected * 2
    assert expected != ids

    # only the non-norm parameters trained, and run.json counts exactly those
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == "reversed-ft" and info["status"] == "finished"
    assert info["roles"]["reference"] is None  # uses_reference is False
    assert info["trainable_parameters"] == sum(p.numel() for n, p in before.items() if n not in norm_names)
    assert info["trainable_parameters"] < sum(p.numel() for p in before.values())
    after = dict(model.named_parameters())
    for n in norm_names:
        assert torch.equal(after[n], before[n]), n
    assert any(not torch.equal(after[n], before[n]) for n in before if n not in norm_names)
    assert float(rows[0]["masked_fraction"]) == 0


# ------------------------------------------------------------------------------------ config layering
@pytest.fixture
def presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_qwen2_dir: Path) -> dict[str, Any]:
    """A presets folder of our own: 'Mine', and one named like the tiny model (found automatically)."""
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "Mine.yaml").write_text(
        "lr: 2.0e-6\nepochs: 5\nmethods:\n  lora:\n    lr: 3.0e-4\n  reversed-ft:\n    epochs: 9\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(cnl.presets, "_folder", lambda: folder)
    tag = resolve_model_source(str(tiny_qwen2_dir)).tag
    return {"folder": folder, "tag": tag, "model": {"model": str(tiny_qwen2_dir)}}


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_layering_without_preset_uses_method_defaults(tmp_path: Path, presets: dict[str, Any]) -> None:
    model = presets["model"]
    c = resolve_configs(model=model, train={"method": "lora"})
    assert c.preset is None  # no preset is named like the tiny model
    assert (c.train.lr, c.train.epochs) == (1e-5, 25)  # lora's own lr over the dataclass default
    c = resolve_configs(model=model, train={"method": "cnl"})
    assert (c.preset, c.train.lr) == (None, 1e-7)  # cnl has no defaults of its own
    c = resolve_configs(model=model, config_file=_yaml(tmp_path, "method: lora\n"))
    assert (c.train.method, c.train.lr) == ("lora", 1e-5)  # the method named in the file brings its defaults
    c = resolve_configs(model=model, config_file=_yaml(tmp_path, "method: lora\n"), train={"method": "ft"})
    assert (c.train.method, c.train.lr) == ("ft", 1e-7)  # the flag's method, not the file's


def test_layering_without_preset_file_and_flags_over_method_defaults(tmp_path: Path, presets: dict[str, Any]) -> None:
    model = presets["model"]
    y = _yaml(tmp_path, "lr: 1.0e-3\nepochs: 4\n")
    c = resolve_configs(model=model, config_file=y, train={"method": "lora"})
    assert (c.train.lr, c.train.epochs) == (1e-3, 4)  # file over method defaults
    y = _yaml(tmp_path, "lr: 1.0e-3\nmethods:\n  lora:\n    lr: 0.5\n  cnl:\n    lr: 0.7\n")
    c = resolve_configs(model=model, config_file=y, train={"method": "lora"})
    assert c.train.lr == 0.5  # the file's methods table over its base keys; other methods' tables unused
    c = resolve_configs(model=model, config_file=y, train={"method": "lora", "lr": 4e-4})
    assert c.train.lr == 4e-4  # flags over everything
    c = resolve_configs(model=model, train={"method": "lora", "lr": 4e-4})
    assert c.train.lr == 4e-4


def test_layering_with_registered_method_defaults(
    tmp_path: Path, presets: dict[str, Any], reversed_ft: type[Method]
) -> None:
    model = presets["model"]
    c = resolve_configs(model=model, train={"method": "reversed-ft"})
    assert (c.preset, c.train.lr, c.train.epochs) == (None, 0.25, 3)  # its defaults, no preset
    c = resolve_configs(model=model, preset="mine", train={"method": "reversed-ft"})
    # preset base (lr 2e-6, epochs 5) < method defaults (lr 0.25, epochs 3) < preset methods table (epochs 9)
    assert (c.preset, c.train.lr, c.train.epochs) == ("Mine", 0.25, 9)
    c = resolve_configs(
        model=model, preset="mine", config_file=_yaml(tmp_path, "epochs: 2\n"), train={"method": "reversed-ft"}
    )
    assert (c.train.lr, c.train.epochs) == (0.25, 2)  # config file over the preset's methods table
    c = resolve_configs(
        model=model,
        preset="mine",
        config_file=_yaml(tmp_path, "epochs: 2\nlr: 0.1\nmethods:\n  reversed-ft:\n    lr: 0.2\n"),
        train={"method": "reversed-ft", "epochs": 1},
    )
    assert (c.train.lr, c.train.epochs) == (0.2, 1)


def test_layering_preset_methods_table_below_config_file(tmp_path: Path, presets: dict[str, Any]) -> None:
    model = presets["model"]
    c = resolve_configs(model=model, preset="MINE", train={"method": "lora"})
    assert (c.preset, c.train.lr, c.train.epochs) == ("Mine", 3e-4, 5)  # preset's table over lora's 1e-5
    c = resolve_configs(
        model=model, preset="mine", config_file=_yaml(tmp_path, "lr: 1.0e-3\n"), train={"method": "lora"}
    )
    assert c.train.lr == 1e-3  # config file base keys over the preset's methods table
    c = resolve_configs(model=model, preset="mine", train={"method": "ft"})
    assert (c.train.lr, c.train.epochs) == (2e-6, 5)  # ft: no defaults, no table entry -> preset base


def test_layering_preset_found_by_model_name(tmp_path: Path, presets: dict[str, Any]) -> None:
    (presets["folder"] / f"{presets['tag']}.yaml").write_text("lr: 6.0e-6\nepochs: 2\n", encoding="utf-8")
    model = presets["model"]
    c = resolve_configs(model=model, train={"method": "cnl"})
    assert (c.preset, c.train.lr, c.train.epochs) == (presets["tag"], 6e-6, 2)
    c = resolve_configs(model=model, train={"method": "lora"})
    assert (c.train.lr, c.train.epochs) == (1e-5, 2)  # method defaults over the automatic preset's base too
    c = resolve_configs(model=model, preset="mine", train={"method": "cnl"})
    assert (c.preset, c.train.lr) == ("Mine", 2e-6)  # an explicit preset wins over the model's own
