"""Tests for :mod:`cnl.resolve`: every method's own options, from flags, YAML files (three forms), presets and a
run's ``config.yaml``, generated from the registry; and what the shared ``TrainConfig`` no longer holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import run_cli

from cnl.cli import build_parser, resolve_train_configs
from cnl.config import MethodOptions, TrainConfig, field_docs, to_dict
from cnl.errors import ConfigError
from cnl.methods import all_methods, get_method, method_names
from cnl.methods.ewc import EWCOptions
from cnl.methods.lora import LoRAOptions
from cnl.resolve import normalize_train_dict, resolve_configs, train_config

#: Every method option of the methods shipped with options, as (flat key, field, value other than the default).
SHIPPED = {
    "lora": [
        ("lora_r", "r", 4), ("lora_alpha", "alpha", 8), ("lora_dropout", "dropout", 0.25),
        ("lora_targets", "targets", "q_proj"),
    ],
    "replay": [("replay_seed", "seed", 7)],
    "mofo": [("mofo_fraction", "fraction", 0.5)],
    "hft": [("hft_redraw", "redraw", "never")],
    "ewc": [("ewc_lambda", "lambda_", 3.0), ("ewc_fisher", "fisher", "once"), ("ewc_gamma", "gamma", 0.5)],
    "l2": [("l2_alpha", "alpha", 5.0), ("l2_anchor", "anchor", "original")],
    "freeze": [("freeze_bottom", "bottom", 2), ("freeze_top", "top", 1), ("freeze_embeddings", "embeddings", False)],
    "asft": [("asft_kl_weight", "kl_weight", 0.5), ("asft_kl_direction", "kl_direction", "reverse")],
    "wise": [("wise_alpha", "alpha", 0.25)],
    "osf": [
        ("osf_effective_rank", "effective_rank", 0.25), ("osf_targets", "targets", "q_proj"),
        ("osf_rank_growth", "rank_growth", 0.5),
    ],
    "cnl-lora": [
        ("cnl_lora_r", "r", 4), ("cnl_lora_alpha", "alpha", 8), ("cnl_lora_dropout", "dropout", 0.25),
        ("cnl_lora_targets", "targets", "q_proj"),
    ],
}  # fmt: skip


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def model(tiny_qwen2_dir: Path) -> dict[str, str]:
    """A model no shipped preset is named after (so no preset layer applies)."""
    return {"model": str(tiny_qwen2_dir)}


# ------------------------------------------------------------------------------------ the shared config
def test_train_config_holds_no_method_option() -> None:
    """Options of one method live in its own dataclass, not in everyone's TrainConfig."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for m in all_methods():
        prefix = m.name.replace("-", "_") + "_"
        assert not [f for f in fields if f.startswith(prefix)], m.name
    for keys in SHIPPED.values():
        assert not {k for k, _, _ in keys} & fields
    source = (Path(__file__).resolve().parents[1] / "src" / "cnl" / "config.py").read_text(encoding="utf-8")
    for word in ("lora_", "mofo_", "ewc_", "l2_alpha", "hft_", "replay_seed"):
        assert word not in source, word


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_documented_options(name: str) -> None:
    m = get_method(name)
    assert issubclass(m.options_class, MethodOptions) and dataclasses.is_dataclass(m.options_class)
    docs = field_docs(m.options_class)
    for f in dataclasses.fields(m.options_class):
        assert docs.get(f.name), f"{name}: option {f.name} has no docstring"
    assert {f.name for f in dataclasses.fields(m.options_class)} == {f for _, f, _ in SHIPPED.get(name, [])}
    m.options_class().validate()  # the defaults are valid


