"""Hyperparameter presets: YAML files shipped with the package, one per model.

A preset is a mapping of :class:`~cnl.config.TrainConfig` fields, plus an optional ``methods:``
table of per-method overrides. A method's own defaults (:mod:`cnl.methods`, e.g. LoRA's learning
rate) sit above the preset's base keys and below its ``methods:`` table, so a preset states only what
is specific to its model. Without ``--preset``, the preset named like the model (e.g.
``Qwen2.5-1.5B-Instruct``) is used when there is one; layering is :func:`cnl.config.resolve_configs`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import read_yaml

__all__ = ["preset_names", "preset_path", "find_preset_for_model", "load_preset"]


def _folder() -> Path:
    return Path(str(resources.files("cnl") / "presets"))


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in _folder().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Path of a shipped preset (case-insensitive name), or a clear error listing the known ones."""
    for known in preset_names():
        if known.lower() == name.lower():
            return _folder() / f"{known}.yaml"
    raise ConfigError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")


def find_preset_for_model(model_tag: str) -> str | None:
    """The preset named like the model, if any."""
    for known in preset_names():
        if known.lower() == model_tag.lower():
            return known
    return None


def load_preset(name: str) -> dict[str, Any]:
    """A preset's raw mapping (base keys and the optional ``methods:`` table)."""
    return read_yaml(preset_path(name))
