"""Tests for ``cnl train`` (:mod:`cnl.train` and the CLI verb): SPEC §4 end to end on tiny models.

The sets are hand-made from synthetic rows, each carrying an ``id`` and the ``set`` it was put in, so
that which rows play which role (reference, training, learning, forgetting) can be checked exactly.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import SPEC_OPTIMIZERS, blocked_child, cli_error, cnl_adam_train_args, train_tiny, umask
from transformers import AutoModelForCausalLM

import cnl.train as T
from cnl.cli import build_parser, main, resolve_train_configs
from cnl.config import DataConfig, TrainConfig
from cnl.data import rows_from_dicts
from cnl.errors import ConfigError
from cnl.optimizer import MaskedOptimizer
from cnl.scoring import PromptEncoder
from cnl.split import run_split
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl

METHOD_OPTIMIZERS = SPEC_OPTIMIZERS
SETTINGS = ("in-set", "ood-correct", "ood-wrong")
SECONDS = ("reference_seconds", "train_seconds", "eval_seconds", "epoch_seconds")
SPEC_COLUMNS = {
    "in-set": ["epoch", "train_avg_loss", "wrong_to_correct", "correct_to_wrong"],
    "replay": ["epoch", "train_avg_loss", "wrong_to_correct", "correct2_to_wrong"],
    "ood-correct": ["epoch", "train_avg_loss", "wrong_to_correct", "correct2_to_wrong"],
    "ood-wrong": ["epoch", "train_avg_loss", "wrong2_to_correct", "correct_to_wrong"],
}
# (reference set, training sets, learning set, forgetting set) of SPEC §4's settings table
ROLES = {
    "in-set": ("mastered", ("injection",), "injection", "mastered"),
    "replay": (None, ("injection", "mastered1"), "injection", "mastered2"),
    "ood-correct": ("mastered1", ("injection",), "injection", "mastered2"),
    "ood-wrong": ("mastered", ("injection1",), "injection2", "mastered"),
}
LR = {"sgd": 1e-2, "momentum": 1e-2, "adam": 1e-3, "adamw": 1e-3}


# ------------------------------------------------------------------------------------------------ data
SET_FILES = ("mastered", "injection", "mastered1", "mastered2", "injection1", "injection2")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    """M = m0..m7 (M1 = m0..m3, M2 = m4..m7), I = i0..i7 (I1 = i0..i3, I2 = i4..i7), every row tagged."""
    d = tmp_path_factory.mktemp("sets")
    rows = make_mc_rows(16, seed=5)
    assert len({r["question"] for r in rows}) == 16
    m = [{"id": f"m{k}", "set": "M", **r} for k, r in enumerate(rows[:8])]
    i = [{"id": f"i{k}", "set": "I", **r} for k, r in enumerate(rows[8:])]
    parts = {
        "mastered": m,
        "injection": i,
        "mastered1": [{**r, "set": "M1"} for r in m[:4]],
        "mastered2": [{**r, "set": "M2"} for r in m[4:]],
        "injection1": [{**r, "set": "I1"} for r in i[:4]],
        "injection2": [{**r, "set": "I2"} for r in i[4:]],
    }
    files = {name: write_jsonl(d / f"{name}.jsonl", rs) for name, rs in parts.items()}
    by_question = {r["question"]: r["id"] for r in m + i}
    return {"dir": d, "files": files, "rows": parts, "by_question": by_question}


def data_config(sets: dict, only: tuple[str, ...] = SET_FILES) -> DataConfig:
    return DataConfig(**{name: str(sets["files"][name]) for name in only})


def data_flags(sets: dict, only: tuple[str, ...] = SET_FILES) -> list[str]:
    return [x for name in only for x in (f"--{name}", str(sets["files"][name]))]


def fresh_model(seed: int = 0):
    tok = make_tiny_tokenizer("chatml")
    return make_tiny_model("qwen2", vocab_size=len(tok), seed=seed), tok


def run_train(out: Path, sets: dict, *, model=None, tokenizer=None, resume: bool = False, **cfg):
    cfg.setdefault("epochs", 1)
    cfg.setdefault("lr", LR[cfg.get("optimizer", "sgd")])
    if model is None:
        model, tokenizer = fresh_model()
    return train_tiny(out, sets["files"], model=model, tokenizer=tokenizer, resume=resume, **cfg)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: str(v) for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def prediction_files(run: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((run / "predictions").glob("*.jsonl"))}


def question_ids(sets: dict, encoded) -> list[str]:
    """Map encoded prompts back to row ids (prompt ids -> question through a fresh encoder)."""
    _, tok = fresh_model()
    enc = PromptEncoder(tok)
    lookup = {}
    for q, ident in sets["by_question"].items():
        lookup[tuple(enc.prompt_ids(q))] = ident
    return [lookup[tuple(e.input_ids)] for e in encoded]


# ------------------------------------------------------------------------------- every method, once
COMBOS = [
    (method, opt, setting)
    for method, opts in METHOD_OPTIMIZERS.items()
    for opt in opts
    for setting in (("replay",) if method == "replay" else SETTINGS)
]


@pytest.mark.parametrize(("method", "optimizer", "setting"), COMBOS, ids=["/".join(c) for c in COMBOS])
def test_every_method_optimizer_and_setting_runs(tmp_path, sets, method, optimizer, setting):
    out = tmp_path / "run"
    kw = {} if method == "replay" else {"setting": setting}
    rows = run_train(out, sets, method=method, optimizer=optimizer, **kw)
    ref_set, train_sets, learn, forget = ROLES[setting]
    if method != "cnl":
        ref_set = None

    header, csv_rows = read_csv(out / "summary.csv")
    assert header[:4] == SPEC_COLUMNS[setting]
    assert header[4] == "masked_fraction"
    assert set(header[5:]) == set(SECONDS)
    assert len(csv_rows) == len(rows) == 1
    row = csv_rows[0]
    assert row["epoch"] == "1"
    assert math.isfinite(float(row["train_avg_loss"])) and float(row["train_avg_loss"]) > 0
    n_learn, n_forget = len(sets["rows"][learn]), len(sets["rows"][forget])
    assert 0 <= int(row[SPEC_COLUMNS[setting][2]]) <= n_learn
    assert 0 <= int(row[SPEC_COLUMNS[setting][3]]) <= n_forget
    masked = float(row["masked_fraction"])
    if method == "cnl":
        assert 0 < masked < 1
    else:
        assert masked == 0

    # predictions of the learning and forgetting sets, in file order
    for name in {learn, forget}:
        preds = read_jsonl(out / "predictions" / f"epoch_001_{name}.jsonl")
        src = sets["rows"][name]
        assert [p["question"] for p in preds] == [r["question"] for r in src]
        assert [p["label"] for p in preds] == [r["label"] for r in src]
        assert all(p["predict_label"] in "ABCD" for p in preds)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(
        f"epoch_001_{name}.jsonl" for name in {learn, forget}
    )
    # the counts in the summary are the ones in the prediction files
    learn_preds = read_jsonl(out / "predictions" / f"epoch_001_{learn}.jsonl")
    forget_preds = read_jsonl(out / "predictions" / f"epoch_001_{forget}.jsonl")
    assert int(row[SPEC_COLUMNS[setting][2]]) == sum(p["label"] == p["predict_label"] for p in learn_preds)
    assert int(row[SPEC_COLUMNS[setting][3]]) == sum(p["label"] != p["predict_label"] for p in forget_preds)

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_done"] == 1
    assert (info["method"], info["optimizer"], info["setting"]) == (method, optimizer, setting)
    assert info["roles"]["reference"] == ref_set
    assert tuple(info["roles"]["train"]) == train_sets
    assert (info["learn_set"], info["forget_set"]) == (learn, forget)
    expected_sets = {s for s in (ref_set, *train_sets, learn, forget) if s}
    assert set(info["sets"]) == expected_sets
    assert all(info["sets"][s]["count"] == len(sets["rows"][s]) for s in expected_sets)
    assert info["columns"] == header
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["method"] == method and cfg["train"]["optimizer"] == optimizer
    log = (out / "train.log").read_text()
    assert "epoch   1/1" in log
    assert not (out / "checkpoint").exists()  # removed after a successful run by default
    if method == "lora":
        assert info["trainable_parameters"] < 35520  # only the adapters


# ------------------------------------------------------------------------------------------------- roles
def record_training(monkeypatch) -> list:
    """Record every sample the training loop computes a loss for (batch_losses is only used there)."""
    seen: list = []
    orig = T.batch_losses

    def spy(model, batch, pad_id=0):
        seen.extend(batch)
        return orig(model, batch, pad_id)

    monkeypatch.setattr(T, "batch_losses", spy)
    return seen


def record_reference(monkeypatch) -> list:
    calls: list = []
    orig = T.reference_sign

    def spy(model, batches, loss_fn, params, **kw):
        calls.append([e for batch in batches for e in batch])
        return orig(model, batches, loss_fn, params, **kw)

    monkeypatch.setattr(T, "reference_sign", spy)
    return calls


def ids_of(sets: dict, name: str) -> list[str]:
    return [r["id"] for r in sets["rows"][name]]


def test_replay_trains_on_i_and_m1_shuffled_once(tmp_path, sets, monkeypatch):
    trained = record_training(monkeypatch)
    refs = record_reference(monkeypatch)
    out = tmp_path / "replay"
    rows = run_train(out, sets, method="replay", optimizer="sgd", epochs=2)
    assert refs == []  # no reference gradient for replay
    order = question_ids(sets, trained)
    pool = ids_of(sets, "injection") + ids_of(sets, "mastered1")
    assert len(order) == 2 * 12
    assert order[:12] == order[12:]  # shuffled once, the same order every epoch
    expected = list(pool)
    random.Random(42).shuffle(expected)
    assert order[:12] == expected and order[:12] != pool
    info = json.loads((out / "run.json").read_text())
    assert {k: v["count"] for k, v in info["sets"].items()} == {
        "injection": 8,
        "mastered1": 4,
        "mastered2": 4,
    }
    assert (info["learn_total"], info["forget_total"]) == (8, 4)
    assert len(rows) == 2
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        f"epoch_00{e}_{s}.jsonl" for e in (1, 2) for s in ("injection", "mastered2")
    ]


def test_ood_correct_reference_from_m1_forgetting_on_m2(tmp_path, sets, monkeypatch):
    trained = record_training(monkeypatch)
    refs = record_reference(monkeypatch)
    out = tmp_path / "oodc"
    run_train(out, sets, method="cnl", optimizer="sgd", setting="ood-correct", epochs=2)
    assert len(refs) == 2  # afresh at the start of every epoch
    assert all(sorted(question_ids(sets, r)) == sorted(ids_of(sets, "mastered1")) for r in refs)
    assert question_ids(sets, trained) == ids_of(sets, "injection") * 2  # file order
    preds = read_jsonl(out / "predictions" / "epoch_001_mastered2.jsonl")
    assert [sets["by_question"][p["question"]] for p in preds] == ids_of(sets, "mastered2")
    header, _ = read_csv(out / "summary.csv")
    assert header[2:4] == ["wrong_to_correct", "correct2_to_wrong"]


def test_ood_wrong_trains_on_i1_learns_on_i2_forgets_on_m(tmp_path, sets, monkeypatch):
    trained = record_training(monkeypatch)
    refs = record_reference(monkeypatch)
    out = tmp_path / "oodw"
    run_train(out, sets, method="cnl", optimizer="adam", setting="ood-wrong")
    assert [sorted(question_ids(sets, r)) for r in refs] == [sorted(ids_of(sets, "mastered"))]
    assert question_ids(sets, trained) == ids_of(sets, "injection1")
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "epoch_001_injection2.jsonl",
        "epoch_001_mastered.jsonl",
    ]
    info = json.loads((out / "run.json").read_text())
    assert (info["learn_total"], info["forget_total"]) == (4, 8)


def test_in_set_cnl_reference_from_m_trains_on_i(tmp_path, sets, monkeypatch):
    trained = record_training(monkeypatch)
    refs = record_reference(monkeypatch)
    run_train(tmp_path / "ins", sets, method="cnl", optimizer="momentum")
    assert [sorted(question_ids(sets, r)) for r in refs] == [sorted(ids_of(sets, "mastered"))]
    assert question_ids(sets, trained) == ids_of(sets, "injection")


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_baselines_compute_no_reference(tmp_path, sets, monkeypatch, method):
    refs = record_reference(monkeypatch)
    run_train(tmp_path / method, sets, method=method, optimizer="sgd", setting="ood-correct")
    assert refs == []


# ------------------------------------------------------------------------ first step, independently
def spec_loss(model, tok, row: dict) -> torch.Tensor:
    """SPEC §2 written out: chat template, no extra BOS, full-vocabulary CE at the last prompt position."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    target = tok(row["label"], add_special_tokens=False)["input_ids"][-1]
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    return F.cross_entropy(logits[None].float(), torch.tensor([target]))


