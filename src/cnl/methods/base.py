"""What every training method declares: :class:`Method`, its options, its hooks and what it may ask of a run.

A method is one small class registered with :func:`register`: its name, its defaults (with their
source), its own options (a :class:`~cnl.config.MethodOptions` dataclass, one docstring per field, which
become ``--<method>-<field>`` flags and a ``<method>:`` YAML section), the optimizers it allows, whether
it needs a reference set, the setting it imposes (if any), how it prepares the model, in which order it
trains, and the per-update hooks it adds (:class:`~cnl.optim.UpdateHooks`). The one training loop
(:mod:`cnl.train`) asks the method these questions and never switches on its name.

Methods sit below the loop: they see a run only through :class:`TrainingContext`, a narrow protocol
(the model, its trainable parameters, the run's gradient passes over the reference set, a logger), so
this package imports nothing of :mod:`cnl.train`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..optim import OPTIMIZERS
from ..sets import SETTINGS

if TYPE_CHECKING:
    from ..distributed import Dist
    from ..optim import UpdateHooks

__all__ = ["Method", "MethodOptions", "TrainingContext", "LossFn", "register", "registry", "check_common_options"]

#: A method's own training objective (:meth:`Method.make_loss`): ``loss_fn(model, batch, pad_id)`` returns
#: ``(objective, reported)``, two per-question tensors ``[len(batch)]`` of the batch's encoded questions: the
#: loop back-propagates the objective (the step's sum divided by its question count, as the task loss) and
#: reports the other (``train_avg_loss``, ``steps.csv``'s loss; checked for non-finite values).
LossFn = Callable[[torch.nn.Module, Sequence[Any], int], tuple[torch.Tensor, torch.Tensor]]

#: Every registered method by name (filled by :func:`register` as the method modules are imported).
_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise TypeError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def registry() -> dict[str, Method]:
    """The registered methods by name (as imported so far; :func:`cnl.methods.get_method` imports all)."""
    return _REGISTRY


class TrainingContext(Protocol):
    """What a method's epoch hook may use of the run in progress (:class:`cnl.train.Run` provides it).

    Gradient passes go through the context, so a method never needs to know the data format, the loss
    (SPEC's letter loss or an answer loss) or whether the model is sharded over several processes.
    """

    @property
    def cfg(self) -> TrainConfig:
        """The run's resolved training configuration (``cfg.options``: the method's own options)."""

    @property
    def model(self) -> torch.nn.Module:
        """The model being trained (sharded under torchrun)."""

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters by name, in the optimizer's order."""

    @property
    def hooks(self) -> UpdateHooks | None:
        """The hooks this method's :meth:`Method.make_hooks` returned for the run."""

    @property
    def dist(self) -> Dist:
        """The processes of the job (one unless under torchrun): reduce scalars with ``dist.sum``."""

    def mean_gradient(self) -> None:
        """Add the mean gradient of the run's loss over the reference set to every trainable ``.grad``
        (each rank's shard under torchrun), at the current weights, in eval mode."""

    def example_gradients(self, which: str = "reference") -> Iterator[int]:
        """For each example of the reference set (``which="train"``: of the training set) in turn, leave that
        example's gradient in the trainable ``.grad`` (cleared before each) and yield the number of
        examples; ``.grad`` is cleared at the end."""

    def say(self, message: str) -> None:
        """Print and log a line (rank 0 only)."""


