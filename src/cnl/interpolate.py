"""``cnl interpolate``: WiSE-FT points of a finished run, θ = (1 − α) θ₀ + α θ_ft, at no training cost.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") mixes the fine-tuned weights θ_ft
with the start weights θ₀. For a finished run of a full-weight method (``ft``, ``cnl``, ``mofo``, ``hft``,
``ewc``, ``l2``, ...) and each α, :func:`interpolate_run` evaluates the mixture on the run's learning and
forgetting sets (and its ``--general`` set) exactly as the run evaluated its epochs (:func:`cnl.train.evaluate`
with the run's scoring options), and writes the point as a run directory of its own,
``RUN/wise/alpha_<α>/`` (:meth:`cnl.rundir.RunDir.wise_point`): run.json (method ``wise``, ``alpha``, the
source run), summary.csv with one row (the final epoch's number), predictions/. ``cnl report RUN`` finds
the points and draws the run's WiSE curve.

- θ_ft: the run's saved model (``model/``, ``--save-model``), else its kept last checkpoint
  (``--keep-checkpoint``; one process only).
- θ₀: the model the run started from, loaded as the run loaded it (run.json's ``model_source`` and the
  recorded model options: the embedded GGUF, a directory, a hub id; a ``cnl continual`` round's start is
  the previous round's saved model).
- α = 1 gives the run's final weights, so its counts and predictions are the final epoch's exactly;
  α = 0 gives the untrained model's.

Every check (the α, the run, its weights, its sets, its start model) comes before any model work; points
already written for the same final epoch are skipped (rerun to continue); each point is built aside and
moved into place (:func:`cnl.io.atomic_dir`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig, ModelConfig, TrainConfig
from .errors import CnlError
from .io import atomic_dir, locked_output, remove_atomic_leftovers
from .rundir import RunDir, RunDirError
from .train import GENERAL

__all__ = ["DEFAULT_ALPHAS", "NotInterpolable", "Source", "parse_alphas", "check_source", "interpolate_run"]

#: ``--alphas`` when none are given: the untrained model and three mixtures (α = 1 is the run's final epoch).
DEFAULT_ALPHAS = "0,0.25,0.5,0.75"


class NotInterpolable(CnlError):
    """A run whose weights WiSE-FT cannot mix: an adapter, a wise run, a point, or no final weights kept."""


# ------------------------------------------------------------------------------------------ the α
def parse_alphas(text: str | Sequence[float], flag: str = "--alphas") -> list[float]:
    """``"0.25,0.5,0.75"`` (or numbers) as a list of α, each in [0, 1] and given once, in the order given (errors
    name ``flag``)."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    alphas: list[float] = []
    for p in parts:
        if p == "":
            continue
        try:
            a = float(p)
        except (TypeError, ValueError):
            raise CnlError(
                f"{flag}: {p!r} is not a number (give mixing weights in [0, 1], e.g. 0.25,0.5,0.75)"
            ) from None
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise CnlError(f"{flag}: {p} is outside [0, 1] (α = 0: the start weights, α = 1: the run's final ones)")
        if a in alphas:
            raise CnlError(f"{flag} names {a:g} twice")
        alphas.append(a)
    if not alphas:
        raise CnlError(f"{flag} names no mixing weight (e.g. 0.25,0.5,0.75)")
    return alphas


# ------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Source:
    """A finished full-weight run, checked: what interpolating it needs."""

    rundir: RunDir
    info: dict[str, Any]
    cfg: TrainConfig
    data: DataConfig
    model_cfg: ModelConfig
    #: The final epoch (the weights θ_ft are its).
    epoch: int
    #: Where θ_ft comes from: ``model`` (``model/``) or ``checkpoint`` (the kept last checkpoint).
    weights: str
    #: The learning and forgetting sets' files by set name (None: the run was given no such set).
    files: dict[str, Path | None]

    @property
    def root(self) -> Path:
        return self.rundir.root


