"""WiSE-FT: ``cnl interpolate`` (:mod:`cnl.interpolate`), the ``wise`` method and the WiSE curve of ``cnl report``.

θ = (1 − α) θ₀ + α θ_ft by hand; α = 1 is the run's final epoch exactly and α = 0 the untrained model; finished
points are skipped; bad α and bad runs are refused before any model work; ``wise`` trains as ``ft`` and evaluates
and saves the hand-mixed weights, keeping θ₀ across ``--resume``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import cli_error, run_cli
from PIL import Image

import cnl.loading
import cnl.train as T
from cnl.config import DataConfig, ModelConfig, TrainConfig
from cnl.data import read_jsonl
from cnl.errors import CnlError
from cnl.interpolate import NotInterpolable, check_source, interpolate_run, parse_alphas
from cnl.methods import get_method, validate_train_config
from cnl.methods.wise import mix
from cnl.report import build_report, load_run_record, plot_pareto, with_wise_points, write_report
from cnl.resolve import train_config
from cnl.rundir import RunDir, RunDirError
from cnl.scoring import PromptEncoder
from cnl.testing import make_tiny_model, make_tiny_tokenizer

Weights = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ helpers
def train_from_dir(out: Path, files: dict[str, Path], model_dir: Path, **cfg: Any) -> list[dict[str, Any]]:
    """:func:`cnl.train.train` loading the model from ``model_dir`` (as ``cnl train --model DIR`` does), CPU."""
    return T.train(
        train_config(**cfg),
        DataConfig(**{k: str(v) for k, v in files.items()}),
        ModelConfig(model=str(model_dir), device="cpu"),
        out,
        progress=False,
        echo=False,
    )


def train_in_memory(
    out: Path, files: dict[str, Path], model: Any, tok: Any, *, resume: bool = False, **cfg: Any
) -> list[dict[str, Any]]:
    return T.train(
        train_config(**cfg),
        DataConfig(**{k: str(v) for k, v in files.items()}),
        ModelConfig(device="cpu"),
        out,
        model=model,
        tokenizer=tok,
        model_tag="tiny",
        progress=False,
        echo=False,
        resume=resume,
    )


def weights(model: torch.nn.Module) -> Weights:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def summary(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def info_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))


def edit_info(run: Path, **changes: Any) -> None:
    info = info_of(run)
    info.update(changes)
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")


def evaluate_model(model: Any, tok: Any, files: dict[str, Path]) -> dict[str, Any]:
    """Predictions of ``model`` on the set files, scored as a run scores them (default settings)."""
    enc = PromptEncoder(tok)
    sets = {name: enc.encode_all(read_jsonl(path)) for name, path in files.items()}
    return T.evaluate(model, sets, batch_size=TrainConfig().eval_batch_size, pad_id=enc.pad_id, tokenizer=tok)


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, sets: dict[str, Path], _one_thread: None
) -> dict[str, Path]:
    """Two finished ft runs of the tiny Llama loaded from its directory: ``model`` saved its model (adam, 2
    epochs), ``checkpoint`` kept its last checkpoint only (sgd, 2 epochs). Copy them before writing into them."""
    d = tmp_path_factory.mktemp("finished")
    train_from_dir(d / "ft", sets, tiny_llama_dir, method="ft", optimizer="adam", lr=1e-3, epochs=2, save_model=True)
    train_from_dir(
        d / "ckpt", sets, tiny_llama_dir, method="ft", optimizer="sgd", lr=0.1, epochs=2, keep_checkpoint=True
    )
    return {"model": d / "ft", "checkpoint": d / "ckpt"}


@pytest.fixture
def run(finished: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the ft run that saved its model (its directory is called ``ft``)."""
    return Path(shutil.copytree(finished["model"], tmp_path / "ft"))


@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: what is checked must be refused before."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cnl.loading, "load_for_sets", refuse)


def spy_evaluate(monkeypatch: pytest.MonkeyPatch) -> list[Weights]:
    """The model's weights at every :func:`cnl.train.evaluate` call (interpolate evaluates through it)."""
    seen: list[Weights] = []
    orig = T.evaluate

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(weights(model))
        return orig(model, *args, **kwargs)

    monkeypatch.setattr(T, "evaluate", spy)
    return seen


