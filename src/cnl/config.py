"""Configuration: dataclasses are the single source of truth.

Each field carries its documentation as an attribute docstring (the string literal right after it),
which :func:`field_docs` reads from the source, so ``--help`` text, YAML presets and the resolved
config written into every run directory all describe the same fields. A training method's own options
are a dataclass of their own (a subclass of :class:`MethodOptions`, declared beside the method in
:mod:`cnl.methods`), held by :attr:`TrainConfig.options`. Values are layered by
:func:`cnl.resolve.resolve_configs`, in order: dataclass defaults, the model's preset, the method's own
defaults, the preset's per-method table, a YAML file (``--config``), then command-line flags.

This module is pure configuration: it imports nothing of cnl but its errors (and no torch), so the CLI
can build its parser without loading the libraries.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = [
    "ModelConfig",
    "field_docs",
    "add_dataclass_arguments",
    "values_from_namespace",
    "build_config",
    "to_dict",
    "DataConfig",
    "MethodOptions",
    "TrainConfig",
    "option_key",
]

T = TypeVar("T")


@dataclasses.dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str | None = None
    """Hugging Face hub id, local model directory, or .gguf file (default: the embedded
    SmolLM2-135M-Instruct, converted once and cached)."""
    dtype: str = "float32"
    """Weights dtype: float32 (SPEC default), bfloat16 or float16."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run (off: never executed unless asked)."""
    prompt_style: str = "clean"
    """How a question becomes prompt tokens: clean (one BOS, a fixed date in templates that print one)
    or reference (the published code's tokenizer(text) with special tokens: two BOS for Llama 3.x, and
    the day of the run; the published Llama splits were made that way)."""
    flush_denormal: bool = False
    """Treat denormal floats (below 1.2e-38) as zero on the CPU (faster on CPUs with slow denormal
    arithmetic; it can turn a denormal reference gradient into a zero, so off by default)."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, ``{field: text}``, read from its source with ``ast``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # pragma: no cover - classes built at run time
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(inner type, optional?)`` for ``X | None`` / ``Optional[X]``; other types unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(tp: Any, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if tp is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        try:
            return tp(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {getattr(tp, '__name__', tp)}, got {text!r}") from None

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
    group_title: str | None = None,
    group_description: str | None = None,
    prefix: str = "",
    help_overrides: dict[str, str] | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """Add one ``--field-name`` flag per dataclass field (``only``: those fields), help text from its docstring.

    Flags default to ``argparse.SUPPRESS``: a flag the user did not give leaves no attribute, so it
    cannot override a preset with a default value. With ``prefix`` (a method's name), the flags are
    ``--<prefix>-<field>`` and their destinations :func:`option_key` (``--my-method-rank`` -> ``my_method_rank``).
    Fields whose type is not a scalar (``TrainConfig.options``) get no flag. ``help_overrides`` replaces
    the docstring of some fields (a text built at run time, e.g. the list of registered methods).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    target = parser.add_argument_group(group_title, group_description) if group_title else parser
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init or (only is not None and f.name not in only):
            continue
        tp, optional = _base_type(hints[f.name])
        if tp not in (int, float, str, bool):
            continue
        dest = option_key(prefix, f.name) if prefix else f.name
        flag = "--" + dest.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = (help_overrides or {}).get(f.name, docs.get(f.name, "")).replace("%", "%%")  # argparse formats
        if default is not None and tp is not bool:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = help_text + f" (default: {'on' if default else 'off'})"
        else:
            kw["type"] = _parse_scalar(tp, optional)
            kw["metavar"] = f.name.rstrip("_").upper()
            if choices and f.name in choices:
                kw["choices"] = choices[f.name]
                kw["metavar"] = "{" + ",".join(choices[f.name]) + "}"
        target.add_argument(flag, **kw)


def option_key(prefix: str, name: str) -> str:
    """The flat key of a method's option: ``("adapter", "rank")`` -> ``adapter_rank``; ``("pull", "lambda_")`` ->
    ``pull_lambda`` (a trailing underscore only avoids a Python keyword); ``("my-method", "x")`` -> ``my_method_x``."""
    return f"{prefix}_{name.rstrip('_')}".replace("-", "_")


def values_from_namespace(ns: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` that the user actually gave on the command line (by field name; with
    ``prefix``, read from the prefixed flags of :func:`add_dataclass_arguments`)."""
    given = vars(ns)
    out = {}
    for f in dataclasses.fields(cls):
        key = option_key(prefix, f.name) if prefix else f.name
        if key in given:
            out[f.name] = given[key]
    return out


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    tp, optional = _base_type(typing.get_type_hints(cls)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' cannot be empty")
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-7" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{name}' must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build_config(cls: type[T], *layers: tuple[str, dict[str, Any]]) -> T:
    """Fill ``cls`` from its defaults then each ``(source name, values)`` layer in order.

    Unknown keys are an error naming the source and the known keys, so a typo in a preset or YAML
    file never silently does nothing.
    """
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            k = key.replace("-", "_")
            if k not in known:
                raise ConfigError(f"{source}: unknown option '{key}' (known: {', '.join(sorted(known))})")
            values[k] = _coerce(cls, k, value, source)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a plain dict (for YAML/JSON). A :class:`TrainConfig`'s method options
    appear under the method's name (``lora: {r: 16, ...}``), by their external names (``lambda``, not
    ``lambda_``), as a config file gives them back."""
    if not isinstance(cfg, TrainConfig):
        return dataclasses.asdict(cfg)
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "options"}
    if cfg.options is not None and dataclasses.fields(cfg.options):
        out[cfg.method] = {f.name.rstrip("_"): getattr(cfg.options, f.name) for f in dataclasses.fields(cfg.options)}
    return out


@dataclasses.dataclass
class DataConfig:
    """Where the mastered (M) and injection (I) sets come from."""

    split: str | None = None
    """Directory written by 'cnl split' (its split.json names every set and half)."""
    mastered: str | None = None
    """Mastered set M as a JSONL file (instead of --split)."""
    injection: str | None = None
    """Injection set I as a JSONL file (instead of --split)."""
    mastered1: str | None = None
    """First half of M (replay trains on it; ood-correct takes the reference from it)."""
    mastered2: str | None = None
    """Second half of M (replay and ood-correct measure forgetting on it)."""
    injection1: str | None = None
    """First half of I (ood-wrong trains on it)."""
    injection2: str | None = None
    """Second half of I (ood-wrong measures learning on it)."""
    general: str | None = None
    """A general-knowledge set evaluated after every epoch into the general_accuracy column (and once
    before training): NAME[:N] or FILE.jsonl[:N], e.g. mmlu:500 (N sampled with a fixed seed; 500 by
    default; offline copies when the hub is unreachable)."""
    skip_long_prompts: bool = False
    """Leave out questions whose prompt is longer than the model's context (a count is printed and
    recorded in run.json); off: such a question is an error naming its file and line."""
    format: str = "auto"
    """The sets' format: auto (each file's own: rows with 'label' are multiple-choice, rows with 'answer' and
    no label open-ended), mcq or open (forced)."""
    eval_templates: str | None = None
    """Other phrasings to evaluate the learning and forgetting sets under, beside the training one: a YAML file
    (a list or mapping of templates holding {question}, or paraphrase:K for each row's K-th 'paraphrases'
    entry), or 'paraphrases' for every paraphrase the rows carry; adds wrong_to_correct@NAME columns."""


@dataclasses.dataclass
class MethodOptions:
    """Base class of a training method's own options (one dataclass per method, one docstring per field).

    A method declares its subclass as ``options_class`` (:class:`cnl.methods.base.Method`); the CLI gets
    one ``--<method>-<field>`` flag per field, and a YAML file gives them as ``<method>: {field: value}``
    (or flat ``<method>_<field>: value``). A field named like a Python keyword ends with ``_``
    (``lambda_``), which its flag and key leave out.
    """

    def validate(self) -> None:
        """Reject impossible values (a :class:`~cnl.errors.ConfigError` naming the option); override."""


@dataclasses.dataclass
class TrainConfig:
    """One training run: method, optimizer, setting and hyperparameters (SPEC §4)."""

    method: str = "cnl"
    """The training method: cnl (the masked update) or a baseline (see 'cnl train --help' for every registered
    method, and the method's own options)."""
    optimizer: str = "sgd"
    """sgd, momentum (0.9), adam or adamw (the mask applies to the optimizer's update)."""
    setting: str = "in-set"
    """in-set (reference M, train I), ood-correct (reference M1, forgetting on M2), ood-wrong (train I1,
    learning on I2); the replay method always uses the replay setting."""
    lr: float = 1e-7
    """Learning rate η (SPEC reference: 1e-7 for 1.5B/7B/1B models, 2e-8 for 3B; LoRA 1e-5)."""
    epochs: int = 25
    """Number of epochs E."""
    seed: int = 0
    """Seed for everything random (LoRA initialisation and dropout)."""
    batch_size: int = 1
    """Questions per update (per process under torchrun): the loss is their mean and the masked update
    follows its gradient. 1 is SPEC's sample-by-sample training; larger is an extension."""
    momentum: float = 0.9
    """Momentum coefficient of the momentum optimizer."""
    beta1: float = 0.9
    """Adam β1."""
    beta2: float = 0.999
    """Adam β2."""
    eps: float = 1e-8
    """Adam ε."""
    adamw_weight_decay: float = 0.1
    """AdamW's decoupled decay λ (u = m̂/(√v̂+ε) + λθ)."""
    ref_batch_size: int = 8
    """Questions per backward pass when computing the reference gradient (memory vs speed)."""
    eval_batch_size: int = 16
    """Questions per forward pass in evaluation."""
    sign_storage: str = "bits"
    """How the reference sign is stored: bits (0.25 byte per element) or int8 (1 byte, a little faster)."""
    reference_sample: int = 0
    """Compute CNL's reference sign over N questions of the reference set drawn anew each epoch (a fixed-seed
    sample: seed, epoch), not the whole set: the reference pass stops growing with a protected set that grows
    round after round. 0: the whole set (SPEC)."""
    reference: str = "mastered"
    """What cnl (and agem, ewc, replay) protect: mastered (the setting's own set, SPEC), a set FILE in either
    format, or self:N[:SOURCE]: the model's own greedy answers, before training, to N prompts of SOURCE (a named
    offline set, mmlu, csqa, nq-open, ...: its questions only; or a JSONL file of prompts; default mmlu for
    multiple-choice runs, nq-open for open-ended ones). With a reference other than M, the mastered set is only
    measured (and may be left out)."""
    probe: str | None = None
    """SET[:N]: N prompts (default 64, a fixed-seed sample) whose next-token distributions at the answer
    positions are stored at the start; the mean forward KL of the model's from them (kl_drift) is logged after
    every epoch and every --eval-every steps. SET: mastered, injection (the run's sets), a named set or a file."""
    eval_every: int = 0
    """Every K optimizer steps: a steps.csv row with the KL of --probe and the learned/forgotten counts on
    --eval-sample questions (0: at epoch ends only)."""
    eval_sample: int = 0
    """With --eval-every: count learned and forgotten every K steps on N questions (a fixed-seed sample) of the
    learning and of the forgetting set."""
    report_to: str = "none"
    """Where training curves go besides steps.csv and summary.csv: tensorboard (event files in
    RUN_DIR/tensorboard), wandb (offline when there is no key or no network; RUN_DIR/wandb), or none."""
    ref_chunks: int = 1
    """Compute the reference over this many parameter groups, one extra forward pass each, so the
    fp32 gradient buffer covers only one group (lower peak memory, more time)."""
    fused_update: bool = True
    """Apply each update with a fused kernel (cnl.kernels: C on the CPU, Triton on CUDA) where one
    applies: one pass over weights, gradient, optimizer state and signs, bit-identical to the eager
    torch rules; off: always the eager rules (the reference implementation)."""
    update_in_backward: bool = True
    """Apply each parameter's update in the backward pass as soon as its gradient is ready (no full
    gradient copy kept); off: backward first, then update (same numbers, more memory)."""
    sparse_embedding_grad: bool = True
    """During training steps, let the input embedding give a sparse gradient so that a tied embedding
    keeps one dense gradient buffer instead of two (same sum up to float summation order)."""
    cpu_offload: bool = False
    """Under torchrun: keep each rank's shard of the weights, gradients and optimizer state in CPU
    memory (FSDP2's CPU offload), moving it to the GPU layer by layer; slower, far less GPU memory."""
    save_model: bool = False
    """Save the final weights (LoRA: the adapter) in Hugging Face format into RUN_DIR/model."""
    checkpoint: bool = True
    """Write a checkpoint (trainable weights, optimizer state, RNG) after every epoch so that --resume
    can continue a killed run; off saves disk for large models (--resume then starts a killed run over
    from epoch 1)."""
    keep_checkpoint: bool = False
    """Keep the last epoch's checkpoint after a successful run (it is deleted otherwise)."""
    score: str = "contains"
    """How an open-ended question's greedy answer is judged: contains (the normalised answer or an alias occurs
    as whole words in it), exact (it is the answer or an alias, normalised), exact-tokens (greedy decoding
    gives exactly an answer's tokens, then ends the turn). Multiple-choice questions: SPEC's letter."""
    max_new_tokens: int | None = None
    """Tokens generated for an open-ended answer (default: the longest answer's, plus 32 for contains and 4
    for exact)."""
    answer_loss_end: bool = False
    """Count the end-of-turn token in an open-ended answer's loss, beside the answer's own tokens."""
    options: MethodOptions | None = None
    """The method's own options (an instance of its ``options_class``, e.g. LoRA's rank); None: its
    defaults, filled in when the configuration is validated."""
