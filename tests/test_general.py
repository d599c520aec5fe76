"""General-knowledge checks: ``--general`` per epoch in ``cnl train`` and ``cnl compare``, and ``cnl eval``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import run_cli

from cnl.data import GENERAL_DEFAULT_SIZE, read_mc_jsonl, resolve_general
from cnl.errors import CnlError
from cnl.testing import make_mc_rows, write_jsonl


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rows = make_mc_rows(40, seed=11)
    return {
        "mastered": write_jsonl(tmp_path / "m.jsonl", rows[:8]),
        "injection": write_jsonl(tmp_path / "i.jsonl", rows[8:16]),
        "general": write_jsonl(tmp_path / "g.jsonl", rows[16:40]),
    }


def test_general_spec_samples_with_a_fixed_seed_in_file_order(files):
    every = read_mc_jsonl(files["general"])
    rows, tag = resolve_general(f"{files['general']}:10")
    assert tag == "g" and len(rows) == 10
    lines = [r.line for r in rows]
    assert lines == sorted(lines) and len(set(lines)) == 10  # a sample, in file order
    assert [r.line for r in resolve_general(f"{files['general']}:10")[0]] == lines  # the same every time
    assert len(resolve_general(f"{files['general']}:all")[0]) == len(every) == 24
    assert len(resolve_general(str(files["general"]))[0]) == min(GENERAL_DEFAULT_SIZE, 24)
    with pytest.raises(CnlError):
        resolve_general(f"{files['general']}:0")


def train_argv(model_dir: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--lr", "0.02", "--epochs", "2",
        "--mastered", str(files["mastered"]), "--injection", str(files["injection"]), *extra,
    ]  # fmt: skip


def test_train_evaluates_the_general_set_every_epoch(tmp_path, files, tiny_qwen2_dir):
    out = tmp_path / "run"
    spec = f"{files['general']}:20"
    assert run_cli(train_argv(tiny_qwen2_dir, files, out, "--general", spec, "--save-model")) == 0
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [k for k in rows[0]][:6] == [
        "epoch", "train_avg_loss", "wrong_to_correct", "correct_to_wrong", "masked_fraction", "general_accuracy"
    ]  # fmt: skip
    info = json.loads((out / "run.json").read_text())
    assert info["sets"]["general"]["count"] == 20 and 0 <= info["general_accuracy_before"] <= 1
    assert not list((out / "predictions").glob("*general*"))
    # the last epoch's column equals what cnl eval says about the saved model
    ev = tmp_path / "ev"
    assert run_cli(["eval", "--run", str(out), "--device", "cpu", "--general", spec, "--out", str(ev)]) == 0
    acc = json.loads((ev / "eval.json").read_text())["sets"][spec]
    assert acc["questions"] == 20
    assert float(rows[-1]["general_accuracy"]) == pytest.approx(acc["accuracy"], abs=1e-6)
    # another general set on resume is another run
    assert run_cli([*train_argv(tiny_qwen2_dir, files, out, "--general", f"{files['general']}:5"), "--resume"]) == 2


def test_report_shows_the_general_column(tmp_path, files, tiny_qwen2_dir):
    spec = f"{files['general']}:12"
    for method in ("ft", "cnl"):
        argv = train_argv(tiny_qwen2_dir, files, tmp_path / method, "--general", spec, "--method", method)
        assert run_cli(argv) == 0
    assert run_cli(["report", str(tmp_path / "ft"), str(tmp_path / "cnl"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "general accuracy" in md
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert all(r["final_general"] is not None and r["general_before"] is not None for r in rep["rows"])


def test_eval_of_a_model_and_errors(tmp_path, files, tiny_qwen2_dir, capsys):
    assert run_cli(["eval", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--general", str(files["general"])]) == 0
    out = capsys.readouterr().out
    assert "g.jsonl" in out and "%" in out
    assert run_cli(["eval", "--model", str(tiny_qwen2_dir), "--device", "cpu"]) == 2
    assert "--general" in capsys.readouterr().err
    run = tmp_path / "nomodel"
    assert run_cli(train_argv(tiny_qwen2_dir, files, run, "--epochs", "1")) == 0
    assert run_cli(["eval", "--run", str(run), "--device", "cpu", "--general", str(files["general"])]) == 2
    assert "saved no model" in capsys.readouterr().err


def test_eval_of_a_lora_run_loads_the_adapter_on_its_base(tmp_path, files, tiny_qwen2_dir):
    run = tmp_path / "lora"
    argv = train_argv(tiny_qwen2_dir, files, run, "--method", "lora", "--lr", "0.05", "--epochs", "1", "--save-model")
    argv += ["--general", f"{files['general']}:all"]
    assert run_cli(argv) == 0
    ev = tmp_path / "ev"
    spec = f"{files['general']}:all"
    assert run_cli(["eval", "--run", str(run), "--device", "cpu", "--general", spec, "--out", str(ev)]) == 0
    got = json.loads((ev / "eval.json").read_text())["sets"][spec]["accuracy"]
    with open(run / "summary.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[-1]["general_accuracy"]) == pytest.approx(got, abs=1e-6)


@pytest.mark.integration
def test_eval_on_the_offline_mmlu_copy(shared_dir, capsys):
    assert run_cli(["eval", "--device", "cpu", "--general", "mmlu:40"]) == 0
    out = capsys.readouterr().out
    assert "mmlu:40" in out and "40" in out