def grads_of(model, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_first_cnl_sgd_step_equals_spec_formula(tmp_path, sets):
    lr = 0.1
    mastered = sets["rows"]["mastered"][:5]
    injection = sets["rows"]["injection"][2:3]
    m_file = write_jsonl(tmp_path / "m.jsonl", mastered)
    i_file = write_jsonl(tmp_path / "i.jsonl", injection)

    model, tok = fresh_model(seed=3)
    base = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in base.parameters()]
    # g_M: the mean of per-sample gradients; g: the gradient of the training sample
    per_sample = [grads_of(base, spec_loss(base, tok, r)) for r in mastered]
    g_m = [torch.stack(gs).mean(0) for gs in zip(*per_sample, strict=True)]
    g = grads_of(base, spec_loss(base, tok, injection[0]))
    expected = [t - lr * ((gi * gm) >= 0).float() * gi for t, gi, gm in zip(theta0, g, g_m, strict=True)]
    conflicts = sum(int(((gi * gm) < 0).sum()) for gi, gm in zip(g, g_m, strict=True))
    assert conflicts > 0  # the mask really freezes something
    # where g_M is ~0 next to the per-sample gradients (or exactly 0), summation order may decide its
    # sign: there either decision is correct and is accepted
    ambiguous = [
        gm.abs() <= 1e-5 * torch.stack(gs).abs().amax(0)
        for gm, gs in zip(g_m, zip(*per_sample, strict=True), strict=True)
    ]
    n_ambiguous = sum(int(a.sum()) for a in ambiguous)
    n_elements = sum(p.numel() for p in base.parameters())
    assert n_ambiguous < 0.01 * n_elements

    out = tmp_path / "run"
    files = {"mastered": m_file, "injection": i_file}
    rows = train_tiny(out, files, model=model, tokenizer=tok, method="cnl", lr=lr, epochs=1, save_model=True)
    masked = float(rows[0]["masked_fraction"]) * n_elements
    assert masked == pytest.approx(conflicts, abs=n_ambiguous + 0.1)
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    for (name, p), e, t, gi, amb in zip(saved.named_parameters(), expected, theta0, g, ambiguous, strict=True):
        p = p.detach()
        torch.testing.assert_close(p[~amb], e[~amb], rtol=0, atol=1e-6, msg=name)
        either = torch.isclose(p, t, rtol=0, atol=1e-6) | torch.isclose(p, t - lr * gi, rtol=0, atol=1e-6)
        assert bool(either[amb].all()), name
    # the unmasked (ft) update is measurably different
    unmasked = [t - lr * gi for t, gi in zip(theta0, g, strict=True)]
    assert max(float((p.detach() - u).abs().max()) for p, u in zip(saved.parameters(), unmasked, strict=True)) > 1e-4
    assert float(rows[0]["train_avg_loss"]) == pytest.approx(
        float(spec_loss(base, tok, injection[0]).detach()), abs=1e-5
    )