def check_common_options(cfg: TrainConfig) -> None:
    """Ranges of the options every method shares (rejected before any work)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r} (choose from {', '.join(SETTINGS)})")
    for name in ("momentum", "beta1", "beta2"):
        value = getattr(cfg, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if not cfg.eps > 0:
        raise ConfigError(f"eps must be positive, got {cfg.eps}")
    if cfg.adamw_weight_decay < 0:
        raise ConfigError(f"adamw_weight_decay must be >= 0, got {cfg.adamw_weight_decay}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"learning rate must be a positive number, got {cfg.lr}")
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {cfg.epochs}")
    for name in ("batch_size", "ref_batch_size", "eval_batch_size", "ref_chunks"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.reference_sample < 0:
        raise ConfigError(f"reference_sample must be >= 0 (0: the whole reference set), got {cfg.reference_sample}")
    from ..answers import SCORES
    from ..mask import SIGN_STORAGES
    from ..selfref import parse_reference

    parse_reference(cfg.reference)
    check_monitoring_options(cfg)

    if cfg.score not in SCORES:
        raise ConfigError(f"unknown score {cfg.score!r} (choose from {', '.join(SCORES)})")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.sign_storage not in SIGN_STORAGES:
        raise ConfigError(f"sign_storage must be one of {', '.join(SIGN_STORAGES)}, got {cfg.sign_storage!r}")


#: Where ``--report-to`` sends training curves.
REPORT_TO = ("none", "tensorboard", "wandb")


def check_monitoring_options(cfg: TrainConfig) -> None:
    """``--probe``, ``--eval-every``, ``--eval-sample`` and ``--report-to`` (what is watched while training)."""
    if cfg.eval_every < 0 or cfg.eval_sample < 0:
        raise ConfigError(f"eval_every and eval_sample must be >= 0, got {cfg.eval_every} and {cfg.eval_sample}")
    if cfg.eval_every and not (cfg.probe or cfg.eval_sample):
        raise ConfigError(
            "--eval-every K logs the KL of --probe and the counts on --eval-sample questions every K steps: "
            "give at least one of them"
        )
    if cfg.eval_sample and not cfg.eval_every:
        raise ConfigError("--eval-sample N counts every --eval-every K steps: give --eval-every too")
    if cfg.probe is not None:
        from ..drift import parse_probe

        parse_probe(cfg.probe)
    if cfg.report_to not in REPORT_TO:
        raise ConfigError(f"unknown --report-to {cfg.report_to!r} (choose from {', '.join(REPORT_TO)})")


class Method:
    """Base class of the training methods; subclasses set the class attributes and override hooks."""

    #: Name used by ``--method`` and in run directories.
    name: ClassVar[str] = ""
    #: One line for ``--help`` and the docs.
    summary: ClassVar[str] = ""
    #: The method's own options (a :class:`~cnl.config.MethodOptions` dataclass; the base class has none).
    options_class: ClassVar[type[MethodOptions]] = MethodOptions
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
    #: Whether the method runs sharded over several processes (torchrun + FSDP2); else why not.
    sharding_refusal: ClassVar[str | None] = None

    @property
    def supports_sharding(self) -> bool:
        return self.sharding_refusal is None

    @property
    def accepts_reference(self) -> bool:
        """Whether ``--reference`` applies: the method protects a set (its reference; replay: its buffer)."""
        return self.uses_reference or self.fixed_setting == "replay"

    # ------------------------------------------------------------------ options and validation
    def options(self, cfg: TrainConfig) -> Any:
        """The run's options of this method (its ``options_class``), the defaults when none were given."""
        opts = cfg.options
        if opts is None:
            return self.options_class()
        if type(opts) is not self.options_class:
            raise ConfigError(
                f"the options given are {type(opts).__name__}, "
                f"but method {self.name} takes {self.options_class.__name__}"
            )
        return opts

    def validate(self, cfg: TrainConfig) -> None:
        """Everything that makes ``cfg`` impossible for this method, before any work; fills ``cfg.options``
        with the method's defaults when it holds none."""
        check_common_options(cfg)
        cfg.options = self.options(cfg)
        cfg.options.validate()
        self.resolve_setting(cfg.setting)
        if cfg.optimizer not in self.optimizers:
            raise ConfigError(f"{self.name} supports {', '.join(self.optimizers)} (SPEC §4), not {cfg.optimizer}")
        self.check(cfg)

    def check(self, cfg: TrainConfig) -> None:
        """Method-specific checks beyond its options' own (override)."""

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

    def make_loss(self, cfg: TrainConfig, model: torch.nn.Module) -> LossFn | None:
        """The run's training objective per question (:data:`LossFn`), made once per run from the prepared model
        at its start weights (before a checkpoint is restored: what it keeps of them is the original start on
        ``--resume`` too); None (default): the task loss, SPEC's letter loss or the open-ended answer loss, as
        the reference gradients use."""
        return None

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks | None:
        """The per-run changes to each update (:class:`~cnl.optim.UpdateHooks`) for the trainable
        ``params`` (by name, each rank's shard under torchrun); None: the rule alone."""
        return None

    def begin_epoch(self, ctx: TrainingContext, epoch: int) -> None:
        """Per-epoch preparation after the sign reference (A-GEM's mean gradient, EWC's Fisher, HFT's draw)."""

    def evaluation_weights(self, ctx: TrainingContext) -> contextlib.AbstractContextManager[None]:
        """The weights each epoch is evaluated with and ``--save-model`` saves: those in place while the loop is
        inside this context (WiSE-FT's interpolation with the start weights); on exit the training weights must
        be back bit for bit, as training continues from them. The default leaves the trained weights."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ cnl continual: one round to the next
    def round_config(self, cfg: TrainConfig, k: int) -> None:
        """Adapt round ``k``'s (1, 2, ...) checked configuration before the round is planned and recorded (OSF's
        preserved share growing round by round); the default changes nothing."""

    def round_begin(self, hooks: UpdateHooks, carried: dict[str, Any], cfg: TrainConfig) -> None:
        """Take the state :meth:`round_end` carried from the previous round (the method's continual form:
        online EWC's accumulated Fisher, L2-SP's original anchor); the default carries nothing."""

    def round_end(self, ctx: TrainingContext) -> dict[str, Any]:
        """What the next round of ``cnl continual`` needs of this one (tensors allowed); default nothing."""
        return {}
