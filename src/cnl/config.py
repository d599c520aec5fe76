"""Configuration: dataclasses are the single source of truth.

Each field carries its documentation as an attribute docstring (the string literal right after it),
which :func:`field_docs` reads from the source, so ``--help`` text, YAML presets and the resolved
config written into every run directory all describe the same fields. Values are layered by
:func:`resolve_configs`, in order: dataclass defaults, the model's preset, the method's own defaults,
the preset's per-method table, a YAML file (``--config``), then command-line flags.
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

from .errors import ConfigError

__all__ = [
    "ModelConfig",
    "field_docs",
    "add_dataclass_arguments",
    "values_from_namespace",
    "build_config",
    "to_dict",
    "DataConfig",
    "TrainConfig",
    "ResolvedConfigs",
    "resolve_configs",
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
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help strings
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
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA α."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    """Comma-separated module names that get LoRA adapters."""
    replay_seed: int = 42
    """Seed of the one-time shuffle of I ∪ M1 for replay (the reference's shuffle was unseeded)."""
    mofo_fraction: float = 0.15
    """mofo: share of each tensor's elements stepped, those with the largest |momentum| (MoFO's runs: 15%)."""
    hft_redraw: str = "epoch"
    """hft: redraw the frozen half at every epoch (with the run's seed), or never (one draw)."""
    ewc_lambda: float = 100.0
    """ewc: strength λ of the penalty λ/2 Σ F (θ − θ*)² (F: diagonal Fisher of the reference set); an
    SGD step is stable while lr · λ · max F < 2."""
    ewc_fisher: str = "epoch"
    """ewc: recompute the Fisher and the anchor θ* at every epoch, or once (at the start weights)."""
    l2_alpha: float = 1000.0
    """l2: strength α of the pull α/2 ||θ − θ₀||² to the starting weights (L2-SP)."""
    ref_batch_size: int = 8
    """Questions per backward pass when computing the reference gradient (memory vs speed)."""
    eval_batch_size: int = 16
    """Questions per forward pass in evaluation."""
    sign_storage: str = "bits"
    """How the reference sign is stored: bits (0.25 byte per element) or int8 (1 byte, a little faster)."""
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


# ------------------------------------------------------------------------------------ layering
@dataclasses.dataclass
class ResolvedConfigs:
    """The three configs of a run after layering, and the preset that applied (None: none)."""

    train: TrainConfig
    data: DataConfig
    model: ModelConfig
    preset: str | None


_SECTIONS = ("train", "data", "model")


def _file_sections(path: Path | None) -> dict[str, dict[str, Any]]:
    """A ``--config`` file as ``{train, data, model}`` mappings.

    Either a run's ``config.yaml`` (sections ``train``, ``data``, ``model``) or a flat mapping of
    training options (a preset-like file, with an optional ``methods:`` table).
    """
    from .io import read_yaml

    if path is None:
        return {k: {} for k in _SECTIONS}
    raw = read_yaml(path)
    if not set(raw) & set(_SECTIONS):
        return {"train": raw, "data": {}, "model": {}}
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown} (expected {', '.join(_SECTIONS)})")
    out: dict[str, dict[str, Any]] = {}
    for k in _SECTIONS:
        section = raw.get(k) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{k}' must be a mapping of option: value, got {type(section).__name__}")
        out[k] = dict(section)
    return out


def per_method_layer(values: dict[str, Any], method: str, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a preset/config mapping into its base keys and its ``methods[method]`` table."""
    base = dict(values)
    per_method = base.pop("methods", None) or {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"{source}: 'methods' must map method names to options")
    override = per_method.get(method) or {}
    if not isinstance(override, dict):
        raise ConfigError(f"{source}: 'methods.{method}' must be a mapping of options")
    return base, dict(override)


def resolve_configs(
    *,
    config_file: Path | None = None,
    preset: str | None = None,
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> ResolvedConfigs:
    """Layer every source of options into the run's configs (the one layering function of cnl).

    Training options, lowest first: dataclass defaults; the preset's base keys (``preset``, else the
    shipped preset named like the model); the method's own defaults (LoRA's learning rate is not the
    full fine-tuning one); the preset's ``methods.<method>`` table; the ``--config`` file (base keys,
    then its ``methods.<method>`` table); ``train`` (the flags the user gave). Data and model options
    come from the file's sections, then ``data`` / ``model``.
    """
    from .methods import get_method
    from .models import resolve_model_source
    from .presets import find_preset_for_model, load_preset, preset_path

    sections = _file_sections(config_file)
    source = str(config_file)
    cli_train = dict(train or {})
    model_cfg = build_config(ModelConfig, (source, sections["model"]), ("command line", dict(model or {})))
    data_cfg = build_config(DataConfig, (source, sections["data"]), ("command line", dict(data or {})))
    name = cli_train.get("method") or sections["train"].get("method") or TrainConfig.method
    method = get_method(str(name))
    if preset is None:
        preset = find_preset_for_model(resolve_model_source(model_cfg.model).tag)
    else:
        preset = preset_path(preset).stem  # the shipped spelling of a case-insensitive name
    layers: list[tuple[str, dict[str, Any]]] = []
    if preset is not None:
        base, own = per_method_layer(load_preset(preset), method.name, f"preset {preset}")
        layers += [(f"preset {preset}", base), (f"{method.name} defaults", dict(method.defaults))]
        layers.append((f"preset {preset} (methods.{method.name})", own))
    else:
        layers.append((f"{method.name} defaults", dict(method.defaults)))
    base, own = per_method_layer(sections["train"], method.name, source)
    layers += [(source, base), (f"{source} (methods.{method.name})", own), ("command line", cli_train)]
    return ResolvedConfigs(build_config(TrainConfig, *layers), data_cfg, model_cfg, preset)
