"""Configuration: dataclasses are the single source of truth.

Each field carries its documentation as an attribute docstring (the string literal right after it),
which :func:`field_docs` reads from the source, so ``--help`` text, YAML presets and the resolved
config written into every run directory all describe the same fields. Values are layered, in order:
dataclass defaults, then a YAML preset or file, then command-line flags (:func:`build_config`).
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
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

__all__ = [
    "ModelConfig",
    "field_docs",
    "add_dataclass_arguments",
    "values_from_namespace",
    "build_config",
    "load_yaml",
    "to_dict",
    "METHOD_DEFAULTS",
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
) -> None:
    """Add one ``--field-name`` flag per dataclass field, help text from its docstring.

    Flags default to ``argparse.SUPPRESS``: a flag the user did not give leaves no attribute, so it
    cannot override a preset with a default value.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    target = parser.add_argument_group(group_title) if group_title else parser
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if default is not None and tp is not bool:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = help_text + f" (default: {'on' if default else 'off'})"
        else:
            kw["type"] = _parse_scalar(tp, optional)
            kw["metavar"] = f.name.upper()
            if choices and f.name in choices:
                kw["choices"] = choices[f.name]
                kw["metavar"] = "{" + ",".join(choices[f.name]) + "}"
        target.add_argument(flag, **kw)


def values_from_namespace(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the user actually gave on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (preset or config file) with a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return data


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
    """A dataclass config as a plain dict (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


METHODS = ("cnl", "ft", "lora", "replay")

#: Per-method defaults that differ from the dataclass defaults (SPEC §4: LoRA's learning rate is 1e-5).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"lora": {"lr": 1e-5}}
SETTINGS = ("in-set", "ood-correct", "ood-wrong", "replay")


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


@dataclasses.dataclass
class TrainConfig:
    """One training run: method, optimizer, setting and hyperparameters (SPEC §4)."""

    method: str = "cnl"
    """cnl (masked update), ft (plain fine-tuning), lora (PEFT LoRA, no mask) or replay (SGD on I ∪ M1)."""
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
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA α."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated module names that get LoRA adapters."""
    replay_seed: int = 42
    """Seed of the one-time shuffle of I ∪ M1 for replay."""
    ref_batch_size: int = 8
    """Questions per backward pass when computing the reference gradient (memory vs speed)."""
    eval_batch_size: int = 16
    """Questions per forward pass in evaluation."""
    sign_storage: str = "bits"
    """How the reference sign is stored: bits (0.25 byte per element) or int8 (1 byte, a little faster)."""
    ref_chunks: int = 1
    """Compute the reference over this many parameter groups, one extra forward pass each, so the
    fp32 gradient buffer covers only one group (lower peak memory, more time)."""
    update_in_backward: bool = True
    """Apply each parameter's update in the backward pass as soon as its gradient is ready (no full
    gradient copy kept); off: backward first, then update (same numbers, more memory)."""
    sparse_embedding_grad: bool = True
    """During training steps, let the input embedding give a sparse gradient so that a tied embedding
    keeps one dense gradient buffer instead of two (same sum up to float summation order)."""
    save_model: bool = False
    """Save the final weights (LoRA: the adapter) in Hugging Face format into RUN_DIR/model."""
    checkpoint: bool = True
    """Write a checkpoint (trainable weights, optimizer state, RNG) after every epoch so that --resume
    can continue a killed run; off saves disk for large models (a killed run then starts over)."""
    keep_checkpoint: bool = False
    """Keep the last epoch's checkpoint after a successful run (it is deleted otherwise)."""