# ------------------------------------------------------------------------------------------------ the mixture
def test_mix_is_the_formula_elementwise() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        assert torch.equal(mix(a, b, alpha), (1 - alpha) * a + alpha * b)
    assert torch.equal(mix(a, b, 0.0), a) and torch.equal(mix(a, b, 1.0), b)


def test_interpolated_weights_are_the_hand_mixture(
    run: Path, tiny_llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    theta0 = weights(tiny_llama[0])
    final = load_file(str(run / "model" / "model.safetensors"))
    seen = spy_evaluate(monkeypatch)
    interpolate_run(run, [0.0, 0.5, 1.0], say=lambda _: None)
    assert len(seen) == 3
    assert any(not torch.equal(theta0[n], final[n]) for n in theta0)  # training moved the weights
    for alpha, got in zip((0.0, 0.5, 1.0), seen, strict=True):
        assert got.keys() == theta0.keys()
        for n in theta0:
            assert torch.equal(got[n], (1 - alpha) * theta0[n] + alpha * final[n]), (alpha, n)
    for n in theta0:
        assert torch.equal(seen[0][n], theta0[n]) and torch.equal(seen[2][n], final[n])


@pytest.mark.parametrize("weights_from", ["model", "checkpoint"])
def test_alpha_one_is_the_final_epoch_exactly(finished: dict[str, Path], tmp_path: Path, weights_from: str) -> None:
    src = Path(shutil.copytree(finished[weights_from], tmp_path / "run"))
    assert check_source(src).weights == weights_from
    (result,) = interpolate_run(src, "1", say=lambda _: None)
    point = src / "wise" / "alpha_1"
    assert result["path"] == str(point) and not result["skipped"]
    last = summary(src)[-1]
    (row,) = summary(point)
    assert row["epoch"] == last["epoch"] == "2"
    assert row["wrong_to_correct"] == last["wrong_to_correct"]
    assert row["correct_to_wrong"] == last["correct_to_wrong"]
    for name in ("injection", "mastered"):
        ours = (point / "predictions" / f"epoch_002_{name}.jsonl").read_bytes()
        assert ours == (src / "predictions" / f"epoch_002_{name}.jsonl").read_bytes()
    info = info_of(point)
    assert info["method"] == "wise" and info["alpha"] == 1.0 and info["status"] == "finished"
    assert info["source_run"] == str(src.resolve()) and info["source_method"] == "ft"
    assert info["source_epoch"] == 2 and info["source_weights"] == weights_from
    assert info["sets"] == info_of(src)["sets"]


def test_alpha_zero_is_the_untrained_model(run: Path, tiny_llama_dir: Path, sets: dict[str, Path]) -> None:
    (result,) = interpolate_run(run, [0], say=lambda _: None)
    rows = {name: read_jsonl(path) for name, path in sets.items()}
    loaded = cnl.loading.load_for_sets(ModelConfig(model=str(tiny_llama_dir), device="cpu"), rows)  # as the run did
    enc, tok = loaded.sets.encoded, loaded.tokenizer
    batch = TrainConfig().eval_batch_size
    preds = T.evaluate(loaded.model, enc, batch_size=batch, pad_id=PromptEncoder(tok).pad_id, tokenizer=tok)
    assert result["learned"] == preds["injection"].n_correct
    assert result["forgotten"] == len(preds["mastered"].correct) - preds["mastered"].n_correct
    answers, _ = RunDir(run / "wise" / "alpha_0").read_predictions(2, "injection")
    assert answers == preds["injection"].answers


def test_finished_points_are_skipped_and_stale_ones_redone(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    first = interpolate_run(run, "0,0.5", say=lines.append)
    assert [r["skipped"] for r in first] == [False, False]
    stamp = (run / "wise" / "alpha_0" / "run.json").stat().st_mtime_ns
    seen = spy_evaluate(monkeypatch)
    lines.clear()
    second = interpolate_run(run, "0,0.5,1", say=lines.append)
    assert [r["skipped"] for r in second] == [True, True, False] and len(seen) == 1
    assert [r["learned"] for r in second[:2]] == [r["learned"] for r in first]
    assert (run / "wise" / "alpha_0" / "run.json").stat().st_mtime_ns == stamp
    assert sum("skipped" in x for x in lines) == 2 and any(x.startswith("α=1: learned") for x in lines)
    # every point done: no model is loaded at all
    monkeypatch.setattr(cnl.loading, "load_for_sets", lambda *a, **k: pytest.fail("a model was loaded"))
    assert all(r["skipped"] for r in interpolate_run(run, "1,0,0.5", say=lambda _: None))
    monkeypatch.undo()
    # a point of an earlier final epoch (the run was resumed with more epochs since) is computed again
    edit_info(run / "wise" / "alpha_0.5", source_epoch=1)
    assert [r["skipped"] for r in interpolate_run(run, "0.5", say=lambda _: None)] == [False]
    assert info_of(run / "wise" / "alpha_0.5")["source_epoch"] == 2


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.5", "1.5 is outside \\[0, 1\\]"),
        ("-0.1", "is outside"),
        ("nan", "is outside"),
        ("x", "'x' is not a number"),
        ("0.5,0.50", "names 0.5 twice"),
        (" , ", "names no mixing weight"),
    ],
)
def test_bad_alphas_are_refused(text: str, message: str) -> None:
    with pytest.raises(CnlError, match=message):
        parse_alphas(text)


