"""Tests of the offline tiny-model helpers in :mod:`cnl.testing` and of the conftest fixtures."""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

import cnl
from cnl.datasets import format_question
from cnl.testing import (
    ARCHS,
    CHATML_DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPLATE_FOR_ARCH,
    TEMPLATES,
    TINY_MODEL_MAX_LENGTH,
    make_mc_rows,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_model_dir,
    write_jsonl,
)

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Question: What could happen to a car?\nOptions:\nA: rush away\nB: gain speed\n\nPlease reply.",
    "Non-ASCII: café naïve Straße Zürich — “quotes” the patient’s 東京 Москва 🤗 αβγ",
    "digits 0 12 345 6789 2024, tabs\tand\r\nnewlines",
]


def _prompt(tokenizer: PreTrainedTokenizerFast, question: str, **kwargs: object) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False, **kwargs
    )


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokenizer_round_trips_any_text(template: str) -> None:
    tok = make_tiny_tokenizer(template)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 256 < len(tok) <= 1024
    assert tok.model_max_length == TINY_MODEL_MAX_LENGTH
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize("template", TEMPLATES)
def test_capital_letters_are_single_distinct_tokens(template: str) -> None:
    tok = make_tiny_tokenizer(template)
    ids = []
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        encoded = tok.encode(letter, add_special_tokens=False)
        assert len(encoded) == 1, (letter, encoded)
        ids.append(encoded[0])
        assert tok.decode(encoded) == letter
    assert len(set(ids)) == 26


