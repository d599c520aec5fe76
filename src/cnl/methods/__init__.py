"""The training methods, one registered object each (``ft``, ``cnl``, ``lora``, ``replay``, ...).

Adding a method is one new module in this package that defines a :class:`~cnl.methods.base.Method`
subclass decorated with :func:`~cnl.methods.base.register`, with its options dataclass beside it;
every module here is imported when the registry is first used, so nothing else needs editing: the CLI
flags, the YAML sections and ``--help`` are generated from the registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Method, MethodOptions, TrainingContext, register, registry

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = [
    "Method",
    "MethodOptions",
    "TrainingContext",
    "register",
    "get_method",
    "all_methods",
    "method_names",
    "is_baseline",
    "validate_train_config",
]

#: Modules of this package that define no method.
_NOT_METHODS = ("base", "anchors")
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def method_names() -> tuple[str, ...]:
    """Every registered method name (the ``--method`` choices): the seed's four first, then by name."""
    _load_all()
    order = ("cnl", "ft", "lora", "replay")  # as the docs list them
    return tuple(sorted(registry(), key=lambda n: (order.index(n) if n in order else len(order), n)))


def all_methods() -> list[Method]:
    """Every registered method, in :func:`method_names` order."""
    return [registry()[n] for n in method_names()]


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a clear error listing the known ones."""
    _load_all()
    try:
        return registry()[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (choose from {', '.join(method_names())})") from None


def is_baseline(name: str) -> bool:
    """Whether runs of method ``name`` are the baseline of forgetting reductions (unknown names: no)."""
    _load_all()
    method = registry().get(name)
    return method is not None and method.baseline


def validate_train_config(cfg: TrainConfig) -> Method:
    """Reject an impossible configuration before any work (filling in the method's default options);
    return its method."""
    method = get_method(cfg.method)
    method.validate(cfg)
    return method
