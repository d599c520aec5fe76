"""``--reference``: a set file or the model's own answers (``self:N[:SOURCE]``) as what cnl, agem, ewc and replay
protect; :func:`cnl.self_reference` for one's own loop; ``cnl.protect(trainer, "self", prompts=...)``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli, train_tiny

import cnl
import cnl.train as T
from cnl.config import DataConfig, ModelConfig
from cnl.data import DataError, MCRow, OpenRow, read_jsonl, rows_from_dicts
from cnl.errors import ConfigError
from cnl.resolve import train_config
from cnl.scoring import PromptEncoder, predict
from cnl.selfref import answer_self, parse_reference, read_prompts, self_prompts
from cnl.testing import make_mc_rows, make_open_rows, make_tiny_model, make_tiny_tokenizer, memorize, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("selfref")
    mc = make_mc_rows(20, seed=3)
    opens = make_open_rows(8, seed=4)
    return {
        "dir": d,
        "mastered": write_jsonl(d / "m.jsonl", mc[:6]),
        "injection": write_jsonl(d / "i.jsonl", mc[6:12]),
        "mc_prompts": write_jsonl(d / "mc_prompts.jsonl", [{"question": r["question"], "label": "A"} for r in mc[12:]]),
        "open_prompts": write_jsonl(d / "open_prompts.jsonl", [{"prompt": r["question"]} for r in opens]),
        "ref_file": write_jsonl(d / "ref.jsonl", mc[12:16]),
    }


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    tok = make_tiny_tokenizer("chatml")
    return make_tiny_model("llama", vocab_size=len(tok), seed=1), tok


# ------------------------------------------------------------------------------------------ parsing
def test_parse_reference_forms(files: dict[str, Path]) -> None:
    assert parse_reference(None).kind == parse_reference("mastered").kind == "mastered"
    spec = parse_reference("self:50:mmlu")
    assert (spec.kind, spec.n, spec.source) == ("self", 50, "mmlu")
    assert parse_reference("self:7").source is None
    f = parse_reference(str(files["ref_file"]))
    assert f.kind == "file" and f.path == files["ref_file"]
    for bad in ("self", "self:0", "self:x:mmlu", "no/such/file.jsonl", ""):
        with pytest.raises(ConfigError, match="--reference"):
            parse_reference(bad)


def test_read_prompts_takes_strings_objects_and_questions_and_names_bad_lines(tmp_path: Path) -> None:
    mc = make_mc_rows(1, seed=0)[0]
    p = tmp_path / "p.jsonl"
    p.write_text('"plain prompt"\n{"prompt": "another"}\n\n' + json.dumps({"question": mc["question"], "label": "B"}))
    rows = read_prompts(p)
    assert [type(r) for r in rows] == [OpenRow, OpenRow, MCRow]
    assert rows[0].question == "plain prompt" and rows[1].question == "another" and rows[2].letters
    for text, where in (('"a"\n{"x": 1}\n', ":2:"), ("[1]\n", ":1:"), ('"a"\nnot json\n', ":2:")):
        p.write_text(text)
        with pytest.raises(Exception, match=where):
            read_prompts(p)
    p.write_bytes(b'"a"\n"\xff"\n')  # the line reader read_jsonl uses: bad UTF-8 names its line too
    with pytest.raises(DataError, match=r":2:.*not valid UTF-8"):
        read_prompts(p)
    p.write_text("\n")
    with pytest.raises(Exception, match="no prompts"):
        read_prompts(p)


def test_self_prompts_sample_with_a_fixed_seed(files: dict[str, Path]) -> None:
    a, source = self_prompts(parse_reference(f"self:3:{files['open_prompts']}"), "mcq")
    b, _ = self_prompts(parse_reference(f"self:3:{files['open_prompts']}"), "open")
    assert source == str(files["open_prompts"]) and len(a) == 3
    assert [r.question for r in a] == [r.question for r in b]
    every = read_prompts(files["open_prompts"])
    assert [r.line for r in a] == sorted(r.line for r in a) and {r.question for r in a} <= {r.question for r in every}


# ------------------------------------------------------------------------------------------ the model's answers
def test_multiple_choice_prompts_get_the_letter_the_model_picks(tiny: tuple[Any, Any], files: dict[str, Path]) -> None:
    model, tok = tiny
    enc = PromptEncoder(tok)
    prompts = read_prompts(files["mc_prompts"])
    rows, dropped = answer_self(model, enc, prompts)
    picked = predict(model, enc.encode_all(prompts), pad_id=enc.pad_id, progress=False).answers
    assert dropped == 0 and [r.label for r in rows] == picked
    assert [r.raw["label"] for r in rows] == picked and [r.question for r in rows] == [r.question for r in prompts]


def _greedy_by_hand(model: Any, ids: list[int], stops: set[int], limit: int) -> list[int]:
    """Greedy decoding without a cache: one full forward pass per token."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
    return out


