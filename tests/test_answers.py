"""Tests for :mod:`cnl.answers` (open-ended questions) on tiny offline models: the answer's tokens in the
chat template, the completion-only loss against a hand computation, greedy decoding against
``model.generate``, the fast path against real generation (aliases, answers that end mid-word), and the
three scores."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cnl.answers import SCORES, default_max_new_tokens, fast_matches, greedy, matches, normalize, score_open
from cnl.data import rows_from_dicts
from cnl.scoring import PromptEncoder, batch_losses, iter_batches, predict
from cnl.testing import make_open_rows, make_tiny_model, make_tiny_tokenizer, memorize

FACTS = [
    {"question": "Who founded the city of Tarn?", "answer": "Oliver Wendt"},
    {"question": "What is the capital of Ruvia?", "answer": "Paris", "aliases": ["Paris, Ruvia"]},
    {"question": "Which river flows through Osk?", "answer": "the Selke"},
    {"question": "What colour is a ripe lumo?", "answer": "blue"},
]


@pytest.fixture(scope="module")
def taught() -> tuple[Any, Any]:
    """A tiny Qwen2 (chatml) that learned FACTS' answers, each followed by the end of the turn."""
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=0)
    return memorize(model, tok, FACTS), tok


def encode(tok: Any, rows: list[dict[str, Any]], **kw: Any) -> tuple[list[Any], PromptEncoder]:
    enc = PromptEncoder(tok, **kw)
    return [enc.encode(r) for r in rows_from_dicts(rows)], enc


def generate_one(model: Any, e: Any, n: int, pad_id: int) -> list[int]:
    """``model.generate`` on one prompt alone: the baseline every batched path must equal."""
    ids = torch.tensor([e.input_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
        eos_token_id=list(e.stop_ids), pad_token_id=pad_id,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


# ------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Capital is PARIS.", "capital is paris"),
        ("  an   apple, a pear & the fig!  ", "apple pear fig"),
        ("“Theatre” isn't 'the' end", "theatre isnt end"),
        ("", ""),
    ],
)
def test_normalize_is_squads_rule(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_matches_contains_and_exact() -> None:
    assert matches("The capital of Ruvia is Paris.", ["Paris"], "contains")
    assert not matches("The capital of Ruvia is Paris.", ["Paris"], "exact")
    assert matches("Paris.", ["paris"], "exact") and matches("the Paris", ["Paris"], "exact")
    assert not matches("Parisian food", ["Paris"], "contains")  # whole words only
    assert not matches("Pari", ["Paris"], "contains") and not matches("Paris", ["Pari"], "contains")
    assert matches("It is New York City.", ["NYC", "new york city"], "contains")  # an alias
    assert matches("The The", ["The"], "contains")  # an answer that normalises to nothing: lower case
    assert not matches("", ["Paris"], "contains") and not matches("", ["Paris"], "exact")


# ------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_answer_tokens_are_the_assistant_message(template: str) -> None:
    tok = make_tiny_tokenizer(template)
    (e,), enc = encode(tok, [FACTS[1]])
    full = tok.apply_chat_template(
        [{"role": "user", "content": FACTS[1]["question"]}, {"role": "assistant", "content": "Paris"}],
        tokenize=False, date_string=enc.fixed_date,
    )  # fmt: skip
    assert tok.decode(list(e.input_ids) + list(e.answer_ids) + list(e.end_ids)) == full
    assert tok.decode(e.answer_ids) == "Paris" and e.loss_ids == e.answer_ids
    assert e.answers == ("Paris", "Paris, Ruvia") and [tok.decode(v) for v in e.variants] == list(e.answers)
    end_token = tok.convert_ids_to_tokens(e.end_ids[0])
    assert end_token == {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template] and e.end_ids[0] in e.stop_ids
    (with_end,), _ = encode(tok, [FACTS[1]], answer_loss_end=True)
    assert with_end.loss_ids == e.answer_ids + (e.end_ids[0],)


# ------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("with_end", [False, True])
def test_answer_loss_is_the_mean_over_the_answers_tokens_only(with_end: bool) -> None:
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=1)
    encoded, enc = encode(tok, make_open_rows(5, seed=2), answer_loss_end=with_end)
    batched = batch_losses(model, encoded, enc.pad_id)
    for i, e in enumerate(encoded):
        seq = torch.tensor([list(e.input_ids) + list(e.loss_ids)])
        logits = model(seq).logits[0]
        p, t = len(e.input_ids), len(e.loss_ids)
        # position j predicts token j + 1: the prompt's tokens are no target (completion only)
        hand = F.cross_entropy(logits[p - 1 : p + t - 1], torch.tensor(e.loss_ids))
        torch.testing.assert_close(batched[i], hand, rtol=1e-5, atol=1e-6)
    assert len({len(e.loss_ids) for e in encoded}) > 1 and len({len(e.input_ids) for e in encoded}) > 1  # padded
    batched.sum().backward()  # gradients flow
    assert model.get_input_embeddings().weight.grad is not None


def test_answer_loss_masks_the_prompt() -> None:
    """Changing the prompt's own tokens as targets cannot change the loss: only the answer is scored."""
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=1)
    (e,), enc = encode(tok, [FACTS[0]])
    longer = [{**FACTS[0], "answer": "Oliver Wendt Junior"}]
    (f,), _ = encode(tok, longer)
    assert e.input_ids == f.input_ids
    a, b = batch_losses(model, [e], enc.pad_id), batch_losses(model, [f], enc.pad_id)
    assert not torch.allclose(a, b)  # the answer's tokens are what is scored


