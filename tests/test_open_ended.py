"""Open-ended questions through every verb, on a tiny offline model that learned half of the facts: the data
format (recognised per file, forced, refused when mixed, bad rows named), split, train with every method and
setting, a CNL step that leaves conflicting elements unmoved, cross-prompt evaluation, the analyses, eval,
report and compare."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import cli_error, run_cli

from cnl.data import DataError, MCRow, OpenRow, read_jsonl
from cnl.methods import method_names
from cnl.optimizer import build_optimizer
from cnl.phrasings import Phrasing, load_phrasings, rephrase
from cnl.scoring import PromptEncoder, batch_losses, predict
from cnl.testing import make_mc_rows, make_open_rows, make_tiny_model, make_tiny_tokenizer, memorize, write_jsonl
from cnl.train import sign_reference, train_epoch

#: Phrasings for the cross-prompt tests: a template, and each row's first paraphrase.
PHRASINGS = {"quick": "Quick question: {question}", "reworded": "paraphrase:1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A saved tiny Qwen2 that learned the first 6 of 12 facts, and the 12 facts as JSONL (with paraphrases)."""
    d = tmp_path_factory.mktemp("open")
    rows = make_open_rows(12, seed=7)
    for r in rows:
        r["paraphrases"] = [r["question"].replace("What is the main export of", "Name the chief export of")]
    tok = make_tiny_tokenizer("chatml")
    model = memorize(make_tiny_model("qwen2", vocab_size=len(tok), seed=0), tok, rows[:6], steps=80)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return {"dir": d, "model": d / "model", "rows": rows, "data": write_jsonl(d / "facts.jsonl", rows)}


def model_flags(world: dict[str, Any]) -> list[str]:
    return ["--model", str(world["model"]), "--device", "cpu"]


@pytest.fixture(scope="module")
def split(world: dict[str, Any]) -> Path:
    out = world["dir"] / "split"
    assert run_cli(["split", "--dataset", str(world["data"]), "--out", str(out), *model_flags(world)]) == 0
    return out


# ------------------------------------------------------------------------------------------ the format
def test_format_is_recognised_per_file_and_can_be_forced(tmp_path: Path) -> None:
    open_file = write_jsonl(tmp_path / "open.jsonl", make_open_rows(3))
    mc_file = write_jsonl(tmp_path / "mc.jsonl", make_mc_rows(3))
    assert all(isinstance(r, OpenRow) for r in read_jsonl(open_file))
    assert all(isinstance(r, MCRow) for r in read_jsonl(mc_file))
    named_like = write_jsonl(tmp_path / "both.jsonl", [{**r, "answer": "x"} for r in make_mc_rows(2)])
    assert all(isinstance(r, MCRow) for r in read_jsonl(named_like))  # a label decides
    assert all(isinstance(r, OpenRow) for r in read_jsonl(named_like, fmt="open"))  # forced
    with pytest.raises(DataError, match=r"open.jsonl:1: field 'label' is missing"):
        read_jsonl(open_file, fmt="mcq")
    rows = read_jsonl(open_file)
    assert rows[0].aliases == (rows[0].answer.lower() + " indeed",) and rows[1].aliases == ()
    assert rows[0].raw["question"] == rows[0].question  # every field carried through


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"question": "Q?", "label": "A"}, r"mixed.jsonl:3: this row is multiple-choice \('label'\) but line 1 is "
                                            r"open-ended"),
        ({"question": "Q?"}, r"mixed.jsonl:3: field 'answer' is missing"),
        ({"question": "Q?", "answer": "  "}, r"mixed.jsonl:3: field 'answer' is empty"),
        ({"question": "Q?", "answer": 7}, r"mixed.jsonl:3: field 'answer' must be a string, got int"),
        ({"question": "Q?", "answer": "x", "aliases": "y"}, r"mixed.jsonl:3: field 'aliases' must be a list"),
        ({"question": "Q?", "answer": "x", "aliases": ["y", ""]}, r"mixed.jsonl:3: field 'aliases' must be a list"),
        ({"question": "Q \ud800?", "answer": "x"}, r"mixed.jsonl:3: field 'question' holds a lone surrogate"),
    ],
)  # fmt: skip
def test_bad_open_rows_name_file_and_line(tmp_path: Path, line: dict[str, Any], message: str, capsys) -> None:
    rows = [*make_open_rows(2), line]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl(path)
    err = cli_error(capsys, ["split", "--dataset", str(path), "--out", str(tmp_path / "s"), "--model", "nowhere"])
    assert "mixed.jsonl:3" in err  # before any model is looked for


# ------------------------------------------------------------------------------------------ split and train
def test_split_writes_what_the_model_answers(world: dict[str, Any], split: Path) -> None:
    manifest = json.loads((split / "split.json").read_text())
    assert manifest["format"] == "open" and manifest["score"] == "contains"
    assert (manifest["files"]["correct"]["count"], manifest["files"]["wrong"]["count"]) == (6, 6)
    correct = [json.loads(x) for x in (split / manifest["files"]["correct"]["file"]).read_text().splitlines()]
    assert [r["question"] for r in correct] == [r["question"] for r in world["rows"][:6]]
    assert all(r["prediction"] == r["answer"] for r in correct) and "predict_label" not in correct[0]


