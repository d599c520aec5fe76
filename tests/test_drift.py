"""Forgetting while it happens: the KL drift of ``--probe`` (:mod:`cnl.drift`), ``steps.csv`` with
``--eval-every``/``--eval-sample``, and the Trainer callback's ``cnl_kl_drift``."""

from __future__ import annotations

import copy
import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import train_tiny

import cnl.train as T
from cnl.data import read_jsonl
from cnl.drift import DriftProbe, answer_log_probs, kl_drift, parse_probe
from cnl.errors import ConfigError
from cnl.resolve import train_config
from cnl.rundir import RunDir
from cnl.scoring import PromptEncoder, hf_examples
from cnl.testing import make_mc_rows, make_open_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("drift")
    mc = make_mc_rows(16, seed=5)
    return {"mastered": write_jsonl(d / "m.jsonl", mc[:8]), "injection": write_jsonl(d / "i.jsonl", mc[8:])}


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    tok = make_tiny_tokenizer("chatml")
    return make_tiny_model("llama", vocab_size=len(tok), seed=2), tok


def test_parse_probe() -> None:
    assert parse_probe("mastered") == parse_probe("mastered:64")
    assert parse_probe("mmlu:10").n == 10 and parse_probe("a/b.jsonl:3").set == "a/b.jsonl"
    for bad in ("x:0", ":5", "x:-1"):
        with pytest.raises(ConfigError, match="--probe"):
            parse_probe(bad)


# ------------------------------------------------------------------------------------------ the KL
def test_the_kl_of_an_unchanged_model_is_zero(tiny: tuple[Any, Any], files: dict[str, Path]) -> None:
    model, tok = tiny
    probe = DriftProbe(model, hf_examples(PromptEncoder(tok), read_jsonl(files["mastered"])), batch_size=3)
    assert probe.kl(model) == 0.0


def _by_hand(model: Any, examples: list[dict[str, list[int]]]) -> list[torch.Tensor]:
    """Per example, the log-softmax of the logits that predict each labelled token, one example at a time."""
    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e["input_ids"]])).logits[0].double()
            positions = [t - 1 for t, label in enumerate(e["labels"]) if label != -100]
            out.append(torch.log_softmax(logits[positions], dim=-1))
    return out


@pytest.mark.parametrize("kind", ["mcq", "open"])
def test_after_an_sgd_step_the_kl_is_positive_and_equals_a_hand_computation(tiny: tuple[Any, Any], kind: str) -> None:
    model, tok = tiny
    enc = PromptEncoder(tok)
    rows = make_mc_rows(5, seed=1) if kind == "mcq" else make_open_rows(5, seed=1)
    from cnl.data import rows_from_dicts

    examples = hf_examples(enc, rows_from_dicts(rows))
    before = _by_hand(model, examples)
    probe = DriftProbe(model, examples, batch_size=2)  # padded batches: the same distributions
    # one SGD step on another question
    other = hf_examples(enc, rows_from_dicts(make_mc_rows(1, seed=9)))[0]
    model.train()
    loss = model(torch.tensor([other["input_ids"]]), labels=torch.tensor([other["labels"]])).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    after = _by_hand(model, examples)
    expected = sum(
        float(F.kl_div(b, a, log_target=True, reduction="none").sum(-1).mean())
        for a, b in zip(before, after, strict=True)
    ) / len(examples)
    got = probe.kl(model)
    assert got > 0 and got == pytest.approx(expected, rel=1e-4)
    if kind == "open":  # every answer token's position counts
        assert [t.shape[0] for t in probe.start] == [sum(x != -100 for x in e["labels"]) for e in examples]


def test_kl_drift_checks_its_inputs() -> None:
    a = torch.log_softmax(torch.randn(2, 5), -1)
    with pytest.raises(ValueError):
        kl_drift([a], [a, a])
    with pytest.raises(ValueError):
        kl_drift([a], [a[:1]])


