"""``cnl eval --lm-eval``: EleutherAI's lm-evaluation-harness on a model that is already in memory.

cnl's own general-knowledge check (``--general``, :mod:`cnl.evaluation`) scores multiple-choice sets with
SPEC §2's prediction. This adapter adds the standard benchmarks of lm-evaluation-harness (``arc_easy``,
``hellaswag``, ``mmlu``, ... or any task YAML in a local folder) beside it, on the very model object cnl
loaded or trained: nothing is saved and reloaded, so a LoRA adapter or a freshly trained model is scored
as it is.

``lm_eval`` is an optional dependency (the ``lmeval`` extra: ``pip install 'cnl[lmeval]'``); it is
imported inside the functions, so ``import cnl`` and every other command work without it.

Reported metric: per task, ``acc`` (the share of questions whose choice of highest total log-likelihood
is the gold one), or ``acc_norm`` (the same with each choice's log-likelihood divided by its length in
characters) for tasks that report no ``acc``, or else the task's first metric. ``acc`` comes first because
it is the plain rule (the answer the model scores highest, like cnl's own check) and nearly every
multiple-choice task reports it, so numbers across tasks and runs measure the same thing; ``acc_norm``,
which some leaderboards quote for a few tasks (hellaswag, arc_challenge), and every other metric are kept
beside it (``metrics``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from .errors import CnlError

__all__ = [
    "INSTALL_HINT",
    "LmEvalNotInstalled",
    "PreparedTasks",
    "TaskScore",
    "evaluate_lm_eval",
    "lm_eval_version",
    "parse_tasks",
    "prepare_tasks",
    "task_manager",
]

#: How to get lm-evaluation-harness; ``scripts/setup.sh`` installs it.
INSTALL_HINT = "pip install 'cnl[lmeval]'"

#: The metrics tried, in order, as a task's main one (see the module docstring for why ``acc`` first).
MAIN_METRICS = ("acc", "acc_norm")


class LmEvalNotInstalled(CnlError, ImportError):
    """``lm_eval`` cannot be imported: the ``lmeval`` extra is not installed."""


class TaskScore(TypedDict):
    """One task's (or task group's) result."""

    #: name of the main metric: ``acc``, else ``acc_norm``, else the task's first metric
    metric: str
    #: its value
    value: float
    #: its standard error, ``None`` when lm-eval gives none (a single document, or no stderr defined)
    stderr: float | None
    #: documents scored (after ``limit``); ``None`` when lm-eval does not say (some groups)
    samples: int | None
    #: every numeric metric lm-eval reported for the task (``acc``, ``acc_stderr``, ``acc_norm``, ...)
    metrics: dict[str, float]


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (TaskManager; also fails early if a dependency is missing)
    except ImportError as e:
        raise LmEvalNotInstalled(
            f"--lm-eval needs EleutherAI's lm-evaluation-harness, which cannot be imported ({e}): {INSTALL_HINT}"
        ) from e
    return lm_eval


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version (raises :class:`LmEvalNotInstalled` without it)."""
    return str(_import_lm_eval().__version__)


