"""End-to-end tests of ``cnl compare``, ``cnl analyze neurons`` and ``cnl analyze distance`` on the tiny Qwen2.

One ``compare`` (split, ft and cnl for 2 epochs, report) is run once per module on 24 synthetic questions;
the analyses read its split and its ft run. Everything runs in-process through :func:`cnl.cli.main`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

import cnl.split
import cnl.train
from cnl.analyze import distance_table, gradient_distance, neuron_statistics, thirds_follow_up
from cnl.data import read_mc_jsonl
from cnl.scoring import PromptEncoder
from cnl.testing import make_mc_rows, write_jsonl


def _read(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@dataclass
class Compared:
    argv: list[str]
    out: Path
    data: Path
    model_dir: Path
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def compared(_one_thread: Any, tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Compared:
    root = tmp_path_factory.mktemp("compare")
    data = write_jsonl(root / "quiz.jsonl", make_mc_rows(24))
    out = root / "out"
    argv = ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out)]
    argv += ["--epochs", "2", "--lr", "0.01"]
    so, se = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        mp.setenv("HF_HUB_OFFLINE", "1")
        code = run_cli(argv)
    return Compared(argv, out, data, tiny_qwen2_dir, code, so.getvalue(), se.getvalue())


# -------------------------------------------------------------------------------------------- compare


def test_compare_writes_split_runs_and_report(compared: Compared) -> None:
    assert compared.code == 0, compared.stderr
    out = compared.out
    split = json.loads((out / "split" / "split.json").read_text(encoding="utf-8"))
    n_m, n_i = split["files"]["correct"]["count"], split["files"]["wrong"]["count"]
    assert n_m + n_i == 24 and n_m > 0 and n_i > 0

    for name, method in (("ft-sgd", "ft"), ("cnl-sgd", "cnl")):
        run = out / "runs" / name
        info = json.loads((run / "run.json").read_text(encoding="utf-8"))
        assert (info["method"], info["optimizer"], info["setting"]) == (method, "sgd", "in-set")
        assert info["status"] == "finished" and info["lr"] == 0.01
        assert (info["learn_total"], info["forget_total"]) == (n_i, n_m)
        rows = _csv(run / "summary.csv")
        assert [r["epoch"] for r in rows] == ["1", "2"]
        assert list(rows[0])[:4] == ["epoch", "train_avg_loss", "wrong_to_correct", "correct_to_wrong"]
        for e in (1, 2):
            for s in ("injection", "mastered"):
                assert (run / "predictions" / f"epoch_{e:03d}_{s}.jsonl").is_file()
        # the summary counts agree with the final predictions
        inj = _read(run / "predictions" / "epoch_002_injection.jsonl")
        mas = _read(run / "predictions" / "epoch_002_mastered.jsonl")
        assert int(rows[-1]["wrong_to_correct"]) == sum(r["label"] == r["predict_label"] for r in inj)
        assert int(rows[-1]["correct_to_wrong"]) == sum(r["label"] != r["predict_label"] for r in mas)

    rep_dir = out / "report"
    for name in ("report.md", "report.json", "curves.png"):
        assert (rep_dir / name).is_file(), name
    rep = json.loads((rep_dir / "report.json").read_text(encoding="utf-8"))
    assert [r["run"] for r in rep["rows"]] == ["ft-sgd", "cnl-sgd"]
    assert rep["baseline"] == "ft-sgd"
    md = (rep_dir / "report.md").read_text(encoding="utf-8")
    assert "| ft-sgd | ft |" in md and "| cnl-sgd | cnl |" in md
    with Image.open(rep_dir / "curves.png") as im:
        assert im.format == "PNG"
    assert "== 1/4 split" in compared.stdout and "== 4/4 report" in compared.stdout
    assert "(reused)" not in compared.stdout and "already finished" not in compared.stdout
    assert "report:" in compared.stdout


def test_compare_rerun_reuses_everything(
    compared: Compared, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = compared.out
    files = ["split/split.json", "runs/ft-sgd/summary.csv", "runs/cnl-sgd/summary.csv"]
    files += ["runs/ft-sgd/run.json", "runs/cnl-sgd/run.json"]
    before = {f: (out / f).read_bytes() for f in files}

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("finished work must be reused, not redone")

    monkeypatch.setattr(cnl.split, "run_split", boom)
    monkeypatch.setattr(cnl.train, "load", boom)
    monkeypatch.setattr("cnl.cli._load_model", boom)
    code = run_cli(compared.argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "(reused)" in captured.out
    assert captured.out.count("already finished") == 2
    for f in files:
        assert (out / f).read_bytes() == before[f], f
    rep = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    assert [r["run"] for r in rep["rows"]] == ["ft-sgd", "cnl-sgd"]


def test_compare_refuses_unknown_or_repeated_methods(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", make_mc_rows(6))
    out = tmp_path / "out"
    base = ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out), "--methods"]
    for methods, text in (("ft,nope", "unknown method 'nope'"), ("ft,cnl,ft", "twice")):
        code = run_cli([*base, methods])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.err.startswith("error: ") and text in captured.err, captured.err
        assert "Traceback" not in captured.err
        assert not out.exists()


# ------------------------------------------------------------------------------------- analyze neurons


def test_analyze_neurons(compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split_dir = compared.out / "split"
    out = tmp_path / "neurons"
    code = run_cli(
        ["analyze", "neurons", "--model", str(compared.model_dir), "--split", str(split_dir), "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((out / "neurons.json").read_text(encoding="utf-8"))
    split = json.loads((split_dir / "split.json").read_text(encoding="utf-8"))
    assert data["mastered"]["count"] == split["files"]["correct"]["count"]
    assert data["injection"]["count"] == split["files"]["wrong"]["count"]

    model = AutoModelForCausalLM.from_pretrained(compared.model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert data["overall"]["elements"] == n_params
    for table in ("per_layer", "per_kind", "per_layer_kind"):
        assert sum(r["elements"] for r in data[table]) == n_params
        assert sum(r["conflicting"] for r in data[table]) == data["overall"]["conflicting"]
    for row in [data["overall"], *data["per_layer"], *data["per_kind"], *data["per_layer_kind"]]:
        for key in (
            "collaborative_fraction",
            "conflicting_fraction",
            "collaborative_grad_share",
            "conflicting_grad_share",
        ):
            assert 0.0 <= row[key] <= 1.0, (key, row)
        assert row["collaborative"] + row["conflicting"] == row["elements"]

    # the same numbers as the library on the base model and the split's sets
    tok = AutoTokenizer.from_pretrained(compared.model_dir)
    enc = PromptEncoder(tok)
    m = enc.encode_all(read_mc_jsonl(data["mastered"]["file"]))
    i = enc.encode_all(read_mc_jsonl(data["injection"]["file"]))
    stats = neuron_statistics(model, m, i, pad_id=tok.pad_token_id, progress=False)
    assert data["overall"]["conflicting"] == stats.grouped()["overall"]["conflicting"]

    rows = _csv(out / "neurons.csv")
    assert rows[0]["scope"] == "overall" and int(rows[0]["elements"]) == n_params
    with Image.open(out / "neurons_heatmap.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert "conflicting" in captured.out


def test_analyze_neurons_without_data(compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["analyze", "neurons", "--model", str(compared.model_dir), "--out", str(tmp_path / "n")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "no data" in captured.err and "--split" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "n").exists()


def test_analyze_neurons_empty_set(compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    inj = write_jsonl(tmp_path / "i.jsonl", make_mc_rows(3))
    code = run_cli(
        ["analyze", "neurons", "--model", str(compared.model_dir), "--mastered", str(empty), "--injection", str(inj)]
        + ["--out", str(tmp_path / "n")]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert str(empty) in captured.err and "empty" in captured.err and "Traceback" not in captured.err


# ------------------------------------------------------------------------------------ analyze distance


def test_analyze_distance(compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ft_run = compared.out / "runs" / "ft-sgd"
    out = tmp_path / "distance"
    code = run_cli(["analyze", "distance", "--ft-run", str(ft_run), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("distance.jsonl", "distance_table.csv", "distance.json", "distance.png"):
        assert (out / name).is_file(), name

    info = json.loads((ft_run / "run.json").read_text(encoding="utf-8"))
    mastered = read_mc_jsonl(info["sets"]["mastered"]["file"])
    injection = read_mc_jsonl(info["sets"]["injection"]["file"])
    final_m = _read(ft_run / "predictions" / "epoch_002_mastered.jsonl")
    final_i = _read(ft_run / "predictions" / "epoch_002_injection.jsonl")

    rows = _read(out / "distance.jsonl")
    assert len(rows) == len(mastered)  # one row per mastered question, in file order
    for r, m, p in zip(rows, mastered, final_m, strict=True):
        assert set(r) == {"question", "label", "predict_label", "dot", "forgotten"}
        assert (r["question"], r["label"]) == (m.question, m.label)
        assert r["predict_label"] == p["predict_label"]
        assert r["forgotten"] == (p["predict_label"] != p["label"])
        assert isinstance(r["dot"], float)
    dots = [r["dot"] for r in rows]
    forgotten = [r["forgotten"] for r in rows]

    summary = json.loads((out / "distance.json").read_text(encoding="utf-8"))
    still_wrong = [q for q, p in zip(injection, final_i, strict=True) if p["predict_label"] != q.label]
    assert summary["still_wrong"] == len(still_wrong) > 0
    assert summary["final_epoch"] == 2
    assert summary["table"] == distance_table(dots, forgotten)
    assert summary["thirds"] == json.loads(json.dumps(thirds_follow_up(dots, forgotten)))
    assert sum(b["count"] for b in summary["bins"]) == len(rows)

    table = _csv(out / "distance_table.csv")
    assert [t["group"] for t in table] == ["dot < 0", "dot >= 0"]
    assert int(table[0]["total"]) == sum(d < 0 for d in dots)
    assert int(table[1]["total"]) == sum(d >= 0 for d in dots)
    assert int(table[0]["forgotten"]) + int(table[1]["forgotten"]) == sum(forgotten)

    # d_m is taken at the BASE parameters (the run's own model), with I' from the final predictions
    model = AutoModelForCausalLM.from_pretrained(compared.model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    tok = AutoTokenizer.from_pretrained(compared.model_dir)
    enc = PromptEncoder(tok)
    expected = gradient_distance(
        model, enc.encode_all(mastered), enc.encode_all(still_wrong), pad_id=tok.pad_token_id, progress=False
    )
    assert dots == pytest.approx(expected, rel=1e-5, abs=1e-6 * max(abs(x) for x in expected))

    with Image.open(out / "distance.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert "dot < 0" in captured.out


def test_analyze_distance_on_non_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notrun").mkdir()
    code = run_cli(["analyze", "distance", "--ft-run", str(tmp_path / "notrun"), "--out", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "not a run directory" in captured.err
    assert str(tmp_path / "notrun") in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "d").exists()


def test_analyze_distance_without_final_predictions(
    compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ft-copy"
    shutil.copytree(compared.out / "runs" / "ft-sgd", run)
    (run / "predictions" / "epoch_002_mastered.jsonl").unlink()
    code = run_cli(["analyze", "distance", "--ft-run", str(run), "--out", str(tmp_path / "d")])
    captured = capsys.readouterr()
    assert code == 2
    assert "epoch_002_mastered.jsonl" in captured.err and "Traceback" not in captured.err


def test_report_without_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.csv").write_text("epoch\n1\n", encoding="utf-8")
    code = run_cli(["report", str(tmp_path / "r"), "--out", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "no run.json" in captured.err
    assert "Traceback" not in captured.err


def test_analyze_distance_from_another_directory(
    compared: Compared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run trained with relative paths can be analysed from any working directory."""
    work = tmp_path / "work"
    shutil.copytree(compared.out / "split", work / "split")
    monkeypatch.chdir(work)
    argv = ["train", "--method", "ft", "--epochs", "1", "--lr", "0.01", "--split", "split", "--out", "ft-rel"]
    assert run_cli([*argv, "--model", str(compared.model_dir)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    code = run_cli(["analyze", "distance", "--ft-run", str(work / "ft-rel"), "--out", "d"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _read(elsewhere / "d" / "distance.jsonl")
    assert len(rows) == json.loads((work / "split" / "split.json").read_text())["files"]["correct"]["count"]


def test_analyze_distance_refuses_a_run_whose_sets_changed(
    compared: Compared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "ft-copy"
    shutil.copytree(compared.out / "runs" / "ft-sgd", run)
    info = json.loads((run / "run.json").read_text())
    info["sets"][info["forget_set"]]["sha256"] = "0" * 16  # as if the file had been rewritten since
    (run / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert run_cli(["analyze", "distance", "--ft-run", str(run), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "changed since the run" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_compare_config_file_sets_per_method_options(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "q.jsonl", make_mc_rows(12))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.01\nepochs: 1\nmethods:\n  cnl:\n    lr: 0.02\n    sign_storage: int8\n")
    out = tmp_path / "out"
    argv = ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out)]
    assert run_cli([*argv, "--config", str(cfg)]) == 0, capsys.readouterr().err
    ft = json.loads((out / "runs" / "ft-sgd" / "run.json").read_text())
    cn = json.loads((out / "runs" / "cnl-sgd" / "run.json").read_text())
    assert (ft["lr"], ft["epochs"], ft["config"]["train"]["sign_storage"]) == (0.01, 1, "bits")
    assert (cn["lr"], cn["epochs"], cn["config"]["train"]["sign_storage"]) == (0.02, 1, "int8")
    # the flags sit above the file, for every method
    out2 = tmp_path / "out2"
    assert (
        run_cli(
            [
                "compare",
                "--model",
                str(tiny_qwen2_dir),
                "--dataset",
                str(data),
                "--out",
                str(out2),
                "--config",
                str(cfg),
                "--lr",
                "0.005",
            ]
        )
        == 0
    )
    assert {json.loads((out2 / "runs" / r / "run.json").read_text())["lr"] for r in ("ft-sgd", "cnl-sgd")} == {0.005}


def test_compare_checks_every_run_before_training_any(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model answers nothing correctly, so M is empty: cnl cannot run, and ft must not train first."""
    import cnl.scoring as S

    real = S.predict

    def all_wrong(model: Any, encoded: Any, **kw: Any) -> Any:
        p = real(model, encoded, **kw)
        letters = [next(x for x in e.letters if x != e.label) for e in encoded]
        return S.Predictions(letters, [False] * len(letters), p.candidate_logits)

    monkeypatch.setattr(cnl.split, "predict", all_wrong)
    data = write_jsonl(tmp_path / "q.jsonl", make_mc_rows(8))
    out = tmp_path / "out"
    code = run_cli(
        [
            "compare",
            "--model",
            str(tiny_qwen2_dir),
            "--dataset",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--lr",
            "0.01",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "reference set mastered" in err and "is empty" in err
    assert (out / "split" / "split.json").is_file()
    assert not (out / "runs").exists()


def test_compare_passes_reference_and_watching_to_its_runs(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--reference self:...`` goes to the methods that protect a set (cnl), not to ft; ``--probe`` and
    ``--eval-every`` to every run."""
    data = write_jsonl(tmp_path / "q.jsonl", make_mc_rows(12))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": r["question"]} for r in make_mc_rows(4, seed=9)])
    out = tmp_path / "out"
    argv = ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out), "--epochs", "1"]
    argv += ["--reference", f"self:3:{prompts}", "--probe", "injection:3", "--eval-every", "2"]
    assert run_cli(argv) == 0, capsys.readouterr().err
    ft = json.loads((out / "runs" / "ft-sgd" / "run.json").read_text())
    cn = json.loads((out / "runs" / "cnl-sgd" / "run.json").read_text())
    assert ft["config"]["train"]["reference"] == "mastered" and ft["roles"]["reference"] is None
    assert cn["config"]["train"]["reference"] == f"self:3:{prompts}" and cn["sets"]["reference"]["count"] == 3
    assert (out / "runs" / "cnl-sgd" / "reference.jsonl").is_file()
    for run in ("ft-sgd", "cnl-sgd"):
        assert "kl_drift" in _csv(out / "runs" / run / "summary.csv")[0]
        assert (out / "runs" / run / "steps.csv").is_file()
    assert (out / "report" / "steps.png").is_file()
