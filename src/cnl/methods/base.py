"""What every training method declares: :class:`Method`.

A method is one small class registered with :func:`cnl.methods.register`: its name, its defaults
(with their source), the optimizers it allows, whether it needs a reference gradient, the setting it
imposes (if any), how it prepares the model and in which order it trains. The one training loop
(:mod:`cnl.train`) asks the method these questions and never switches on its name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError
from ..optim import OPTIMIZERS
from ..sets import SETTINGS

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..optim import UpdateHooks
    from ..train import Run

__all__ = ["Method", "check_common_options"]


def check_common_options(cfg: TrainConfig) -> None:
    """Ranges of the options every method shares (rejected before any work)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r} (choose from {', '.join(SETTINGS)})")
    for name in ("momentum", "beta1", "beta2", "lora_dropout"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    for name in ("eps", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.adamw_weight_decay < 0:
        raise ConfigError(f"adamw_weight_decay must be >= 0, got {cfg.adamw_weight_decay}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {cfg.lr}")
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {cfg.epochs}")
    for name in ("batch_size", "ref_batch_size", "eval_batch_size", "ref_chunks", "lora_r"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    from ..mask import SIGN_STORAGES

    if cfg.sign_storage not in SIGN_STORAGES:
        raise ConfigError(f"sign_storage must be one of {', '.join(SIGN_STORAGES)}, got {cfg.sign_storage!r}")


class Method:
    """Base class of the training methods; subclasses set the class attributes and override hooks."""

    #: Name used by ``--method`` and in run directories.
    name: ClassVar[str] = ""
    #: One line for ``--help`` and the README.
    summary: ClassVar[str] = ""
    #: TrainConfig values that differ from the dataclass defaults for this method (source in a comment).
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: Optimizers this method runs with.
    optimizers: ClassVar[tuple[str, ...]] = OPTIMIZERS
    #: Whether the method reads the reference (protected) set: the setting then names one (SPEC §4).
    uses_reference: ClassVar[bool] = False
    #: Whether the loop computes CNL's sign reference over that set at the start of every epoch.
    sign_reference: ClassVar[bool] = False
    #: False when a step needs the whole gradient before any parameter moves (A-GEM's projection): the
    #: loop then runs the backward pass first and the update after it, whatever --update-in-backward says.
    updates_in_backward: ClassVar[bool] = True
    #: A setting the method always runs in (replay), or None to take ``--setting``.
    fixed_setting: ClassVar[str | None] = None
    #: Whether reports measure other runs' forgetting reduction against this method's runs.
    baseline: ClassVar[bool] = False
    #: Whether the method runs sharded over several processes (torchrun + FSDP2).
    supports_sharding: ClassVar[bool] = True

    # ------------------------------------------------------------------ validation
    def validate(self, cfg: TrainConfig) -> None:
        """Everything that makes ``cfg`` impossible for this method, before any work."""
        check_common_options(cfg)
        self.resolve_setting(cfg.setting)
        if cfg.optimizer not in self.optimizers:
            raise ConfigError(f"{self.name} supports {', '.join(self.optimizers)} (SPEC §4), not {cfg.optimizer}")
        self.check(cfg)

    def check(self, cfg: TrainConfig) -> None:
        """Method-specific checks (override)."""

    def resolve_setting(self, requested: str) -> str:
        """The setting the run uses: ``requested``, or the method's own one."""
        if self.fixed_setting is None:
            others = [s for s in SETTINGS if s != "replay"]
            if requested not in others:
                raise ConfigError(
                    f"the {requested} setting goes with --method {requested}; {self.name} runs in {', '.join(others)}"
                )
            return requested
        if requested not in ("in-set", self.fixed_setting):
            raise ConfigError(
                f"--method {self.name} has its own setting ({self.fixed_setting}); drop --setting {requested}"
            )
        return self.fixed_setting

    # ------------------------------------------------------------------ hooks of the training loop
    def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        """Make the parameters this method trains require grad (default: all of them)."""
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def training_order(self, n: int, cfg: TrainConfig) -> list[int]:
        """Order of the ``n`` training questions, fixed for the whole run (default: file order)."""
        return list(range(n))

    def make_hooks(self, cfg: TrainConfig, model: torch.nn.Module) -> UpdateHooks | None:
        """The per-run changes to each update (:class:`~cnl.optim.UpdateHooks`); None: the rule alone."""
        return None

    def begin_epoch(self, run: Run, epoch: int) -> None:
        """Per-epoch preparation after the sign reference (A-GEM's mean gradient, EWC's Fisher, HFT's draw)."""
