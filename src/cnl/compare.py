"""``cnl compare``: the whole study in one resumable job: split, train each method, report.

:func:`plan_compare` resolves every method's configuration (the one layering of
:func:`cnl.resolve.resolve_configs`) and validates the dataset before any model loads;
:func:`run_compare` splits (or reuses a matching split), checks every run before any of them trains
(sets, resumability), trains each method into ``runs/<method>-<optimizer>`` with ``resume`` (finished
runs are reused), then (``--interpolate``) writes each full-weight run's WiSE-FT points
(:mod:`cnl.interpolate`), then the report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig, ModelConfig
from .errors import CnlError, ConfigError
from .resolve import ResolvedConfigs, resolve_configs

__all__ = ["ComparePlan", "plan_compare", "run_compare"]


@dataclass
class ComparePlan:
    """A comparison resolved and validated, before any model work."""

    dataset: str
    limit: int | None
    rows: list[Any]
    tag: str
    out: Path
    configs: dict[str, ResolvedConfigs]
    source: Any
    run_dirs: dict[str, Path] = field(default_factory=dict)
    #: A general-knowledge set every run evaluates after each epoch (``--general``).
    general: str | None = None
    #: The dataset's format as forced (``auto``: the file's own).
    format: str = "auto"
    #: Other phrasings every run is evaluated under (``--eval-templates``).
    eval_templates: str | None = None
    #: WiSE-FT mixing weights of the points written for every full-weight run (``--interpolate``; None: none).
    interpolate: list[float] | None = None

    @property
    def model(self) -> ModelConfig:
        return next(iter(self.configs.values())).model

    @property
    def preset(self) -> str | None:
        return next(iter(self.configs.values())).preset

    @property
    def split_dir(self) -> Path:
        return self.out / "split"

    @property
    def split_identity(self) -> dict[str, Any]:
        """What a reusable split must have been made from: the dataset (its name or file, the limit, and
        the content of the questions taken), and the model."""
        from .data import rows_digest

        first = next(iter(self.configs.values())).train
        return {
            "source": self.dataset,
            "limit": self.limit,
            "dataset_sha256": rows_digest(self.rows),
            "model_source": self.source.path_or_id,
            **({"score": first.score, "max_new_tokens": first.max_new_tokens} if self.open_ended else {}),
        }

    @property
    def open_ended(self) -> bool:
        from .data import rows_format

        return rows_format(self.rows) == "open"


def plan_compare(
    *,
    dataset: str,
    out: str | Path,
    methods: Sequence[str],
    limit: int | None = None,
    config_file: Path | None = None,
    preset: str | None = None,
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    general: str | None = None,
    fmt: str = "auto",
) -> ComparePlan:
    """Resolve and validate every method's configuration and the dataset (no model work). ``fmt`` forces the
    dataset's format (``auto``: the file's own); open-ended questions are judged by each run's ``score``."""
    from .data import resolve_dataset
    from .methods import get_method, validate_train_config
    from .models import resolve_model_source

    if not methods:
        raise CnlError("--methods names no method")
    if len(set(methods)) != len(methods):
        raise CnlError(f"--methods names a method twice: {','.join(methods)}")
    for m in methods:
        get_method(m)  # an unknown name fails here, listing the known ones
    rows, tag = resolve_dataset(dataset, limit=limit, fmt=fmt)  # validated before the model loads
    configs = {
        m: resolve_configs(
            config_file=config_file,
            preset=preset,
            train={**(train or {}), "method": m},
            model=model,
            strict_flags=False,
        )
        for m in methods
    }
    for c in configs.values():
        validate_train_config(c.train)
    first = next(iter(configs.values()))
    if general:
        from .data import resolve_general

        resolve_general(general)  # validated now, not after the split
    plan = ComparePlan(dataset, limit, rows, tag, Path(out), configs, resolve_model_source(first.model.model))
    plan.general = general
    plan.format = fmt
    plan.run_dirs = {m: plan.out / "runs" / f"{m}-{c.train.optimizer}" for m, c in configs.items()}
    return plan


