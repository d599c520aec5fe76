"""Hyperparameter presets: YAML files shipped with the package, one per model.

A preset is a mapping of :class:`~cnl.config.TrainConfig` fields, plus an optional ``methods:``
table of per-method overrides (LoRA's reference learning rate is 1e-5, not the full fine-tuning
rate). Without ``--preset``, the preset named like the model (e.g. ``Qwen2.5-1.5B-Instruct``) is
used when there is one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import ConfigError

__all__ = ["preset_names", "preset_path", "preset_layer", "find_preset_for_model", "load_preset"]


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


def preset_layer(values: dict[str, Any], method: str, source: str) -> dict[str, Any]:
    """Flatten a preset/config mapping for one method: base keys, then ``methods[method]``."""
    values = dict(values)
    per_method = values.pop("methods", None) or {}
    if not isinstance(per_method, dict):
        raise ConfigError(f"{source}: 'methods' must map method names to options")
    override = per_method.get(method) or {}
    if not isinstance(override, dict):
        raise ConfigError(f"{source}: 'methods.{method}' must be a mapping of options")
    values.update(override)
    return values


def load_preset(name: str, method: str) -> dict[str, Any]:
    """A preset's values for ``method``."""
    path = preset_path(name)
    return preset_layer(load_yaml(path), method, f"preset {name}")
