"""The anti-forgetting peers (``mofo``, ``hft``, ``agem``, ``ewc``, ``l2``) as the registry declares them: their
properties, their options refused before any work, and every one of them from the command line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import run_cli
from method_helpers import ALLOWED, LR, NEW, assert_same, in_set, tiny, train, weights

import cnl.train as T
from cnl.config import DataConfig, ModelConfig, TrainConfig
from cnl.distributed import Dist
from cnl.errors import ConfigError
from cnl.methods import get_method, method_names, validate_train_config
from cnl.resolve import train_config


@pytest.mark.parametrize("name", NEW)
def test_declared_properties(name: str) -> None:
    m = get_method(name)
    assert name in method_names() and m.name == name and m.summary
    assert m.optimizers == ALLOWED[name]
    assert m.uses_reference is (name in ("agem", "ewc", "cnl-lora"))
    assert m.sign_reference is (name == "cnl-lora") and m.baseline is False and m.fixed_setting is None
    assert m.updates_in_backward is (name != "agem")
    assert set(m.defaults) <= set(TrainConfig.__dataclass_fields__)
    # MoFO's top-k: whole tensors; ASFT: a model copy; osf, cnl-lora: PEFT under FSDP2 is not wired up
    assert m.supports_sharding is (name not in ("mofo", "asft", "osf", "cnl-lora"))
    for optimizer in m.optimizers:
        validate_train_config(train_config(method=name, optimizer=optimizer))


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
        validate_train_config(train_config(**fields))
    model, tok = tiny()
    before = weights(model)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "run", in_set(sets), model=model, tok=tok, **fields)
    assert not (tmp_path / "run").exists()
    assert_same(weights(model), before)


EXTRA = {
    "mofo": ["--mofo-fraction", "0.5"],
    "hft": ["--hft-redraw", "never"],
    "agem": [],
    "ewc": ["--ewc-lambda", "1", "--ewc-fisher", "once"],
    "l2": ["--l2-alpha", "10"],
    "freeze": ["--freeze-top", "1", "--freeze-bottom", "0"],
    "asft": ["--asft-kl-weight", "0.5"],
    "osf": ["--osf-effective-rank", "0.25"],
    "cnl-lora": ["--cnl-lora-r", "4"],
}
#: What run.json's config records of those flags: the method's own section.
EXTRA_FIELDS = {
    "mofo": {"fraction": 0.5},
    "hft": {"redraw": "never"},
    "agem": {},
    "ewc": {"lambda": 1.0, "fisher": "once"},
    "l2": {"alpha": 10.0},
    "freeze": {"top": 1, "bottom": 0, "embeddings": True},
    "asft": {"kl_weight": 0.5, "kl_direction": "forward"},
    "osf": {"effective_rank": 0.25, "rank_growth": 0.2},
    "cnl-lora": {"r": 4, "alpha": 32},
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
        assert resolved[method][k] == v
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert (float(row["masked_fraction"]) > 0) is (method in ("mofo", "hft", "cnl-lora"))


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
    for flag in ("--mofo-fraction", "--hft-redraw", "--ewc-lambda", "--ewc-fisher", "--l2-alpha", "--osf-rank-growth",
                 "--cnl-lora-r"):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize("method", NEW)
def test_sharding_refused_unless_supported(tmp_path: Path, sets: dict[str, Any], method: str) -> None:
    data = DataConfig(**{k: str(v) for k, v in sets["files"].items()})
    cfg = train_config(method=method, optimizer=ALLOWED[method][0])
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