def run_compare(
    plan: ComparePlan,
    load_model: Callable[..., Any],
    *,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Split, train every method, write the report; return the report content.

    ``load_model(model_config, {"dataset": rows}, sources=...)`` loads the model for the split and
    returns a :class:`cnl.loading.Loaded` (the CLI's loader prints what it loaded); it is not called when
    a matching split exists.
    """
    from .io import locked_output

    # every directory of the comparison is held from the start: no other cnl process can replace its
    # split, train into one of its runs or write its report while it runs (this process's own steps
    # take their locks again, which is a no-op)
    with contextlib.ExitStack() as stack:
        for sub in (plan.split_dir, *plan.run_dirs.values(), plan.out / "report"):
            stack.enter_context(locked_output(sub, "cnl compare", for_own_steps=True))
        return _run_compare(plan, load_model, say)


def _run_compare(plan: ComparePlan, load_model: Callable[..., Any], say: Callable[[str], None]) -> dict[str, Any]:
    from .report import write_report
    from .split import read_split_manifest, run_split
    from .train import ResumeMismatch, plan_run, train

    steps = len(plan.configs) + 2 + (1 if plan.interpolate else 0)
    want = plan.split_identity
    manifest = None
    if (plan.split_dir / "split.json").exists():
        found = read_split_manifest(plan.split_dir).manifest
        differ = [k for k, v in want.items() if found.get(k) != v]
        if differ:
            what = ", ".join(f"{k} {found.get(k)!r} (now {want[k]!r})" for k in differ)
            raise ConfigError(
                f"{plan.split_dir} was made from other data or another model ({what}); its runs belong to that "
                f"split: use another --out, or delete {plan.split_dir} and {plan.out / 'runs'} to start over"
            )
        manifest = found
    limit = f" (first {plan.limit})" if plan.limit else ""
    say(f"== 1/{steps} split: {plan.tag}{limit} with {plan.source.tag}" + (" (reused)" if manifest else ""))
    if manifest is None:
        loaded = load_model(plan.model, {"dataset": plan.rows}, sources={"dataset": plan.dataset})
        first = next(iter(plan.configs.values())).train
        result = run_split(
            loaded.sets.rows["dataset"],
            loaded.model,
            loaded.tokenizer,
            encoded=loaded.sets.encoded["dataset"],
            dataset_tag=plan.tag,
            model_tag=loaded.tag,
            out_dir=plan.split_dir,
            extra=want,
            score=first.score,
            max_new_tokens=first.max_new_tokens,
        )
        del loaded
        manifest = result.manifest
    files = manifest["files"]
    say(
        f"accuracy {manifest['accuracy']:.1%}: mastered M = {files['correct']['count']}, "
        f"injection I = {files['wrong']['count']}"
    )
    data = DataConfig(
        split=str(plan.split_dir), general=plan.general, format=plan.format, eval_templates=plan.eval_templates
    )
    for m, c in plan.configs.items():  # every run is checked (sets, resumability) before any trains
        try:
            plan_run(c.train, data, c.model, plan.run_dirs[m], resume=True)
        except ResumeMismatch as e:
            raise ConfigError(
                f"{plan.run_dirs[m]} holds a run made with other options ({str(e).split(': ', 1)[-1]}); "
                "use another --out or delete that directory"
            ) from None
    for i, (m, c) in enumerate(plan.configs.items(), start=2):
        say(
            f"\n== {i}/{steps} train {m}/{c.train.optimizer}: lr {c.train.lr:g}, {c.train.epochs} epochs"
            + (f" (preset {c.preset})" if c.preset else "")
        )
        train(c.train, data, c.model, plan.run_dirs[m], resume=True)
    if plan.interpolate:
        from .interpolate import NotInterpolable, interpolate_run

        say(f"\n== {steps - 1}/{steps} interpolate (WiSE-FT): α = {', '.join(f'{a:g}' for a in plan.interpolate)}")
        for m, run_dir in plan.run_dirs.items():
            try:
                interpolate_run(run_dir, plan.interpolate, say=say)
            except NotInterpolable as e:
                say(f"{m}: no WiSE-FT points ({e})")
    say(f"\n== {steps}/{steps} report")
    # replay measures forgetting on M2 (its own setting): the report then compares percentages
    return write_report(list(plan.run_dirs.values()), plan.out / "report", mixed_forget_sets=True)