def check_source(run_dir: str | Path, *, device: str | None = None) -> Source:
    """Everything that makes ``run_dir`` impossible to interpolate, before any model work: not a run, not
    finished, LoRA or another adapter, a wise run or a point, no final weights kept, changed set files, a
    start model that cannot be found. ``device``: evaluate there instead of the run's device."""
    from .models import DEFAULT_MODEL, resolve_device, resolve_model_source
    from .resolve import train_config

    rundir = RunDir(run_dir)
    info = rundir.read_info()
    root = rundir.root
    if "source_run" in info:
        raise NotInterpolable(f"{root} is a WiSE point written by cnl interpolate, not a training run")
    method = info.get("method")
    if method == "wise":
        raise NotInterpolable(
            f"{root} is a wise run: it already evaluates (1 − α) θ₀ + α θ (--wise-alpha) and saved that model; "
            "interpolate an ft run instead"
        )
    adapter = (rundir.model / "adapter_config.json").is_file()
    if method == "lora" or adapter:
        raise NotInterpolable(
            f"{root} is a {'LoRA' if method == 'lora' else 'adapter'} run: WiSE-FT mixes full weights, and its "
            "weights are an adapter on the base model; interpolate runs of full-weight methods (ft, cnl, ...)"
        )
    status = rundir.live_status(info)
    if status != "finished":
        done, planned = info.get("epochs_done", 0), info.get("epochs")
        raise CnlError(
            f"{root} has not finished (status {status}, {done} of {planned} epochs): finish it first "
            f"(cnl train ... --out {root} --resume), then interpolate its final weights"
        )
    rows = rundir.read_summary()
    if not rows:
        raise CnlError(f"{root}: summary.csv has no finished epoch")
    epoch = int(rows[-1]["epoch"])
    if (rundir.model / "config.json").is_file():
        weights = "model"
    elif rundir.has_checkpoint():
        if int(info.get("world_size", 1)) > 1:
            raise NotInterpolable(
                f"{root} kept only its checkpoint, sharded over {info['world_size']} processes (torchrun); "
                "train it with --save-model to interpolate it"
            )
        weights = "checkpoint"
    else:
        raise NotInterpolable(
            f"{root} kept neither its model (model/) nor its last checkpoint: train it with --save-model "
            "(or --keep-checkpoint) to interpolate it"
        )
    config = info.get("config") or {}
    try:
        cfg = train_config(**(config.get("train") or {}))
        data = DataConfig(**(config.get("data") or {}))
        model_cfg = ModelConfig(**(config.get("model") or {}))
    except (CnlError, TypeError) as e:
        raise RunDirError(f"{rundir.run_json}: damaged, its recorded configuration cannot be read ({e})") from None
    # the start weights as the run loaded them: its resolved model (absolute path, hub id), else the embedded one
    start = info.get("model_source") or model_cfg.model
    if start is None and info.get("model") not in (None, DEFAULT_MODEL):
        raise CnlError(
            f"{root} was trained on a model given in memory ({info.get('model')!r}), not loaded from a --model: "
            "its start weights cannot be loaded again"
        )
    model_cfg = dataclasses.replace(model_cfg, model=start, device=device or model_cfg.device)
    try:
        resolve_model_source(start)
        resolve_device(model_cfg.device)
    except CnlError as e:
        raise CnlError(f"{root}: cannot load the model it started from ({start or DEFAULT_MODEL}): {e}") from None
    files: dict[str, Path | None] = {}
    for name in (info["learn_set"], info["forget_set"]):
        meta = (info.get("sets") or {}).get(name) or {}
        if meta.get("file") is None and meta.get("count") == 0:
            files[name] = None  # no such set was given (forgetting counted on an empty set)
        else:
            files.update(rundir.verify_sets(info, [name]))
    return Source(rundir, info, cfg, data, model_cfg, epoch, weights, files)


def _is_done(point: RunDir, alpha: float, src: Source) -> bool:
    """Whether ``point`` holds this α's finished point of the run's current final epoch."""
    if not point.run_json.is_file():
        return False
    try:
        info = point.read_info()
    except RunDirError:
        return False
    return info.get("status") == "finished" and info.get("alpha") == alpha and info.get("source_epoch") == src.epoch


