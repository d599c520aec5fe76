"""``cnl train``: the one training loop of every method, optimizer and setting (SPEC §4).

Read :func:`train` top to bottom: it plans the run (every check that needs no model), loads the model,
then runs the epochs. Per epoch:

1. :func:`reference`: for methods that use one (CNL), the sign of the mean gradient over the
   reference set at the current weights;
2. :func:`train_epoch`: one update per training question, in the method's order, batch size 1
   (SPEC); each parameter's update is applied during the backward pass (:mod:`cnl.optim`), masked by
   the reference when there is one;
3. :func:`evaluate`: predictions on the learning and forgetting sets;
4. :func:`record`: predictions, the ``summary.csv`` row, an atomic checkpoint and ``run.json``, so
   a killed run resumes after its last finished epoch with identical numbers.

The benchmarks call the same functions. What the run directory holds is :mod:`cnl.rundir`'s business;
what differs between methods is :mod:`cnl.methods`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .allocator import PeakMemory
from .config import DataConfig, ModelConfig, TrainConfig, to_dict
from .data import MCRow, read_jsonl
from .distributed import SINGLE, Dist, from_env, local
from .errors import CnlError, ConfigError, Terminated
from .io import locked_output, refuse_foreign_files
from .loading import Loaded, load_for_sets
from .mask import SignReference
from .methods import Method, validate_train_config
from .methods.base import LossFn
from .optim import UpdateHooks, sparse_embedding_grads
from .optimizer import MaskedOptimizer, build_optimizer
from .reference import accumulate_mean_gradient, reference_sign
from .rundir import RECOVER_HINT, RunDir, RunDirError, capture_rng, restore_rng
from .scoring import (
    Encoded,
    Predictions,
    PromptEncoder,
    batch_losses,
    hf_examples,
    mc_batches,
    predict,
    spec_loss,
)
from .selfref import parse_reference
from .sets import REFERENCE, SetRoles, resolve_set_files, roles_for, with_reference

__all__ = [
    "TrainingError",
    "ResumeMismatch",
    "RunPlan",
    "Run",
    "plan_run",
    "load",
    "reference",
    "sign_reference",
    "build_run_optimizer",
    "train_epoch",
    "evaluate",
    "record",
    "train",
    "summary_columns",
]

log = logging.getLogger("cnl.train")

#: Options that change neither the numbers nor the run's identity, so they may differ on --resume.
RESUMABLE_CHANGES = (
    "epochs",
    "save_model",
    "keep_checkpoint",
    "checkpoint",
    "eval_batch_size",
    "ref_batch_size",
    "ref_chunks",
    "sign_storage",
    "update_in_backward",
    "fused_update",
    "report_to",
)


class TrainingError(CnlError):
    """Training had to stop (e.g. a non-finite loss); finished epochs are kept."""


class ResumeMismatch(ConfigError):
    """``--resume`` on a run directory started with other options, sets or model."""


#: The set name under which a run keeps its general-knowledge questions (``--general``).
GENERAL = "general"


@dataclasses.dataclass
class RoundLink:
    """What makes a training run one round of ``cnl continual`` (:mod:`cnl.continual`).

    Attributes:
        watch: every set of the sequence by name (``set_0``: the original M; ``set_k``: round k's injection
            set), evaluated after every epoch (predictions ``epoch_NNN_set_k.jsonl``, for the ledger).
        before: also evaluate them before training (``epoch_000_set_k.jsonl``: the first round's R[0]).
        carried: the method's state at the end of the previous round (:meth:`Method.round_end`: online
            EWC's accumulated Fisher, L2-SP's original anchor), given to :meth:`Method.round_begin`.
    """

    watch: dict[str, Path]
    before: bool = False
    carried: dict[str, Any] | None = None


def summary_columns(
    roles: SetRoles, general: bool = False, phrasings: Sequence[str] = (), kl: bool = False
) -> list[str]:
    """SPEC's columns for the setting, then masked fraction, general accuracy (with ``--general``), the KL drift
    from the start (with ``--probe``), the learned and forgotten counts under each other phrasing
    (``--eval-templates``: ``wrong_to_correct@name``) and seconds per phase."""
    return [
        "epoch",
        "train_avg_loss",
        roles.learn_column,
        roles.forget_column,
        "masked_fraction",
        *(["general_accuracy"] if general else []),
        *(["kl_drift"] if kl else []),
        *(c for p in phrasings for c in (f"{roles.learn_column}@{p}", f"{roles.forget_column}@{p}")),
        "reference_seconds",
        "train_seconds",
        "eval_seconds",
        "epoch_seconds",
    ]


# ================================================================================== the recipe
def train(
    cfg: TrainConfig,
    data: DataConfig,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    model_tag: str | None = None,
    progress: bool | None = None,
    echo: bool = True,
    link: RoundLink | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) one training run into ``out_dir``; return the summary rows.

    ``model``/``tokenizer`` may be given directly (tests, notebooks); otherwise ``model_cfg`` loads
    them. Everything that can be checked is checked before the model is loaded. ``link`` makes the run a
    round of ``cnl continual`` (sets watched every epoch; the method's state carried between rounds).
    """
    validate_train_config(cfg)
    dist = from_env(model_cfg.device)
    with contextlib.ExitStack() as stack:
        # rank 0 holds the run directory; every rank learns whether it could before going on
        agreed(dist, lambda: stack.enter_context(locked_output(out_dir, "cnl train")) if dist.is_main else None)
        plan = agreed(dist, lambda: plan_run(cfg, data, model_cfg, out_dir, resume=resume, dist=dist, link=link))
        if plan.finished_rows is not None:
            if echo and dist.is_main:
                print(f"{plan.rundir.root}: run already finished ({len(plan.finished_rows)} epochs); nothing to do")
            return plan.finished_rows
        say = stack.enter_context(_run_log(plan.rundir, echo)) if dist.is_main else _silent
        progress = progress if dist.is_main else False
        run = load(plan, model_cfg, model=model, tokenizer=tokenizer, model_tag=model_tag, say=say)
        _before_training(run, progress)
        meter = PeakMemory(next(run.model.parameters()).device)
        meter.reset()  # from here on: what training needs, not the loading of the full weights
        watch = None
        try:
            watch = Watch(run, progress)
            watch.begin()
            with run.optimizer.in_backward(run.in_backward):
                for epoch in range(len(run.rows) + 1, cfg.epochs + 1):
                    t_epoch = time.perf_counter()
                    reference(run, epoch, progress=progress)
                    t_ref = time.perf_counter() - t_epoch
                    t0 = time.perf_counter()
                    loss, masked = train_epoch(
                        run.model,
                        run.train_enc,
                        run.optimizer,
                        pad_id=run.pad_id,
                        batch_size=cfg.batch_size,
                        dist=dist,
                        in_backward=run.in_backward,
                        sparse_embedding=cfg.sparse_embedding_grad,
                        lines=[r.line for r in run.train_rows],
                        where=f"epoch {epoch}",
                        progress=progress,
                        on_step=functools.partial(watch.step, epoch),
                        loss_fn=run.loss_fn,
                    )
                    _check_finite(run, epoch)
                    t_watch = watch.pop_seconds()  # the probe's KL and the sample counts are evaluation
                    t_train = time.perf_counter() - t0 - t_watch
                    t0 = time.perf_counter()
                    with run.plan.method.evaluation_weights(run):  # the trained weights, unless the method says
                        preds = evaluate(
                            run.model,
                            {name: run.encoded[name] for name in _evaluated_sets(run)},
                            desc=f"epoch {epoch} eval",
                            **_eval_settings(run, progress),
                        )
                    t_eval = time.perf_counter() - t0 + t_watch
                    seconds = {"reference": t_ref, "train": t_train, "eval": t_eval}
                    run.info["peak_memory_bytes"] = dist.gather(meter.peak())
                    run.info["method_bytes_per_param"] = method_bytes_per_param(run)
                    row = record(run, epoch, loss, masked, preds, seconds, time.perf_counter() - t_epoch, watch.kl)
                    watch.epoch_end(row, preds)
            _finish(run)
        except BaseException as e:
            _fail(run, e)
        finally:
            if watch is not None:
                watch.close()
    return run.rows


