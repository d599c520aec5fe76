"""Prompt, answer tokens, prediction and loss exactly as SPEC §2, batched; and the dispatch to open-ended
questions (:mod:`cnl.answers`: the answer as the assistant's message, its tokens' loss, generated answers).

- Prompt: the tokenizer's chat template on one user message (the question), generation prompt added,
  the template's own default system prompt kept. The rendered text is tokenized *without* special
  tokens, so a template that prints BOS does not get a second one; a BOS is prepended only for a
  tokenizer that normally adds one and whose template did not print it. Templates that print
  today's date (Llama 3.x) get :data:`FIXED_DATE`, so results never depend on the day.
- Answer token of letter X: the last id of ``encode(X, add_special_tokens=False)``.
- Prediction: one forward pass; the candidate letter whose answer token has the highest logit at the
  last prompt position.
- Loss: cross-entropy over the whole vocabulary at the last prompt position, target = the label's
  answer token.

Batches are length-sorted and left-padded with explicit position ids, and only the last position's
logits are computed (``logits_to_keep=1``), so batched scores equal one-at-a-time scores to float
rounding while costing a fraction of the time and memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .answers import OpenEncoded, answer_losses, encode_open, score_open
from .data import DataError, MCRow, OpenRow
from .distributed import SINGLE, Dist
from .errors import CnlError
from .models import pad_token_id

__all__ = [
    "FIXED_DATE",
    "PROMPT_STYLES",
    "Encoded",
    "PromptEncoder",
    "EncodedSets",
    "encode_sets",
    "length_sorted_batches",
    "last_token_logits",
    "batch_losses",
    "spec_loss",
    "mc_batches",
    "predict",
    "Predictions",
    "answer_examples",
    "hf_examples",
]

#: Date given to chat templates that print one (the Llama 3.x templates' own fallback date).
FIXED_DATE = "26 Jul 2024"


@dataclass(frozen=True)
class Encoded:
    """A question turned into model inputs.

    Attributes:
        input_ids: prompt token ids (chat template applied, exactly one BOS where the model uses one).
        target: answer token id of the label (the loss target).
        candidates: answer token ids of the candidate letters, in ``letters`` order.
        letters: the candidate letters.
        label: the correct letter.
    """

    input_ids: tuple[int, ...]
    target: int
    candidates: tuple[int, ...]
    letters: tuple[str, ...]
    label: str


#: How prompts are tokenized (SPEC §2): ``clean`` (default) or ``reference`` (as the published code did).
PROMPT_STYLES = ("clean", "reference")


class PromptEncoder:
    """Turns :class:`~cnl.data.MCRow` questions into :class:`Encoded` inputs for one tokenizer.

    ``style="clean"`` (default): the template's text is tokenized without special tokens (a BOS the
    template printed is not doubled; one is added for a tokenizer that uses one and a template that
    did not print it) and a template that prints today's date gets :data:`FIXED_DATE`.
    ``style="reference"``: as the published implementation does, ``tokenizer(text)`` *with* special
    tokens — two ``<|begin_of_text|>`` for Llama 3.x — and the date as the template renders it (the day
    of the run). The published Llama splits were made that way.
    """

    def __init__(
        self, tokenizer, *, fixed_date: str = FIXED_DATE, style: str = "clean", answer_loss_end: bool = False
    ) -> None:
        if style not in PROMPT_STYLES:
            raise CnlError(f"unknown prompt style {style!r} (choose from {', '.join(PROMPT_STYLES)})")
        self.style = style
        if not getattr(tokenizer, "chat_template", None):
            raise CnlError(
                "the tokenizer has no chat template; cnl scores instruction-tuned (chat) models, "
                "whose template builds the prompt (SPEC §2)"
            )
        self.tokenizer = tokenizer
        self.fixed_date = fixed_date
        #: Whether an open-ended answer's loss counts the end-of-turn token too (``--answer-loss-end``).
        self.answer_loss_end = answer_loss_end
        #: Token id that fills left padding (masked out, so any id works; 0 when the tokenizer has none).
        self.pad_id = pad_token_id(tokenizer)
        self._letter_cache: dict[str, int] = {}
        bos = tokenizer.bos_token_id
        self._prepend_bos: int | None = None
        if bos is not None:
            with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
            if with_special and with_special[0] == bos:
                self._prepend_bos = bos

    def prompt_text(self, question: str) -> str:
        """The chat-template text for one user message, generation prompt added (fixed date when clean)."""
        extra = {"date_string": self.fixed_date} if self.style == "clean" else {}
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True, **extra
        )

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of :meth:`prompt_text`: clean, exactly one BOS for models that use one; reference,
        the tokenizer's own special tokens added on top of the template's."""
        if self.style == "reference":
            return list(self.tokenizer(self.prompt_text(question))["input_ids"])
        ids = list(self.tokenizer(self.prompt_text(question), add_special_tokens=False)["input_ids"])
        if self._prepend_bos is not None and (not ids or ids[0] != self._prepend_bos):
            ids.insert(0, self._prepend_bos)
        return ids

    def letter_token(self, letter: str) -> int:
        """Answer token of ``letter``: the last id of its tokenization without special tokens."""
        if letter not in self._letter_cache:
            ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
            if not ids:
                raise CnlError(f"the tokenizer maps the letter {letter!r} to no token")
            self._letter_cache[letter] = int(ids[-1])
        return self._letter_cache[letter]

    def candidates(self, letters: tuple[str, ...]) -> tuple[int, ...]:
        """Answer tokens of ``letters``; an error when two letters share a token."""
        tokens = tuple(self.letter_token(x) for x in letters)
        if len(set(tokens)) != len(tokens):
            raise CnlError(f"letters {letters} do not map to distinct answer tokens with this tokenizer")
        return tokens

    def encode(self, row: MCRow | OpenRow) -> Encoded | OpenEncoded:
        """Encode one question (an open-ended one as :class:`cnl.answers.OpenEncoded`)."""
        if isinstance(row, OpenRow):
            return encode_open(self, row)
        candidates = self.candidates(row.letters)
        return Encoded(
            input_ids=tuple(self.prompt_ids(row.question)),
            target=self.letter_token(row.label),
            candidates=candidates,
            letters=row.letters,
            label=row.label,
        )

    def check(self, rows: Sequence[MCRow | OpenRow]) -> None:
        """Fail fast on what would stop :meth:`encode_all` (the template, letters without distinct
        answer tokens) without tokenizing every question: one prompt and each distinct letter set."""
        if rows:
            self.encode(rows[0]) if isinstance(rows[0], OpenRow) else self.prompt_ids(rows[0].question)
        for letters in {r.letters for r in rows if isinstance(r, MCRow)}:
            self.candidates(letters)

    def encode_all(self, rows: Sequence[MCRow]) -> list[Encoded]:
        """Encode many questions (tokenization is cheap next to a forward pass)."""
        return [self.encode(r) for r in rows]


