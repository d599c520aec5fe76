"""Open-ended questions: the question is the user's turn of the chat template, the answer the assistant's.

A row ``{"question": "...", "answer": "...", "aliases": [...]}`` (:class:`cnl.data.OpenRow`) becomes an
:class:`OpenEncoded`: the prompt's tokens (the template with the generation prompt, as for a
multiple-choice question), the answer's tokens as the content of the assistant's message, and the tokens
the template puts after that content (the end of the turn). From it:

- **the loss** (:func:`answer_losses`): the mean cross-entropy over the answer's tokens, the prompt
  masked out (completion only); with ``include_end`` the end-of-turn token counts too. It drives training,
  the reference gradient (CNL's g_M), the analyses and every method, as SPEC's letter loss does for
  multiple-choice questions;
- **the answer the model gives** (:func:`greedy`): batched greedy decoding, left padding, a KV cache,
  stopping at the end of the turn;
- **scoring** (:func:`matches`): ``contains`` (default) — the normalised answer, or an alias, occurs as
  whole words in the normalised output; ``exact`` — the normalised output equals the normalised answer or
  an alias; ``exact-tokens`` — greedy decoding gives exactly the tokens of the answer (or an alias) and
  then ends the turn. Normalising is SQuAD's rule: lower case, no punctuation, no articles (a, an, the),
  whitespace collapsed;
- **the fast path** (:func:`fast_matches`): greedy decoding reproduces an answer's tokens exactly if and
  only if, with that answer fed in, every answer position's argmax is the next answer token and the
  position after the last one predicts the end of the turn. That is one batched pass over the prompts
  and one short pass over the answers that start with the greedy first token (after the cached prompts),
  instead of one pass per generated token. A question it accepts is correct in every mode (the
  output *is* the answer), so :func:`score_open` generates only for the others; in ``exact-tokens`` mode
  it is the whole verdict.

Nothing here knows the command line or the training loop; :mod:`cnl.scoring` dispatches to it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .distributed import SINGLE, Dist
from .errors import CnlError

__all__ = [
    "SCORES",
    "OpenEncoded",
    "encode_open",
    "normalize",
    "matches",
    "answer_logits",
    "answer_losses",
    "greedy",
    "fast_matches",
    "default_max_new_tokens",
    "score_open",
]

#: How a generated answer is judged (``--score``).
SCORES = ("contains", "exact", "exact-tokens")
#: Extra tokens generated beyond the longest answer: a sentence around it (contains), punctuation (exact).
_MARGIN = {"contains": 32, "exact": 4, "exact-tokens": 1}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”")


@dataclass(frozen=True)
class OpenEncoded:
    """An open-ended question turned into model inputs.

    Attributes:
        input_ids: the prompt's token ids (chat template with the generation prompt; one BOS where the
            model uses one), as :class:`cnl.scoring.Encoded`'s: what scoring feeds and batching sorts by.
        answer_ids: the tokens of the answer as the content of the assistant's message.
        end_ids: the tokens the template puts after that content; the first ends the turn.
        variants: the token ids of the answer and of each alias (for the fast path).
        loss_ids: the tokens the loss is over: the answer's, and the end of the turn when asked for.
        answers: the answer and its aliases, as given.
        stop_ids: the token ids that end a generated answer (the end of the turn, the tokenizer's EOS).
    """

    input_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    variants: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]
    stop_ids: tuple[int, ...]
    loss_ids: tuple[int, ...]

    @property
    def label(self) -> str:
        """The answer (what predictions files show as the expected answer)."""
        return self.answers[0]


def _assistant_tail(encoder: Any, question: str, answer: str) -> str:
    """What the chat template writes after the prompt for an assistant message ``answer``."""
    tokenizer = encoder.tokenizer
    extra = {"date_string": encoder.fixed_date} if encoder.style == "clean" else {}
    prompt = encoder.prompt_text(question)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False, **extra
    )
    if not full.startswith(prompt):
        raise CnlError(
            "the chat template writes the prompt differently when an assistant message follows; cnl cannot "
            "place the answer after it (open-ended questions need a template whose prompt is a prefix)"
        )
    return full[len(prompt) :]


def encode_open(encoder: Any, row: Any) -> OpenEncoded:
    """Encode an :class:`cnl.data.OpenRow` with a :class:`cnl.scoring.PromptEncoder` ``encoder``."""
    tokenizer = encoder.tokenizer
    tail = _assistant_tail(encoder, row.question, row.answer)
    if not tail.startswith(row.answer):
        raise CnlError(
            "the chat template changes the answer's text in the assistant's message (it does not start with "
            f"{row.answer!r}); cnl cannot find the answer's tokens"
        )
    end_text = tail[len(row.answer) :]

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    end_ids = ids(end_text)
    if not end_ids:
        raise CnlError("the chat template writes nothing after the assistant's message: no end of turn to stop at")
    stops = {end_ids[0]}
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    answers = (row.answer, *row.aliases)
    answer_ids = ids(row.answer)
    if not answer_ids:
        raise CnlError(f"the answer {row.answer!r} has no tokens")
    return OpenEncoded(
        input_ids=tuple(encoder.prompt_ids(row.question)),
        answer_ids=answer_ids,
        end_ids=end_ids,
        variants=tuple(ids(a) for a in answers),
        answers=answers,
        stop_ids=tuple(sorted(stops)),
        loss_ids=answer_ids + ((end_ids[0],) if getattr(encoder, "answer_loss_end", False) else ()),
    )


# ------------------------------------------------------------------------------------------ scoring text
def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def matches(output: str, answers: Sequence[str], score: str) -> bool:
    """Whether ``output`` answers correctly: ``contains`` (an answer's normalised words occur, whole, in the
    normalised output) or ``exact`` (the normalised output is a normalised answer). An answer that normalises
    to nothing ("The") is compared in lower case, its punctuation and articles kept, with the output alike."""
    for answer in answers:
        want = normalize(answer)
        out = normalize(output)
        if not want:
            want, out = " ".join(answer.lower().split()), " ".join(output.lower().split())
        if not want:
            continue
        if score == "exact" and out == want:
            return True
        if score == "contains" and f" {want} " in f" {out} ":
            return True
    return False


# ------------------------------------------------------------------------------------------ the model
def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded ids, attention mask and position ids counting real tokens only."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def _forward_parameters(model: torch.nn.Module) -> Any:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _tail_logits(model: torch.nn.Module, seqs: Sequence[Sequence[int]], keep: int, pad_id: int) -> torch.Tensor:
    """Logits ``[len(seqs), keep, vocab]`` of each sequence's last ``keep`` positions (left padding)."""
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {**_left_padded(seqs, pad_id, device), "use_cache": False}
    if "logits_to_keep" in _forward_parameters(model):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:, :]


