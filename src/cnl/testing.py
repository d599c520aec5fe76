"""Test and benchmark support; the CLI never imports it.

Tiny, fully offline stand-ins for real chat models, and synthetic multiple-choice data, used by ``tests/``
and ``bench/`` only: no command of :mod:`cnl.cli`, and no module it loads, imports :mod:`cnl.testing`.

Nothing here touches the network or the Hugging Face hub: the tokenizer is a byte-level BPE trained
in-process on a small built-in corpus, and the models are randomly initialised from a fixed seed.

* :func:`make_tiny_tokenizer` -- a few-hundred-token byte-level BPE tokenizer with a Qwen2-style
  ("chatml") or Llama-3-style ("llama3") chat template and special tokens.
* :func:`make_tiny_model` -- a 2-layer, hidden-32 ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` in FP32.
* :func:`save_tiny_model_dir` -- model (safetensors) + tokenizer in a directory that
  ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.
* :func:`make_mc_rows` / :func:`write_jsonl` -- synthetic multiple-choice rows in the project's data format
  (question text from :func:`cnl.datasets.format_question`, written with :func:`cnl.io.atomic_write_jsonl`).

Byte-level BPE means every string (any Unicode) encodes without unknown tokens and decodes back exactly;
every single character of printable ASCII -- in particular each capital letter ``A``-``Z`` -- is one token.

Attention implementation: the models use ``attn_implementation="eager"``. On CPU both eager and SDPA are
deterministic run to run, but eager is the more reproducible across batch shapes: measured on these models,
a right-padded batch gives bit-identical last-token logits to one-at-a-time scoring with eager (SDPA: ~1e-7
off), and a left-padded batch is within ~1e-6 with either. :func:`save_tiny_model_dir` also writes
``"attn_implementation": "eager"`` into ``config.json`` (transformers does not serialise it and would
otherwise reload with SDPA), so a reloaded model gives bit-identical logits to the in-memory one.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from .datasets import format_question
from .io import atomic_write_jsonl, atomic_write_text

__all__ = [
    "ARCHS",
    "CHATML_DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_TEMPLATE_FOR_ARCH",
    "TEMPLATES",
    "TINY_INITIALIZER_RANGE",
    "TINY_MODEL_MAX_LENGTH",
    "make_mc_rows",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "save_tiny_model_dir",
    "write_jsonl",
]

#: Context length of the tiny models (``max_position_embeddings``) and tokenizers (``model_max_length``).
TINY_MODEL_MAX_LENGTH = 512

#: Std of the random init. Larger than the usual 0.02 so that attention is not almost uniform: the answer
#: logits then depend on the question, not only on the template's last tokens (with 0.02 a tiny model
#: predicts the same letter for every question). Gaps between the top answer logits stay ~1e-3 or more,
#: far above FP32 batching noise (~1e-6).
TINY_INITIALIZER_RANGE = 0.3

#: Supported chat templates.
TEMPLATES = ("chatml", "llama3")

#: Supported architectures.
ARCHS = ("llama", "qwen2")

#: Template that :func:`save_tiny_model_dir` pairs with each architecture by default.
DEFAULT_TEMPLATE_FOR_ARCH = {"llama": "llama3", "qwen2": "chatml"}

#: System prompt the chatml (Qwen2.5-style) template inserts when the conversation has none.
CHATML_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Target size of the trained BPE (before special tokens). The corpus is small, so training may stop a bit
# short of it; what matters is "a few hundred tokens", which keeps the models tiny.
_BPE_VOCAB_SIZE = 640

# --------------------------------------------------------------------------------------------------------
# Chat templates (Jinja, as stored in ``tokenizer.chat_template``).
# --------------------------------------------------------------------------------------------------------

# Qwen2.5-Instruct's template without the tool-calling branches.
_CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\n" + CHATML_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message['role'] == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama-3.2-Instruct's template without the tool-calling branches: prints the BOS itself and a system
# block with a knowledge cutoff and today's date (``strftime_now``, unless ``date_string`` is passed).
_LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    "    {%- else %}\n"
    '        {%- set date_string = "26 Jul 2024" %}\n'
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

# --------------------------------------------------------------------------------------------------------
# Training corpus for the BPE.
# --------------------------------------------------------------------------------------------------------

_CORPUS: tuple[str, ...] = (
    "Question: What could happen to a car when you press one of its pedals?",
    "Question: Where would you put a book after reading it?",
    "Question: Why would you go to a bathroom after drinking water?",
    "Question: Which of the following is most likely to happen next?",
    "Question: What do people do if they do not like each other?",
    "Question: A 45-year-old man comes to the physician because of a cough.",
    "Options:\nA: rush away\nB: gain speed\nC: go forward\nD: suffer damage\nE: none of the above",
    "Options:\nA: trouble\nB: confusion\nC: being fired\nD: hurt feelings",
    "A: market\nB: vegetables\nC: bookstore\nD: train station\nE: library",
    "Please reply with only A, B, C, or D. Do not provide any explanation.",
    "Please reply with only A, B, C, D, or E. Do not provide any explanation.",
    "Please answer strictly with A, B, C, or D only. No explanation.",
    "The answer is A. The answer is B. The answer is C. The answer is D. The answer is E.",
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "system user assistant",
    "The quick brown fox jumps over the lazy dog.",
    "A tree grows from a small seed into a tall plant with green leaves.",
    "People often read the newspaper in the morning while drinking coffee.",
    "The students went to the school library to study for their final exam.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The heart pumps blood through the body, and the lungs bring in oxygen.",
    "She bought fresh vegetables and fruit at the market on Saturday.",
    "When it rains, the streets become wet and people carry umbrellas.",
    "The doctor examined the patient and wrote a prescription for the infection.",
    "A computer stores information in memory and processes it very quickly.",
    "The train station was crowded with travelers waiting for the next train.",
    "He was lying because he wanted to avoid legal trouble with the police.",
    "Most animals need food, water, and shelter in order to survive.",
    "The moon moves around the earth, and the earth moves around the sun.",
    "Which of the following statements about energy is true?",
    "Scientists measure the temperature of the ocean every year.",
    "If you heat ice, it melts and becomes liquid water.",
    "The children played in the park until the sun went down.",
    "What is the most likely cause of this patient's symptoms?",
    "They decided to go swimming because the weather was hot.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 50 100 2023 2024.",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ | @ # $ % ^ & * + = < > ~ `",
    "Letters: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "letters: a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Non-ASCII text: café, naïve, façade, Straße, São Paulo, Zürich, 東京, Москва, the patient’s “chart”.",
)


# Pre-tokenisation regexes of the real tokenizers (the Llama 3 one groups digits by three, Qwen2's splits
# every digit). transformers 5 rebuilds a ``qwen2`` checkpoint's tokenizer as ``Qwen2Tokenizer`` from
# vocab/merges with exactly this regex and an NFC normaliser, whatever tokenizer.json says, so the chatml
# tokenizer uses the same pieces: the in-memory tokenizer and the reloaded one then behave identically.
_QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Regex split followed by the byte-level mapping, as in the real Qwen2 / Llama 3 tokenizer.json."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    """Train the byte-level BPE once per process and return its serialisation (cheap to rebuild from).

    The trainer is deterministic, so every process gets the same vocabulary and merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(_QWEN2_PRETOKENIZE_REGEX)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    """Build a small byte-level BPE tokenizer with a chat template, entirely offline.

    Args:
        template: ``"chatml"`` (Qwen2.5-style: default system prompt ``"You are a helpful assistant."``
            when none is given; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; eos ``<|im_end|>``,
            pad ``<|endoftext|>``, no BOS) or ``"llama3"`` (Llama-3.2-style: the template prints
            ``<|begin_of_text|>`` itself and a system block with ``Today Date: <date_string>``, where
            ``date_string`` defaults to ``strftime_now("%d %b %Y")``; eos ``<|eot_id|>``, no pad token;
            encoding with ``add_special_tokens=True`` prepends ``<|begin_of_text|>``, like the real one).

    Returns:
        A fresh :class:`~transformers.PreTrainedTokenizerFast` (a new object on every call; the BPE itself
        is trained once per process and is identical across calls and processes).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    backend = Tokenizer.from_str(_trained_bpe_json())
    if template == "chatml":
        specials = _CHATML_SPECIAL_TOKENS
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = _pre_tokenizer(_QWEN2_PRETOKENIZE_REGEX)
        backend.add_special_tokens(list(specials))
        # No post-processor: transformers installs a plain ``$A`` TemplateProcessing (no BOS), which is also
        # what a reloaded Qwen2Tokenizer gets.
        backend.post_processor = None
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            model_max_length=TINY_MODEL_MAX_LENGTH,
            padding_side="right",
            chat_template=_CHATML_TEMPLATE,
            clean_up_tokenization_spaces=False,
        )
    specials = _LLAMA3_SPECIAL_TOKENS
    backend.pre_tokenizer = _pre_tokenizer(_LLAMA3_PRETOKENIZE_REGEX)
    backend.add_special_tokens(list(specials))
    bos = "<|begin_of_text|>"
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token=None,
        unk_token=None,
        model_max_length=TINY_MODEL_MAX_LENGTH,
        chat_template=_LLAMA3_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------------


def _config_class_and_model_class(arch: str) -> tuple[type, type]:
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig, LlamaForCausalLM
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def make_tiny_model(
    arch: str = "llama",
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> PreTrainedModel:
    """Build a tiny randomly initialised causal LM (FP32, eval mode, eager attention).

    The config is hidden 32, intermediate 64, 2 layers, 4 attention heads, 2 key/value heads,
    ``max_position_embeddings`` 512, ``initializer_range`` :data:`TINY_INITIALIZER_RANGE`. The weights
    depend only on ``seed`` and the config (``torch.manual_seed`` before construction; the global RNG state
    is restored afterwards, so calling this does not disturb the caller's random stream). Note that
    ``pad_token_id`` is part of the config: its embedding row is initialised to zero.

    Args:
        arch: ``"llama"`` (``LlamaForCausalLM``) or ``"qwen2"`` (``Qwen2ForCausalLM``).
        vocab_size: size of the embedding / output head; ``None`` means ``len()`` of
            ``make_tiny_tokenizer(DEFAULT_TEMPLATE_FOR_ARCH[arch])``. Pass ``len(tokenizer)`` when pairing the
            model with a specific tokenizer.
        seed: initialisation seed.
        tie_word_embeddings: share the input embedding and output head (as in small Qwen2.5 / Llama 3.2).
        **overrides: any further config attributes (e.g. ``num_hidden_layers=1``, ``bos_token_id=...``,
            ``attn_implementation="sdpa"``).
    """
    config_cls, model_cls = _config_class_and_model_class(arch)
    if vocab_size is None:
        vocab_size = len(make_tiny_tokenizer(DEFAULT_TEMPLATE_FOR_ARCH[arch]))
    attn_implementation = overrides.pop("attn_implementation", "eager")
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": TINY_MODEL_MAX_LENGTH,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": TINY_INITIALIZER_RANGE,
        "use_cache": True,
    }
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config.dtype = torch.float32
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def save_tiny_model_dir(
    path: str | Path,
    arch: str = "llama",
    template: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a tiny model (safetensors) and its tokenizer to ``path`` with ``save_pretrained``.

    The directory loads offline with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)``. The model's vocabulary matches ``len(tokenizer)`` and its
    ``bos/eos/pad_token_id`` (config and generation config) are the tokenizer's.

    Args:
        path: target directory (created if missing).
        arch: ``"llama"`` or ``"qwen2"``.
        template: chat template of the tokenizer; ``None`` means ``"llama3"`` for llama and ``"chatml"`` for
            qwen2.
        seed: initialisation seed of the model.
        **overrides: passed to :func:`make_tiny_model`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(template or DEFAULT_TEMPLATE_FOR_ARCH[arch])
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = make_tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **{**token_ids, **overrides})
    if model.generation_config is not None:
        for key, value in token_ids.items():
            setattr(model.generation_config, key, value)
    model.save_pretrained(path, safe_serialization=True)
    # transformers does not serialise the attention implementation; a config.json key
    # ``attn_implementation`` is read back by ``PreTrainedConfig`` and used by ``from_pretrained`` (an
    # explicit ``from_pretrained(..., attn_implementation=...)`` still wins), so the reloaded model runs the
    # same kernel as the in-memory one instead of defaulting to SDPA.
    config_path = path / "config.json"
    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    config_dict["attn_implementation"] = model.config._attn_implementation
    atomic_write_text(config_path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------------
# Multiple-choice data.
# --------------------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_SUBJECTS = (
    "a car",
    "the teacher",
    "a small child",
    "the old farmer",
    "a hungry cat",
    "the river",
    "a student",
    "the doctor",
    "a patient",
    "the city council",
    "a tall tree",
    "the computer",
    "a musician",
    "the baker",
)
_VERBS = (
    "press one of its pedals",
    "go to the market",
    "read a newspaper",
    "drink too much coffee",
    "wait for a train",
    "lose the keys",
    "plant a seed",
    "finish the exam",
    "hear a loud noise",
    "see the sun go down",
    "forget an umbrella",
    "open the window",
)
_WH = (
    "What could happen to",
    "Where would you find",
    "Why would",
    "What is most likely to happen when",
    "Which of the following describes",
    "How would",
)
_OPTIONS = (
    "rush away",
    "gain speed",
    "go forward",
    "suffer damage",
    "trouble",
    "confusion",
    "being fired",
    "hurt feelings",
    "check makeup",
    "throwing up",
    "market",
    "vegetables",
    "bookstore",
    "train station",
    "commit crimes",
    "sing together",
    "part company",
    "go swimming",
    "have fun",
    "sickness",
    "become drunk",
    "library",
    "the park",
    "a café in Zürich",
    "naïve optimism",
    "nothing at all",
    "the patient’s chart",
    "an increase in temperature",
    "a decrease in pressure",
    "more water",
    "less light",
)
_FILLER = (
    "Consider the situation carefully before choosing.",
    "The weather that day was cold and the streets were wet after the rain.",
    "Several people nearby noticed what happened and talked about it for a long time afterwards.",
    "A 45-year-old man comes to the physician because of a cough that has lasted for three weeks.",
    "He has a history of high blood pressure and takes medication every morning.",
    "Scientists measured the temperature of the water every hour during the experiment.",
    "The children had been playing in the park until the sun went down.",
)


def make_mc_rows(n: int, seed: int = 0, n_options: int = 4) -> list[dict[str, str]]:
    """Synthetic multiple-choice rows ``{"label": "B", "question": "Question: ...\\nOptions:\\nA: ..."}``.

    The question text is :func:`cnl.datasets.format_question` ``(stem, options)`` (style ``"reply"``), i.e. the
    project's dataset format ``Question: <stem>\\nOptions:\\nA: ...\\n...\\n\\nPlease reply with only A, B,
    C, or D. Do not provide any explanation.`` (the letter list follows ``n_options``, 2 to 26).
    Row ``i`` is short, medium or long for ``i % 3 == 0, 1, 2`` (a one-word stem, a sentence, several
    sentences of filler -- well under the tiny models' 512-token context), so batches exercise padding.
    Labels and contents come from ``random.Random(seed)``: the same ``(n, seed, n_options)`` always gives the
    same rows, and a longer list extends a shorter one with the same seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 2 <= n_options <= len(_LETTERS):
        raise ValueError(f"n_options must be in 2..{len(_LETTERS)}, got {n_options}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            stem = rng.choice(("Why?", "Where?", "Which one?", "What now?", "Which is true?"))
        else:
            stem = f"{rng.choice(_WH)} {rng.choice(_SUBJECTS)} when you {rng.choice(_VERBS)}?"
            if kind == 2:
                filler = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(3, 6)))
                stem = f"{filler} {stem}"
        options = rng.sample(_OPTIONS, n_options)
        label = _LETTERS[rng.randrange(n_options)]
        rows.append({"label": label, "question": format_question(stem, options, style="reply")})
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON Lines (UTF-8, non-ASCII kept as is, one object per line); return the path.

    Goes through :func:`cnl.io.atomic_write_jsonl` (parent folders created, file replaced atomically).
    """
    path = Path(path)
    atomic_write_jsonl(path, (dict(row) for row in rows))
    return path


#: Invented facts for open-ended tests: (question template, answers) filled with made-up names.
_PLACES = ("Tarn", "Ruvia", "Osk", "Melp", "Vardo", "Quill", "Brenn", "Zell", "Ormo", "Lisk", "Padda", "Wend")
_ANSWERS = ("Paris", "blue", "seven", "the Selke", "Oliver Wendt", "copper", "north", "Anna Roy", "tea", "granite")


def make_open_rows(n: int, seed: int = 0, aliases: bool = True) -> list[dict[str, Any]]:
    """``n`` open-ended rows about invented places (``question``, ``answer``, some with ``aliases``),
    deterministic for ``seed``; questions are distinct."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        place = f"{_PLACES[i % len(_PLACES)]}{i // len(_PLACES) or ''}"
        answer = rng.choice(_ANSWERS)
        row: dict[str, Any] = {"question": f"What is the main export of {place}?", "answer": answer}
        if aliases and i % 3 == 0:
            row["aliases"] = [answer.lower() + " indeed"]
        rows.append(row)
    return rows


def memorize(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], steps: int = 60, lr: float = 3e-3) -> Any:
    """Teach a (tiny) model ``rows``' open-ended answers, each followed by the end of the turn, with full-batch
    AdamW: a model that answers them exactly, for tests of scoring and generation. Returns the model, in eval
    mode."""
    import torch

    from .answers import answer_losses
    from .data import rows_from_dicts
    from .scoring import PromptEncoder

    encoder = PromptEncoder(tokenizer, answer_loss_end=True)
    encoded = [encoder.encode(r) for r in rows_from_dicts(list(rows))]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = answer_losses(model, encoded, encoder.pad_id).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