@dataclass
class EncodedSets:
    """Question sets encoded for one model, with the questions too long for its context left out.

    Attributes:
        encoded: per set, the encoded questions that fit, in file order.
        rows: per set, the rows that fit (aligned with ``encoded``).
        skipped: per set, the file lines of the questions left out (empty unless skipping was asked for).
    """

    encoded: dict[str, list[Encoded]]
    rows: dict[str, list[MCRow]]
    skipped: dict[str, list[int]]

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())


def encode_sets(
    encoder: PromptEncoder,
    sets: dict[str, Sequence[MCRow]],
    *,
    sources: dict[str, str] | None = None,
    max_length: int | None = None,
    skip_long: bool = False,
    suggest_skip: bool = True,
) -> EncodedSets:
    """Encode every set once; check each prompt against the model's context ``max_length``.

    A prompt longer than the context is an error naming its file (``sources[name]``), line and length,
    unless ``skip_long``, which leaves such questions out and records their lines. Run it before the
    weights load, so a 10k-token question fails in seconds rather than after minutes of work.
    """
    encoded: dict[str, list[Encoded]] = {}
    kept: dict[str, list[MCRow]] = {}
    skipped: dict[str, list[int]] = {}
    for name, rows in sets.items():
        encoded[name], kept[name], skipped[name] = [], [], []
        too_long: list[tuple[MCRow, int]] = []
        for row in rows:
            e = encoder.encode(row)
            n = _length(e)
            if max_length is not None and n > max_length:
                too_long.append((row, n))
                skipped[name].append(row.line)
                continue
            encoded[name].append(e)
            kept[name].append(row)
        if too_long and not skip_long:
            row, n = too_long[0]
            more = f" ({len(too_long) - 1} more question(s) of this file too)" if len(too_long) > 1 else ""
            skip = ", or pass --skip-long-prompts to leave such questions out" if suggest_skip else ""
            how = "; shorten the question" + skip
            raise DataError(
                f"the prompt is {n} tokens, longer than the model's context of {max_length} tokens{more}{how}",
                (sources or {}).get(name, name),
                row.line or None,
            )
    return EncodedSets(encoded, kept, skipped)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so memory peaks show early)."""
    if batch_size < 1:
        raise CnlError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def last_token_logits(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Logits ``[len(seqs), vocab]`` at the last position of each sequence, in one forward pass.

    Sequences are left-padded; position ids count real tokens only, so every row sees exactly the
    positions it would see alone. Gradients flow when grad mode is enabled.
    """
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "use_cache": False,
    }
    if _supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    logits = model(**kwargs).logits
    return logits[:, -1, :]