def test_alphas_keep_their_order() -> None:
    assert parse_alphas("0.75, 0,1,0.25") == [0.75, 0.0, 1.0, 0.25]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("lora", NotInterpolable, "LoRA run: WiSE-FT mixes full weights"),
        ("adapter", NotInterpolable, "adapter run"),
        ("wise", NotInterpolable, "is a wise run"),
        ("unfinished", CnlError, "has not finished \\(status interrupted, 1 of 2 epochs\\)"),
        ("no weights", NotInterpolable, "kept neither its model \\(model/\\) nor its last checkpoint: train it with "
                                        "--save-model"),
        ("point", NotInterpolable, "is a WiSE point"),
        ("not a run", RunDirError, "not a run directory"),
        ("in memory", CnlError, "trained on a model given in memory"),
        ("start gone", CnlError, "cannot load the model it started from"),
        ("set changed", RunDirError, "changed since the run"),
    ],
)  # fmt: skip
def test_bad_runs_are_refused_before_any_work(
    run: Path, tmp_path: Path, no_model_work: None, change: str, error: type, message: str
) -> None:
    target = run
    if change == "lora":
        edit_info(run, method="lora")
    elif change == "adapter":
        (run / "model" / "adapter_config.json").write_text("{}")
    elif change == "wise":
        edit_info(run, method="wise")
    elif change == "unfinished":
        edit_info(run, status="interrupted", epochs_done=1)
    elif change == "no weights":
        shutil.rmtree(run / "model")
    elif change == "point":
        edit_info(run, source_run=str(run))
    elif change == "not a run":
        target = tmp_path / "nothing"
    elif change == "in memory":
        info = info_of(run)
        info["config"]["model"]["model"] = None
        edit_info(run, model="tiny", model_source=None, config=info["config"])
    elif change == "start gone":
        edit_info(run, model_source=str(tmp_path / "gone"))
    elif change == "set changed":  # the run's injection file, then edited
        info = info_of(run)
        copy = tmp_path / "injection.jsonl"
        shutil.copyfile(info["sets"]["injection"]["file"], copy)
        info["sets"]["injection"]["file"] = str(copy)
        edit_info(run, sets=info["sets"])
        copy.write_text(copy.read_text() + "\n")
    with pytest.raises(error, match=message):
        interpolate_run(target, "0.5", say=lambda _: None)
    assert not (run / "wise").exists()


def test_a_checkpoint_of_several_processes_is_refused(finished: dict[str, Path], tmp_path: Path) -> None:
    src = Path(shutil.copytree(finished["checkpoint"], tmp_path / "run"))
    edit_info(src, world_size=2)
    with pytest.raises(NotInterpolable, match="sharded over 2 processes.*--save-model"):
        check_source(src)


# ------------------------------------------------------------------------------------------------ the wise method
def tiny(seed: int = 0) -> tuple[Any, Any]:
    tok = make_tiny_tokenizer("chatml")
    return make_tiny_model("qwen2", vocab_size=len(tok), seed=seed), tok