# --------------------------------------------------------------------------------- determinism & variants
def test_two_identical_runs_give_identical_results(tmp_path, sets):
    a = run_train(tmp_path / "a", sets, method="cnl", optimizer="adam", epochs=2)
    b = run_train(tmp_path / "b", sets, method="cnl", optimizer="adam", epochs=2)
    assert without_seconds(a) == without_seconds(b)
    _, ra = read_csv(tmp_path / "a" / "summary.csv")
    _, rb = read_csv(tmp_path / "b" / "summary.csv")
    assert without_seconds(ra) == without_seconds(rb) and len(ra) == 2
    assert prediction_files(tmp_path / "a") == prediction_files(tmp_path / "b")


@pytest.mark.parametrize(
    "variant",
    [{"update_in_backward": False}, {"ref_chunks": 3}, {"sign_storage": "int8"}, {"ref_batch_size": 1}],
    ids=lambda v: next(iter(v)),
)
def test_engine_variants_give_the_same_numbers(tmp_path, sets, variant):
    """Memory/speed options must not change the results (SPEC numbers stay reachable)."""
    ma, tok = fresh_model()
    mb, _ = fresh_model()
    a = run_train(tmp_path / "a", sets, model=ma, tokenizer=tok, method="cnl", optimizer="momentum", epochs=2)
    b = run_train(
        tmp_path / "b", sets, model=mb, tokenizer=tok, method="cnl", optimizer="momentum", epochs=2, **variant
    )
    assert without_seconds(a) == without_seconds(b)
    assert prediction_files(tmp_path / "a") == prediction_files(tmp_path / "b")
    for (n, pa), pb in zip(ma.named_parameters(), mb.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------ resume
def cli_train_args(model_dir: Path, sets: dict, out: Path, *extra: str) -> list[str]:
    files = sets["files"]
    return cnl_adam_train_args(model_dir, out, files["mastered"], files["injection"], *extra)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, sets, tiny_qwen2_dir, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(cli_train_args(tiny_qwen2_dir, sets, a)) == 0

    n_train = len(sets["rows"]["injection"])
    with blocked_child(tmp_path, cli_train_args(tiny_qwen2_dir, sets, b), n_train + 3) as proc:  # in epoch 2
        latest = json.loads((b / "checkpoint" / "latest.json").read_text())
        assert latest["epoch"] == 1
        _, partial = read_csv(b / "summary.csv")
        assert [r["epoch"] for r in partial] == ["1"]
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert json.loads((b / "run.json").read_text())["status"] == "running"

    capsys.readouterr()
    assert main(cli_train_args(tiny_qwen2_dir, sets, b, "--resume")) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    ha, ra = read_csv(a / "summary.csv")
    hb, rb = read_csv(b / "summary.csv")
    assert ha == hb and len(ra) == 3
    assert without_seconds(ra) == without_seconds(rb)
    assert prediction_files(a) == prediction_files(b) and len(prediction_files(a)) == 6
    info = json.loads((b / "run.json").read_text())
    assert info["status"] == "finished" and info["epochs_done"] == 3
    # a finished run resumed again does nothing and keeps its files
    assert main(cli_train_args(tiny_qwen2_dir, sets, b, "--resume")) == 0
    assert without_seconds(read_csv(b / "summary.csv")[1]) == without_seconds(rb)


@pytest.mark.parametrize(("method", "optimizer"), [("cnl", "momentum"), ("lora", "adamw"), ("ft", "adamw")])
def test_resume_after_crash_in_epoch_two_equals_uninterrupted_run(tmp_path, sets, monkeypatch, method, optimizer):
    cfg = {"method": method, "optimizer": optimizer, "epochs": 3, "lr": 1e-2}
    a, b = tmp_path / "a", tmp_path / "b"
    ma, tok = fresh_model()
    rows_a = run_train(a, sets, model=ma, tokenizer=tok, **cfg)

    orig, calls = T.batch_losses, [0]

    def crash(*args, **kw):
        calls[0] += 1
        if calls[0] == 8 + 3:
            raise RuntimeError("simulated crash in epoch 2")
        return orig(*args, **kw)

    monkeypatch.setattr(T, "batch_losses", crash)
    mb, _ = fresh_model()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(b, sets, model=mb, tokenizer=tok, **cfg)
    monkeypatch.setattr(T, "batch_losses", orig)
    assert (b / "checkpoint" / "latest.json").exists()
    assert len(read_csv(b / "summary.csv")[1]) == 1

    with pytest.raises(ConfigError, match="already holds a run"):
        run_train(b, sets, **cfg)
    # non-LoRA: resume with the very model object that was half-way through epoch 2 (the checkpoint wins)
    mc = mb if method != "lora" else fresh_model()[0]
    rows_b = run_train(b, sets, model=mc, tokenizer=tok, resume=True, **cfg)
    assert without_seconds(rows_a) == without_seconds(rows_b)
    assert without_seconds(read_csv(a / "summary.csv")[1]) == without_seconds(read_csv(b / "summary.csv")[1])
    assert prediction_files(a) == prediction_files(b)


def test_resume_rejects_a_different_configuration(tmp_path, sets):
    out = tmp_path / "r"
    run_train(out, sets, method="cnl", optimizer="sgd", keep_checkpoint=True)
    with pytest.raises(ConfigError, match="lr was"):
        run_train(out, sets, method="cnl", optimizer="sgd", lr=0.5, resume=True)


def test_resume_rejects_a_different_model_or_dtype(tmp_path, sets, tiny_qwen2_dir, tiny_llama_dir, capsys):
    """The checkpoint holds only trainable weights (LoRA: adapters): the base model must be the same."""
    out = tmp_path / "r"
    common = [
        "train",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--method",
        "lora",
        "--lr",
        "0.01",
        "--keep-checkpoint",
        *data_flags(sets, ("mastered", "injection")),
    ]
    assert main([*common, "--model", str(tiny_qwen2_dir), "--epochs", "1"]) == 0
    err = cli_error(capsys, [*common, "--model", str(tiny_llama_dir), "--epochs", "2", "--resume"])
    assert "different model" in err
    err = cli_error(
        capsys, [*common, "--model", str(tiny_qwen2_dir), "--epochs", "2", "--resume", "--dtype", "bfloat16"]
    )
    assert "dtype" in err
    assert len(read_csv(out / "summary.csv")[1]) == 1
    # the same directory spelled differently is the same model
    other_spelling = str(tiny_qwen2_dir.parent / "." / tiny_qwen2_dir.name) + "/"
    assert main([*common, "--model", other_spelling, "--epochs", "2", "--resume"]) == 0
    assert len(read_csv(out / "summary.csv")[1]) == 2


def test_extending_a_finished_run_equals_a_longer_run(tmp_path, sets, tiny_qwen2_dir):
    def argv(out, epochs, *extra):  # flags given later override cli_train_args' own
        return cli_train_args(tiny_qwen2_dir, sets, out, "--optimizer", "adamw", "--epochs", str(epochs), *extra)

    assert main(argv(tmp_path / "long", 2)) == 0
    assert main(argv(tmp_path / "ext", 1, "--keep-checkpoint")) == 0
    assert (tmp_path / "ext" / "checkpoint").exists()
    assert main(argv(tmp_path / "ext", 2, "--resume")) == 0
    long_rows = read_csv(tmp_path / "long" / "summary.csv")[1]
    assert without_seconds(long_rows) == without_seconds(read_csv(tmp_path / "ext" / "summary.csv")[1])
    assert prediction_files(tmp_path / "long") == prediction_files(tmp_path / "ext")


def test_extending_a_finished_run_without_checkpoint_is_refused(tmp_path, sets, tiny_qwen2_dir, capsys):
    common = cli_train_args(tiny_qwen2_dir, sets, tmp_path / "ext", "--method", "ft")
    assert main([*common, "--epochs", "1"]) == 0
    before = (tmp_path / "ext" / "summary.csv").read_text()
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "kept no checkpoint" in err and "--keep-checkpoint" in err and "Traceback" not in err
    assert (tmp_path / "ext" / "summary.csv").read_text() == before  # finished results untouched


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: errors must come before any work."""
    import cnl.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the error was reported")

    monkeypatch.setattr(cnl.models, "load_model_and_tokenizer", boom)


def base_args(out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "unused-model-dir",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--lr",
        "0.01",
        *extra,
    ]


def test_error_empty_mastered_set_for_cnl(tmp_path, sets, capsys, no_model_load):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    err = cli_error(
        capsys,
        base_args(out, "--method", "cnl", "--mastered", str(empty), "--injection", str(sets["files"]["injection"])),
    )
    assert "empty" in err and "empty.jsonl" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("method", "setting", "missing"),
    [
        ("replay", "in-set", ("mastered1", "mastered2")),
        ("cnl", "ood-correct", ("mastered1", "mastered2")),
        ("ft", "ood-correct", ("mastered2",)),
        ("cnl", "ood-wrong", ("injection1", "injection2")),
    ],
)
def test_error_missing_halves_names_the_sets(tmp_path, sets, capsys, no_model_load, method, setting, missing):
    out = tmp_path / "out"
    argv = base_args(out, "--method", method, "--setting", setting, *data_flags(sets, ("mastered", "injection")))
    err = cli_error(capsys, argv)
    for name in missing:
        assert name in err and f"--{name}" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (["--lr", "0"], "learning rate"),
        (["--lr=-1e-3"], "learning rate"),
        (["--lr", "-0.001"], "learning rate"),
        (["--lr", "nan"], "learning rate"),
        (["--epochs", "0"], "epochs"),
        (["--preset", "No-Such-Model"], "unknown preset"),
        (["--method", "replay", "--optimizer", "adam"], "replay"),
        (["--method", "lora", "--optimizer", "adam"], "lora"),
        (["--ref-batch-size", "0"], "ref_batch_size"),
        (["--method", "replay", "--setting", "ood-wrong"], "replay has its own setting"),
        (["--optimizer", "adam", "--beta2", "1.0"], "beta2"),
        (["--method", "lora", "--lora-dropout", "2"], "lora_dropout"),
        (["--momentum", "-0.1"], "momentum"),
        (["--eps", "0"], "eps"),
    ],
)
def test_error_bad_options(tmp_path, sets, capsys, no_model_load, flags, text):
    out = tmp_path / "out"
    err = cli_error(capsys, base_args(out, *data_flags(sets), *flags))
    assert text in err
    assert not out.exists()


def test_error_out_is_a_file_or_set_file_missing(tmp_path, sets, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = cli_error(capsys, base_args(afile, *data_flags(sets)))
    assert "not a directory" in err
    missing = tmp_path / "nope.jsonl"
    err = cli_error(
        capsys,
        base_args(tmp_path / "out", "--mastered", str(sets["files"]["mastered"]), "--injection", str(missing)),
    )
    assert "not found" in err and "nope.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_error_unknown_key_in_config_yaml(tmp_path, sets, capsys, no_model_load):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.01\nlearning_rate: 0.5\n")
    err = cli_error(capsys, base_args(tmp_path / "out", *data_flags(sets), "--config", str(cfg)))
    assert "learning_rate" in err and "c.yaml" in err
    cfg.write_text("train:\n  lr: 0.01\n  epoch: 2\n")
    assert "'epoch'" in cli_error(capsys, base_args(tmp_path / "out", *data_flags(sets), "--config", str(cfg)))
    cfg.write_text("train: {lr: 0.01}\ntrian: {}\n")
    assert "trian" in cli_error(capsys, base_args(tmp_path / "out", *data_flags(sets), "--config", str(cfg)))


def test_error_output_dir_holds_another_run(tmp_path, sets, capsys, tiny_qwen2_dir, monkeypatch):
    out = tmp_path / "out"
    argv = cli_train_args(tiny_qwen2_dir, sets, out, "--optimizer", "sgd", "--epochs", "1", "--lr", "0.01")
    assert main(argv) == 0
    before = (out / "summary.csv").read_text()
    import cnl.models

    monkeypatch.setattr(cnl.models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    err = cli_error(capsys, [*argv, "--method", "ft"])
    assert "already holds a run" in err and "--resume" in err
    assert (out / "summary.csv").read_text() == before


def test_nan_loss_stops_with_training_error_and_keeps_epoch_one(tmp_path, sets, monkeypatch, capsys):
    orig, calls = T.batch_losses, [0]
    k = 3  # the third sample of epoch 2

    def nan_loss(*args, **kw):
        calls[0] += 1
        loss = orig(*args, **kw)
        return loss * float("nan") if calls[0] == 8 + k else loss

    monkeypatch.setattr(T, "batch_losses", nan_loss)
    out = tmp_path / "nan"
    with pytest.raises(T.TrainingError) as info:
        run_train(out, sets, method="cnl", optimizer="sgd", epochs=3)
    msg = str(info.value)
    assert "epoch 2" in msg and f"sample {k}" in msg and "nan" in msg.lower()
    _, rows = read_csv(out / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert sorted(prediction_files(out)) == ["epoch_001_injection.jsonl", "epoch_001_mastered.jsonl"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "epoch 2" in run["error"] and run["epochs_done"] == 1
    assert "epoch 2" in (out / "train.log").read_text()


def test_nan_loss_via_cli_exits_2(tmp_path, sets, monkeypatch, capsys, tiny_qwen2_dir):
    orig = T.batch_losses
    monkeypatch.setattr(T, "batch_losses", lambda *a, **k: orig(*a, **k) * float("nan"))
    argv = cli_train_args(tiny_qwen2_dir, sets, tmp_path / "o", "--optimizer", "sgd", "--epochs", "2", "--lr", "0.01")
    err = cli_error(capsys, argv)
    assert "epoch 1" in err and "sample 1" in err


# ------------------------------------------------------------------------------------------ save model
def test_save_model_full_weights(tmp_path, sets):
    model, tok = fresh_model()
    out = tmp_path / "run"
    run_train(out, sets, model=model, tokenizer=tok, method="cnl", optimizer="adamw", save_model=True)
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    ours = dict(model.named_parameters())
    theirs = dict(loaded.named_parameters())
    assert set(ours) == set(theirs)
    untrained = dict(fresh_model()[0].named_parameters())
    for n, p in ours.items():
        assert torch.equal(theirs[n], p.detach()), n
    assert any(not torch.equal(untrained[n], p.detach()) for n, p in ours.items())
    assert (out / "model" / "tokenizer_config.json").exists()


def test_save_model_lora_adapter(tmp_path, sets):
    from peft import PeftModel

    model, tok = fresh_model()
    out = tmp_path / "run"
    run_train(out, sets, model=model, tokenizer=tok, method="lora", optimizer="adamw", lr=1e-2, save_model=True)
    assert (out / "model" / "adapter_config.json").exists()
    adapter_cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    assert set(adapter_cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}  # base mutated in place
    assert trained
    loaded = PeftModel.from_pretrained(fresh_model()[0], out / "model")
    got = {n.removeprefix("base_model.model."): p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    assert set(got) == set(trained)
    for n, p in trained.items():
        assert torch.equal(got[n], p), n
    assert any(bool(p.abs().sum() > 0) for n, p in trained.items() if "lora_B" in n)  # B left zero init


# ------------------------------------------------------------------------------------ config layering
def resolve(argv: list[str]):
    return resolve_train_configs(build_parser().parse_args(argv))


def test_config_layering_preset_yaml_cli(tmp_path):
    preset = ["--preset", "Qwen2.5-1.5B-Instruct"]
    c = resolve(["train", "--out", str(tmp_path), *preset])
    assert c.preset == "Qwen2.5-1.5B-Instruct" and (c.train.lr, c.train.epochs) == (1e-7, 25)
    c = resolve(["train", "--out", str(tmp_path), *preset, "--method", "lora"])
    assert (c.train.lr, c.train.epochs) == (1e-5, 25)  # the method's own lr sits above the preset's base lr
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-3\noptimizer: adam\nmethods:\n  lora:\n    lr: 0.5\n")
    c = resolve(["train", "--out", str(tmp_path), *preset, "--config", str(y)])
    assert (c.train.lr, c.train.epochs, c.train.optimizer) == (1e-3, 25, "adam")  # YAML over preset
    c = resolve(["train", "--out", str(tmp_path), *preset, "--config", str(y), "--epochs", "2", "--lr", "5e-4"])
    assert (c.train.lr, c.train.epochs, c.train.optimizer) == (5e-4, 2, "adam")  # CLI over YAML
    c = resolve(["train", "--out", str(tmp_path), *preset, "--config", str(y), "--method", "lora"])
    assert c.train.lr == 0.5  # YAML's per-method value over everything but the flags
    y.write_text("epochs: 4\n")
    c = resolve(["train", "--out", str(tmp_path), *preset, "--config", str(y), "--method", "lora"])
    assert (c.train.lr, c.train.epochs) == (1e-5, 4)


def test_config_layering_preset_methods_table_over_method_defaults(tmp_path, monkeypatch):
    import cnl.presets

    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "Mine.yaml").write_text("lr: 2.0e-6\nmethods:\n  lora:\n    lr: 3.0e-4\n  cnl:\n    epochs: 7\n")
    monkeypatch.setattr(cnl.presets, "_folder", lambda: folder)
    c = resolve(["train", "--out", str(tmp_path), "--preset", "mine", "--method", "lora"])
    assert (c.preset, c.train.lr, c.train.epochs) == ("Mine", 3e-4, 25)
    c = resolve(["train", "--out", str(tmp_path), "--preset", "mine"])
    assert (c.train.method, c.train.lr, c.train.epochs) == ("cnl", 2e-6, 7)


def test_config_file_errors_are_clear(tmp_path, capsys, no_model_load):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"lr: \xff\xfe\n")
    assert "not UTF-8" in cli_error(capsys, ["train", "--out", str(tmp_path / "o"), "--config", str(bad)])
    bad.write_text("train: [1, 2]\n")
    assert "section 'train' must be a mapping" in cli_error(
        capsys, ["train", "--out", str(tmp_path / "o"), "--config", str(bad)]
    )
    assert "not a file" in cli_error(capsys, ["train", "--out", str(tmp_path / "o"), "--config", str(tmp_path)])
    assert not (tmp_path / "o").exists()


def test_resolved_config_yaml_can_be_fed_back(tmp_path, sets, tiny_qwen2_dir):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.02\nepochs: 5\nmethod: cnl\n")
    first = tmp_path / "first"
    argv = [
        "train",
        "--model",
        str(tiny_qwen2_dir),
        "--device",
        "cpu",
        "--out",
        str(first),
        "--config",
        str(y),
        "--epochs",
        "1",
        "--optimizer",
        "momentum",
        *data_flags(sets),
    ]
    assert main(argv) == 0
    resolved = yaml.safe_load((first / "config.yaml").read_text())
    assert resolved["train"]["lr"] == 0.02 and resolved["train"]["epochs"] == 1
    assert resolved["train"]["optimizer"] == "momentum"
    assert resolved["model"]["model"] == str(tiny_qwen2_dir)
    assert resolved["data"]["mastered"] == str(sets["files"]["mastered"])
    second = tmp_path / "second"
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    assert yaml.safe_load((second / "config.yaml").read_text()) == resolved
    assert without_seconds(read_csv(first / "summary.csv")[1]) == without_seconds(read_csv(second / "summary.csv")[1])
    assert prediction_files(first) == prediction_files(second)


# ----------------------------------------------------------------------------------- split dir via CLI
def test_cli_train_on_a_split_directory(tmp_path, tiny_qwen2_dir, tiny_qwen2, capsys):
    model, tok = tiny_qwen2
    split = run_split(
        rows_from_dicts(make_mc_rows(30)),
        model,
        tok,
        dataset_tag="syn",
        model_tag="tiny",
        out_dir=tmp_path / "split",
        progress=False,
    )
    assert split.n_correct >= 2 and split.n_wrong >= 2
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(tiny_qwen2_dir),
        "--device",
        "cpu",
        "--split",
        str(tmp_path / "split"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--setting",
        "ood-correct",
    ]
    assert main(argv) == 0
    assert "summary.csv" in capsys.readouterr().out
    header, rows = read_csv(out / "summary.csv")
    assert header[:4] == SPEC_COLUMNS["ood-correct"]
    info = json.loads((out / "run.json").read_text())
    counts = split.manifest["files"]
    assert info["sets"]["mastered1"]["count"] == counts["correct1"]["count"]
    assert info["sets"]["mastered2"]["count"] == counts["correct2"]["count"]
    assert info["sets"]["injection"]["count"] == counts["wrong"]["count"]
    assert 0 <= int(rows[0]["correct2_to_wrong"]) <= counts["correct2"]["count"]
    # --split and explicit set files together are refused
    err = cli_error(capsys, [*argv[:-6], "--out", str(tmp_path / "x"), "--mastered", "m.jsonl"])
    assert "--split" in err


def test_non_finite_weights_stop_before_the_epoch_is_written(tmp_path, sets, monkeypatch):
    """An update that leaves NaN weights (while the loss was still finite) is caught before that
    epoch's row, predictions or checkpoint are written; epoch 1 and its checkpoint stay good."""
    orig = T.MaskedOptimizer.step_parameter
    steps = [0]
    n_train = len(sets["rows"]["injection"])

    def poisoned(self, param):
        orig(self, param)
        if self.names[param].endswith("norm.weight") and steps[0] == 2 * n_train:  # last step of epoch 2
            with torch.no_grad():
                param.fill_(float("nan"))

    def count(*args, **kw):
        steps[0] += 1
        return orig_losses(*args, **kw)

    orig_losses = T.batch_losses
    monkeypatch.setattr(T.MaskedOptimizer, "step_parameter", poisoned)
    monkeypatch.setattr(T, "batch_losses", count)
    out = tmp_path / "nanw"
    with pytest.raises(T.TrainingError, match="epoch 2: the weights became non-finite"):
        run_train(out, sets, method="ft", epochs=3, keep_checkpoint=True)
    _, rows = read_csv(out / "summary.csv")
    assert [r["epoch"] for r in rows] == ["1"]
    assert not list((out / "predictions").glob("epoch_002_*"))
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["epoch"] == 1
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "non-finite" in info["error"]


def test_any_exception_marks_the_run_failed(tmp_path, sets, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(T, "predict", boom)
    out = tmp_path / "boom"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_train(out, sets, method="ft")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "disk on fire" in info["error"]


# ------------------------------------------------------------------------------------------ permissions
def test_run_outputs_are_readable_by_group_and_others(tmp_path, sets):
    """Under the usual umask 022 every file of a run is 0644 and every folder 0755 (no 0600 temp-file
    modes leaking through), checkpoints and the saved model included."""
    out = tmp_path / "perm"
    with umask(0o022):
        run_train(out, sets, method="cnl", epochs=1, keep_checkpoint=True, save_model=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {
        "run.json",
        "summary.csv",
        "config.yaml",
        "train.log",
        "rank_0.safetensors",
        "meta.json",
        "latest.json",
    } <= {p.name for p in files}
    assert any(p.parent.name == "model" for p in files)
    bad = [f"{p.relative_to(out)} {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o777 != 0o644]
    assert not bad, bad
    dirs = [p for p in [out, *out.rglob("*")] if p.is_dir()]
    assert not [p for p in dirs if p.stat().st_mode & 0o777 != 0o755]


def test_prompt_style_is_part_of_the_runs_identity(tmp_path, sets, tiny_llama_dir, capsys):
    out = tmp_path / "style"
    argv = cli_train_args(tiny_llama_dir, sets, out, "--epochs", "1", "--keep-checkpoint")
    assert main([*argv, "--prompt-style", "reference"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["model"]["prompt_style"] == "reference"
    err = cli_error(capsys, [*argv[:-3], "--epochs", "2", "--keep-checkpoint", "--resume"])
    assert "prompt_style was 'reference', now 'clean'" in err


def test_lora_adamw_decay_defaults_to_torchs_001(tmp_path):
    """The reference's LoRA runs use torch's AdamW default weight decay 0.01, CNL's AdamW 0.1."""
    c = resolve(["train", "--out", str(tmp_path), "--method", "lora", "--optimizer", "adamw"])
    assert c.train.adamw_weight_decay == 0.01 and c.train.lr == 1e-5
    c = resolve(["train", "--out", str(tmp_path), "--method", "cnl", "--optimizer", "adamw"])
    assert c.train.adamw_weight_decay == 0.1
    c = resolve(["train", "--out", str(tmp_path), "--method", "lora", "--adamw-weight-decay", "0.2"])
    assert c.train.adamw_weight_decay == 0.2


# ------------------------------------------------------------------------------------------------ one optimizer
@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_a_runs_checkpoint_and_a_masked_optimizer_load_into_each_other(tmp_path, sets, optimizer):
    """``cnl train`` and :class:`cnl.MaskedOptimizer` share one state layout: the optimizer state of a run's
    checkpoint loads into a MaskedOptimizer a user builds around torch's own optimizer, and a user's
    MaskedOptimizer state loads into a run's optimizer; either way the next masked step is bit-identical."""
    from cnl.distributed import SINGLE
    from cnl.mask import SignReference
    from cnl.methods import get_method
    from cnl.rundir import RunDir, capture_rng

    out = tmp_path / "run"
    model, tok = fresh_model()
    run_train(out, sets, model=model, tokenizer=tok, method="cnl", optimizer=optimizer, keep_checkpoint=True)
    meta, state = RunDir(out).load_checkpoint()
    cfg = TrainConfig(method="cnl", optimizer=optimizer, lr=LR[optimizer])
    get_method("cnl").validate(cfg)

    def user_optimizer(m):
        params = [p for p in m.parameters() if p.requires_grad]
        inner = (
            torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
            if optimizer == "momentum"
            else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.1)
        )
        return MaskedOptimizer(inner)

    def run_optimizer(m):
        return T.build_run_optimizer(cfg, get_method("cnl"), [(n, p) for n, p in m.named_parameters()])

    def one_masked_step(m, opt):
        enc = PromptEncoder(tok)
        q = enc.encode(rows_from_dicts(sets["rows"]["injection"][:1])[0])
        gen = torch.Generator().manual_seed(3)
        opt.reference = SignReference.from_tensors((p, torch.randn(p.shape, generator=gen)) for p in m.parameters())
        opt.zero_grad(set_to_none=True)
        T.batch_losses(m, [q], PromptEncoder(tok).pad_id).sum().backward()
        opt.step()
        return {n: p.detach().clone() for n, p in m.named_parameters()}, opt.last_masked

    # the run's checkpoint -> a user's MaskedOptimizer(torch.optim.X)
    results = []
    for build in (run_optimizer, user_optimizer):
        m, _ = fresh_model()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(state["weights"][n])
        opt = build(m)
        opt.load_state_dict(state["optimizer"])
        assert len(opt.state) == len(list(m.parameters()))
        results.append(one_masked_step(m, opt))
    (wa, frozen_a), (wb, frozen_b) = results
    assert frozen_a == frozen_b > 0
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n

    # a user's MaskedOptimizer -> a run's checkpoint -> the run's optimizer on --resume
    m, _ = fresh_model(seed=1)
    user = user_optimizer(m)
    one_masked_step(m, user)
    one_masked_step(m, user)
    rd = RunDir(tmp_path / "mine")
    weights = {n: p.detach() for n, p in m.named_parameters()}
    rd.save_checkpoint(2, {"weights": weights, "optimizer": user.state_dict(), "rng": capture_rng()}, meta, SINGLE)
    resumed_model, _ = fresh_model(seed=2)
    resumed = run_optimizer(resumed_model)
    T._restore(rd, resumed, SINGLE)
    assert all(torch.equal(p, weights[n]) for n, p in resumed_model.named_parameters())
    assert [sorted(st) for st in resumed.state.values()] == [sorted(st) for st in user.state.values()]
    (wa, frozen_a), (wb, frozen_b) = one_masked_step(resumed_model, resumed), one_masked_step(m, user)
    assert frozen_a == frozen_b > 0
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"method": "ft"}, lambda n, e: 0.0),
        ({"method": "cnl", "sign_storage": "int8"}, lambda n, e: 1.0),  # one sign byte per parameter
        ({"method": "cnl", "sign_storage": "bits"}, lambda n, e: None),  # 2 bits per parameter, in 64-byte blocks
        ({"method": "l2"}, lambda n, e: 4.0),  # a float32 copy of the start weights
        ({"method": "asft"}, lambda n, e: 4.0 + e / n),  # a float32 copy of the whole model (its buffers too)
        ({"method": "lora"}, lambda n, e: "lora"),  # the adapters: r (in + out) float32 numbers per target
    ],
    ids=["ft", "cnl-int8", "cnl-bits", "l2", "asft", "lora"],
)
def test_run_json_records_the_bytes_per_parameter_the_method_holds(
    tmp_path: Path, options: dict[str, object], expected: Callable[[int, int], float | None]
) -> None:
    """``method_bytes_per_param`` counts what the method keeps beside the weights and the optimizer state."""
    import json

    from helpers import train_tiny

    from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl

    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("llama", vocab_size=len(tok), seed=2)
    n = sum(p.numel() for p in model.parameters())
    mc = make_mc_rows(6, seed=5)
    files = {
        "mastered": write_jsonl(tmp_path / "m.jsonl", mc[:3]),
        "injection": write_jsonl(tmp_path / "i.jsonl", mc[3:]),
    }
    out = tmp_path / "run"
    train_tiny(out, files, model=model, tokenizer=tok, epochs=1, optimizer="sgd", lr=1e-3, **options)
    held = json.loads((out / "run.json").read_text())["method_bytes_per_param"]
    want = expected(n, sum(b.numel() * b.element_size() for b in model.buffers()))
    if want is None:  # bits: a 64-byte block per 256 elements of each tensor
        blocks = sum(-(-p.numel() // 256) for p in model.parameters())
        want = round(64 * blocks / n, 4)
    if want == "lora":  # r = 16 on every attention and MLP projection
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        linear = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
        want = sum(16 * (m.in_features + m.out_features) * 4 for m in linear) / n
    assert held == pytest.approx(want, abs=1e-4)