def batch_losses(model: torch.nn.Module, batch: Sequence[Encoded | OpenEncoded], pad_id: int = 0) -> torch.Tensor:
    """Per-sample losses ``[len(batch)]``: SPEC's full-vocabulary cross-entropy at the last prompt position
    for multiple-choice questions; for open-ended ones the mean cross-entropy over the answer's tokens
    (:func:`cnl.answers.answer_losses`; the end of the turn too when they were encoded with it)."""
    if batch and isinstance(batch[0], OpenEncoded):
        return answer_losses(model, batch, pad_id)
    logits = last_token_logits(model, [e.input_ids for e in batch], pad_id)
    targets = torch.tensor([e.target for e in batch], device=logits.device)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def spec_loss(pad_id: int = 0) -> Callable[[torch.nn.Module, Sequence[Encoded]], torch.Tensor]:
    """SPEC §2's loss as a ``loss_fn(model, batch) -> per-question losses`` for :mod:`cnl.reference`."""

    def loss_fn(model: torch.nn.Module, batch: Sequence[Encoded]) -> torch.Tensor:
        return batch_losses(model, batch, pad_id)

    return loss_fn


def _length(e: Encoded | OpenEncoded) -> int:
    """What a forward pass of the loss covers: the prompt (and an open-ended question's answer)."""
    return len(e.input_ids) + (len(e.loss_ids) if isinstance(e, OpenEncoded) else 0)


def mc_batches(encoded: Sequence[Encoded | OpenEncoded], batch_size: int) -> list[list[Encoded | OpenEncoded]]:
    """Length-sorted batches of questions (the order the reference gradient and scoring use)."""
    return [[encoded[i] for i in idx] for idx in length_sorted_batches([_length(e) for e in encoded], batch_size)]


@dataclass
class Predictions:
    """Model answers for a list of questions, in input order.

    Attributes:
        answers: the predicted letter per question, or an open-ended question's answer (the generated
            text, or the answer the fast path found the model gives exactly).
        correct: whether the prediction is correct (the label's letter; an accepted answer, see
            :mod:`cnl.answers`).
        candidate_logits: logits of the candidate letters' answer tokens (for inspection; empty for
            open-ended questions).
    """

    answers: list[str]
    correct: list[bool]
    candidate_logits: list[list[float]]

    @property
    def letters(self) -> list[str]:
        """The predicted letters (:attr:`answers`, by the name multiple-choice callers use)."""
        return self.answers

    @property
    def n_correct(self) -> int:
        return sum(self.correct)