def test_open_prompts_get_the_models_greedy_answer(files: dict[str, Path]) -> None:
    tok = make_tiny_tokenizer("chatml")
    rows = make_open_rows(4, seed=4)
    model = memorize(make_tiny_model("qwen2", vocab_size=len(tok), seed=0), tok, rows, steps=60)
    enc = PromptEncoder(tok)
    prompts = [OpenRow(r["question"], "", (), raw={"question": r["question"]}) for r in rows]
    answered, dropped = answer_self(model.eval(), enc, prompts, max_new_tokens=12)
    assert dropped == 0
    from cnl.answers import encode_open

    for row, got in zip(prompts, answered, strict=True):
        e = encode_open(enc, OpenRow(row.question, "x", (), raw={}))
        tokens = [t for t in _greedy_by_hand(model, list(e.input_ids), set(e.stop_ids), 12) if t not in e.stop_ids]
        assert got.answer == tok.decode(tokens, skip_special_tokens=True).strip()
    # it memorised them: its own answers are the facts
    assert sum(got.answer == r["answer"] for got, r in zip(answered, rows, strict=True)) >= 3


def test_the_runs_reference_equals_reference_from_on_self_reference_examples(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path
) -> None:
    model, tok = tiny
    start = copy.deepcopy(model)
    cfg = train_config(method="cnl", optimizer="sgd", lr=1e-2, epochs=1, reference=f"self:5:{files['mc_prompts']}")
    data = DataConfig(mastered=str(files["mastered"]), injection=str(files["injection"]))
    plan = T.plan_run(cfg, data, ModelConfig(device="cpu"), tmp_path / "run")
    run = T.load(plan, ModelConfig(device="cpu"), model=model, tokenizer=tok, model_tag="tiny", say=lambda m: None)
    T.reference(run, 1, progress=False)
    theirs = cnl.reference_from(
        start, cnl.self_reference(start, tok, self_prompts(parse_reference(cfg.reference), "mcq")[0]), batch_size=1
    )
    ours = run.optimizer.reference
    assert run.roles.reference == "reference" and len(run.encoded["reference"]) == 5
    for p_ours, p_theirs in zip(run.model.parameters(), start.parameters(), strict=True):
        assert torch.equal(ours.sign(p_ours), theirs.sign(p_theirs))


# ------------------------------------------------------------------------------------------ cnl train
def test_train_with_a_self_reference_writes_and_resumes_from_the_answers(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path
) -> None:
    model, tok = tiny
    out = tmp_path / "run"
    common = {"method": "cnl", "optimizer": "sgd", "lr": 1e-2, "reference": f"self:4:{files['open_prompts']}"}
    sets = {"mastered": files["mastered"], "injection": files["injection"]}
    train_tiny(out, sets, model=copy.deepcopy(model), tokenizer=tok, epochs=1, keep_checkpoint=True, **common)
    info = json.loads((out / "run.json").read_text())
    ref = info["sets"]["reference"]
    assert (
        ref["spec"] == common["reference"]
        and ref["prompts"] == 4
        and ref["count"] == len(read_jsonl(out / "reference.jsonl"))
    )
    answers = (out / "reference.jsonl").read_text()
    # resuming reads the answers back (the start weights are gone by then); a changed file is refused
    rows = train_tiny(
        out, sets, model=copy.deepcopy(model), tokenizer=tok, epochs=2, resume=True, keep_checkpoint=True, **common
    )
    assert len(rows) == 2 and (out / "reference.jsonl").read_text() == answers
    line = json.loads(answers.splitlines()[0])
    (out / "reference.jsonl").write_text(json.dumps({**line, "answer": line["answer"] + " changed"}) + "\n")
    with pytest.raises(Exception, match="not the answers this run recorded"):
        train_tiny(out, sets, model=copy.deepcopy(model), tokenizer=tok, epochs=3, resume=True, **common)


def test_no_mastered_set_is_needed_when_the_reference_is_not_m(
    tiny: tuple[Any, Any], files: dict[str, Path], tmp_path: Path
) -> None:
    model, tok = tiny
    rows = train_tiny(
        tmp_path / "run", {"injection": files["injection"]}, model=model, tokenizer=tok, method="cnl",
        optimizer="sgd", lr=1e-2, epochs=1, reference=f"self:3:{files['mc_prompts']}",
    )  # fmt: skip
    assert rows[0]["correct_to_wrong"] == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["sets"]["mastered"]["file"] is None and info["roles"]["reference"] == "reference"


@pytest.mark.parametrize("method", ["agem", "ewc", "replay"])
def test_a_reference_file_is_what_agem_ewc_and_replay_protect(
    method: str, files: dict[str, Path], tmp_path: Path
) -> None:
    cfg = train_config(method=method, optimizer="sgd", lr=1e-2, epochs=1, reference=str(files["ref_file"]))
    data = DataConfig(mastered=str(files["mastered"]), injection=str(files["injection"]))
    plan = T.plan_run(cfg, data, ModelConfig(device="cpu"), tmp_path / "run")
    ref_rows = [r.raw for r in plan.sets["reference"]]
    assert ref_rows == [r.raw for r in read_jsonl(files["ref_file"])]
    if method == "replay":  # the buffer is the reference; forgetting is counted on the whole of M
        assert plan.roles.train == ("injection", "reference") and plan.roles.forget == "mastered"
    else:
        assert plan.roles.reference == "reference" and plan.roles.forget == "mastered"