def test_tokenizer_is_deterministic() -> None:
    a, b = make_tiny_tokenizer("chatml"), make_tiny_tokenizer("chatml")
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_chatml_template_inserts_default_system_prompt() -> None:
    tok = make_tiny_tokenizer("chatml")
    assert tok.bos_token is None
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    prompt = _prompt(tok, "Question: Why?")
    assert prompt == (
        f"<|im_start|>system\n{CHATML_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nQuestion: Why?<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert CHATML_DEFAULT_SYSTEM_PROMPT not in custom
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # Special tokens are single ids, and no BOS is ever added.
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.encode(prompt, add_special_tokens=True) == tok.encode(prompt, add_special_tokens=False)


def test_llama3_template_prints_date_and_tokenizer_adds_bos() -> None:
    tok = make_tiny_tokenizer("llama3")
    bos = tok.bos_token_id
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot_id|>"
    assert tok.pad_token is None
    prompt = _prompt(tok, "Question: Why?")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "Cutting Knowledge Date: December 2023\n" in prompt
    # Default date from strftime_now("%d %b %Y"), e.g. "26 Jul 2024".
    assert re.search(r"\nToday Date: \d{2} [A-Z][a-z]{2} \d{4}\n\n<\|eot_id\|>", prompt)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    fixed = _prompt(tok, "Question: Why?", date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024\n" in fixed
    assert fixed == _prompt(tok, "Question: Why?", date_string="26 Jul 2024")
    for special in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1

    # Like real Llama 3, encoding with add_special_tokens=True prepends BOS ...
    assert tok.encode("A", add_special_tokens=True) == [bos, tok.encode("A", add_special_tokens=False)[0]]
    # ... so the templated text (which already starts with BOS) gets a SECOND BOS that way -- the hazard the
    # scoring code must avoid by tokenizing the prompt with add_special_tokens=False.
    doubled = tok(fixed, add_special_tokens=True)["input_ids"]
    single = tok(fixed, add_special_tokens=False)["input_ids"]
    assert doubled[:2] == [bos, bos]
    assert single[0] == bos and single[1] != bos
    assert doubled[1:] == single


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ARCHS)
def test_models_build_with_finite_logits(arch: str) -> None:
    tok = make_tiny_tokenizer(DEFAULT_TEMPLATE_FOR_ARCH[arch])
    rng_state = torch.random.get_rng_state()
    model = make_tiny_model(arch, vocab_size=len(tok), seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "make_tiny_model must not consume global RNG"
    assert not model.training
    assert model.config.model_type == arch
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert sum(p.numel() for p in model.parameters()) < 100_000

    ids = tok(_prompt(tok, make_mc_rows(1)[0]["question"]), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()

    with torch.no_grad():
        again = make_tiny_model(arch, vocab_size=len(tok), seed=0)(**ids).logits
        other = make_tiny_model(arch, vocab_size=len(tok), seed=1)(**ids).logits
    assert torch.equal(logits, again)
    assert not torch.allclose(logits, other)


def test_model_overrides_and_untied() -> None:
    model = make_tiny_model("qwen2", vocab_size=300, tie_word_embeddings=False, num_hidden_layers=1)
    assert model.config.vocab_size == 300 and model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    with pytest.raises(ValueError):
        make_tiny_model("gpt2", vocab_size=300)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_dir_reloads_offline_with_identical_logits(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = save_tiny_model_dir(tmp_path / arch, arch=arch, seed=3)
    assert (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ref_tok = make_tiny_tokenizer(DEFAULT_TEMPLATE_FOR_ARCH[arch])
    assert model.config.model_type == arch
    assert model.config._attn_implementation == "eager"
    assert tok.get_vocab() == ref_tok.get_vocab()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        ref_tok.bos_token,
        ref_tok.eos_token,
        ref_tok.pad_token,
    )
    for text in TEXTS:
        for special in (False, True):
            assert tok.encode(text, add_special_tokens=special) == ref_tok.encode(text, add_special_tokens=special)
    question = make_mc_rows(3)[2]["question"]
    prompt = _prompt(tok, question, date_string="26 Jul 2024")
    assert prompt == _prompt(ref_tok, question, date_string="26 Jul 2024")
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id

    ref = make_tiny_model(
        arch,
        vocab_size=len(tok),
        seed=3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model.eval()(**ids).logits, ref(**ids).logits)


def test_fixtures_load_both_archs(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    tiny_qwen2: tuple[PreTrainedModel, PreTrainedTokenizerBase],
    tiny_llama_dir: Path,
    tiny_qwen2_dir: Path,
) -> None:
    for (model, tok), arch, template in ((tiny_llama, "llama", "llama3"), (tiny_qwen2, "qwen2", "chatml")):
        assert model.config.model_type == arch
        assert not model.training
        assert model.config.vocab_size == len(tok)
        assert tok.chat_template == make_tiny_tokenizer(template).chat_template
    assert tiny_llama_dir != tiny_qwen2_dir


# --------------------------------------------------------------------------------------------------- data

_ROW_RE = re.compile(
    r"Question: (?P<stem>.+)\nOptions:\n(?P<options>(?:[A-Z]: .+\n)+)\n"
    r"Please reply with only (?P<letters>.+)\. Do not provide any explanation\.",
    re.DOTALL,
)


REPLY4 = "Please reply with only A, B, C, or D. Do not provide any explanation."


def test_make_mc_rows_format_and_determinism() -> None:
    rows = make_mc_rows(24, seed=0)
    assert rows == make_mc_rows(24, seed=0)
    assert rows != make_mc_rows(24, seed=1)
    assert make_mc_rows(10, seed=0) == rows[:10]
    assert len({row["question"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"label", "question"}
        match = _ROW_RE.fullmatch(row["question"])
        assert match, row["question"]
        assert match["letters"] == "A, B, C, or D"
        assert [line[0] for line in match["options"].splitlines()] == list("ABCD")
        assert row["label"] in "ABCD"
        # exactly the project's own prompt text for that stem and those options
        options = [line[3:] for line in match["options"].splitlines()]
        assert row["question"] == format_question(match["stem"], options, style="reply")
    assert {row["label"] for row in rows} == set("ABCD")
    assert rows[0]["question"].endswith("\n\n" + REPLY4)


@pytest.mark.parametrize(
    ("n_options", "trailer"),
    [
        (2, "Please reply with only A or B. Do not provide any explanation."),
        (3, "Please reply with only A, B, or C. Do not provide any explanation."),
        (5, "Please reply with only A, B, C, D, or E. Do not provide any explanation."),
    ],
)
def test_make_mc_rows_option_counts(n_options: int, trailer: str) -> None:
    rows = make_mc_rows(6, seed=2, n_options=n_options)
    letters = "ABCDE"[:n_options]
    for row in rows:
        assert row["question"].endswith("\n\n" + trailer)
        assert re.findall(r"^([A-Z]): ", row["question"], re.MULTILINE) == list(letters)
        assert row["label"] in letters


@pytest.mark.parametrize("n_options", [0, 1, 27])
def test_make_mc_rows_rejects_bad_option_counts(n_options: int) -> None:
    with pytest.raises(ValueError, match="n_options"):
        make_mc_rows(0, n_options=n_options)
    with pytest.raises(ValueError, match="n must be"):
        make_mc_rows(-1)


def test_make_mc_rows_have_varied_lengths_within_context() -> None:
    rows = make_mc_rows(24)
    for template in TEMPLATES:
        tok = make_tiny_tokenizer(template)
        lengths = [len(tok(_prompt(tok, r["question"]), add_special_tokens=False)["input_ids"]) for r in rows]
        assert max(lengths) >= 2 * min(lengths)
        assert max(lengths) < TINY_MODEL_MAX_LENGTH


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [*make_mc_rows(3), {"label": "A", "question": "café “x”", "predict_label": "B"}]
    path = write_jsonl(tmp_path / "sub" / "rows.jsonl", rows)
    assert path == tmp_path / "sub" / "rows.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "café “x”" in lines[-1]


def test_write_jsonl_is_atomic(tmp_path: Path) -> None:
    """A row that cannot be written leaves the previous file whole and no temporary file behind."""
    path = write_jsonl(tmp_path / "rows.jsonl", make_mc_rows(2))
    old = path.read_bytes()
    with pytest.raises(TypeError):
        write_jsonl(path, [*make_mc_rows(3), {"label": "A", "question": object()}])
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def _imported_modules(tree: ast.AST, package: list[str]) -> list[tuple[int, list[str]]]:
    """``(line, dotted name as parts)`` of everything ``tree`` imports, relative imports resolved against
    ``package`` (the importing module's package, e.g. ``["cnl", "methods"]``); ``from m import a`` gives
    both ``m`` and ``m.a`` (``a`` may be a submodule)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            found.append((node.lineno, module))
            found += [(node.lineno, [*module, a.name]) for a in node.names]
    return found


def test_imported_modules_resolves_relative_imports() -> None:
    code = "from .testing import x\nfrom .. import testing\nfrom torch.testing import assert_close\nimport cnl.io"
    names = [".".join(n) for _, n in _imported_modules(ast.parse(code), ["cnl", "methods"])]
    assert "cnl.methods.testing" in names and "cnl.testing" in names
    assert "torch.testing" in names and "cnl.io" in names


def test_cnl_modules_never_import_testing() -> None:
    """cnl.testing is test and benchmark support: no other module of the package imports it, even lazily."""
    package = Path(cnl.__file__).resolve().parent
    offenders = []
    for source in sorted(package.rglob("*.py")):
        if source == package / "testing.py":
            continue
        parts = ["cnl", *source.parent.relative_to(package).parts]
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
        for line, name in _imported_modules(tree, parts):
            if name[:2] == ["cnl", "testing"]:
                offenders.append(f"{source.relative_to(package)}:{line}")
    assert not offenders, f"modules importing cnl.testing: {offenders}"


#: The published question sets in ``../shared/data`` and their sizes (SPEC §1).
SHARED_DATASETS = {"csqa": 1096, "arc_c": 1270, "medqa": 1272, "mmlu": 1555}
#: Models with published mastered/injection splits in ``../shared/data/reference-splits`` (SPEC §1).
REFERENCE_MODELS = (
    "Llama-3.2-1B-Instruct",
    "Llama-3.2-3B-Instruct",
    "Qwen2.5-1.5B-Instruct",
    "Qwen2.5-3B-Instruct",
    "Qwen2.5-7B-Instruct",
)


def _jsonl(path: Path) -> list[dict[str, object]]:
    assert path.is_file(), f"{path} missing"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_shared_dir_holds_the_published_data(shared_dir: Path) -> None:
    """What the integration tests and benchmarks rely on in ``../shared``: the four question sets with
    their published sizes, and for every reference model a split of each set into correct + wrong
    that covers exactly that set (with ``predict_label`` consistent with the part)."""
    data = shared_dir / "data"
    ref = data / "reference-splits"
    assert ref.is_dir() and any(ref.glob("*.jsonl"))
    for name, size in SHARED_DATASETS.items():
        rows = _jsonl(data / f"{name}.jsonl")
        assert len(rows) == size, name
        assert all(r["label"] in "ABCDE" and str(r["question"]).startswith("Question: ") for r in rows), name
        questions = Counter((r["question"], r["label"]) for r in rows)
        for model in REFERENCE_MODELS:
            correct = _jsonl(ref / f"{name}_correct_{model}.jsonl")
            wrong = _jsonl(ref / f"{name}_wrong_{model}.jsonl")
            assert Counter((r["question"], r["label"]) for r in correct + wrong) == questions, (name, model)
            assert all(r["predict_label"] == r["label"] for r in correct), (name, model)
            assert all(r["predict_label"] != r["label"] for r in wrong), (name, model)
        for part in ("correct", "wrong"):
            whole = _jsonl(ref / f"{name}_{part}_Qwen2.5-1.5B-Instruct.jsonl")
            halves = [_jsonl(ref / f"{name}_{part}{h}_Qwen2.5-1.5B-Instruct.jsonl") for h in (1, 2)]
            assert sorted(map(json.dumps, halves[0] + halves[1])) == sorted(map(json.dumps, whole)), (name, part)
    # SPEC §1's example: csqa with Qwen2.5-1.5B-Instruct has |M| = 824, |I| = 272.
    assert len(_jsonl(ref / "csqa_correct_Qwen2.5-1.5B-Instruct.jsonl")) == 824