def iter_batches(encoded: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Length-sorted batches of indices into ``encoded``."""
    yield from length_sorted_batches([len(e.input_ids) for e in encoded], batch_size)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    encoded: Sequence[Encoded | OpenEncoded],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    desc: str | None = "scoring",
    progress: bool | None = None,
    on_batch: Callable[[int], None] | None = None,
    dist: Dist = SINGLE,
    placeholder: Encoded | OpenEncoded | None = None,
    tokenizer: Any = None,
    score: str = "contains",
    max_new_tokens: int | None = None,
    fast: bool = True,
) -> Predictions:
    """SPEC §2 prediction for every question: argmax over candidate answer tokens, batched; for open-ended
    questions the greedy answer judged by ``score`` (:func:`cnl.answers.score_open`, which needs the
    ``tokenizer`` to read generated answers; ``fast``: its fast path first).

    ``progress=None`` shows a bar only on a terminal; ``on_batch`` is told how many questions each
    finished batch held (used by callers with their own progress display). Under torchrun (``dist``)
    each rank scores its own ``encoded`` and joins the other ranks' remaining passes with forward passes
    on ``placeholder`` (a sharded model needs every rank in every pass).
    """
    if (encoded and isinstance(encoded[0], OpenEncoded)) or isinstance(placeholder, OpenEncoded):
        return _predict_open(
            model, encoded, batch_size=batch_size, pad_id=pad_id, desc=desc, progress=progress, on_batch=on_batch,
            dist=dist, placeholder=placeholder, tokenizer=tokenizer, score=score, max_new_tokens=max_new_tokens,
            fast=fast,
        )  # fmt: skip
    was_training = model.training
    model.eval()
    letters: list[str] = [""] * len(encoded)
    cand: list[list[float]] = [[] for _ in encoded]
    bar = tqdm(total=len(encoded), desc=desc, unit="q", disable=(progress is False) or None, leave=False)
    try:
        for _, idx in dist.lockstep(list(iter_batches(encoded, batch_size))):
            if idx is None:
                assert placeholder is not None, "predict under torchrun needs a placeholder question"
                last_token_logits(model, [placeholder.input_ids], pad_id)
                continue
            logits = last_token_logits(model, [encoded[i].input_ids for i in idx], pad_id)
            # one gather and one device-to-host copy per batch (no sync per question on a GPU)
            width = max(len(encoded[i].candidates) for i in idx)
            index = torch.tensor(
                [
                    list(encoded[i].candidates) + [encoded[i].candidates[0]] * (width - len(encoded[i].candidates))
                    for i in idx
                ],
                device=logits.device,
            )
            picked = torch.gather(logits, 1, index).float().cpu()
            for row, i in enumerate(idx):
                e = encoded[i]
                c = picked[row, : len(e.candidates)]
                letters[i] = e.letters[int(torch.argmax(c))]
                cand[i] = c.tolist()
            bar.update(len(idx))
            if on_batch is not None:
                on_batch(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    correct = [letters[i] == e.label for i, e in enumerate(encoded)]
    return Predictions(answers=letters, correct=correct, candidate_logits=cand)


def _predict_open(
    model: torch.nn.Module,
    encoded: Sequence[OpenEncoded],
    *,
    batch_size: int,
    pad_id: int,
    desc: str | None,
    progress: bool | None,
    on_batch: Callable[[int], None] | None,
    dist: Dist,
    placeholder: OpenEncoded | None,
    tokenizer: Any,
    score: str,
    max_new_tokens: int | None,
    fast: bool,
) -> Predictions:
    if tokenizer is None:
        raise ValueError("scoring open-ended questions needs the tokenizer (to read the generated answers)")
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, unit="q", disable=(progress is False) or None, leave=False)

    def done(n: int) -> None:
        bar.update(n)
        if on_batch is not None:
            on_batch(n)

    try:
        texts, correct = score_open(
            model,
            list(encoded),
            list(iter_batches(encoded, batch_size)),
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            score=score,
            max_new_tokens=max_new_tokens,
            pad_id=pad_id,
            fast=fast,
            dist=dist,
            placeholder=placeholder,
            on_batch=done,
        )
    finally:
        bar.close()
        model.train(was_training)
    return Predictions(answers=texts, correct=correct, candidate_logits=[[] for _ in encoded])


def answer_examples(
    tokenizer: Any, rows: Sequence[Any], *, answer_loss_end: bool = False, prompt_style: str = "clean"
) -> list[dict[str, list[int]]]:
    """Open-ended questions (dicts or :class:`~cnl.data.OpenRow`) as Hugging Face causal-LM examples for
    :func:`cnl.reference_from` and :func:`cnl.protect`: ``input_ids`` = the prompt then the answer (and the
    end of the turn with ``answer_loss_end``), ``labels`` = -100 on the prompt, so that their loss is
    cnl's answer loss (the mean cross-entropy over the answer's tokens)."""
    from .data import rows_from_dicts

    encoder = PromptEncoder(tokenizer, style=prompt_style, answer_loss_end=answer_loss_end)
    parsed = [r if isinstance(r, OpenRow) else None for r in rows]
    if any(p is None for p in parsed):
        parsed = rows_from_dicts([dict(r.raw if hasattr(r, "raw") else r) for r in rows], fmt="open")
    return hf_examples(encoder, parsed)


def hf_examples(encoder: Any, rows: Sequence[MCRow | OpenRow]) -> list[dict[str, list[int]]]:
    """Questions with their answers as Hugging Face causal-LM examples whose loss is cnl's: ``input_ids`` = the
    prompt then the answer (a multiple-choice answer's letter token; an open-ended answer's tokens, and the end
    of the turn when the encoder counts it), ``labels`` = -100 on the prompt."""
    out = []
    for row in rows:
        e = encoder.encode(row)
        answer = list(e.loss_ids) if isinstance(row, OpenRow) else [e.target]
        out.append(
            {
                "input_ids": [*e.input_ids, *answer],
                "attention_mask": [1] * (len(e.input_ids) + len(answer)),
                "labels": [-100] * len(e.input_ids) + answer,
            }
        )
    return out