def test_methods_without_a_reference_refuse_one(files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    cfg = train_config(method="ft", optimizer="sgd", lr=1e-2, epochs=1, reference=str(files["ref_file"]))
    data = DataConfig(mastered=str(files["mastered"]), injection=str(files["injection"]))
    with pytest.raises(ConfigError, match="ft protects no reference set"):
        T.plan_run(cfg, data, ModelConfig(device="cpu"), tmp_path / "run")


def test_compare_and_continual_take_the_option(files: dict[str, Path]) -> None:
    from cnl.cli import build_parser

    parser = build_parser()
    for verb in (["compare", "--out", "x"], ["continual", "--out", "x"], ["train", "--out", "x"]):
        args = parser.parse_args([*verb, "--reference", "self:5:mmlu", "--probe", "mastered:4", "--report-to", "none"])
        assert args.reference == "self:5:mmlu" and args.probe == "mastered:4"


def test_continual_regenerates_the_self_reference_each_round(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer("chatml")
    rows = make_open_rows(12, seed=21)
    model = memorize(make_tiny_model("qwen2", vocab_size=len(tok), seed=0), tok, rows[:4], steps=60)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    m, a, b = (write_jsonl(tmp_path / f"{k}.jsonl", rows[s : s + 4]) for k, s in (("m", 0), ("a", 4), ("b", 8)))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": r["question"]} for r in make_open_rows(5, seed=2)])
    out = tmp_path / "cl"
    argv = ["continual", "--out", str(out), "--model", str(tmp_path / "model"), "--device", "cpu", "--mastered", str(m)]
    argv += ["--rounds", f"{a},{b}", "--method", "cnl", "--optimizer", "adamw", "--lr", "3e-3", "--epochs", "1"]
    assert run_cli([*argv, "--reference", f"self:5:{prompts}"]) == 0
    from cnl.models import load_model_and_tokenizer

    for k in (1, 2):
        start = tmp_path / "model" if k == 1 else out / "rounds" / "01" / "model"
        before, tk, _ = load_model_and_tokenizer(str(start), device="cpu")
        expected, _ = answer_self(before, PromptEncoder(tk), read_prompts(prompts))
        got = read_jsonl(out / "rounds" / f"{k:02d}" / "reference.jsonl")
        assert [r.answer for r in got] == [r.answer for r in expected]


# ------------------------------------------------------------------------------------------ Trainer
def test_protect_self_uses_the_models_own_answers_with_answer_only_labels(tiny: tuple[Any, Any]) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from cnl.reference import _pad_collate

    model, tok = tiny
    prompts = ["What is the capital of Ruvia?", "Name a colour."]
    args = TrainingArguments(output_dir="/tmp/cnl-selfref-trainer", report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": [1, 2, 3]}], processing_class=tok)
    cb = cnl.protect(trainer, "self", prompts=prompts, max_new_tokens=6)
    assert cb.reference_data == cnl.self_reference(model, tok, prompts, max_new_tokens=6)
    assert cb.collate_fn is _pad_collate
    for e in cb.reference_data:
        n_prompt = sum(1 for x in e["labels"] if x == -100)
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:] and n_prompt < len(e["input_ids"])
    with pytest.raises(ValueError, match="prompts"):
        cnl.protect(Trainer(model=model, args=args, train_dataset=[{"input_ids": [1]}]), "self")
    bare = Trainer(model=model, args=args, train_dataset=[{"input_ids": [1]}])  # no processing_class
    with pytest.raises(ValueError, match="tokenizer"):
        cnl.protect(bare, "self", prompts=prompts)
    assert (
        cnl.protect(bare, "self", prompts=prompts, tokenizer=tok, max_new_tokens=6).reference_data == cb.reference_data
    )


def test_rows_from_dicts_answers_roundtrip(tiny: tuple[Any, Any], files: dict[str, Path]) -> None:
    """The answered rows are valid rows of their format (what reference.jsonl holds is readable as a set)."""
    model, tok = tiny
    rows = cnl.self_reference(model, tok, read_prompts(files["mc_prompts"]), return_rows=True)
    again = rows_from_dicts([r.raw for r in rows])
    assert [r.label for r in again] == [r.label for r in rows]


def test_one_reference_for_several_methods_goes_to_those_that_protect_a_set(files: dict[str, Path]) -> None:
    from cnl.resolve import resolve_configs

    for method, kept in (
        ("cnl", True),
        ("agem", True),
        ("ewc", True),
        ("replay", True),
        ("ft", False),
        ("lora", False),
    ):
        cfg = resolve_configs(train={"method": method, "reference": str(files["ref_file"])}, strict_flags=False).train
        assert cfg.reference == (str(files["ref_file"]) if kept else "mastered"), method
