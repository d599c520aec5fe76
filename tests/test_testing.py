"""Tests of the offline tiny-model helpers in :mod:`cnl.testing` and of the conftest fixtures."""

from __future__ import annotations

import json
import re
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

from cnl.testing import (
    ARCHS,
    CHATML_DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TEMPLATE_FOR_ARCH,
    TEMPLATES,
    TINY_MODEL_MAX_LENGTH,
    answer_trailer,
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
    assert {row["label"] for row in rows} == set("ABCD")
    assert rows[0]["question"].endswith(answer_trailer(4))
    assert answer_trailer(4) == "Please reply with only A, B, C, or D. Do not provide any explanation."

    five = make_mc_rows(6, seed=2, n_options=5)
    assert all("\nE: " in r["question"] and r["question"].endswith(answer_trailer(5)) for r in five)
    assert answer_trailer(5) == "Please reply with only A, B, C, D, or E. Do not provide any explanation."
    assert answer_trailer(2) == "Please reply with only A or B. Do not provide any explanation."


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
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "café “x”" in lines[-1]


def test_shared_dir_fixture(shared_dir: Path) -> None:
    assert shared_dir.name == "shared" and shared_dir.is_dir()
