"""``--report-to``: TensorBoard event files read back with TensorBoard's own reader, a W&B run written offline
(no key, no network), and ``cnl report`` drawing ``steps.csv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import train_tiny

from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl
from cnl.tracking import open_tracker, wandb_mode

OPTIONS = {"method": "cnl", "optimizer": "sgd", "lr": 3e-2, "probe": "mastered:4", "eval_every": 3, "eval_sample": 4}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tracking")
    mc = make_mc_rows(12, seed=7)
    return {"mastered": write_jsonl(d / "m.jsonl", mc[:6]), "injection": write_jsonl(d / "i.jsonl", mc[6:])}


def _train(out: Path, files: dict[str, Path], **extra: Any) -> list[dict[str, Any]]:
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("llama", vocab_size=len(tok), seed=3)
    return train_tiny(out, files, model=model, tokenizer=tok, epochs=2, **{**OPTIONS, **extra})


def _steps(out: Path) -> list[dict[str, str]]:
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tensorboard_event_files_hold_the_steps_and_epochs(files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = _train(out, files, report_to="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = _steps(out)
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(int(s["step"]), pytest.approx(float(s["loss"]), abs=1e-6)) for s in steps if s["loss"]]
    kl = [(e.step, e.value) for e in events.Scalars("steps/kl_drift")]
    assert kl == [(int(s["step"]), pytest.approx(float(s["kl_drift"]), abs=1e-6)) for s in steps if s["kl_drift"]]
    assert [e.value for e in events.Scalars("epoch/forgotten")] == [r["correct_to_wrong"] for r in rows]
    assert {"train/masked_fraction", "train/lr", "steps/forgotten_sample", "epoch/kl_drift"} <= set(
        events.Tags()["scalars"]
    )


def test_wandb_runs_offline_without_a_key(files: dict[str, Path], tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    out = tmp_path / "run"
    _train(out, files, report_to="wandb")
    runs = list((out / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert (out / "wandb" / "cnl-run-id").read_text().strip() in runs[0].name


def test_a_tracker_that_sends_nothing(tmp_path: Path) -> None:
    t = open_tracker("none", tmp_path, {})
    t.log({"x": 1.0}, 1)
    t.close()
    assert not any(tmp_path.iterdir())


def test_report_draws_the_steps_and_shows_the_kl(files: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from cnl.report import write_report

    _train(tmp_path / "a", files)
    _train(tmp_path / "b", files, method="ft", probe="mastered:4")
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep")
    assert report["steps_figure"] == "steps.png"
    with Image.open(tmp_path / "rep" / "steps.png") as im:
        assert im.size[0] > 1000 and len(set(im.convert("L").get_flattened_data())) > 10  # three panels, not blank
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "KL drift" in md and "steps.png" in md
    final = {r["run"]: r["final_kl_drift"] for r in report["rows"]}
    summary = json.loads((tmp_path / "a" / "run.json").read_text())
    assert final["a"] > 0 and summary["columns"][5] == "kl_drift"


def test_a_missing_tracker_package_is_refused_before_any_work(
    files: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    import importlib.util

    from cnl.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'cnl\[track\]'"):
        _train(tmp_path / "r", files, report_to="wandb")
    assert not (tmp_path / "r" / "run.json").exists()