def parse_tasks(values: Sequence[str]) -> list[str]:
    """Task names from ``--lm-eval`` values, each ``TASK[,TASK...]``; the flag may be repeated."""
    tasks: list[str] = []
    for value in values:
        for name in (n.strip() for n in value.split(",")):
            if not name:
                continue
            if name in tasks:
                raise CnlError(f"--lm-eval task {name!r} given twice")
            tasks.append(name)
    return tasks


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An ``lm_eval`` ``TaskManager`` that knows every name of ``tasks``, or a clear error.

    Cheap (it indexes task YAML files and reads no dataset). A name may be a task, group or tag of lm-eval
    or of the YAML files under ``include_path`` (by their ``task:`` name), or the path of a task YAML file.
    """
    if not tasks:
        raise CnlError("name at least one lm-eval task, e.g. --lm-eval arc_easy,hellaswag")
    if include_path is not None and not Path(include_path).is_dir():
        raise CnlError(f"--lm-eval-include {include_path}: not a directory of lm-eval task YAML files")
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = (
            f"lm-eval or {include_path}"
            if include_path is not None
            else "lm-eval (add your own with --lm-eval-include DIR)"
        )
        raise CnlError(f"unknown lm-eval task {name!r}: no task, group or tag of that name in {where}{hint}")
    return manager


@dataclass
class PreparedTasks:
    """lm-eval tasks checked and built (their datasets read) before a model loads: see :func:`prepare_tasks`."""

    names: list[str]
    manager: Any
    #: the top-level task and group objects, for one evaluation (lm-eval fills them with its requests)
    objects: list[Any] | None = field(default=None, repr=False)


def prepare_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> PreparedTasks:
    """Check ``tasks`` and build them, reading (on first use: downloading) their datasets.

    ``cnl eval`` calls this before the model loads, so a typo, a missing extra or an unreachable dataset
    fails in seconds rather than after minutes of loading. Datasets of lm-eval's own tasks come from the
    Hugging Face hub the first time and from the ``datasets`` cache afterwards; tasks on local files (a
    YAML with ``dataset_path: json`` under ``include_path``) need no internet.
    """
    names = list(tasks)
    manager = task_manager(names, include_path)
    return PreparedTasks(names, manager, _build(names, manager))


def _build(names: list[str], manager: Any) -> list[Any]:
    objects: list[Any] = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (OSError, ValueError) as e:  # ConnectionError offline, a missing data file, a bad task config
            raise CnlError(
                f"lm-eval task {name!r}: cannot load it ({type(e).__name__}: {e}). Tasks on the Hugging Face hub "
                "need the internet the first time (the datasets cache serves afterwards); a task on local files "
                "under --lm-eval-include needs none"
            ) from e
        # load() flattens groups into their tasks; simple_evaluate wants the top level (a group, a task, or
        # a tag's tasks), i.e. what is nobody's child
        children = {c for kids in loaded["group_map"].values() for c in kids}
        objects += [g for n, g in loaded["groups"].items() if n not in children]
        objects += [t for n, t in loaded["tasks"].items() if n not in children]
    return objects


def evaluate_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | PreparedTasks,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    include_path: str | Path | None = None,
    device: Any = None,
) -> dict[str, TaskScore]:
    """Run lm-evaluation-harness ``tasks`` on an in-memory causal LM.

    Args:
        model: a ``transformers`` causal LM, or a ``peft`` model wrapping one (a LoRA run's adapter).
        tokenizer: its tokenizer (not modified: a copy gets the pad token lm-eval may add).
        tasks: lm-eval task, group or tag names, or task YAML paths; or :func:`prepare_tasks`' result.
        limit: score only the first ``limit`` documents of each task (``None``: all of them).
        batch_size: sequences per forward pass.
        include_path: a folder of extra task YAML files (e.g. tasks on local JSONL files, which need no
            internet); with prepared ``tasks``, the one given to :func:`prepare_tasks` counts.
        device: where to evaluate; ``None`` is where the model is. A model elsewhere is moved there for
            the evaluation and back afterwards.

    Returns:
        ``{name: TaskScore}`` for every task and every group lm-eval reports (a group's subtasks too), in
        lm-eval's order.

    The model's train/eval mode, its device and the caller's random streams (Python, NumPy, torch, which
    lm-eval reseeds for its reproducible sampling) are as before when this returns or raises.
    """
    if limit is not None and limit < 1:
        raise CnlError(f"limit must be at least 1 document per task, got {limit}")
    if batch_size < 1:
        raise CnlError(f"batch size must be at least 1, got {batch_size}")
    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(tasks, include_path)
    objects = prepared.objects if prepared.objects is not None else _build(prepared.names, prepared.manager)
    prepared.objects = None  # used up: a second evaluation builds fresh task objects
    lm_eval = _import_lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # lm-eval sets (or adds) a pad token on the object it gets
    # per module, not model.training alone: a caller may keep parts in eval mode (frozen, dropout off)
    modes = [(m, m.training) for m in model.modules()]
    home = next(model.parameters()).device
    target = home if device is None else torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    try:
        with _caller_random_state(home, target), _quiet_prebuilt_model_warnings():
            if target != home:
                model.to(target)
            # backend="causal": cnl only handles decoder-only models; naming it skips lm-eval's guess from
            # the config, which a peft wrapper's config could mislead.
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                limit=limit,
                task_manager=prepared.manager,
                # the per-document records are not reported and would hold every prompt in memory
                log_samples=False,
            )
    finally:
        if target != home:
            model.to(home)
        for module, training in modes:  # HFLM puts the model in eval mode and leaves it there
            module.training = training
    if results is None:  # only on ranks other than 0 of a distributed run, which cnl eval never starts
        return {}
    return _scores(results)


def _scores(results: dict[str, Any]) -> dict[str, TaskScore]:
    """Each task's main metric out of ``simple_evaluate``'s results (keys like ``acc,none``)."""
    out: dict[str, TaskScore] = {}
    n_samples = results.get("n-samples", {})
    for name, entry in results["results"].items():
        metrics = _numeric_metrics(entry)
        values = [k for k in metrics if not k.endswith("_stderr") and "_stderr," not in k]
        main = next((m for m in MAIN_METRICS if m in metrics), values[0] if values else None)
        if main is None:
            continue  # a group without aggregated metrics: its subtasks are reported one by one
        samples = n_samples.get(name, {}).get("effective", entry.get("sample_len"))
        out[name] = {
            "metric": main,
            "value": metrics[main],
            "stderr": metrics.get(_stderr_key(main)),
            "samples": int(samples) if isinstance(samples, int | float) else None,
            "metrics": metrics,
        }
    return out


def _stderr_key(metric: str) -> str:
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def _numeric_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """``{metric: value}`` of one results entry; the default filter's ``,none`` suffix is dropped, other
    filters' (``exact_match,strict-match``) kept; "N/A" stderrs and text fields (alias) left out."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name, _, filt = key.partition(",")
        metrics[name if filt == "none" else key] = float(value)
    return metrics


@contextlib.contextmanager
def _caller_random_state(*devices: Any) -> Iterator[None]:
    """simple_evaluate seeds Python's, NumPy's and torch's generators (its sampling is reproducible);
    called from a training loop it must not change what the loop draws next, so they are put back
    (torch's on the CPU and on each CUDA device of ``devices``)."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = sorted({d.index for d in devices if d.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_prebuilt_model_warnings() -> Iterator[None]:
    """HFLM warns that a model object (not a name) was passed and that it assumes one process: both are
    exactly this adapter's design, so they would only alarm users; lm-eval's other messages stay."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    f = _DropMessages(("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model"))
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