def test_wise_is_registered_with_its_option() -> None:
    m = get_method("wise")
    assert m.options_class().alpha == 0.5 and dict(m.defaults) == dict(get_method("ft").defaults)
    assert m.optimizers == get_method("ft").optimizers and not m.baseline
    with pytest.raises(CnlError, match="wise_alpha must be in \\[0, 1\\]"):
        validate_train_config(train_config(method="wise", wise_alpha=1.5))


def test_wise_trains_as_ft_and_evaluates_and_saves_the_mixture(tmp_path: Path, sets: dict[str, Path]) -> None:
    n = len(read_jsonl(sets["injection"]))
    step = {"optimizer": "sgd", "lr": 0.5, "epochs": 1, "batch_size": n}  # one SGD step
    ft_model, tok = tiny()
    theta0 = weights(ft_model)
    ft_rows = train_in_memory(tmp_path / "ft", sets, ft_model, tok, method="ft", **step)
    wise_model, _ = tiny()
    train_in_memory(tmp_path / "wise", sets, wise_model, tok, method="wise", wise_alpha=0.25, save_model=True, **step)
    theta1 = weights(ft_model)
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta0)
    for k, v in weights(wise_model).items():  # the training weights are plain ft's, bit for bit
        assert torch.equal(v, theta1[k]), k
    twin, _ = tiny()
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p.copy_(0.75 * theta0[k] + 0.25 * theta1[k])
    preds = evaluate_model(twin, tok, sets)
    out = RunDir(tmp_path / "wise")
    (row,) = out.read_summary()
    assert row["wrong_to_correct"] == preds["injection"].n_correct
    assert row["correct_to_wrong"] == len(preds["mastered"].correct) - preds["mastered"].n_correct
    assert row["train_avg_loss"] == ft_rows[0]["train_avg_loss"]
    for name in ("injection", "mastered"):
        assert out.read_predictions(1, name)[0] == preds[name].answers
    from safetensors.torch import load_file

    saved = load_file(str(out.model / "model.safetensors"))
    for k, p in twin.named_parameters():
        assert torch.equal(saved[k], p.detach()), k


def test_wise_at_alpha_one_is_ft(tmp_path: Path, sets: dict[str, Path]) -> None:
    ma, tok = tiny()
    mb, _ = tiny()
    cfg = {"optimizer": "adam", "lr": 1e-3, "epochs": 2}
    a = train_in_memory(tmp_path / "ft", sets, ma, tok, method="ft", **cfg)
    b = train_in_memory(tmp_path / "wise", sets, mb, tok, method="wise", wise_alpha=1.0, **cfg)
    assert without_seconds(a) == without_seconds(b)