def _before_training(run: Run, progress: bool | None) -> None:
    """Once per run, before training: the general-knowledge accuracy (``--general``) and the learned and
    forgotten counts under each other phrasing (``--eval-templates``) of the untrained model."""
    if run.rows:
        return
    roles = run.roles
    if GENERAL in run.encoded and "general_accuracy_before" not in run.info:
        enc = run.encoded[GENERAL]
        before = evaluate(run.model, {GENERAL: enc}, desc="before training", **_eval_settings(run, progress))
        run.info["general_accuracy_before"] = round(before[GENERAL].n_correct / len(enc), 6)
        run.say(f"general-knowledge accuracy before training: {run.info['general_accuracy_before']:.1%}")
    link = run.plan.link
    if link and link.before and not run.rundir.prediction_file(0, next(iter(link.watch))).exists():
        preds = evaluate(
            run.model, {n: run.encoded[n] for n in link.watch}, desc="before training", **_eval_settings(run, progress)
        )
        if run.dist.is_main:
            for name, p in preds.items():
                run.rundir.write_predictions(0, name, run.plan.sets[name], p)
        shown = ", ".join(f"{n} {p.n_correct}/{len(p.correct)}" for n, p in preds.items())
        run.say(f"before training: {shown}")
    if run.plan.phrasings and "phrasings_before" not in run.info:
        sets = {f"{n}@{p}": run.encoded[f"{n}@{p}"] for p in run.plan.phrasings for n in (roles.learn, roles.forget)}
        preds = evaluate(run.model, sets, desc="before training", **_eval_settings(run, progress))
        run.info["phrasings_before"] = {
            p: {
                "learned": preds[f"{roles.learn}@{p}"].n_correct,
                "forgotten": len(sets[f"{roles.forget}@{p}"]) - preds[f"{roles.forget}@{p}"].n_correct,
            }
            for p in run.plan.phrasings
        }
        shown = ", ".join(f"{p}: {v['learned']}/{v['forgotten']}" for p, v in run.info["phrasings_before"].items())
        run.say(f"learned/forgotten under the other phrasings before training: {shown}")


def _eval_settings(run: Run, progress: bool | None) -> dict[str, Any]:
    """How the run scores its sets (:func:`evaluate`'s keyword arguments)."""
    cfg = run.cfg
    return {
        "batch_size": cfg.eval_batch_size,
        "pad_id": run.pad_id,
        "dist": run.dist,
        "progress": progress,
        "tokenizer": run.tokenizer,
        "score": cfg.score,
        "max_new_tokens": cfg.max_new_tokens,
    }


def _evaluated_sets(run: Run) -> list[str]:
    """The learning and forgetting sets, and the general-knowledge set when there is one."""
    roles = run.roles
    phrased = [f"{name}@{p}" for p in run.plan.phrasings for name in (roles.learn, roles.forget)]
    watched = list(run.plan.link.watch) if run.plan.link else []
    general = [GENERAL] if GENERAL in run.encoded else []
    return list(dict.fromkeys((roles.learn, roles.forget, *phrased, *watched, *general)))


def _silent(msg: str) -> None:
    """What ranks other than 0 say: nothing (rank 0 prints and logs for the job)."""