def answer_logits(
    model: torch.nn.Module, batch: Sequence[OpenEncoded], pad_id: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per question, ``(logits [n, vocab] in float32, targets [n])`` at the positions that predict its ``loss_ids``
    (the positions :func:`answer_losses` is over), from one forward pass of the batch. Gradients flow when grad
    mode is on."""
    targets = [list(e.loss_ids) for e in batch]
    seqs = [list(e.input_ids) + t for e, t in zip(batch, targets, strict=True)]
    keep = max(len(t) for t in targets) + 1
    logits = _tail_logits(model, seqs, keep, pad_id).float()
    out = []
    for i, t in enumerate(targets):
        # the last len(t) tokens are the targets; the positions before each predict it
        pred = logits[i, keep - 1 - len(t) : keep - 1]
        out.append((pred, torch.tensor(t, device=pred.device)))
    return out


def answer_losses(model: torch.nn.Module, batch: Sequence[OpenEncoded], pad_id: int = 0) -> torch.Tensor:
    """Per-question losses ``[len(batch)]``: the mean cross-entropy over each question's ``loss_ids`` (the
    answer's tokens, and the end of the turn when encoded with it), the prompt masked out. Gradients flow
    when grad mode is on."""
    losses = [F.cross_entropy(pred, t, reduction="mean") for pred, t in answer_logits(model, batch, pad_id)]
    return torch.stack(losses)


def _cache_name(model: torch.nn.Module) -> str:
    """The forward argument of the KV cache (transformers 5: ``cache``; before: ``past_key_values``)."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _cache_of(out: Any, name: str) -> Any:
    return getattr(out, name, None) if name == "cache" else out.past_key_values


def _shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with (the chat template's system turn and the start of the user's), less one:
    at least one token of each prompt is left to feed after the shared part."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


@torch.no_grad()
def _prefill(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """The prompts' pass: ``(last position's logits, KV cache, attention mask, last position per prompt)``.

    The part every prompt shares (the chat template's system turn, in practice most of a short question's
    prompt) is computed once and its cache repeated for the batch; the rest of each prompt follows it,
    left-padded, so the padding sits between the shared part and the question (masked out) and every
    position counts real tokens only."""
    device = next(model.parameters()).device
    name = _cache_name(model)
    shared = _shared_prefix(prompts)
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in _forward_parameters(model):
        kwargs["logits_to_keep"] = 1
    cache = None
    if shared:
        head = torch.tensor([list(prompts[0][:shared])], device=device)
        cache = _cache_of(model(input_ids=head, use_cache=True), name)
        cache.batch_repeat_interleave(len(prompts))
    rest = _left_padded([p[shared:] for p in prompts], pad_id, device)
    mask = torch.cat([torch.ones((len(prompts), shared), dtype=torch.long, device=device), rest["attention_mask"]], 1)
    positions = rest["position_ids"] + shared
    extra = {name: cache} if cache is not None else {}
    out = model(input_ids=rest["input_ids"], attention_mask=mask, position_ids=positions, **kwargs, **extra)
    return out.logits[:, -1, :], _cache_of(out, name), mask, positions[:, -1:]


@torch.no_grad()
def fast_matches(
    model: torch.nn.Module, batch: Sequence[OpenEncoded], pad_id: int = 0, *, dist: Dist = SINGLE
) -> list[int | None]:
    """Per question, the index of the answer variant (0: the answer, 1...: its aliases) that greedy decoding
    would reproduce exactly, token for token and then the end of the turn; None when none would.

    Two passes, no generation: the prompts (the first token greedy decoding gives, and the KV cache), then,
    for the variants that start with that token only, their tokens fed after the cached prompts: greedy
    decoding reproduces a variant iff every next token is the argmax and the end of the turn follows it."""
    device = next(model.parameters()).device
    name = _cache_name(model)
    logits, cache, prompt_mask, last = _prefill(model, [e.input_ids for e in batch], pad_id)
    first = logits.argmax(-1).tolist()
    pairs = [(q, v) for q, e in enumerate(batch) for v, ids in enumerate(e.variants) if ids and ids[0] == first[q]]
    found: list[int | None] = [None] * len(batch)
    if not dist.any(bool(pairs)):
        return found
    todo = pairs or [(0, 0)]  # a rank with no candidate still joins the pass (sharded models)
    cache.reorder_cache(torch.tensor([q for q, _ in todo], device=device))
    width = max(len(batch[q].variants[v]) for q, v in todo)
    tokens = torch.full((len(todo), width), pad_id, dtype=torch.long)
    tail = torch.zeros((len(todo), width), dtype=torch.long)
    for row, (q, v) in enumerate(todo):
        ids = batch[q].variants[v] or (pad_id,)
        tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        tail[row, : len(ids)] = 1
    rows = torch.tensor([q for q, _ in todo], device=device)
    mask = torch.cat([prompt_mask[rows], tail.to(device)], dim=1)
    positions = last[rows] + 1 + torch.arange(width, device=device)
    pred = (
        model(input_ids=tokens.to(device), attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
        .logits.argmax(-1)
        .cpu()
    )
    for row, (q, v) in enumerate(pairs):
        ids, stops = batch[q].variants[v], batch[q].stop_ids
        after = pred[row, : len(ids)].tolist()  # what follows each of the variant's tokens
        if after[:-1] == list(ids[1:]) and after[-1] in stops and (found[q] is None or v < found[q]):
            found[q] = v
    return found


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    stop_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int = 0,
    dist: Dist = SINGLE,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` in one batch (left padding, a KV cache), each ending at its first
    stop token (kept) or after ``max_new_tokens``. Under torchrun every rank runs the same number of steps."""
    device = next(model.parameters()).device
    name = _cache_name(model)
    logits, past, mask, positions = _prefill(model, prompts, pad_id)
    nxt = logits.argmax(-1)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = [set(s) for s in stop_ids]
    for step in range(max_new_tokens):
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                generated[i].append(token)
                done[i] = token in stops[i]
        if step == max_new_tokens - 1 or not dist.any(not all(done)):
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **{name: past})
        past = _cache_of(out, name)
        nxt = out.logits[:, -1, :].argmax(-1)
    return generated


def default_max_new_tokens(encoded: Sequence[OpenEncoded], score: str) -> int:
    """Tokens to generate when ``--max-new-tokens`` is not given: the longest answer (or alias) and a margin
    (32 for ``contains``, where models answer in sentences; 4 for ``exact``: punctuation)."""
    longest = max((len(v) for e in encoded for v in e.variants), default=1)
    return longest + _MARGIN[score]


def score_open(
    model: torch.nn.Module,
    encoded: Sequence[OpenEncoded],
    batches: Sequence[Sequence[int]],
    decode: Callable[[list[int]], str],
    *,
    score: str = "contains",
    max_new_tokens: int | None = None,
    pad_id: int = 0,
    fast: bool = True,
    dist: Dist = SINGLE,
    placeholder: OpenEncoded | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[str], list[bool]]:
    """``(what each question's answer was, whether it is correct)`` for ``encoded``, batch by batch.

    The fast path decides first (``fast``): a question whose answer (or an alias) greedy decoding would give
    exactly is correct in every mode, its prediction that answer. The others are generated (``exact-tokens``:
    none are, the fast path is the verdict) and judged by ``score``. Under torchrun a rank with fewer batches
    joins the others' passes on ``placeholder``.
    """
    if score not in SCORES:
        raise CnlError(f"unknown score {score!r} (choose from {', '.join(SCORES)})")
    limit = max_new_tokens or default_max_new_tokens(encoded, score)
    texts = [""] * len(encoded)
    correct = [False] * len(encoded)
    for _, idx in dist.lockstep(list(batches)):
        chunk = [encoded[i] for i in idx] if idx is not None else [placeholder]
        use_fast = fast or score == "exact-tokens"
        hits = fast_matches(model, chunk, pad_id, dist=dist) if use_fast else [None] * len(chunk)
        rest = [k for k, h in enumerate(hits) if h is None]
        if score != "exact-tokens" and dist.any(bool(rest)):
            todo = rest or [0]  # a rank with nothing left still joins the generation
            outs = greedy(
                model,
                [chunk[k].input_ids for k in todo],
                [chunk[k].stop_ids for k in todo],
                max_new_tokens=limit,
                pad_id=pad_id,
                dist=dist,
            )
            generated = dict(zip(todo, outs, strict=True)) if rest else {}
        else:
            generated = {}
        if idx is None:
            continue
        for k, i in enumerate(idx):
            e = encoded[i]
            if hits[k] is not None:
                texts[i], correct[i] = e.answers[hits[k]], True
            elif score == "exact-tokens":
                texts[i], correct[i] = "", False
            else:
                tokens = [t for t in generated[k] if t not in e.stop_ids]
                texts[i] = decode(tokens)
                correct[i] = matches(texts[i], e.answers, score)
        if on_batch is not None:
            on_batch(len(idx))
    return texts, correct
