"""``cnl eval --lm-eval``: lm-evaluation-harness on the in-memory model (:mod:`cnl.lm_eval_adapter`).

No lm-eval dataset and no internet: the tests write their own multiple-choice task (a YAML on a local
JSONL file) and check lm-eval's accuracy against one computed here from the model's log-likelihoods.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli

pytest.importorskip("lm_eval")  # a guard only: scripts/setup.sh installs the lmeval extra

from cnl.config import ModelConfig  # noqa: E402
from cnl.lm_eval_adapter import evaluate_lm_eval, parse_tasks  # noqa: E402
from cnl.loading import load_for_sets  # noqa: E402
from cnl.models import load_from_config  # noqa: E402
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl  # noqa: E402

TASK = "cnl_tiny_mc"

#: Question, choices (of different lengths, so acc and length-normalised acc_norm would differ), gold index.
DOCS = [
    ("What colour is a clear sky at noon?", ["blue", "green grass", "red"], 0),
    ("How many legs has a cat?", ["two", "four", "six hundred"], 1),
    ("Which of these is a fruit?", ["a stone", "apple", "chair legs", "iron"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice"], 2),
    ("Which animal barks?", ["dog", "a fish in the sea", "bird"], 0),
    ("What do bees make?", ["milk", "honey", "paper", "glass"], 1),
    ("Where does the sun rise?", ["in the west", "north", "east"], 2),
    ("What is two plus two?", ["four", "five", "three"], 0),
]


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@pytest.fixture
def task_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the task YAML; its JSONL beside it. Offline, with a private datasets cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    # datasets reads HF_DATASETS_CACHE at import: keep the arrow files of each test's JSONL out of ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"question": q, "choices": c, "label": g} for q, c, g in DOCS])
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"  # listed first: acc must win
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def reference_accuracy(model: Any, tokenizer: Any, n_docs: int) -> tuple[float, float, float]:
    """``(acc, acc_norm, gap)`` on the first ``n_docs``, computed here independently of lm-eval.

    Each choice is scored by the summed log-probabilities of its tokens after the prompt (" " + choice: the
    default target delimiter); acc_norm divides that by the choice's length in characters. ``gap`` is the
    smallest margin between the best and second-best choice under either rule, so that a near tie (where
    batching noise could flip lm-eval's pick) is caught rather than making the test flaky.
    """
    correct, correct_norm, gap = 0, 0, float("inf")
    for question, choices, gold in DOCS[:n_docs]:
        ctx = tokenizer(prompt(question))["input_ids"]
        scores = []
        for choice in choices:
            ids = tokenizer(prompt(question) + " " + choice)["input_ids"]
            assert ids[: len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        norm = [x / len(c) for x, c in zip(scores, choices, strict=True)]
        for rule in (scores, norm):
            ranked = sorted(rule, reverse=True)
            gap = min(gap, ranked[0] - ranked[1])
        correct += int(scores.index(max(scores)) == gold)
        correct_norm += int(norm.index(max(norm)) == gold)
    return correct / n_docs, correct_norm / n_docs, gap


def stderr_of(acc: float, n: int) -> float:
    """lm-eval's stderr of a mean of 0/1 values: sample standard deviation / sqrt(n)."""
    return (acc * (1 - acc) * n / (n - 1)) ** 0.5 / n**0.5


def test_accuracy_matches_the_models_log_likelihoods(task_dir):
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=3, pad_token_id=tok.pad_token_id)
    model.train()
    model.model.layers[0].eval()  # a caller's mixed modes must survive, module by module
    modes = [m.training for m in model.modules()]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    scores = evaluate_lm_eval(model, tok, [TASK], limit=6, batch_size=4, include_path=str(task_dir), device="cpu")
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.rand(3), expected_draw)  # lm-eval's reseeding did not leak into the caller
    model.eval()
    acc, acc_norm, gap = reference_accuracy(model, tok, 6)
    assert gap > 1e-3
    assert 0 < acc < 1  # the tiny model is neither always right nor always wrong here: a real check
    assert acc_norm != acc  # so reporting the wrong one of the two would be seen
    s = scores[TASK]
    assert (s["metric"], s["samples"]) == ("acc", 6)
    assert s["value"] == pytest.approx(acc, abs=1e-9)
    assert s["stderr"] == pytest.approx(stderr_of(acc, 6), rel=1e-6)
    assert s["metrics"]["acc"] == s["value"]
    assert s["metrics"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)