# ------------------------------------------------------------------------------------ flags and --help
def test_help_lists_every_method_and_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("train", "compare"):
        assert run_cli([verb, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for m in all_methods():
            assert m.name in text, (verb, m.name)
            for key, _, _ in SHIPPED.get(m.name, []):
                assert "--" + key.replace("_", "-") in text, (verb, key)
            if dataclasses.fields(m.options_class):
                assert f"{m.name} options" in text, (verb, m.name)
    assert run_cli(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for m in all_methods():  # --method names every registered method with its summary
        assert f"{m.name}: {' '.join(m.summary.split())}" in text


@pytest.mark.parametrize("method", sorted(SHIPPED))
def test_old_flags_still_set_the_options(tmp_path: Path, model: dict[str, str], method: str) -> None:
    argv = ["train", "--out", str(tmp_path / "r"), "--model", model["model"], "--method", method]
    for key, _, value in SHIPPED[method]:
        flag = "--" + key.replace("_", "-")
        argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    c = resolve_train_configs(build_parser().parse_args(argv))
    assert type(c.train.options) is get_method(method).options_class
    for _, field, value in SHIPPED[method]:
        assert getattr(c.train.options, field) == value


def test_a_flag_of_another_method_is_refused_by_train(tmp_path: Path, model: dict[str, str]) -> None:
    argv = ["train", "--out", str(tmp_path / "r"), "--model", model["model"], "--method", "cnl", "--ewc-lambda", "5"]
    with pytest.raises(ConfigError, match="--ewc-lambda is an option of --method ewc; this run's method is cnl"):
        resolve_train_configs(build_parser().parse_args(argv))


def test_compare_applies_method_flags_to_their_own_method(tmp_path: Path, model: dict[str, str]) -> None:
    from cnl.compare import plan_compare
    from cnl.testing import make_mc_rows, write_jsonl

    plan = plan_compare(
        dataset=str(write_jsonl(tmp_path / "quiz.jsonl", make_mc_rows(6))),
        out=tmp_path / "cmp",
        methods=["cnl", "ewc"],
        train={"ewc_lambda": 5.0, "lr": 1e-3},
        model=model,
    )
    assert plan.configs["ewc"].train.options.lambda_ == 5.0
    assert plan.configs["cnl"].train.lr == plan.configs["ewc"].train.lr == 1e-3


# ------------------------------------------------------------------------------------ YAML files
@pytest.mark.parametrize(
    "text",
    [
        "lora_r: 4\nlora_targets: q_proj\n",  # flat, the old way
        "lora:\n  r: 4\n  targets: q_proj\n",  # a section named after the method
        "methods:\n  lora:\n    r: 4\n    targets: q_proj\n",  # bare, in the methods table
        "methods:\n  lora:\n    lora_r: 4\n    lora_targets: q_proj\n",  # flat, in the methods table
    ],
    ids=["flat", "section", "table-bare", "table-flat"],
)
def test_every_yaml_form_sets_the_options(tmp_path: Path, model: dict[str, str], text: str) -> None:
    c = resolve_configs(model=model, config_file=_yaml(tmp_path, text), train={"method": "lora"})
    assert c.train.options == LoRAOptions(r=4, targets="q_proj")
    assert c.train.lr == 1e-5  # lora's own default learning rate still applies


def test_yaml_options_of_other_methods_are_ignored(tmp_path: Path, model: dict[str, str]) -> None:
    """One file can serve a comparison of several methods: keys of the others do nothing here."""
    text = "ewc_lambda: 3\nlora:\n  r: 4\nmethods:\n  ewc:\n    fisher: once\n"
    c = resolve_configs(model=model, config_file=_yaml(tmp_path, text), train={"method": "cnl"})
    assert c.train.method == "cnl" and c.train.options == get_method("cnl").options_class()
    c = resolve_configs(model=model, config_file=_yaml(tmp_path, text), train={"method": "ewc"})
    assert c.train.options == EWCOptions(lambda_=3.0, fisher="once")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora_rank: 4\n", "unknown option 'lora_rank'"),
        ("lora:\n  rank: 4\n", "unknown lora option 'rank' (known: alpha, dropout, r, targets)"),
        ("lora: 4\n", "'lora' must be a mapping of lora's options"),
        ("r: 4\n", "unknown option 'r'"),
        ("methods:\n  lora:\n    rank: 4\n", "unknown option 'rank'"),
        ("lora_r: four\n", "'r' must be int"),
    ],
)
def test_bad_yaml_options_are_named(tmp_path: Path, model: dict[str, str], text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_configs(model=model, config_file=_yaml(tmp_path, text), train={"method": "lora"})


def test_layering_order_of_method_options(tmp_path: Path, model: dict[str, str]) -> None:
    """file base < file methods table < flags, for a method's options as for the shared ones."""
    y = _yaml(tmp_path, "ewc_lambda: 2\nmethods:\n  ewc:\n    lambda: 3\n")
    assert resolve_configs(model=model, config_file=y, train={"method": "ewc"}).train.options.lambda_ == 3.0
    c = resolve_configs(model=model, config_file=y, train={"method": "ewc", "ewc_lambda": 4.0})
    assert c.train.options.lambda_ == 4.0


# ------------------------------------------------------------------------------------ a run's config.yaml
@pytest.mark.parametrize("method", sorted(SHIPPED))
def test_resolved_config_round_trips(tmp_path: Path, model: dict[str, str], method: str) -> None:
    values: dict[str, Any] = {"method": method, **{k: v for k, _, v in SHIPPED[method]}}
    cfg = train_config(**values)
    written = {"train": to_dict(cfg), "data": {}, "model": model}
    assert written["train"][method]  # the options sit under the method's name
    assert not any(k.startswith(method + "_") for k in written["train"])
    y = _yaml(tmp_path, yaml.safe_dump(written))
    again = resolve_configs(config_file=y)
    assert again.train == cfg
    assert to_dict(again.train) == written["train"]


def test_an_old_runs_flat_config_still_loads_and_resumes_as_the_same(tmp_path: Path, model: dict[str, str]) -> None:
    old = {**{k: v for k, v in to_dict(train_config(method="lora")).items() if k != "lora"}}
    old.update(lora_r=4, lora_alpha=32, lora_dropout=0.05, replay_seed=42, mofo_fraction=0.15, ewc_lambda=100.0)
    y = _yaml(tmp_path, yaml.safe_dump({"train": old, "data": {}, "model": model}))
    c = resolve_configs(config_file=y)
    assert c.train.options == LoRAOptions(r=4)
    assert normalize_train_dict(old) == to_dict(c.train)  # what --resume compares


def test_train_config_helper_refuses_unknown_and_foreign_keys() -> None:
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        train_config(method="lora", nope=1)
    with pytest.raises(ConfigError, match="option of --method ewc"):
        train_config(method="lora", ewc_lambda=1.0)
    assert train_config(method="ewc", ewc_lambda=1.0).options == EWCOptions(lambda_=1.0)
