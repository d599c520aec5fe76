"""A run's configuration from every source of options: the one layering of cnl, and the method flags.

:func:`resolve_configs` fills the three config dataclasses of :mod:`cnl.config` and the method's own
options dataclass (:mod:`cnl.methods`) from, lowest first: the dataclass defaults; the preset's base
keys (``--preset``, else the shipped preset named like the model); the method's own defaults (LoRA's
learning rate is not the full fine-tuning one); the preset's ``methods.<method>`` table; the
``--config`` file (base keys, then its ``methods.<method>`` table); the flags the user gave.

A method's options may be written in any of these layers three ways, all equivalent:

- flat, with the method's prefix: ``lora_r: 8`` (``--lora-r 8`` on the command line);
- as a section named after the method: ``lora: {r: 8}`` (how a run's ``config.yaml`` writes them);
- bare, inside the ``methods:`` table: ``methods: {lora: {r: 8, lr: 1e-4}}``.

Keys of *other* methods are ignored in files (one file can serve ``cnl compare`` over several methods),
and refused on the command line of ``cnl train`` (a flag for a method the run does not use is a mistake).
This module sits above :mod:`cnl.config` and :mod:`cnl.methods`, which import nothing of it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_arguments,
    build_config,
    option_key,
    values_from_namespace,
)
from .errors import ConfigError
from .methods import Method, all_methods, get_method

__all__ = [
    "ResolvedConfigs",
    "resolve_configs",
    "train_config",
    "normalize_train_dict",
    "add_method_arguments",
    "method_values_from_namespace",
    "method_help",
]

_SECTIONS = ("train", "data", "model")
#: The common training options (every field of TrainConfig but the method's options).
_COMMON = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "options")


@dataclasses.dataclass
class ResolvedConfigs:
    """The three configs of a run after layering (``train.options``: the method's), and the preset that
    applied (None: none)."""

    train: TrainConfig
    data: DataConfig
    model: ModelConfig
    preset: str | None


def _option_names(method: Method) -> dict[str, str]:
    """External name -> field name of a method's options (``lambda`` -> ``lambda_``)."""
    return {f.name.rstrip("_"): f.name for f in dataclasses.fields(method.options_class)}


def _key(name: str) -> str:
    return name.replace("-", "_")


def _owner(key: str) -> tuple[Method, str] | None:
    """The method whose option ``key`` is in flat form (``ewc_lambda`` -> ewc, ``lambda_``), if any."""
    for m in all_methods():
        prefix = _key(m.name) + "_"
        if key.startswith(prefix):
            field = _option_names(m).get(key[len(prefix) :])
            if field is not None:
                return m, field
    return None


def _route(
    values: Mapping[str, Any], method: Method, source: str, *, bare_options: bool = False, strict: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split one layer's training options into ``(common options, the method's options by field)``.

    ``bare_options``: option names without the prefix are this method's (inside a ``methods:`` table).
    ``strict``: another method's option is an error rather than ignored (``cnl train``'s flags).
    """
    common: dict[str, Any] = {}
    options: dict[str, Any] = {}
    own = _option_names(method)
    others = {_key(m.name): m for m in all_methods()}
    for raw, value in values.items():
        key = _key(str(raw))
        if key == "methods":
            continue  # the per-method table, layered separately
        if key in _COMMON:
            common[key] = value
        elif bare_options and key in own:
            options[own[key]] = value
        elif key == _key(method.name):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{source}: '{raw}' must be a mapping of {method.name}'s options, e.g. {raw}: {{...}}"
                )
            for k, v in value.items():
                field = own.get(_key(str(k)))
                if field is None:
                    known = ", ".join(sorted(own)) or "none"
                    raise ConfigError(f"{source}: unknown {method.name} option '{k}' (known: {known})")
                options[field] = v
        elif key in others and isinstance(value, Mapping):
            continue  # another method's section
        elif (owned := _owner(key)) is not None:
            owner, field = owned
            if owner is method:
                options[field] = value
            elif strict:
                raise ConfigError(
                    f"--{raw.replace('_', '-')} is an option of --method {owner.name}; "
                    f"this run's method is {method.name}"
                )
        else:
            known = sorted({*_COMMON, *(option_key(method.name, f) for f in own)})
            raise ConfigError(f"{source}: unknown option '{raw}' (known: {', '.join(known)})")
    return common, options


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


def _methods_table(values: Mapping[str, Any], method: Method, source: str) -> dict[str, Any]:
    """``values['methods'][method]`` (an empty mapping when absent), checked to be mappings."""
    table = values.get("methods") or {}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: 'methods' must map method names to options")
    own = table.get(method.name) or {}
    if not isinstance(own, Mapping):
        raise ConfigError(f"{source}: 'methods.{method.name}' must be a mapping of options")
    return dict(own)


def resolve_configs(
    *,
    config_file: Path | None = None,
    preset: str | None = None,
    train: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    strict_flags: bool = True,
) -> ResolvedConfigs:
    """Layer every source of options into the run's configs (the one layering function of cnl).

    ``train`` holds the training flags the user gave (method options flat: ``lora_r``); with
    ``strict_flags`` a flag of another method than the run's is an error (``cnl compare`` passes False:
    its flags apply to the methods they belong to). Data and model options come from the file's
    sections, then ``data`` / ``model``.
    """
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
    layers: list[tuple[str, dict[str, Any], bool, bool]] = []  # (source, values, bare options, strict)
    defaults = (f"{method.name} defaults", dict(method.defaults), False, False)
    if preset is not None:
        values = load_preset(preset)
        layers += [(f"preset {preset}", values, False, False), defaults]
        layers.append((f"preset {preset} (methods.{method.name})", _methods_table(values, method, preset), True, False))
    else:
        layers.append(defaults)
    layers += [
        (source, sections["train"], False, False),
        (f"{source} (methods.{method.name})", _methods_table(sections["train"], method, source), True, False),
        ("command line", cli_train, False, strict_flags),
    ]
    common_layers, option_layers = [], []
    for where, values, bare, strict in layers:
        common, options = _route(values, method, where, bare_options=bare, strict=strict)
        common_layers.append((where, common))
        option_layers.append((where, options))
    train_cfg = build_config(TrainConfig, *common_layers)
    train_cfg.options = build_config(method.options_class, *option_layers)
    if not strict_flags and not method.accepts_reference:
        # one --reference for several methods (compare, continual --methods): it is for those that protect a set
        train_cfg.reference = TrainConfig.reference
    return ResolvedConfigs(train_cfg, data_cfg, model_cfg, preset)


def train_config(**values: Any) -> TrainConfig:
    """A :class:`TrainConfig` from the dataclass defaults and ``values`` alone (no preset, no method
    defaults), method options in any of their forms: ``train_config(method="lora", lora_r=4, lr=1e-3)``."""
    method = get_method(str(values.get("method", TrainConfig.method)))
    common, options = _route(values, method, "train_config", strict=True)
    cfg = build_config(TrainConfig, ("train_config", common))
    cfg.options = build_config(method.options_class, ("train_config", options))
    return cfg


def normalize_train_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    """A run's recorded training options in today's form (options of an older cnl's flat layout moved
    into the method's section), so that two runs' options compare equal when they mean the same."""
    from .config import to_dict

    method = get_method(str(values.get("method", TrainConfig.method)))
    common, options = _route(values, method, "run.json")
    cfg = build_config(TrainConfig, ("run.json", common))
    cfg.options = build_config(method.options_class, ("run.json", options))
    return to_dict(cfg)


# ------------------------------------------------------------------------------------------ command line
def method_help() -> str:
    """``--method``'s help: every registered method with its one-line summary."""
    return "The training method: " + "; ".join(f"{m.name}: {m.summary}" for m in all_methods()) + " (default: cnl)."


def add_method_arguments(parser: argparse.ArgumentParser, *, used_by: str = "--method") -> None:
    """One argument group per registered method with options: its ``--<method>-<option>`` flags, help
    from the options' docstrings (generated from the registry, so a new method's file adds its flags)."""
    for m in all_methods():
        if dataclasses.fields(m.options_class):
            add_dataclass_arguments(
                parser,
                m.options_class,
                prefix=m.name,
                group_title=f"{m.name} options",
                group_description=f"used only with {used_by} {m.name}",
            )


def method_values_from_namespace(ns: argparse.Namespace) -> dict[str, Any]:
    """The method-option flags the user gave, by flat key (``lora_r``)."""
    out: dict[str, Any] = {}
    for m in all_methods():
        for field, value in values_from_namespace(ns, m.options_class, prefix=m.name).items():
            out[option_key(m.name, field)] = value
    return out