# ------------------------------------------------------------------------------------------ generation
def test_greedy_equals_generate_one_at_a_time(taught: tuple[Any, Any]) -> None:
    model, tok = taught
    rows = FACTS + make_open_rows(6, seed=3)
    encoded, enc = encode(tok, rows)
    outs = greedy(model, [e.input_ids for e in encoded], [e.stop_ids for e in encoded], max_new_tokens=8,
                  pad_id=enc.pad_id)  # fmt: skip
    assert outs == [generate_one(model, e, 8, enc.pad_id) for e in encoded]
    assert any(o[-1] in e.stop_ids for o, e in zip(outs, encoded, strict=True))  # some ended their turn
    assert any(len(o) == 8 and o[-1] not in e.stop_ids for o, e in zip(outs, encoded, strict=True))  # some did not


def test_fast_path_equals_real_generation(taught: tuple[Any, Any]) -> None:
    """For every question and variant, the fast path accepts exactly when generation gives the variant's tokens
    and then ends the turn: learned answers, aliases that are the learned answer, answers that end mid-word
    (a prefix of the learned one), longer ones, and unknown facts."""
    model, tok = taught
    rows = [
        FACTS[0],  # learned
        {"question": FACTS[1]["question"], "answer": "Pari", "aliases": ["Paris"]},  # mid-word; the alias is right
        {"question": FACTS[2]["question"], "answer": "the Selkes"},  # longer than what the model gives
        {"question": FACTS[3]["question"], "answer": "blu"},  # ends mid-word
        {"question": FACTS[3]["question"], "answer": "blue"},
        *make_open_rows(4, seed=5),  # unknown
    ]
    encoded, enc = encode(tok, rows)
    fast = fast_matches(model, encoded, enc.pad_id)
    for e, found in zip(encoded, fast, strict=True):
        out = generate_one(model, e, max(len(v) for v in e.variants) + 2, enc.pad_id)
        by_generation = next(
            (k for k, v in enumerate(e.variants) if out[: len(v) + 1] == list(v) + out[len(v) : len(v) + 1]
             and len(out) == len(v) + 1 and out[-1] in e.stop_ids),
            None,
        )  # fmt: skip
        assert found == by_generation, (e.answers, tok.decode(out))
    assert fast[:5] == [0, 1, None, None, 0] and set(fast[5:]) == {None}


@pytest.mark.parametrize("score", SCORES)
def test_scores_with_and_without_the_fast_path_agree_with_generation(taught: tuple[Any, Any], score: str) -> None:
    model, tok = taught
    rows = [*FACTS, {"question": FACTS[3]["question"], "answer": "blu"}, *make_open_rows(5, seed=5)]
    encoded, enc = encode(tok, rows)
    limit = default_max_new_tokens(encoded, score)
    batches = list(iter_batches(encoded, 3))

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    fast = score_open(model, encoded, batches, decode, score=score, pad_id=enc.pad_id)
    slow = score_open(model, encoded, batches, decode, score=score, pad_id=enc.pad_id, fast=False)
    by_hand = []
    for e in encoded:
        out = generate_one(model, e, limit, enc.pad_id)
        text = decode([t for t in out if t not in e.stop_ids])
        if score == "exact-tokens":
            ok = any(out == list(v) + [out[-1]] and out[-1] in e.stop_ids for v in e.variants)
        else:
            ok = matches(text, e.answers, score)
        by_hand.append(ok)
    assert fast[1] == by_hand
    if score != "exact-tokens":
        assert slow[1] == by_hand and slow[0] == fast[0]  # the fast path changes no verdict and no answer
    assert by_hand[:4] == [True] * 4 and by_hand[4] is False  # the four facts; "blu" ends mid-word


def test_predict_dispatches_and_needs_the_tokenizer(taught: tuple[Any, Any]) -> None:
    model, tok = taught
    encoded, enc = encode(tok, FACTS)
    p = predict(model, encoded, tokenizer=tok, pad_id=enc.pad_id, progress=False)
    assert p.correct == [True] * 4 and p.answers == [f["answer"] for f in FACTS] and p.n_correct == 4
    with pytest.raises(ValueError, match="needs the tokenizer"):
        predict(model, encoded, pad_id=enc.pad_id, progress=False)


def test_default_max_new_tokens_follows_the_answers() -> None:
    tok = make_tiny_tokenizer("chatml")
    encoded, _ = encode(tok, FACTS)
    longest = max(len(v) for e in encoded for v in e.variants)
    assert default_max_new_tokens(encoded, "contains") == longest + 32
    assert default_max_new_tokens(encoded, "exact") == longest + 4


def test_answer_examples_give_reference_from_cnls_answer_loss() -> None:
    """The Python API on open-ended questions: cnl.answer_examples + cnl.reference_from give the mean gradient
    of cnl's own answer loss (what cnl train's reference uses)."""
    import cnl
    from cnl.reference import accumulate_mean_gradient

    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=3)
    rows = make_open_rows(6, seed=8)
    examples = cnl.answer_examples(tok, rows)
    assert examples[0]["labels"].count(-100) == len(PromptEncoder(tok).prompt_ids(rows[0]["question"]))
    encoded, enc = encode(tok, rows)
    params = list(model.parameters())
    accumulate_mean_gradient(model, [encoded], lambda m, b: batch_losses(m, b, enc.pad_id), n=6, progress=False)
    ours = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    ref = cnl.reference_from(model, examples, batch_size=4)
    for p, g in zip(params, ours, strict=True):
        clear = g.abs() > 1e-6 * float(g.abs().max())
        assert torch.equal(ref.sign(p)[clear].to(g.dtype), torch.sign(g)[clear])