def test_parse_tasks():
    assert parse_tasks(["arc_easy, hellaswag", "mmlu"]) == ["arc_easy", "hellaswag", "mmlu"]
    with pytest.raises(Exception, match="twice"):
        parse_tasks(["arc_easy,arc_easy"])


def test_cli_with_a_model_writes_eval_json(tmp_path, task_dir, tiny_qwen2_dir, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--lm-eval", TASK]
    argv += ["--lm-eval-include", str(task_dir), "--out", str(out)]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert TASK in printed and "acc" in printed
    content = json.loads((out / "eval.json").read_text())
    assert content["sets"] == {}
    lm = content["lm_eval"]
    assert lm["tasks_requested"] == [TASK] and lm["limit"] is None and lm["version"]
    model, tok, _ = load_from_config(ModelConfig(model=str(tiny_qwen2_dir), device="cpu"))
    acc, _, gap = reference_accuracy(model, tok, len(DOCS))
    assert gap > 1e-3
    assert lm["tasks"][TASK]["samples"] == len(DOCS)
    assert lm["tasks"][TASK]["value"] == pytest.approx(acc, abs=1e-9)


def test_cli_with_a_lora_run_and_general(tmp_path, task_dir, tiny_qwen2_dir):
    rows = make_mc_rows(24, seed=11)
    files = {
        k: write_jsonl(tmp_path / f"{k}.jsonl", r) for k, r in (("m", rows[:6]), ("i", rows[6:12]), ("g", rows[12:]))
    }
    run = tmp_path / "lora"
    train = ["train", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--out", str(run), "--method", "lora"]
    train += ["--lr", "0.05", "--epochs", "1", "--mastered", str(files["m"]), "--injection", str(files["i"])]
    assert run_cli([*train, "--save-model"]) == 0
    out = tmp_path / "ev"
    argv = ["eval", "--run", str(run), "--device", "cpu", "--general", str(files["g"]), "--lm-eval", TASK]
    argv += ["--lm-eval-include", str(task_dir), "--lm-eval-limit", "5", "--out", str(out)]
    assert run_cli(argv) == 0
    content = json.loads((out / "eval.json").read_text())
    assert content["sets"][str(files["g"])]["questions"] == 12  # cnl's own check sits beside lm-eval's
    got = content["lm_eval"]["tasks"][TASK]
    loaded = load_for_sets(ModelConfig(device="cpu"), {}, run_dir=run)  # the adapter on its base model
    model, tok = loaded.model, loaded.tokenizer
    assert type(model).__name__.startswith("Peft")
    acc, _, gap = reference_accuracy(model, tok, 5)
    assert gap > 1e-3
    assert (got["samples"], got["value"]) == (5, pytest.approx(acc, abs=1e-9))


def test_bad_inputs_fail_before_the_model_loads(tmp_path, task_dir, monkeypatch, capsys):
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: the errors come first
    base = ["eval", "--model", missing_model, "--device", "cpu"]
    assert run_cli([*base, "--lm-eval", "cnl_tiny_mx", "--lm-eval-include", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'cnl_tiny_mx'" in err and TASK in err  # with a did-you-mean
    assert run_cli([*base, "--lm-eval", TASK, "--lm-eval-include", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert run_cli([*base, "--lm-eval", TASK, "--lm-eval-limit", "0"]) == 2
    assert "--lm-eval-limit must be at least 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the lmeval extra were not installed
    assert run_cli([*base, "--lm-eval", TASK]) == 2
    assert "pip install 'cnl[lmeval]'" in capsys.readouterr().err