def _final_weights(src: Source) -> dict[str, torch.Tensor]:
    """θ_ft by parameter name: the saved model's tensors, or the kept checkpoint's trainable weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    rundir = src.rundir
    if src.weights == "model":
        files = sorted(rundir.model.glob("*.safetensors"))
        if not files:
            raise RunDirError(f"{rundir.model}: no safetensors weights")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                out.update(load_file(str(f)))
            except (OSError, SafetensorError) as e:
                raise RunDirError(f"{f}: damaged ({e})") from None
        return out
    loaded = rundir.load_checkpoint()
    assert loaded is not None  # check_source saw it
    meta, state = loaded
    if int(meta.get("epoch", -1)) != src.epoch:
        raise RunDirError(
            f"{rundir.checkpoints}: the kept checkpoint is of epoch {meta.get('epoch')}, the run's final epoch is "
            f"{src.epoch}; train with --save-model"
        )
    weights = state.get("weights")
    if not isinstance(weights, dict):
        raise RunDirError(f"{rundir.checkpoints}: damaged checkpoint (no weights)")
    return weights


def _match(params: dict[str, torch.nn.Parameter], final: dict[str, torch.Tensor], src: Source) -> list[str]:
    """The parameters θ_ft holds (checked against the start model's names and shapes); the others are θ₀."""
    where = src.rundir.model if src.weights == "model" else src.rundir.checkpoints
    if src.weights == "checkpoint":
        extra = sorted(set(final) - set(params))
        if extra:
            raise NotInterpolable(
                f"{where}: holds weights the start model does not have ({', '.join(extra[:3])}): an adapter, not "
                "full weights; WiSE-FT mixes full weights"
            )
    else:
        missing = sorted(set(params) - set(final))
        if missing:
            raise RunDirError(f"{where}: lacks weights of the start model ({', '.join(missing[:3])})")
    names = [n for n in params if n in final]
    for n in names:
        if tuple(final[n].shape) != tuple(params[n].shape):
            raise RunDirError(
                f"{where}: tensor {n} is {list(final[n].shape)}, the start model's {list(params[n].shape)}; "
                "not this run's start model"
            )
    return names


def _read_sets(src: Source) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """The sets to evaluate (the learning and forgetting sets, and the general set) with their sources."""
    from .data import read_jsonl, resolve_general

    sets: dict[str, list[Any]] = {}
    sources: dict[str, str] = {}
    for name, path in src.files.items():
        sets[name] = [] if path is None else read_jsonl(path, fmt=src.data.format, allow_empty=True)
        sources[name] = str(path) if path is not None else name
    general = (src.info.get("sets") or {}).get(GENERAL)
    if general is not None:
        rows, tag = resolve_general(general["spec"])
        if tag != general.get("tag") or len(rows) != general.get("count"):
            raise CnlError(
                f"{src.root}: its general set {general['spec']} is not what the run evaluated any more "
                f"({len(rows)} questions of {tag}; the run had {general.get('count')} of {general.get('tag')})"
            )
        sets[GENERAL], sources[GENERAL] = rows, general["spec"]
    return sets, sources


# ------------------------------------------------------------------------------------------ the points
def interpolate_run(
    run_dir: str | Path,
    alphas: str | Sequence[float],
    *,
    device: str | None = None,
    say: Callable[[str], None] = print,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Write the WiSE-FT point of ``run_dir`` for each α (skipping those already written); return one dict per
    α: ``alpha``, ``path``, the learned and forgotten counts, ``general_accuracy`` (or None), ``skipped``."""
    alphas = parse_alphas(alphas)
    src = check_source(run_dir, device=device)
    with locked_output(src.root, "cnl interpolate"):  # nothing trains into the run meanwhile
        src = check_source(run_dir, device=device)
        learn, forget = src.info["learn_set"], src.info["forget_set"]
        results: dict[float, dict[str, Any]] = {}
        todo = []
        for a in alphas:
            point = RunDir(src.rundir.wise_point(a))
            if _is_done(point, a, src):
                row = point.read_summary()[-1]
                roles = src.info["roles"]
                results[a] = _result(a, point.root, row[roles["learn_column"]], row[roles["forget_column"]], row, True)
                say(f"α={a:g}: written before ({point.root}); skipped")
            else:
                todo.append(a)
        if todo:
            _evaluate_points(src, todo, learn, forget, results, say, progress)
    return [results[a] for a in alphas]


def _result(alpha: float, path: Path, learned: int, forgotten: int, row: dict[str, Any], skipped: bool) -> dict:
    return {
        "alpha": alpha,
        "path": str(path),
        "learned": learned,
        "forgotten": forgotten,
        "general_accuracy": row.get("general_accuracy"),
        "skipped": skipped,
    }


def _evaluate_points(
    src: Source,
    alphas: list[float],
    learn: str,
    forget: str,
    results: dict[float, dict[str, Any]],
    say: Callable[[str], None],
    progress: bool | None,
) -> None:
    """Load θ_ft, then θ₀ with the sets encoded for it; for each α mix, evaluate and write the point."""
    from .loading import load_for_sets
    from .methods.wise import mix
    from .scoring import PromptEncoder
    from .train import evaluate

    cfg, info = src.cfg, src.info
    sets, sources = _read_sets(src)
    final = _final_weights(src)
    loaded = load_for_sets(
        src.model_cfg,
        sets,
        sources=sources,
        skip_long=src.data.skip_long_prompts,
        answer_loss_end=cfg.answer_loss_end,
    )
    model, rows = loaded.model, loaded.sets.rows
    for name, total in ((learn, info["learn_total"]), (forget, info["forget_total"])):
        if len(rows[name]) != total:
            raise CnlError(
                f"{src.root}: {len(rows[name])} questions of {name} can be evaluated, the run evaluated {total}"
            )
    params = dict(model.named_parameters())
    names = _match(params, final, src)
    start = {n: params[n].detach().to("cpu", copy=True) for n in names}  # θ₀ (the others stay θ₀ throughout)
    settings = {
        "batch_size": cfg.eval_batch_size,
        "pad_id": PromptEncoder(loaded.tokenizer).pad_id,
        "progress": progress,
        "tokenizer": loaded.tokenizer,
        "score": cfg.score,
        "max_new_tokens": cfg.max_new_tokens,
    }
    evaluated = [learn, forget, *([GENERAL] if GENERAL in rows else [])]
    roles = info["roles"]
    lc, fc = roles["learn_column"], roles["forget_column"]
    columns = ["epoch", lc, fc, *(["general_accuracy"] if GENERAL in rows else []), "eval_seconds"]
    say(
        f"{src.root}: {info['method']}/{info['optimizer']}, final epoch {src.epoch} from {src.weights}/, start "
        f"{loaded.tag}; WiSE points α = {', '.join(f'{a:g}' for a in alphas)}"
    )
    for a in alphas:
        t0 = time.perf_counter()
        with torch.no_grad():
            for n in names:
                p = params[n]
                p.copy_(mix(start[n], final[n], a))
        preds = evaluate(model, {n: loaded.sets.encoded[n] for n in evaluated}, desc=f"α={a:g} eval", **settings)
        seconds = time.perf_counter() - t0
        learned = preds[learn].n_correct
        forgotten = len(rows[forget]) - preds[forget].n_correct
        row: dict[str, Any] = {"epoch": src.epoch, lc: learned, fc: forgotten}
        if GENERAL in preds:
            row["general_accuracy"] = round(preds[GENERAL].n_correct / len(rows[GENERAL]), 6)
        row["eval_seconds"] = round(seconds, 3)
        point = src.rundir.wise_point(a)
        remove_atomic_leftovers(point)  # of a killed earlier try (the run's lock is held)
        with atomic_dir(point) as tmp:
            out = RunDir(tmp)
            for name in (learn, forget):
                out.write_predictions(src.epoch, name, rows[name], preds[name])
            out.write_summary(columns, [row])
            out.write_info(_point_info(src, a, columns))
        results[a] = _result(a, point, learned, forgotten, row, False)
        general = f", general {row['general_accuracy']:.1%}" if "general_accuracy" in row else ""
        say(
            f"α={a:g}: learned {learned}/{len(rows[learn])}, forgotten {forgotten}/{len(rows[forget])}{general} "
            f"({seconds:.1f}s) -> {point}"
        )


def _point_info(src: Source, alpha: float, columns: list[str]) -> dict[str, Any]:
    """The point's run.json: what ``cnl report`` reads of any run, and where the point comes from."""
    info = src.info
    keep = ("optimizer", "setting", "model", "model_source", "lr", "roles", "sets", "learn_set", "forget_set",
            "learn_total", "forget_total", "skipped_long_prompts", "general_accuracy_before", "config")  # fmt: skip
    return {
        "method": "wise",
        "alpha": alpha,
        "source_run": str(src.root.resolve()),
        "source_method": info["method"],
        "source_epoch": src.epoch,
        "source_weights": src.weights,
        **{k: info[k] for k in keep if k in info},
        "device": src.model_cfg.device,
        "columns": columns,
        "status": "finished",
        "epochs": 1,
        "epochs_done": 1,
    }