def test_wise_resume_mixes_with_the_original_start(
    tmp_path: Path, sets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {"method": "wise", "optimizer": "momentum", "lr": 1e-2, "epochs": 2, "wise_alpha": 0.5}
    ma, tok = tiny()
    theta0 = weights(ma)
    rows_a = train_in_memory(tmp_path / "a", sets, ma, tok, **cfg)
    orig, calls = T.batch_losses, [0]
    n = len(read_jsonl(sets["injection"]))

    def crash(model: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += model.training
        if calls[0] == n + 2:
            raise RuntimeError("simulated crash in epoch 2")
        return orig(model, *args, **kwargs)

    monkeypatch.setattr(T, "batch_losses", crash)
    mb, _ = tiny()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_in_memory(tmp_path / "b", sets, mb, tok, **cfg)
    monkeypatch.setattr(T, "batch_losses", orig)
    assert any(not torch.equal(p, theta0[k]) for k, p in weights(mb).items())  # resumed from other weights
    caught: list[T.Run] = []
    load = T.load
    monkeypatch.setattr(T, "load", lambda *a, **k: caught.append(load(*a, **k)) or caught[-1])
    rows_b = train_in_memory(tmp_path / "b", sets, mb, tok, resume=True, **cfg)
    assert without_seconds(rows_b) == without_seconds(rows_a)
    anchor = caught[-1].hooks.anchor  # θ₀ came back from the checkpoint
    for k, v in theta0.items():
        assert torch.equal(anchor[k], v), k


# ------------------------------------------------------------------------------------------------ the report
def test_report_draws_the_wise_curve_and_lists_the_points(run: Path, tmp_path: Path) -> None:
    interpolate_run(run, "0.5,0", say=lambda _: None)
    report = write_report([run], tmp_path / "report")
    names = [r["run"] for r in report["rows"]]
    assert names == ["ft", "ft wise α=0", "ft wise α=0.5"]
    point = report["rows"][2]
    assert point["method"] == "wise" and point["wise_source"] == "ft" and point["wise_alpha"] == 0.5
    assert point["forgetting_reduction_pct"] is not None or report["rows"][0]["final_forgotten"] == 0
    assert "| ft wise α=0.5 | wise | adam |" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    with Image.open(tmp_path / "report" / "pareto.png") as img:
        assert img.size[0] > 100
    wise = [p for p in report["pareto"] if p["source"] == "ft"]
    assert sorted(p["alpha"] for p in wise) == [0.0, 0.5]
    fig = plot_pareto(report, tmp_path / "again.png")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert {"α=0", "α=0.5", "α=1"} <= set(labels)  # α = 1: the run's final epoch closes the curve
    (curve,) = [line for line in ax.lines if line.get_label() == "ft WiSE-FT (α)"]
    (ft_line,) = [line for line in ax.lines if line.get_label() == "ft"]
    assert curve.get_color() == ft_line.get_color() and curve.get_linestyle() == ":"
    xs = list(curve.get_xdata())
    by_alpha = {p["alpha"]: p["learned_pct"] for p in wise}
    assert xs[:2] == [by_alpha[0.0], by_alpha[0.5]] and xs[2] == report["rows"][0]["final_learned_pct"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_points_of_an_earlier_final_epoch_and_given_points_are_not_doubled(run: Path) -> None:
    interpolate_run(run, "0,0.5", say=lambda _: None)
    edit_info(run / "wise" / "alpha_0", source_epoch=1)
    runs = with_wise_points([load_run_record(run)])
    assert [r.name for r in runs] == ["ft", "ft wise α=0.5"]
    given = [load_run_record(run), load_run_record(run / "wise" / "alpha_0.5")]
    assert [r.name for r in with_wise_points(given)] == ["ft", "ft wise α=0.5"]
    assert [r["run"] for r in build_report(with_wise_points(given))["rows"]] == ["ft", "ft wise α=0.5"]
    # at equal wall time a point (no training of its own) is left out
    budget = build_report(with_wise_points(given), budget="auto")["budget"]
    assert [r["run"] for r in budget["rows"]] == ["ft"]


# ------------------------------------------------------------------------------------------------ the command line
def test_interpolate_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["interpolate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--alphas" in text and "WiSE-FT" in text and "--save-model" in text


def test_interpolate_end_to_end_through_the_cli(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["interpolate", str(run), "--alphas", "0.5,1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "α=0.5: learned" in out and "α=1: learned" in out
    assert (run / "wise" / "alpha_0.5" / "summary.csv").is_file()
    assert run_cli(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "ft wise α=0.5" in capsys.readouterr().out
    assert run_cli(["interpolate", str(run), "--alphas", "1"]) == 0
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alphas", "1.5"], "--alphas: 1.5 is outside"),
        (["--alphas", "x"], "--alphas: 'x' is not a number"),
        (["--alphas", "0.5,0.5"], "--alphas names 0.5 twice"),
    ],
)
def test_interpolate_cli_errors(
    run: Path, capsys: pytest.CaptureFixture[str], no_model_work: None, argv: list[str], message: str
) -> None:
    assert message in cli_error(capsys, ["interpolate", str(run), *argv])
    assert not (run / "wise").exists()


def test_interpolate_cli_refuses_a_lora_run(run: Path, capsys: pytest.CaptureFixture[str], no_model_work: None) -> None:
    edit_info(run, method="lora")
    assert "LoRA run" in cli_error(capsys, ["interpolate", str(run)])


def test_compare_refuses_bad_interpolate_alphas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, ["compare", "--out", str(tmp_path / "c"), "--interpolate", "0.5,2"])
    assert "--interpolate: 2 is outside [0, 1]" in line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ cnl continual
@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory, sets: dict[str, Path], _one_thread: None) -> dict[str, Path]:
    """The mastered set and the injection set cut into two rounds."""
    from cnl.testing import write_jsonl

    d = tmp_path_factory.mktemp("rounds")
    rows = [r.raw for r in read_jsonl(sets["injection"])]
    return {
        "mastered": sets["mastered"],
        "a": write_jsonl(d / "a.jsonl", rows[:4]),
        "b": write_jsonl(d / "b.jsonl", rows[4:]),
    }


def continual(out: Path, model_dir: Path, rounds: dict[str, Path], method: str) -> list[str]:
    return [
        "continual",
        *("--out", str(out), "--model", str(model_dir), "--device", "cpu", "--method", method),
        *("--optimizer", "adam", "--lr", "1e-3", "--epochs", "1", "--mastered", str(rounds["mastered"])),
        *("--rounds", f"{rounds['a']},{rounds['b']}"),
    ]


def test_a_continual_round_is_mixed_with_the_previous_rounds_weights(
    tmp_path: Path, tiny_llama_dir: Path, rounds: dict[str, Path]
) -> None:
    out = tmp_path / "cl"
    assert run_cli(continual(out, tiny_llama_dir, rounds, "ft")) == 0
    second = out / "rounds" / "02"
    src = check_source(second)
    assert Path(src.model_cfg.model) == (out / "rounds" / "01" / "model").resolve()  # round 2's start
    zero, one = interpolate_run(second, "0,1", say=lambda _: None)
    last = summary(second)[-1]
    assert (one["learned"], one["forgotten"]) == (int(last["wrong_to_correct"]), int(last["correct_to_wrong"]))
    for name in ("injection", "mastered"):
        ours = (second / "wise" / "alpha_1" / "predictions" / f"epoch_001_{name}.jsonl").read_bytes()
        assert ours == (second / "predictions" / f"epoch_001_{name}.jsonl").read_bytes()
    # α = 0: round 1's final weights, evaluated on round 2's sets
    rows = {n: read_jsonl(Path(info_of(second)["sets"][n]["file"])) for n in ("injection", "mastered")}
    loaded = cnl.loading.load_for_sets(ModelConfig(model=str(out / "rounds" / "01" / "model"), device="cpu"), rows)
    tok = loaded.tokenizer
    batch = TrainConfig().eval_batch_size
    preds = T.evaluate(
        loaded.model, loaded.sets.encoded, batch_size=batch, pad_id=PromptEncoder(tok).pad_id, tokenizer=tok
    )
    assert zero["learned"] == preds["injection"].n_correct


def test_wise_runs_round_after_round(tmp_path: Path, tiny_llama_dir: Path, rounds: dict[str, Path]) -> None:
    out = tmp_path / "cl"
    assert run_cli(continual(out, tiny_llama_dir, rounds, "wise")) == 0
    for k in ("01", "02"):
        info = info_of(out / "rounds" / k)
        assert info["status"] == "finished" and info["method"] == "wise"
        assert (out / "rounds" / k / "model" / "config.json").is_file()  # the mixture, the next round's start
    with pytest.raises(NotInterpolable, match="wise run"):
        check_source(out / "rounds" / "02")


def test_compare_interpolates_its_full_weight_runs(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cnl.testing import make_mc_rows, write_jsonl

    data = write_jsonl(tmp_path / "q.jsonl", make_mc_rows(12))
    out = tmp_path / "out"
    argv = ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out), "--epochs", "1"]
    assert run_cli([*argv, "--methods", "ft,lora", "--interpolate", "0.5"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "interpolate (WiSE-FT): α = 0.5" in text and "lora: no WiSE-FT points (" in text
    assert (out / "runs" / "ft-sgd" / "model" / "config.json").is_file()
    assert info_of(out / "runs" / "ft-sgd" / "wise" / "alpha_0.5")["source_method"] == "ft"
    assert not (out / "runs" / "lora-sgd" / "wise").exists()
    report = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    assert [r["run"] for r in report["rows"]] == ["ft-sgd", "ft-sgd wise α=0.5", "lora-sgd"]