def agreed(dist: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; when it fails on any rank, raise on every rank (no rank is left
    waiting in a collective for one that stopped). Rank 0's error wins, else the first one's."""
    if not dist.enabled:
        return fn()
    try:
        result, error = fn(), None
    except CnlError as e:
        result, error = None, e
    errors = dist.gather(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        raise ConfigError(f"another process stopped: {failed[1]}")
    return result


# ================================================================================== 1. plan
@dataclasses.dataclass
class RunPlan:
    """Everything known about a run before its model loads."""

    cfg: TrainConfig
    method: Method
    roles: SetRoles
    rundir: RunDir
    sets: dict[str, list[MCRow]]
    set_info: dict[str, Any]
    resolved: dict[str, Any]
    resume: bool
    #: Leave out questions longer than the model's context (else they are an error).
    skip_long: bool = False
    #: The processes of the job (one unless under torchrun).
    dist: Dist = SINGLE
    #: Why a resumed run starts over from epoch 1 (None: it does not).
    restart_note: str | None = None
    #: What a resumed run's run.json said of the process that ran it before (None: nothing to say).
    resume_note: str | None = None
    #: The other phrasings the learning and forgetting sets are evaluated under (``--eval-templates``).
    phrasings: list[str] = dataclasses.field(default_factory=list)
    #: What makes the run a round of ``cnl continual`` (None: a run on its own).
    link: RoundLink | None = None
    #: The summary of a finished run that needs no more epochs (None: there is work to do).
    finished_rows: list[dict[str, Any]] | None = None
    #: ``--reference self:...``: the prompts the model answers at its start weights (None: another reference).
    self_prompts: list[Any] | None = None
    #: ``--probe``: the rows whose answer distributions the KL drift compares (None: no probe).
    probe_rows: list[Any] | None = None


def plan_run(
    cfg: TrainConfig,
    data: DataConfig,
    model_cfg: ModelConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    dist: Dist = SINGLE,
    link: RoundLink | None = None,
) -> RunPlan:
    """Validate the options, the sets and the run directory; no model work."""
    method = validate_train_config(cfg)
    if dist.enabled:
        if not method.supports_sharding:
            raise ConfigError(
                f"--method {method.name} does not run sharded over several processes yet ({method.sharding_refusal}); "
                "use one process"
            )
        if cfg.ref_chunks > 1:
            raise ConfigError("--ref-chunks splits the parameters of one process; with several processes use 1")
    elif cfg.cpu_offload:
        raise ConfigError("--cpu-offload is FSDP2's CPU offload: it needs several processes (torchrun)")
    ref = parse_reference(cfg.reference)
    roles = with_reference(roles_for(method.resolve_setting(cfg.setting), method.uses_reference), ref.kind, method.name)
    if cfg.report_to != "none":
        from .tracking import check_available

        check_available(cfg.report_to)
    if dist.enabled and (cfg.probe or cfg.eval_every or ref.kind == "self"):
        raise ConfigError(
            "--probe, --eval-every and --reference self:... run in one process for now; drop them under torchrun"
        )
    # Plain fine-tuning in-set may be given no mastered set (teaching a model facts it lacks, say), nor need a
    # method whose reference is not M: forgetting is then counted on an empty set.
    measured_only = (roles.setting == "in-set" and roles.reference is None) or (
        ref.kind != "mastered" and roles.setting in ("in-set", "replay")
    )
    optional = (roles.forget,) if measured_only else ()
    files = resolve_set_files(data, roles, optional)
    sets = {name: read_jsonl(path, fmt=data.format, allow_empty=True) for name, path in files.items()}
    none_given = [n for n in roles.needed() if n not in files and n != REFERENCE]
    for name in none_given:
        sets[name] = []
    self_prompts = None
    if ref.kind == "file":
        files = {**files, REFERENCE: ref.path}
        sets[REFERENCE] = read_jsonl(ref.path, fmt="auto")
    elif ref.kind == "self":
        from .data import rows_format
        from .selfref import self_prompts as read_self_prompts

        self_prompts, source = read_self_prompts(ref, rows_format(sets[roles.train[0]]))
        sets[REFERENCE] = []  # the model's answers, once it is loaded (load)
    general_tag = None
    if data.general:
        from .data import resolve_general

        if GENERAL in sets:
            raise ConfigError(f"a set is already called {GENERAL!r}")
        sets[GENERAL], general_tag = resolve_general(data.general)
    for name, path in (link.watch if link else {}).items():
        if name in sets:
            raise ConfigError(f"a set is already called {name!r}")
        files = {**files, name: Path(path)}
        sets[name] = read_jsonl(path, fmt=data.format, allow_empty=True)
    phrasings: list[str] = []
    if data.eval_templates:
        from .phrasings import load_phrasings, rephrase

        for p in load_phrasings(data.eval_templates, [sets[roles.learn], sets[roles.forget]]):
            for name in (roles.learn, roles.forget):
                sets[f"{name}@{p.name}"] = rephrase(sets[name], p, str(files.get(name, name)))
            phrasings.append(p.name)
    _check_sets_not_empty(
        method, roles, sets, {k: str(v) for k, v in files.items()}, cfg.batch_size * dist.world, later=self_prompts
    )
    probe = None
    if cfg.probe:
        from .drift import parse_probe, probe_rows

        probe = probe_rows(parse_probe(cfg.probe), {k: v for k, v in sets.items() if k != REFERENCE or v})

    from .models import resolve_device, resolve_dtype

    resolve_dtype(model_cfg.dtype)  # a bad dtype or an absent device fails here, before anything is written
    resolve_device(model_cfg.device)
    rundir = RunDir(out_dir)
    if rundir.root.exists() and not rundir.root.is_dir():
        raise ConfigError(f"{rundir.root} exists and is not a directory; choose another --out")
    refuse_foreign_files(rundir.root, ("run.json",), "cnl train")
    resolved = {
        "train": to_dict(cfg),
        "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in to_dict(data).items()},
        "model": to_dict(model_cfg),
    }
    set_info = {name: RunDir.describe_set(path, len(sets[name])) for name, path in files.items()}
    for name in none_given:
        set_info[name] = {"file": None, "sha256": None, "count": 0}
    if self_prompts is not None:
        # the answers are generated at the start weights; resuming reads them back (reference.jsonl)
        set_info[REFERENCE] = {"spec": ref.text, "source": source, "prompts": len(self_prompts)}
    if probe is not None:
        set_info["probe"] = {"spec": cfg.probe, "source": probe[1], "count": len(probe[0])}
    if general_tag is not None:
        set_info[GENERAL] = {"spec": data.general, "tag": general_tag, "count": len(sets[GENERAL])}
    if phrasings:
        from .io import file_digest

        spec = data.eval_templates
        digest = file_digest(spec) if Path(spec).is_file() else spec
        set_info["phrasings"] = {"spec": spec, "sha256": digest, "names": phrasings}
    plan = RunPlan(cfg, method, roles, rundir, sets, set_info, resolved, resume, data.skip_long_prompts, dist)
    plan.phrasings = phrasings
    plan.link = link
    plan.self_prompts = self_prompts
    plan.probe_rows = probe[0] if probe is not None else None
    if rundir.exists():
        previous = rundir.read_info()
        if resume and previous.get("world_size", 1) != dist.world:
            raise ResumeMismatch(
                f"--resume with {dist.world} process(es); the run in {rundir.root} was started with "
                f"{previous.get('world_size', 1)} (its checkpoint is sharded that way): use the same number"
            )
        if not resume:
            raise ConfigError(
                f"{rundir.root} already holds a run ({previous.get('method')}/{previous.get('optimizer')}, "
                f"status {previous.get('status')}); use --resume to continue it or choose another --out"
            )
        _check_resumable(previous, resolved, set_info)
        done = previous.get("epochs_done", 0)
        if previous.get("status") in ("running", "stopped"):  # this process holds the directory now
            plan.resume_note = (
                f"the process that ran it before is gone without a word (run.json said {previous.get('status')}: "
                f"killed, or its machine went down); continuing after epoch {done}"
            )
        if previous.get("status") == "finished" and done >= cfg.epochs:
            plan.finished_rows = rundir.read_summary()
        elif done and not rundir.has_checkpoint():
            if previous.get("status") == "finished":
                raise ConfigError(
                    f"{rundir.root}: the run finished {done} epoch(s) and kept no checkpoint to continue from "
                    "(checkpoints are removed when a run finishes, unless --keep-checkpoint); start a new run with "
                    "more --epochs in another --out"
                )
            plan.restart_note = (
                f"{done} epoch(s) had finished, but there is no checkpoint to continue from (--no-checkpoint, or "
                "the disk filled up before the first one was written): starting over from epoch 1"
            )
    return plan


def _check_sets_not_empty(
    method: Method,
    roles: SetRoles,
    sets: dict[str, list[MCRow]],
    files: dict[str, str],
    batch: int = 1,
    later: Any = None,
) -> None:
    """Refuse an empty reference or training set (``later``: the reference is made once the model loads)."""
    if roles.reference is not None and not sets[roles.reference] and later is None:
        raise ConfigError(
            f"the reference set {roles.reference} ({files.get(roles.reference, 'the model')}) is empty: {method.name} "
            "needs questions for its reference gradient (mastered: the model answered none of them correctly)"
        )
    for name in roles.train:
        if not sets[name] and not (name == REFERENCE and later is not None):
            raise ConfigError(f"the training set {name} ({files[name]}) is empty: nothing to inject")
    n_train = sum(len(sets[name]) for name in roles.train)
    if batch > n_train:
        raise ConfigError(
            f"a step takes {batch} questions (--batch-size x processes), more than the {n_train} of the training "
            f"set {'+'.join(roles.train)}; use a smaller --batch-size"
        )


def _check_resumable(previous: dict[str, Any], resolved: dict[str, Any], set_info: dict[str, Any]) -> None:
    """A resumed run must have the same configuration (epochs may grow), sets and model."""
    from .resolve import normalize_train_dict

    try:
        old_train = normalize_train_dict(previous["config"]["train"])
    except (CnlError, KeyError, TypeError) as e:
        raise RunDirError(f"run.json: damaged, its recorded training options cannot be read ({e})") from None
    old_train = {k: v for k, v in old_train.items() if k not in RESUMABLE_CHANGES}
    new_train = {k: v for k, v in resolved["train"].items() if k not in RESUMABLE_CHANGES}
    diff = sorted(k for k in new_train if old_train.get(k) != new_train[k])
    if diff:
        raise ResumeMismatch(
            "--resume with a different configuration: "
            + ", ".join(f"{k} was {old_train.get(k)!r}, now {new_train[k]!r}" for k in diff)
        )
    old_sets = {k: v.get("sha256", v.get("spec")) for k, v in previous["sets"].items()}
    new_sets = {k: v.get("sha256", v.get("spec")) for k, v in set_info.items()}
    if old_sets != new_sets:
        raise ResumeMismatch("--resume with different set files than the run was started with")
    # The checkpoint holds only the trainable weights (LoRA: the adapters), so a different base model
    # or dtype would silently continue on other weights. The device may change.
    old_model = previous["config"].get("model") or {}
    new_model = resolved["model"]
    mdiff = [
        k
        for k in ("model", "dtype", "prompt_style")
        if not _same_model_value(k, old_model.get(k, "clean" if k == "prompt_style" else None), new_model.get(k))
    ]
    if mdiff:
        raise ResumeMismatch(
            "--resume with a different model: "
            + ", ".join(f"{k} was {old_model.get(k)!r}, now {new_model.get(k)!r}" for k in mdiff)
        )


def _same_model_value(key: str, old: Any, new: Any) -> bool:
    """Equal, or (for ``model``) two spellings of the same existing local path."""
    if old == new:
        return True
    if key == "model" and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


@contextlib.contextmanager
def _run_log(rundir: RunDir, echo: bool) -> Iterator[Callable[[str], None]]:
    """Log to ``train.log`` (and stdout when ``echo``) for the duration of the run. A start that fails
    before run.json is written leaves no log behind (the message is on the terminal): a directory holding
    only a ``train.log`` would look like someone else's files to the next attempt."""
    rundir.root.mkdir(parents=True, exist_ok=True)
    fresh = not rundir.log.exists()
    handler = logging.FileHandler(rundir.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def say(msg: str) -> None:
        log.info(msg)
        if echo:
            tqdm.write(msg, file=sys.stdout)

    try:
        yield say
    except BaseException:
        if fresh and not rundir.exists():
            log.removeHandler(handler)
            handler.close()
            with contextlib.suppress(OSError):
                rundir.log.unlink()
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


# ================================================================================== 2. load
@dataclasses.dataclass
class Run:
    """A run in progress: the plan, the prepared model, the encoded sets and the optimizer.

    It is the :class:`cnl.methods.TrainingContext` a method's epoch hook sees: the model, the trainable
    parameters, the method's hooks, the processes, and the gradient passes over the reference set.
    """

    plan: RunPlan
    model: torch.nn.Module
    tokenizer: Any
    pad_id: int
    encoded: dict[str, list[Encoded]]
    train_rows: list[MCRow]
    train_enc: list[Encoded]
    optimizer: MaskedOptimizer
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    say: Callable[[str], None]
    #: ``--probe``: the start's answer distributions (None: no probe).
    probe: Any = None
    #: The method's own training objective (:meth:`Method.make_loss`; None: the task loss).
    loss_fn: LossFn | None = None
    #: Bytes per parameter that :meth:`Method.prepare_model` added to the model (adapters, OSF's factors).
    model_growth_per_param: float = 0.0

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    @property
    def roles(self) -> SetRoles:
        return self.plan.roles

    @property
    def rundir(self) -> RunDir:
        return self.plan.rundir

    @property
    def dist(self) -> Dist:
        return self.plan.dist

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return self.optimizer.named_parameters()

    @property
    def hooks(self) -> UpdateHooks | None:
        return self.optimizer.hooks

    @property
    def in_backward(self) -> bool:
        """Whether updates happen inside the backward pass (else after it: A-GEM needs the whole gradient)."""
        return self.cfg.update_in_backward and self.plan.method.updates_in_backward

    # ------------------------------------------------------------------ gradient passes (TrainingContext)
    def reference_questions(self, epoch: int | None = None) -> list[Encoded]:
        """The reference set's questions for CNL's sign in ``epoch``: all of them, or with
        ``reference_sample`` N a sample of N drawn with the seed (``seed``, ``epoch``), in set order."""
        questions = self.encoded[self.roles.reference]
        n = self.cfg.reference_sample
        if epoch is None or not 0 < n < len(questions):
            return list(questions)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        keep = sorted(torch.randperm(len(questions), generator=g)[:n].tolist())
        return [questions[i] for i in keep]

    def mean_gradient(self, epoch: int | None = None) -> None:
        """Add the mean SPEC-loss gradient over the reference set (:meth:`reference_questions`) to the
        trainable ``.grad`` (this rank's shard: every rank takes a contiguous share, divides by the set's size,
        and the sums reduce)."""
        questions = self.reference_questions(epoch)
        n, dist, model = len(questions), self.dist, self.model
        if not dist.enabled:
            accumulate_mean_gradient(
                model, mc_batches(questions, self.cfg.ref_batch_size), spec_loss(self.pad_id), n=n, progress=False
            )
            return
        was_training = model.training
        model.eval()  # as in the one-process reference: a property of the parameters, no dropout
        try:
            share = [questions[i] for i in dist.share(n)]
            for _, batch in dist.lockstep(mc_batches(share, self.cfg.ref_batch_size)):
                _loss(model, batch, self.pad_id, n, placeholder=questions[0])[0].backward()
        finally:
            model.train(was_training)

    def example_gradients(self, which: str = "reference") -> Iterator[int]:
        """One reference (or, ``which="train"``, training) question at a time: its loss gradient in the
        trainable ``.grad`` (under torchrun every rank takes the same question at 1/N of its weight, so the
        reduced sum is its gradient)."""
        questions = self.train_enc if which == "train" else self.encoded[self.roles.reference]
        model, params, world = self.model, self.params, self.dist.world
        was_training = model.training
        model.eval()
        try:
            for e in questions:
                for _, p in params:
                    p.grad = None
                _loss(model, [e], self.pad_id, world)[0].backward()
                yield len(questions)
        finally:
            for _, p in params:
                p.grad = None
            model.train(was_training)


def _loss(
    model: torch.nn.Module,
    batch: Sequence[Encoded] | None,
    pad_id: int,
    divisor: float,
    placeholder: Encoded | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """``(the batch's loss sum divided by divisor, the losses)``, to back-propagate. ``batch`` None: a
    placeholder pass of weight 0 on ``placeholder`` (a rank with nothing left joins FSDP's collectives).
    ``loss_fn``: a method's own objective (:meth:`Method.make_loss`), back-propagated while the losses it
    reports are returned; None: the task loss, both."""
    if batch is None:
        assert placeholder is not None
        if loss_fn is not None:
            return loss_fn(model, [placeholder], pad_id)[0].sum() * 0.0, []
        return batch_losses(model, [placeholder], pad_id).sum() * 0.0, []
    if loss_fn is not None:
        objective, reported = loss_fn(model, batch, pad_id)
        return objective.sum() / divisor, reported.detach().tolist()
    losses = batch_losses(model, batch, pad_id)
    return losses.sum() / divisor, losses.detach().tolist()


def load(
    plan: RunPlan,
    model_cfg: ModelConfig,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    model_tag: str | None = None,
    say: Callable[[str], None] = print,
) -> Run:
    """Load and prepare the model, encode the sets, build the optimizer, restore a checkpoint, write run.json."""
    cfg, roles = plan.cfg, plan.roles
    if model_cfg.dtype != "float32":
        say(
            f"note: training in {model_cfg.dtype}; SPEC trains in float32, and updates at small learning rates "
            "can vanish below the precision of 16-bit weights"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    loaded = _load_model(plan, model_cfg, model, tokenizer, say)
    # what needs the start weights comes before the method wraps the model and a checkpoint is restored
    encoder = PromptEncoder(loaded.tokenizer, style=model_cfg.prompt_style, answer_loss_end=cfg.answer_loss_end)
    if plan.self_prompts is not None:
        _answer_self_prompts(plan, loaded, encoder, say)
    probe = None
    if plan.probe_rows is not None:
        from .drift import DriftProbe

        probe = DriftProbe(loaded.model, hf_examples(encoder, plan.probe_rows), batch_size=cfg.eval_batch_size)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    base_bytes = _tensor_bytes(loaded.model)
    model = plan.method.prepare_model(loaded.model, cfg)
    # what preparing the model added (adapters; OSF's factors and their frozen start), per parameter of the model
    growth = max(0, _tensor_bytes(model) - base_bytes) / base_params if base_params else 0.0
    if plan.dist.enabled:
        from .distributed import shard

        model = shard(model, plan.dist, cpu_offload=cfg.cpu_offload)
    encoded, sets = loaded.sets.encoded, plan.sets
    pool_rows = [r for name in roles.train for r in sets[name]]
    pool_enc = [e for name in roles.train for e in encoded[name]]
    order = plan.method.training_order(len(pool_enc), cfg)
    optimizer = build_run_optimizer(cfg, plan.method, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    loss_fn = plan.method.make_loss(cfg, model)  # at the start weights: a checkpoint is restored below
    if plan.link is not None and plan.link.carried and optimizer.hooks is not None:
        plan.method.round_begin(optimizer.hooks, plan.link.carried, cfg)  # a checkpoint (below) restores later state
    rows: list[dict[str, Any]] = []
    if plan.resume_note:
        say(plan.resume_note)
    if plan.restart_note:
        say(plan.restart_note)
    elif plan.resume:
        # every rank reads its own file: a damaged one stops every rank with its message, none is left waiting
        rows = agreed(plan.dist, lambda: _restore(plan.rundir, optimizer, plan.dist))
        if rows:
            say(f"resuming after epoch {len(rows)}")
    info = _start_run_json(plan, loaded, model_tag, optimizer, rows)
    if plan.self_prompts is not None and plan.dist.is_main and not plan.rundir.reference_file.exists():
        plan.rundir.write_reference(plan.sets[REFERENCE])
    n_params = sum(local(p).numel() for _, p in optimizer.named_parameters()) * plan.dist.world
    n_forget = len(sets[roles.forget]) if plan.set_info[roles.forget]["file"] else "none given"
    say(
        f"{cfg.method}/{cfg.optimizer} {roles.setting}: train on {'+'.join(roles.train)} ({len(pool_enc)}), "
        f"learning on {roles.learn} ({len(sets[roles.learn])}), forgetting on {roles.forget} "
        f"({n_forget}), reference {_reference_text(plan)}, lr {cfg.lr:g}, "
        f"{n_params / 1e6:.2f}M trainable parameters"
    )
    return Run(
        plan=plan,
        model=model,
        tokenizer=loaded.tokenizer,
        pad_id=PromptEncoder(loaded.tokenizer).pad_id,
        encoded=encoded,
        train_rows=[pool_rows[i] for i in order],
        train_enc=[pool_enc[i] for i in order],
        optimizer=optimizer,
        rows=rows,
        info=info,
        say=say,
        probe=probe,
        loss_fn=loss_fn,
        model_growth_per_param=growth,
    )


def _reference_text(plan: RunPlan) -> str:
    """What the run protects, for its first log line: the setting's set by name, or ``--reference``'s source."""
    name = plan.roles.reference
    if name is None:
        return "-"
    if name != REFERENCE:
        return name
    return f"{plan.cfg.reference} ({len(plan.sets[REFERENCE])})"


def _answer_self_prompts(plan: RunPlan, loaded: Loaded, encoder: PromptEncoder, say: Callable[[str], None]) -> None:
    """``--reference self:...``: the model's own answers to the prompts become the reference set (read back from
    the run directory when resuming: they were given by the start weights, which a checkpoint has replaced)."""
    from .data import rows_digest
    from .selfref import answer_self

    info = plan.set_info[REFERENCE]
    saved = plan.rundir.reference_file
    if plan.resume and saved.exists():
        rows = read_jsonl(saved)
        recorded = (plan.rundir.read_info().get("sets") or {}).get(REFERENCE) or {}
        if recorded.get("answers_sha256") != rows_digest(rows):
            raise RunDirError(
                f"{saved}: not the answers this run recorded (run.json's answers_sha256); delete it to have the start "
                "weights answer again"
            )
        say(f"reference: the model's own answers to {len(rows)} prompts of {info['source']} (from {saved.name})")
    else:
        t0 = time.perf_counter()
        rows, dropped = answer_self(
            loaded.model, encoder, plan.self_prompts, batch_size=plan.cfg.eval_batch_size, progress=False
        )
        gone = f", {dropped} answered with nothing left out" if dropped else ""
        say(
            f"reference: the model's own answers to {len(plan.self_prompts)} prompts of {info['source']}{gone} "
            f"({time.perf_counter() - t0:.1f}s)"
        )
    if not rows:
        raise ConfigError(f"--reference {info['spec']}: the model answered none of the prompts; nothing to protect")
    plan.sets[REFERENCE] = rows
    loaded.sets.encoded[REFERENCE] = encoder.encode_all(rows)
    info.update(count=len(rows), answers_sha256=rows_digest(rows), file=str(plan.rundir.reference_file.resolve()))


def _load_model(
    plan: RunPlan, model_cfg: ModelConfig, model: Any, tokenizer: Any, say: Callable[[str], None]
) -> Loaded:
    """The model (or the one given) with every set encoded for it, the too-long prompts left out when asked
    (the plan's sets then shrink to match)."""
    sources = {name: info.get("file", info.get("spec")) for name, info in plan.set_info.items()}
    # under torchrun every rank loads the weights on the CPU; sharding then moves only its shard
    load_cfg = dataclasses.replace(model_cfg, device="cpu") if plan.dist.enabled and model is None else model_cfg
    loaded = load_for_sets(
        load_cfg,
        plan.sets,
        sources=sources,
        skip_long=plan.skip_long,
        model=model,
        tokenizer=tokenizer,
        answer_loss_end=plan.cfg.answer_loss_end,
    )
    if loaded.sets.n_skipped:
        plan.sets = loaded.sets.rows
        counts = ", ".join(f"{len(v)} of {k}" for k, v in loaded.sets.skipped.items() if v)
        say(f"skipped {loaded.sets.n_skipped} question(s) longer than the model's context ({counts})")
        _check_sets_not_empty(plan.method, plan.roles, plan.sets, sources)
    return loaded


def build_run_optimizer(
    cfg: TrainConfig, method: Method, named_params: list[tuple[str, torch.nn.Parameter]]
) -> MaskedOptimizer:
    """The run's :class:`~cnl.optimizer.MaskedOptimizer` over the trainable parameters, with the method's hooks."""
    return build_optimizer(
        named_params,
        cfg.optimizer,
        cfg.lr,
        momentum=cfg.momentum,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        eps=cfg.eps,
        adamw_weight_decay=cfg.adamw_weight_decay,
        fused=cfg.fused_update,
        hooks=method.make_hooks(cfg, named_params),
    )


def _start_run_json(
    plan: RunPlan, loaded: Loaded, model_tag: str | None, optimizer: MaskedOptimizer, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """run.json (and config.yaml, and the summary's header) as the run starts or resumes."""
    cfg, roles, sets, dist = plan.cfg, plan.roles, plan.sets, plan.dist
    model_source = loaded.path_or_id if loaded.source is not None else plan.resolved["model"].get("model")
    if model_source is not None and Path(model_source).exists():
        model_source = str(Path(model_source).resolve())  # analyses find the base model from anywhere
    columns = summary_columns(roles, GENERAL in sets, plan.phrasings, plan.probe_rows is not None)
    info: dict[str, Any] = {
        "method": cfg.method,
        "optimizer": cfg.optimizer,
        "setting": roles.setting,
        "model": model_tag if loaded.source is None else loaded.tag,
        "model_source": model_source,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "roles": dataclasses.asdict(roles),
        "sets": plan.set_info,
        "learn_set": roles.learn,
        "forget_set": roles.forget,
        "learn_total": len(sets[roles.learn]),
        "forget_total": len(sets[roles.forget]),
        "trainable_parameters": sum(local(p).numel() for _, p in optimizer.named_parameters()) * dist.world,
        "world_size": dist.world,
        "batch_size": cfg.batch_size,
        "skipped_long_prompts": {k: v for k, v in loaded.sets.skipped.items() if v},
        "columns": columns,
        "config": plan.resolved,
        "status": "running",
        "epochs_done": len(rows),
    }
    if dist.is_main:
        plan.rundir.write_summary(columns, rows)
        plan.rundir.write_info(info)
        plan.rundir.write_config(plan.resolved)
    return info


def _restore(rundir: RunDir, optimizer: MaskedOptimizer, dist: Dist) -> list[dict[str, Any]]:
    """Load the latest checkpoint into the trainable weights, the optimizer (with the method's hook state)
    and the RNGs; return its summary rows. Every tensor is checked against the model first."""
    loaded = rundir.load_checkpoint(dist)
    if loaded is None:
        return []
    meta, state = loaded
    where = rundir.checkpoints / f"epoch_{int(meta.get('epoch', 0)):03d}"
    try:
        weights, opt_state, rng, summary = state["weights"], state["optimizer"], state["rng"], list(meta["summary"])
    except (KeyError, TypeError) as e:
        raise RunDirError(f"{where}: damaged checkpoint (missing {e}); {RECOVER_HINT}") from None
    params = dict(optimizer.named_parameters())
    if not isinstance(weights, dict) or set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights or {})), sorted(set(weights or {}) - set(params))
        raise RunDirError(
            f"{where}: the checkpoint's weights do not match the model's trainable parameters (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); {RECOVER_HINT}"
        )
    for name, p in params.items():
        t, target = weights[name], local(p)
        if not isinstance(t, torch.Tensor) or t.shape != target.shape or t.dtype != target.dtype:
            got = f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise RunDirError(
                f"{where}: checkpoint tensor {name} is {got}, the model's is {list(target.shape)} {target.dtype}; "
                f"{RECOVER_HINT}"
            )
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise RunDirError(f"{where}: damaged optimizer state in the checkpoint ({e}); {RECOVER_HINT}") from None
    with torch.no_grad():
        for name, p in params.items():
            local(p).copy_(weights[name].to(local(p).device))
    try:
        restore_rng(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunDirError(f"{where}: damaged RNG state in the checkpoint ({e}); {RECOVER_HINT}") from None
    return summary


# ================================================================================== 3. an epoch
def reference(run: Run, epoch: int, *, progress: bool | None = None) -> None:
    """SPEC §4 step 1: give the optimizer the sign of the mean gradient over the reference set at the current
    weights (CNL), then let the method prepare its epoch (A-GEM's full reference, EWC's Fisher, HFT's draw)."""
    optimizer = run.optimizer
    name = run.roles.reference
    if name is not None and run.plan.method.sign_reference:
        optimizer.reference = None
        with optimizer.paused():
            if run.dist.enabled:
                run.mean_gradient(epoch)
                ref = SignReference(run.cfg.sign_storage)
                for _, p in run.params:  # each rank keeps the signs of its own shard
                    ref.set(p, local(p.grad) if p.grad is not None else torch.zeros_like(local(p)))
                    p.grad = None
                optimizer.reference = ref
            else:
                optimizer.reference = sign_reference(
                    run.model,
                    run.reference_questions(epoch),
                    [p for _, p in run.params],
                    pad_id=run.pad_id,
                    batch_size=run.cfg.ref_batch_size,
                    storage=run.cfg.sign_storage,
                    chunks=run.cfg.ref_chunks,
                    progress=progress,
                )
    with optimizer.paused():
        run.plan.method.begin_epoch(run, epoch)


def sign_reference(
    model: torch.nn.Module,
    questions: Sequence[Encoded],
    params: Sequence[torch.nn.Parameter],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    storage: str = "bits",
    chunks: int = 1,
    progress: bool | None = None,
) -> SignReference:
    """Sign of the mean SPEC-loss gradient over ``questions`` for ``params``, batched by length."""
    ref, _ = reference_sign(
        model,
        mc_batches(questions, batch_size),
        spec_loss(pad_id),
        params,
        n=len(questions),
        storage=storage,
        chunks=chunks,
        progress=progress,
    )
    return ref


def train_epoch(
    model: torch.nn.Module,
    questions: Sequence[Encoded],
    optimizer: MaskedOptimizer,
    *,
    pad_id: int = 0,
    batch_size: int = 1,
    dist: Dist = SINGLE,
    in_backward: bool = True,
    sparse_embedding: bool = True,
    lines: Sequence[int] | None = None,
    where: str = "",
    progress: bool | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    loss_fn: LossFn | None = None,
) -> tuple[float, float]:
    """One update per batch, in order (SPEC §4 step 2: batch size 1); ``(mean loss, masked fraction)``.

    A batch's loss is the mean over its questions, so its update follows the mean gradient; the last
    batch may be short. With ``dist`` (N processes) a step takes N × ``batch_size`` consecutive
    questions, rank r the r-th ``batch_size`` of them, and every rank divides its loss sum by the step's
    global count (the sharded gradients are reduced as sums): the order and the numbers do not depend on
    N when N × ``batch_size`` is fixed. ``in_backward`` means the optimizer's hooks are attached
    (:meth:`MaskedOptimizer.in_backward`) and update each parameter during the backward pass; otherwise
    the optimizer steps after it. A non-finite loss stops with the question's file line (``lines``)
    before its update. The masked fraction is the share of the epoch's element-updates left frozen.
    ``on_step(i, steps, loss, masked)`` is called after each step's update (i from 1; the step's mean loss and
    masked fraction, over every process). ``loss_fn``: the method's own objective (:meth:`Method.make_loss`),
    back-propagated in place of the task loss; the loss reported is the one it reports.
    """
    model.train()
    loss_sum = 0.0
    optimizer.pop_counts()
    n = len(questions)
    per_step = batch_size * dist.world
    steps = [(start, min(per_step, n - start)) for start in range(0, n, per_step)]
    mine = [  # this rank's questions of each step; only the last step can leave a rank without any
        r
        for start, count in steps
        if (r := range(start + dist.rank * batch_size, min(start + (dist.rank + 1) * batch_size, start + count)))
    ]
    bar = tqdm(total=n, desc=f"{where} train".strip(), unit="q", disable=(progress is False) or None, leave=False)
    frozen_total = elements_total = 0
    with sparse_embedding_grads(model, sparse_embedding and not dist.enabled):
        for i, idx in dist.lockstep(mine):
            start, count = steps[i]
            batch = None if idx is None else [questions[j] for j in idx]
            total, losses = _loss(model, batch, pad_id, count, placeholder=questions[start], loss_fn=loss_fn)
            bad = [(j, v) for j, v in zip(idx or (), losses, strict=True) if not math.isfinite(v)]
            if dist.any(bool(bad)):  # stop before this step's update
                j, v = next((b for found in dist.gather(bad) for b in found), (start, float("nan")))
                line = f" (line {lines[j]})" if lines is not None else ""
                raise TrainingError(f"{where}, training sample {j + 1}{line}: loss is {v}; try a smaller learning rate")
            total.backward()
            if not in_backward:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += sum(losses)
            bar.update(count)
            if on_step is not None:
                frozen, elements = optimizer.pop_counts()
                frozen, elements, step_loss = dist.sum(frozen), dist.sum(elements), dist.sum(sum(losses))
                frozen_total, elements_total = frozen_total + frozen, elements_total + elements
                on_step(i + 1, len(steps), step_loss / count, frozen / elements if elements else 0.0)
    bar.close()
    frozen, elements = optimizer.pop_counts()
    frozen, elements = dist.sum(frozen) + frozen_total, dist.sum(elements) + elements_total
    return dist.sum(loss_sum) / n, (frozen / elements if elements else 0.0)


def _tensor_bytes(value: Any, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors in ``value`` (attributes of objects, nested dicts, lists, tuples, modules), each storage
    counted once and none of ``exclude``'s (the model's own weights, which hooks may refer to)."""
    seen: set[int] = {local(t).untyped_storage().data_ptr() for t in exclude}
    visited: set[int] = set()  # objects already walked (cycles)

    def walk(v: Any) -> int:
        if id(v) in visited:
            return 0
        visited.add(id(v))
        if isinstance(v, torch.Tensor):
            t = local(v)
            key = t.untyped_storage().data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return t.untyped_storage().nbytes()
        if isinstance(v, torch.nn.Module):
            return sum(walk(t) for t in (*v.parameters(), *v.buffers()))
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple, set)):
            return sum(walk(x) for x in v)
        if hasattr(v, "__dict__") and not isinstance(v, type):
            return walk(vars(v))
        return 0

    return walk(value)


def method_bytes_per_param(run: Run) -> float:
    """What the method holds beyond the model's own weights, the gradient and the optimizer's state, per parameter
    of the model as loaded (this process's share): what preparing the model added (LoRA's adapters, OSF's
    trainable factors and their frozen start), CNL's reference signs, the tensors of its hooks (EWC's Fisher and
    anchor, L2-SP's anchor, A-GEM's reference gradient, WiSE's start weights) and its loss's (ASFT's frozen copy
    of the model)."""
    weights = list(run.model.parameters())
    held = run.optimizer.reference.nbytes() if run.optimizer.reference is not None else 0
    held += _tensor_bytes([run.hooks, run.loss_fn], exclude=weights)
    n = sum(local(p).numel() for p in weights)
    return round(run.model_growth_per_param + (held / n if n else 0.0), 4)


def _check_finite(run: Run, epoch: int) -> None:
    """Stop before anything of this epoch is written when the weights went non-finite."""
    bad = [n for n, p in run.params if not bool(torch.isfinite(local(p)).all())]
    if run.dist.any(bool(bad)):
        bad = [n for names in run.dist.gather(bad) for n in names] or ["on another process"]
        raise TrainingError(
            f"epoch {epoch}: the weights became non-finite ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); try a smaller learning rate"
        )


def evaluate(
    model: torch.nn.Module,
    sets: dict[str, Sequence[Encoded]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    dist: Dist = SINGLE,
    desc: str = "eval",
    progress: bool | None = None,
    tokenizer: Any = None,
    score: str = "contains",
    max_new_tokens: int | None = None,
) -> dict[str, Predictions]:
    """Predictions on each set (SPEC §4 step 3: the learning and forgetting sets); open-ended questions are
    answered and judged by ``score`` (:func:`cnl.scoring.predict`, which needs the ``tokenizer`` for them).

    With ``dist`` every rank scores a contiguous share of each set and the shares are gathered, in
    order, on every rank (ranks with fewer batches join the others' passes: :meth:`Dist.lockstep`).
    """
    out = {}
    common = {"batch_size": batch_size, "pad_id": pad_id, "progress": progress, "tokenizer": tokenizer,
              "score": score, "max_new_tokens": max_new_tokens}  # fmt: skip
    for name, enc in sets.items():
        if not dist.enabled:
            out[name] = predict(model, enc, desc=f"{desc} {name}", **common)
            continue
        share = [enc[i] for i in dist.share(len(enc))]
        mine = predict(model, share, desc=f"{desc} {name}", dist=dist, placeholder=enc[0], **common)
        parts = dist.gather((mine.answers, mine.correct, mine.candidate_logits))
        out[name] = Predictions(*(sum((list(p[k]) for p in parts), []) for k in range(3)))
    return out


def record(
    run: Run,
    epoch: int,
    loss: float,
    masked_fraction: float,
    preds: dict[str, Predictions],
    seconds: dict[str, float],
    epoch_seconds: float,
    kl: float | None = None,
) -> dict[str, Any]:
    """Write the epoch's predictions, summary row and run.json, then its checkpoint; return the row (``kl``:
    the probe's KL drift at the epoch's end).

    Results come first: when the disk fills up while the (much larger) checkpoint is written, the
    epoch's results are kept and the previous checkpoint stays valid, so ``--resume`` recomputes only
    this epoch.
    """
    roles, rundir, sets = run.roles, run.rundir, run.plan.sets
    learned = preds[roles.learn].n_correct
    forgotten = len(sets[roles.forget]) - preds[roles.forget].n_correct
    row = {
        "epoch": epoch,
        "train_avg_loss": round(loss, 6),
        roles.learn_column: learned,
        roles.forget_column: forgotten,
        "masked_fraction": round(masked_fraction, 6),
        **({"general_accuracy": round(preds[GENERAL].n_correct / len(sets[GENERAL]), 6)} if GENERAL in preds else {}),
        **({"kl_drift": round(kl, 8)} if kl is not None else {}),
        **{
            column: count
            for p in run.plan.phrasings
            for column, count in (
                (f"{roles.learn_column}@{p}", preds[f"{roles.learn}@{p}"].n_correct),
                (
                    f"{roles.forget_column}@{p}",
                    len(sets[f"{roles.forget}@{p}"]) - preds[f"{roles.forget}@{p}"].n_correct,
                ),
            )
        },
        **{f"{k}_seconds": round(v, 3) for k, v in seconds.items()},
        "epoch_seconds": round(epoch_seconds, 3),
    }
    dist = run.plan.dist
    if dist.is_main:
        with _disk_full_message(f"the results of epoch {epoch}", "earlier epochs' results and checkpoint are kept"):
            for name, p in preds.items():
                if name != GENERAL:  # its accuracy is the summary column; its predictions are not kept
                    rundir.write_predictions(epoch, name, sets[name], p)
            rundir.write_summary(run.info["columns"], [*run.rows, row])
    run.rows.append(row)
    run.info["epochs_done"] = epoch
    if dist.is_main:
        rundir.write_info(run.info)
    if run.cfg.checkpoint:
        kept = f"epoch {epoch}'s results (summary.csv, predictions) are kept and the previous checkpoint is valid"
        with _disk_full_message(f"the checkpoint of epoch {epoch}", kept, checkpoint=True):
            optimizer_state = run.optimizer.state_dict()
            optimizer_state.pop("cnl_reference", None)  # recomputed at the start of every epoch
            state = {
                "weights": {n: local(p) for n, p in run.params},
                "optimizer": optimizer_state,
                "rng": capture_rng(),
            }
            rundir.save_checkpoint(epoch, state, {"epoch": epoch, "summary": run.rows}, dist)
    run.say(
        f"epoch {epoch:>3}/{run.cfg.epochs}  loss {row['train_avg_loss']:.4f}  "
        f"learned {learned}/{len(sets[roles.learn])}  forgotten {forgotten}/{len(sets[roles.forget])}  "
        f"masked {masked_fraction:.1%}  "
        + (f"general {row['general_accuracy']:.1%}  " if "general_accuracy" in row else "")
        + (f"kl {row['kl_drift']:.4f}  " if "kl_drift" in row else "")
        + f"ref {seconds['reference']:.1f}s train {seconds['train']:.1f}s "
        f"eval {seconds['eval']:.1f}s"
    )
    return row


# ================================================================================== watching it happen
def step_columns(cfg: TrainConfig) -> list[str]:
    """``steps.csv``'s columns: per optimizer step the loss, masked fraction and learning rate; at evaluation
    steps (every ``--eval-every`` and each epoch's last) the probe's KL and the sample counts."""
    return [
        "step",
        "epoch",
        "loss",
        "masked_fraction",
        "lr",
        *(["kl_drift"] if cfg.probe else []),
        *(["learned_sample", "forgotten_sample"] if cfg.eval_sample else []),
    ]


class Watch:
    """What is watched while a run trains: ``steps.csv`` (one row per optimizer step), the KL drift of
    ``--probe`` and the learned/forgotten counts on ``--eval-sample`` questions (every ``--eval-every`` steps and
    at each epoch's end), and the ``--report-to`` tracker."""

    def __init__(self, run: Run, progress: bool | None) -> None:
        cfg = run.cfg
        self.run, self.progress = run, progress
        self.every = cfg.eval_every
        self.columns = step_columns(cfg)
        self.per_epoch = math.ceil(len(run.train_enc) / (cfg.batch_size * run.dist.world))
        self.kl: float | None = None
        self._seconds = 0.0
        self.samples: dict[str, list[Any]] = {}
        self.sample_index: dict[str, list[int]] = {}  # positions of the samples in their sets
        self._last: dict[str, Any] | None = None  # the epoch's last step, completed by the full evaluation
        if cfg.eval_sample:
            rng = random.Random(cfg.seed)
            for role, name in (("learn", run.roles.learn), ("forget", run.roles.forget)):
                enc = run.encoded[name]
                keep = sorted(rng.sample(range(len(enc)), min(cfg.eval_sample, len(enc))))
                self.samples[role] = [enc[i] for i in keep]
                self.sample_index[role] = keep
            run.info["eval_sample"] = {role: len(v) for role, v in self.samples.items()}
        from .tracking import Tracker, open_tracker

        main = run.dist.is_main
        resume_step = len(run.rows) * self.per_epoch + 1 if run.rows else None
        self.tracker = (
            open_tracker(cfg.report_to, run.rundir.root, run.plan.resolved, resume_step=resume_step)
            if main
            else Tracker()
        )
        if main:
            run.rundir.start_steps(self.columns, len(run.rows))

    def begin(self) -> None:
        """A fresh run's step 0 (with ``--eval-every``): the KL (0) and the counts before any update."""
        if self.every and not self.run.rows:
            self._write({"step": 0, "epoch": 0, **self.measure()})

    def step(self, epoch: int, i: int, steps: int, loss: float, masked: float) -> None:
        """After the update of step ``i`` (of ``steps``) of ``epoch``."""
        g = (epoch - 1) * self.per_epoch + i
        lr = self.run.optimizer.param_groups[0]["lr"]
        row = {"step": g, "epoch": epoch, "loss": round(loss, 6), "masked_fraction": round(masked, 6), "lr": lr}
        self.tracker.log({"train/loss": loss, "train/masked_fraction": masked, "train/lr": lr}, g)
        if i == steps:  # the epoch's evaluation follows: its predictions give the sample counts
            row.update(self.measure(samples=False))
            self.kl = row.get("kl_drift")
            self._last = row
            return
        if self.every and g % self.every == 0:
            row.update(self.measure())
        self._write(row)

    def measure(self, samples: bool = True) -> dict[str, Any]:
        """The KL drift of the probe and (``samples``) the counts on the samples, now (their time counts as
        evaluation)."""
        run, out = self.run, {}
        t0 = time.perf_counter()
        if run.probe is not None:
            out["kl_drift"] = round(run.probe.kl(run.model), 8)
        if samples and self.samples:
            preds = evaluate(run.model, self.samples, desc="sample", **_eval_settings(run, False))
            out["learned_sample"] = preds["learn"].n_correct
            out["forgotten_sample"] = len(self.samples["forget"]) - preds["forget"].n_correct
        self._seconds += time.perf_counter() - t0
        return out

    def pop_seconds(self) -> float:
        """Seconds spent measuring since the previous call."""
        s, self._seconds = self._seconds, 0.0
        return s

    def epoch_end(self, row: dict[str, Any], preds: dict[str, Predictions]) -> None:
        """Write the epoch's last step (its sample counts taken from the epoch's full predictions ``preds``, the
        same questions at the same weights) and send the summary row to the tracker."""
        roles = self.run.roles
        if self._last is not None:
            if self.samples:
                learn, forget = preds[roles.learn].correct, preds[roles.forget].correct
                self._last["learned_sample"] = sum(bool(learn[i]) for i in self.sample_index["learn"])
                self._last["forgotten_sample"] = sum(not forget[i] for i in self.sample_index["forget"])
            self._write(self._last)
            self._last = None
        values = {
            "epoch/learned": row[roles.learn_column],
            "epoch/forgotten": row[roles.forget_column],
            "epoch/train_avg_loss": row["train_avg_loss"],
            "epoch/masked_fraction": row["masked_fraction"],
            **{f"epoch/{k}": row[k] for k in ("kl_drift", "general_accuracy") if k in row},
        }
        self.tracker.log(values, row["epoch"] * self.per_epoch)

    def _write(self, row: dict[str, Any]) -> None:
        if not self.run.dist.is_main:
            return
        self.run.rundir.append_step(self.columns, row)
        measured = {f"steps/{k}": row[k] for k in ("kl_drift", "learned_sample", "forgotten_sample") if k in row}
        if measured:
            self.tracker.log(measured, row["step"])

    def close(self) -> None:
        self.tracker.close()


@contextlib.contextmanager
def _disk_full_message(what: str, kept: str, checkpoint: bool = False) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``what`` into a TrainingError that says what is kept, whether
    it surfaces as an OSError or as a library's own error (safetensors reports the OS error in its text)."""
    try:
        yield
    except Exception as e:
        if not _disk_full(e):
            raise
        hint = (
            "; free some space and --resume, or train without checkpoints (--no-checkpoint)"
            if checkpoint
            else "; free some space and --resume"
        )
        raise TrainingError(f"the disk is full while writing {what}: {kept}{hint}") from None


def _disk_full(e: BaseException) -> bool:
    """Whether ``e`` says that the disk (or the quota) is full."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28"))


# ================================================================================== 4. the end
def _fail(run: Run, e: BaseException) -> None:
    """Record how the run stopped in run.json (finished epochs and their checkpoint stay), then re-raise."""
    status = "interrupted" if isinstance(e, KeyboardInterrupt | Terminated) else "failed"
    if isinstance(e, torch.OutOfMemoryError):
        e = TrainingError(
            f"out of memory in epoch {run.info['epochs_done'] + 1}: lower --ref-batch-size or "
            "--eval-batch-size, or use --ref-chunks 2 (or more); finished epochs are kept"
        )
    elif isinstance(e, TrainingError):
        e = TrainingError(f"{e}. Finished epochs are kept in {run.rundir.root}")
    run.info["status"] = status
    run.info["error"] = f"{type(e).__name__}: {e}"
    if run.plan.dist.is_main:
        run.rundir.write_info(run.info)
    log.error(run.info["error"])
    if isinstance(e, TrainingError):
        raise e from None
    raise e


def _finish(run: Run) -> None:
    """Save the model (``--save-model``: the weights the method evaluates), the method's state for the next round
    (``cnl continual``), remove the checkpoint (unless kept) and record ``finished``."""
    dist = run.plan.dist
    if run.plan.link is not None:
        with run.optimizer.paused():
            carry = run.plan.method.round_end(run)
        if carry and dist.is_main:
            run.rundir.save_carry(carry)
    if run.cfg.save_model:
        kept = "every epoch's results and the last checkpoint are kept"
        with _disk_full_message(f"the model to {run.rundir.model}", kept), run.plan.method.evaluation_weights(run):
            if dist.enabled:  # one Hugging Face model, gathered from the shards onto rank 0
                from .distributed import full_state_dict

                state = full_state_dict(run.model)
                if dist.is_main:
                    run.rundir.save_model(run.model, run.tokenizer, state_dict=state)
                dist.barrier()
            else:
                run.rundir.save_model(run.model, run.tokenizer)
        run.say(f"model saved to {run.rundir.model}")
    if dist.is_main:
        if not run.cfg.keep_checkpoint:
            run.rundir.remove_checkpoints()
        run.info["status"] = "finished"
        run.rundir.write_info(run.info)
    dist.barrier()