# ------------------------------------------------------------------------------------------ steps.csv
def _steps(out: Path) -> list[dict[str, str]]:
    with open(out / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


OPTIONS = {"method": "cnl", "optimizer": "sgd", "lr": 3e-2, "probe": "mastered:4", "eval_every": 3, "eval_sample": 4}


def test_steps_csv_logs_every_step_and_measures_every_k_and_at_epoch_ends(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    model, tok = tiny
    out = tmp_path / "run"
    sampled: list[int] = []
    evaluate = T.evaluate

    def counting(model: Any, sets: dict[str, Any], **kw: Any) -> Any:
        if kw.get("desc") == "sample":
            sampled.append(1)
        return evaluate(model, sets, **kw)

    monkeypatch.setattr(T, "evaluate", counting)
    rows = train_tiny(out, files, model=model, tokenizer=tok, epochs=2, **OPTIONS)
    steps = _steps(out)
    assert len(sampled) == 6  # steps 0, 3, 6, 9, 12, 15: the epochs' last steps (8, 16) take the full evaluation's
    assert list(steps[0]) == [
        "step",
        "epoch",
        "loss",
        "masked_fraction",
        "lr",
        "kl_drift",
        "learned_sample",
        "forgotten_sample",
    ]
    assert [int(s["step"]) for s in steps] == list(range(17))  # step 0 (before training), then 8 per epoch
    assert float(steps[0]["kl_drift"]) == 0.0
    measured = [int(s["step"]) for s in steps if s["kl_drift"]]
    assert measured == [0, 3, 6, 8, 9, 12, 15, 16]  # every 3 steps and each epoch's last step
    assert all(float(s["lr"]) == 3e-2 for s in steps[1:])
    # the epoch's KL is the summary's; the losses average to the epoch's loss
    for epoch, row in enumerate(rows, 1):
        last = [s for s in steps if s["epoch"] == str(epoch)][-1]
        assert float(last["kl_drift"]) == pytest.approx(row["kl_drift"], abs=1e-8)
        losses = [float(s["loss"]) for s in steps if s["epoch"] == str(epoch)]
        assert sum(losses) / len(losses) == pytest.approx(row["train_avg_loss"], abs=1e-5)
        assert 0 <= row["masked_fraction"] <= 1 and row["kl_drift"] > 0
    # the sample counts at an epoch's end are the full evaluation's on the same questions
    rng = random.Random(0)
    learn = sorted(rng.sample(range(8), 4))
    forget = sorted(rng.sample(range(8), 4))
    for epoch in (1, 2):
        pred = {name: RunDir(out).read_predictions(epoch, name)[1] for name in ("injection", "mastered")}
        last = [s for s in steps if s["epoch"] == str(epoch)][-1]
        assert int(last["learned_sample"]) == sum(pred["injection"][i] for i in learn)
        assert int(last["forgotten_sample"]) == sum(not pred["mastered"][i] for i in forget)
    info = json.loads((out / "run.json").read_text())
    assert info["eval_sample"] == {"learn": 4, "forget": 4} and info["sets"]["probe"]["count"] == 4


def test_a_resumed_run_writes_the_same_steps_csv(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    model, tok = tiny
    whole = tmp_path / "whole"
    train_tiny(whole, files, model=copy.deepcopy(model), tokenizer=tok, epochs=2, **OPTIONS)
    out = tmp_path / "killed"
    real = T.Watch.step

    def dies(self: Any, epoch: int, i: int, *a: Any) -> None:
        real(self, epoch, i, *a)
        if epoch == 2 and i == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(T.Watch, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(out, files, model=copy.deepcopy(model), tokenizer=tok, epochs=2, **OPTIONS)
    assert len(_steps(out)) == 1 + 8 + 5
    monkeypatch.setattr(T.Watch, "step", real)
    train_tiny(out, files, model=copy.deepcopy(model), tokenizer=tok, epochs=2, resume=True, **OPTIONS)
    assert _steps(out) == _steps(whole)


def test_steps_csv_without_watching_still_has_the_loss_of_every_step(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path
) -> None:
    model, tok = tiny
    rows = train_tiny(
        tmp_path / "r", files, model=model, tokenizer=tok, method="ft", optimizer="sgd", lr=1e-2, epochs=1
    )
    steps = _steps(tmp_path / "r")
    assert list(steps[0]) == ["step", "epoch", "loss", "masked_fraction", "lr"] and len(steps) == 8
    assert "kl_drift" not in rows[0] and all(float(s["masked_fraction"]) == 0 for s in steps)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eval_every": 2}, "give at least one"),
        ({"eval_sample": 4}, "give --eval-every"),
        ({"report_to": "mlflow"}, "report-to"),
        ({"probe": "mastered:0"}, "--probe"),
        ({"eval_every": -1, "probe": "mastered"}, "eval_every"),
    ],
)
def test_bad_watch_options_are_refused_before_any_work(options: dict[str, Any], message: str) -> None:
    from cnl.methods import validate_train_config

    with pytest.raises(ConfigError, match=message):
        validate_train_config(train_config(method="cnl", **options))


def test_a_probe_names_a_set_that_exists(files: dict[str, Path], tmp_path: Path) -> None:
    from cnl.config import DataConfig, ModelConfig

    cfg = train_config(method="cnl", probe="nosuchset:3")
    with pytest.raises(ConfigError, match="--probe nosuchset"):
        T.plan_run(cfg, DataConfig(**{k: str(v) for k, v in files.items()}), ModelConfig(device="cpu"), tmp_path / "r")


# ------------------------------------------------------------------------------------------ the Trainer callback
def test_the_trainer_callback_logs_the_kl_drift(tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    import cnl
    from cnl.hf import KL_KEY

    model, tok = tiny
    enc = PromptEncoder(tok)
    train = hf_examples(enc, read_jsonl(files["injection"]))
    probe = hf_examples(enc, read_jsonl(files["mastered"]))[:4]
    start = copy.deepcopy(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, per_device_train_batch_size=1, logging_steps=2,
        num_train_epochs=1, learning_rate=1e-2, optim="sgd", save_strategy="no",
    )  # fmt: skip
    from cnl.reference import _pad_collate

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=_pad_collate)
    cb = cnl.protect(trainer, hf_examples(enc, read_jsonl(files["mastered"])), probe=probe)
    trainer.train()
    logged = [h for h in trainer.state.log_history if KL_KEY in h]
    assert len(logged) >= 4 and all(h[KL_KEY] >= 0 for h in logged) and logged[-1][KL_KEY] > 0
    # the last log's KL is the probe's KL of the final model from the start
    expected = kl_drift(answer_log_probs(start, cb.drift.batches), answer_log_probs(model, cb.drift.batches))
    assert logged[-1][KL_KEY] == pytest.approx(expected, rel=1e-5)