@pytest.mark.parametrize(("method", "optimizer"), [(m, "adamw" if m == "mofo" else "sgd") for m in method_names()])
def test_every_method_trains_on_open_ended_sets(world, split, tmp_path, method: str, optimizer: str) -> None:
    out = tmp_path / "run"
    argv = ["train", "--split", str(split), "--out", str(out), "--method", method, "--optimizer", optimizer]
    argv += ["--epochs", "1", "--lr", "1e-3", "--score", "exact", *model_flags(world)]
    assert run_cli(argv) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    learn = info["learn_set"]
    preds = [json.loads(x) for x in (out / "predictions" / f"epoch_001_{learn}.jsonl").read_text().splitlines()]
    assert {"question", "answer", "prediction", "correct"} <= set(preds[0])
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row[info["roles"]["learn_column"]]) == sum(p["correct"] for p in preds)


@pytest.mark.parametrize("setting", ["ood-correct", "ood-wrong"])
def test_settings_on_open_ended_sets(world, split, tmp_path, setting: str) -> None:
    out = tmp_path / "run"
    argv = ["train", "--split", str(split), "--out", str(out), "--setting", setting, "--epochs", "1"]
    assert run_cli([*argv, "--lr", "1e-3", "--answer-loss-end", *model_flags(world)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["train"]["answer_loss_end"] is True


def test_a_cnl_step_on_open_ended_data_leaves_conflicting_elements_unmoved(world: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world["model"])
    tok = AutoTokenizer.from_pretrained(world["model"])
    enc = PromptEncoder(tok)
    from cnl.data import rows_from_dicts

    m = [enc.encode(r) for r in rows_from_dicts(world["rows"][:6])]
    (i,) = [enc.encode(r) for r in rows_from_dicts(world["rows"][6:7])]
    params = list(model.parameters())
    # g_M by hand: the mean of each mastered question's answer-loss gradient
    g_m = [torch.zeros_like(p) for p in params]
    for e in m:
        grads = torch.autograd.grad(batch_losses(model, [e], enc.pad_id)[0], params)
        g_m = [a + b / len(m) for a, b in zip(g_m, grads, strict=True)]
    model.train()  # as the training step computes it
    g = torch.autograd.grad(batch_losses(model, [i], enc.pad_id)[0], params)
    before = [p.detach().clone() for p in params]
    lr = 0.05
    opt = build_optimizer(model.named_parameters(), "sgd", lr)
    opt.reference = sign_reference(model, m, params, pad_id=enc.pad_id, progress=False)
    with opt.in_backward():
        train_epoch(model, [i], opt, pad_id=enc.pad_id, sparse_embedding=False, progress=False)
    frozen = moved = 0
    for p, b, gi, gm in zip(params, before, g, g_m, strict=True):
        ref = opt.reference.sign(p).to(gi.dtype)
        # the stored signs are g_M's (batched: where g_M is not vanishingly small)
        clear = gm.abs() > 1e-6 * float(gm.abs().max())
        assert torch.equal(ref[clear], torch.sign(gm)[clear])
        conflict = ((gi > 0) & (ref < 0)) | ((gi < 0) & (ref > 0))
        assert torch.equal(p.detach()[conflict], b[conflict])
        # the others moved by -lr·g (to float rounding, 2 ulps: the tied embedding's two gradients add in another order)
        torch.testing.assert_close(p.detach()[~conflict], (b - lr * gi)[~conflict], rtol=0, atol=2.5e-7)
        frozen += int(conflict.sum())
        moved += int((~conflict & (gi != 0)).sum())
    assert frozen > 0 and moved > 0


# ------------------------------------------------------------------------------------------ other phrasings
def test_phrasings_file_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(PHRASINGS))
    rows = read_jsonl(write_jsonl(tmp_path / "f.jsonl", [{**make_open_rows(1)[0], "paraphrases": ["Other?"]}]))
    quick, reworded = load_phrasings(str(path))
    assert rephrase(rows, quick)[0].question == "Quick question: " + rows[0].question
    assert rephrase(rows, reworded)[0].question == "Other?" and rephrase(rows, reworded)[0].answer == rows[0].answer
    for bad, message in (
        ({"x": "no placeholder"}, "must hold {question} exactly once"),
        ({"x": "{question} {question}"}, "exactly once"),
        ({"x": "{question} {other}"}, "exactly once"),
        ({"bad name": "{question}"}, "phrasing name"),
        ({"x": "paraphrase:0"}, "numbered from 1"),
    ):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(DataError, match=message):
            load_phrasings(str(path))
    with pytest.raises(DataError, match="paraphrase 2 of every question"):
        rephrase(rows, Phrasing("x", paraphrase=2))
    mc = read_jsonl(write_jsonl(tmp_path / "mc.jsonl", [{**make_mc_rows(1)[0], "paraphrases": ["no options"]}]))
    with pytest.raises(DataError, match="keeps its options"):
        rephrase(mc, load_phrasings("paraphrases", [mc])[0])


def test_cross_prompt_counts_per_phrasing(world, split, tmp_path) -> None:
    templates = tmp_path / "phrasings.yaml"
    templates.write_text(yaml.safe_dump(PHRASINGS))
    out = tmp_path / "run"
    argv = ["train", "--split", str(split), "--out", str(out), "--method", "ft", "--epochs", "1", "--lr", "1e-3"]
    assert run_cli([*argv, "--eval-templates", str(templates), "--save-model", *model_flags(world)]) == 0
    info = json.loads((out / "run.json").read_text())
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert info["sets"]["phrasings"]["names"] == ["quick", "reworded"]
    assert set(info["phrasings_before"]) == {"quick", "reworded"}
    # recount by hand with the saved model, under each phrasing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    enc = PromptEncoder(tok)
    files = json.loads((split / "split.json").read_text())["files"]
    injection = read_jsonl(split / files["wrong"]["file"])
    mastered = read_jsonl(split / files["correct"]["file"])
    for p in load_phrasings(str(templates)):
        learned = predict(model, [enc.encode(r) for r in rephrase(injection, p)], tokenizer=tok, progress=False)
        kept = predict(model, [enc.encode(r) for r in rephrase(mastered, p)], tokenizer=tok, progress=False)
        assert int(row[f"wrong_to_correct@{p.name}"]) == learned.n_correct
        assert int(row[f"correct_to_wrong@{p.name}"]) == len(mastered) - kept.n_correct
        assert (out / "predictions" / f"epoch_001_injection@{p.name}.jsonl").is_file()
    rep = tmp_path / "report"
    assert run_cli(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "## Under other phrasings" in md and "| run | quick |" in md
    assert json.loads((rep / "report.json").read_text())["rows"][0]["phrasings"]["quick"]["learned"] == int(
        row["wrong_to_correct@quick"]
    )


def test_cross_prompt_on_multiple_choice_sets(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    rows = make_mc_rows(8, seed=4)
    files = {
        "mastered": write_jsonl(tmp_path / "m.jsonl", rows[:4]),
        "injection": write_jsonl(tmp_path / "i.jsonl", rows[4:]),
    }
    templates = tmp_path / "t.yaml"
    templates.write_text(yaml.safe_dump(["Think carefully.\n{question}"]))
    out = tmp_path / "run"
    argv = ["train", "--mastered", str(files["mastered"]), "--injection", str(files["injection"]), "--out", str(out)]
    argv += ["--epochs", "1", "--lr", "1e-3", "--model", str(tiny_qwen2_dir), "--device", "cpu"]
    assert run_cli([*argv, "--eval-templates", str(templates)]) == 0
    with open(out / "summary.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:4] == ["epoch", "train_avg_loss", "wrong_to_correct", "correct_to_wrong"]  # SPEC's first
    assert "wrong_to_correct@p1" in header and "correct_to_wrong@p1" in header


# ------------------------------------------------------------------------------------------ the other verbs
def test_analyses_eval_report_and_compare_on_open_ended_sets(world, split, tmp_path) -> None:
    files = json.loads((split / "split.json").read_text())["files"]
    m, i = split / files["correct"]["file"], split / files["wrong"]["file"]
    flags = model_flags(world)
    assert run_cli(["analyze", "neurons", "--mastered", str(m), "--injection", str(i), "--out",
                    str(tmp_path / "neurons"), *flags]) == 0  # fmt: skip
    neurons = json.loads((tmp_path / "neurons" / "neurons.json").read_text())
    assert 0 < neurons["overall"]["conflicting_fraction"] < 1
    ft = tmp_path / "ft"
    assert run_cli(["train", "--split", str(split), "--out", str(ft), "--method", "ft", "--epochs", "1",
                    "--lr", "1e-3", *flags]) == 0  # fmt: skip
    assert run_cli(["analyze", "distance", "--ft-run", str(ft), "--out", str(tmp_path / "dist"), *flags]) == 0
    assert (tmp_path / "dist" / "distance.json").is_file()
    assert run_cli(["eval", "--general", f"{world['data']}:all", "--out", str(tmp_path / "ev"), *flags]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["sets"][f"{world['data']}:all"]["correct"] == 6
    cmp = tmp_path / "cmp"
    assert run_cli(["compare", "--dataset", str(world["data"]), "--out", str(cmp), "--epochs", "1", "--lr", "1e-3",
                    "--score", "exact", *flags]) == 0  # fmt: skip
    report = json.loads((cmp / "report" / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["ft", "cnl"] and report["rows"][0]["learn_total"] == 6
