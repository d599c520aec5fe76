"""The training methods, one registered object each (``ft``, ``cnl``, ``lora``, ``replay``, ...).

Adding a method is one new module in this package that defines a :class:`~cnl.methods.base.Method`
subclass decorated with :func:`register`; every module here is imported when the registry is first
used, so nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig

__all__ = ["Method", "register", "get_method", "method_names", "is_baseline", "validate_train_config"]

_REGISTRY: dict[str, Method] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise TypeError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def method_names() -> tuple[str, ...]:
    """Every registered method name (the ``--method`` choices), in registration order."""
    _load_all()
    order = ("cnl", "ft", "lora", "replay")  # the seed's four first, as the docs list them
    return tuple(sorted(_REGISTRY, key=lambda n: (order.index(n) if n in order else len(order), n)))


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a clear error listing the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (choose from {', '.join(method_names())})") from None


def is_baseline(name: str) -> bool:
    """Whether runs of method ``name`` are the baseline of forgetting reductions (unknown names: no)."""
    _load_all()
    method = _REGISTRY.get(name)
    return method is not None and method.baseline


def validate_train_config(cfg: TrainConfig) -> Method:
    """Reject an impossible configuration before any work; return its method."""
    method = get_method(cfg.method)
    method.validate(cfg)
    return method
