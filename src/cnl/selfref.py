"""What the reference protects (``--reference``): the mastered set, any set file, or the model's own answers.

CNL (and A-GEM, EWC and replay) protect a *reference set*. SPEC's is the mastered set M, the questions the
model answers correctly. A user fine-tuning a chat model on their domain data has no such set; what they
want kept is what the model does now. ``--reference self:N[:SOURCE]`` builds that set before training: N
prompts (the questions of a named offline set, or a JSONL file of prompts), each paired with the model's
*own* greedy answer, so that the reference protects the model's present behaviour on them:

- a multiple-choice prompt gets the letter the model picks (SPEC's prediction), and the reference's loss
  is SPEC's letter loss on it;
- an open-ended prompt gets the model's greedy continuation up to the end of its turn (at most
  ``max_new_tokens`` tokens), and the loss is the answer loss over its tokens.

The same examples in Hugging Face's form (``input_ids``, ``labels`` with -100 on the prompt) come from
:func:`self_reference`, for :func:`cnl.reference_from` and :func:`cnl.protect`: the sign reference built
from them equals the one ``cnl train`` builds on the same answers.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import DataError, MCRow, OpenRow, json_lines, validate_row
from .errors import ConfigError

__all__ = [
    "ReferenceSpec",
    "parse_reference",
    "read_prompts",
    "self_prompts",
    "answer_self",
    "self_reference",
    "SELF_DEFAULT_SOURCE",
    "SELF_MAX_NEW_TOKENS",
]

#: The prompts ``self:N`` takes when it names no source, by the run's format.
SELF_DEFAULT_SOURCE = {"mcq": "mmlu", "open": "nq-open"}
#: The longest answer the model writes for an open-ended self-reference prompt (tokens).
SELF_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class ReferenceSpec:
    """A parsed ``--reference``.

    Attributes:
        kind: ``mastered`` (SPEC: the setting's own set), ``file`` (a set file in either format) or ``self``
            (the model's own answers to ``n`` prompts of ``source``).
        text: the option as given (recorded in run.json).
        path: the set file (``file``).
        n: how many prompts (``self``).
        source: a named offline set or a JSONL file of prompts (``self``; None: by the run's format,
            :data:`SELF_DEFAULT_SOURCE`).
    """

    kind: str
    text: str = "mastered"
    path: Path | None = None
    n: int = 0
    source: str | None = None

    @property
    def is_default(self) -> bool:
        return self.kind == "mastered"


def parse_reference(spec: str | None) -> ReferenceSpec:
    """Parse ``--reference``: ``mastered``, ``FILE`` or ``self:N[:SOURCE]``; a :class:`ConfigError` naming what is
    wrong (no file is read here beyond checking that it exists)."""
    if spec is None or spec == "mastered":
        return ReferenceSpec("mastered")
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--reference: expected mastered, a set file or self:N[:SOURCE], got {spec!r}")
    if spec == "self" or spec.startswith("self:"):
        _, _, rest = spec.partition(":")
        size, _, source = rest.partition(":")
        if not size.isdigit() or int(size) < 1:
            raise ConfigError(
                f"--reference {spec}: self takes the number of prompts, self:N[:SOURCE] (e.g. self:50:mmlu), "
                f"and N must be at least 1"
            )
        return ReferenceSpec("self", spec, n=int(size), source=source or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"--reference {spec}: no such file (expected mastered, a set file in either format, or "
            "self:N[:SOURCE], e.g. self:50:mmlu)"
        )
    return ReferenceSpec("file", spec, path=path)


def read_prompts(path: str | Path) -> list[MCRow | OpenRow]:
    """The prompts of a JSONL file for ``self:N:FILE``: per line a JSON string (the prompt) or an object with
    ``question`` (or ``prompt``); an object with a ``label`` is a multiple-choice question (its options are
    checked; the label itself is not used). Any ``answer`` is ignored: the model answers. Errors name the line."""
    p = Path(path)
    rows: list[MCRow | OpenRow] = []
    for lineno, obj in json_lines(p):
        if isinstance(obj, str):
            obj = {"question": obj}
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON string or object (a prompt), got {type(obj).__name__}", p, lineno)
        question = obj.get("question", obj.get("prompt"))
        if not isinstance(question, str) or not question.strip():
            raise DataError("a prompt needs a non-empty string 'question' (or 'prompt')", p, lineno)
        if "label" in obj:
            rows.append(validate_row({**obj, "question": question}, path=p, line=lineno))
        else:
            rows.append(OpenRow(question, "", (), raw=obj, line=lineno))
    if not rows:
        raise DataError("no prompts: the file is empty", p)
    return rows


def self_prompts(spec: ReferenceSpec, fmt: str) -> tuple[list[MCRow | OpenRow], str]:
    """The prompts of a ``self`` reference and their source's name: ``spec.n`` of them, sampled with a fixed
    seed (in source order) when the source has more; the source by ``fmt`` (``mcq``/``open``) when none is given."""
    source = spec.source or SELF_DEFAULT_SOURCE[fmt]
    path = Path(source).expanduser()
    if path.is_file() or source.endswith((".jsonl", ".json")) or "/" in source:
        if not path.exists():
            raise ConfigError(f"--reference {spec.text}: the prompts file {source} does not exist")
        rows: list[Any] = read_prompts(path)
    else:
        from .data import resolve_dataset

        try:
            rows, _ = resolve_dataset(source)
        except DataError as e:
            raise ConfigError(f"--reference {spec.text}: {e}") from None
    if spec.n < len(rows):
        keep = sorted(random.Random(0).sample(range(len(rows)), spec.n))
        rows = [rows[i] for i in keep]
    return rows, source


@torch.no_grad()
def answer_self(
    model: torch.nn.Module,
    encoder: Any,
    prompts: Sequence[MCRow | OpenRow],
    *,
    batch_size: int = 8,
    max_new_tokens: int = SELF_MAX_NEW_TOKENS,
    progress: bool | None = False,
) -> tuple[list[MCRow | OpenRow], int]:
    """The prompts with the model's own answers: ``(rows, n_dropped)``. A multiple-choice row gets the letter
    the model picks; an open-ended one its greedy answer (a new :class:`OpenRow` whose ``answer`` it is). A
    prompt answered with nothing (the turn ended at once) has no answer tokens to protect and is dropped."""
    from .answers import encode_open, greedy
    from .scoring import iter_batches, predict

    mcq = [r for r in prompts if isinstance(r, MCRow)]
    picked: dict[int, str] = {}
    if mcq:
        encoded = [encoder.encode(r) for r in mcq]
        preds = predict(model, encoded, batch_size=batch_size, pad_id=encoder.pad_id, progress=progress)
        picked = {id(r): letter for r, letter in zip(mcq, preds.answers, strict=True)}
    open_rows = [r for r in prompts if isinstance(r, OpenRow)]
    texts: dict[int, str] = {}
    if open_rows:
        # a placeholder answer makes the template show where the turn ends (the stop tokens)
        probes = [encode_open(encoder, OpenRow(r.question, "x", (), raw={})) for r in open_rows]
        was_training = model.training
        model.eval()
        try:
            for idx in iter_batches(probes, batch_size):
                outs = greedy(
                    model,
                    [probes[i].input_ids for i in idx],
                    [probes[i].stop_ids for i in idx],
                    max_new_tokens=max_new_tokens,
                    pad_id=encoder.pad_id,
                )
                for i, out in zip(idx, outs, strict=True):
                    tokens = [t for t in out if t not in probes[i].stop_ids]
                    texts[id(open_rows[i])] = encoder.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        finally:
            model.train(was_training)
    rows: list[MCRow | OpenRow] = []
    dropped = 0
    for r in prompts:
        if isinstance(r, MCRow):
            letter = picked[id(r)]
            rows.append(dataclasses.replace(r, label=letter, raw={**r.raw, "label": letter}))
            continue
        text = texts[id(r)]
        if not text:
            dropped += 1
            continue
        raw = {k: v for k, v in r.raw.items() if k not in ("prompt", "aliases")}
        rows.append(OpenRow(r.question, text, (), raw={**raw, "question": r.question, "answer": text}, line=r.line))
    return rows, dropped


def self_reference(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = SELF_MAX_NEW_TOKENS,
    batch_size: int = 8,
    prompt_style: str = "clean",
    answer_loss_end: bool = False,
    return_rows: bool = False,
) -> list[dict[str, list[int]]] | list[MCRow | OpenRow]:
    """The model's own answers to ``prompts``, as examples :func:`cnl.reference_from` and :func:`cnl.protect`
    take: protect what the model does now, without a labelled mastered set.

    Args:
        model: the model before training (answers are greedy, in eval mode; the mode is restored).
        tokenizer: its tokenizer (with a chat template: prompts are user messages).
        prompts: strings (open-ended prompts), dicts (``question``; with ``label`` and options in the question, a
            multiple-choice question), or :class:`cnl.data.MCRow` / :class:`cnl.data.OpenRow` rows.
        max_new_tokens: the longest open-ended answer, in tokens.
        batch_size: prompts per generation batch.
        prompt_style / answer_loss_end: as ``cnl train``'s ``--prompt-style`` and ``--answer-loss-end``.
        return_rows: return the answered rows rather than examples.

    Returns:
        One example per prompt the model answered (``input_ids``, ``attention_mask``, ``labels`` with -100 on the
        prompt): the reference they give is the one ``cnl train --reference self:...`` computes.
    """
    from .scoring import PromptEncoder, hf_examples

    rows: list[MCRow | OpenRow] = []
    for i, p in enumerate(prompts):
        if isinstance(p, MCRow | OpenRow):
            rows.append(p)
        elif isinstance(p, str):
            rows.append(OpenRow(p, "", (), raw={"question": p}, line=i + 1))
        elif isinstance(p, dict) and isinstance(p.get("question", p.get("prompt")), str):
            q = p.get("question", p.get("prompt"))
            if "label" in p:
                rows.append(validate_row({**p, "question": q}, path="prompts", line=i + 1))
            else:
                rows.append(OpenRow(q, "", (), raw=dict(p), line=i + 1))
        else:
            raise ValueError(f"prompt {i + 1}: expected a string, a dict with 'question' or a row, got {p!r:.80}")
    if not rows:
        raise ValueError("no prompts given")
    encoder = PromptEncoder(tokenizer, style=prompt_style, answer_loss_end=answer_loss_end)
    answered, _ = answer_self(model, encoder, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    if return_rows:
        return answered
    return hf_examples(encoder, answered)
