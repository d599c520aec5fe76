"""``cnl train``: one training loop for every method, optimizer and setting of SPEC §4.

Read it top to bottom: :func:`train` resolves the configuration and the sets, validates everything,
loads the model, then runs the epochs. Per epoch:

1. reference (CNL only): sign of the mean gradient over the reference set, at the current weights;
2. one update per training question, in file order, batch size 1 (SPEC): the update is applied
   during the backward pass (see :mod:`cnl.optim`), masked by the reference for CNL;
3. evaluation: predictions on the learning and forgetting sets, written per epoch, one row appended
   to ``summary.csv``, then an atomic checkpoint, so a killed run resumes after its last finished
   epoch with identical numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .config import METHODS, SETTINGS, DataConfig, ModelConfig, TrainConfig, to_dict
from .data import MCRow, read_mc_jsonl
from .errors import CnlError, ConfigError
from .io import atomic_save, atomic_write_csv, atomic_write_json, atomic_write_jsonl, atomic_write_text
from .optim import OPTIMIZERS, ParameterUpdater, make_rule, sparse_embedding_grads
from .reference import reference_sign
from .scoring import Encoded, PromptEncoder, batch_losses, predict
from .sets import SetRoles, resolve_set_files, roles_for

__all__ = ["TrainingError", "RunPaths", "validate_train_config", "train", "summary_columns"]

log = logging.getLogger("cnl.train")


class TrainingError(CnlError):
    """Training had to stop (e.g. a non-finite loss); finished epochs are kept."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of a run directory."""

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoint"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def prediction_file(self, epoch: int, set_name: str) -> Path:
        return self.predictions / f"epoch_{epoch:03d}_{set_name}.jsonl"


def summary_columns(roles: SetRoles) -> list[str]:
    """SPEC's columns for the setting, then masked fraction and seconds per phase."""
    return [
        "epoch",
        "train_avg_loss",
        roles.learn_column,
        roles.forget_column,
        "masked_fraction",
        "reference_seconds",
        "train_seconds",
        "eval_seconds",
        "epoch_seconds",
    ]


def validate_train_config(cfg: TrainConfig) -> None:
    """Reject impossible values before any work."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r} (choose from {', '.join(METHODS)})")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r} (choose from {', '.join(OPTIMIZERS)})")
    if cfg.setting not in SETTINGS:
        raise ConfigError(f"unknown setting {cfg.setting!r} (choose from {', '.join(SETTINGS)})")
    if cfg.setting == "replay" and cfg.method != "replay":
        raise ConfigError("the replay setting goes with --method replay")
    if cfg.method == "replay" and cfg.setting not in ("in-set", "replay"):
        raise ConfigError(
            f"--method replay has its own setting (train I + M1, forgetting on M2); drop --setting {cfg.setting}"
        )
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
    if cfg.method == "replay" and cfg.optimizer != "sgd":
        raise ConfigError("replay is plain SGD in SPEC §4; use --optimizer sgd")
    if cfg.method == "lora" and cfg.optimizer == "adam":
        raise ConfigError("lora supports sgd, momentum and adamw (SPEC §4)")
    for name in ("ref_batch_size", "eval_batch_size", "ref_chunks", "lora_r"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.sign_storage not in ("bits", "int8"):
        raise ConfigError(f"sign_storage must be bits or int8, got {cfg.sign_storage!r}")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _setup_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


# ------------------------------------------------------------------------------------ checkpoints
def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_checkpoint(
    paths: RunPaths, epoch: int, model: torch.nn.Module, updater: ParameterUpdater, state: dict[str, Any]
) -> None:
    """Write epoch ``epoch``'s checkpoint into a fresh folder, then point ``latest.json`` at it.

    The pointer is written atomically after every file of the folder is complete, so a kill at any
    moment leaves the previous checkpoint valid; older folders are removed only afterwards.
    """
    from safetensors.torch import save_file

    root = paths.checkpoints
    folder = root / f"epoch_{epoch:03d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    weights = {n: p.detach().to("cpu").contiguous() for n, p in _trainable(model)}
    atomic_save(folder / "weights.safetensors", lambda tmp: save_file(weights, tmp))
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }
    atomic_save(folder / "optimizer.pt", lambda tmp: torch.save({"rule": updater.rule.state_dict(), "rng": rng}, tmp))
    atomic_write_json(folder / "state.json", state)
    atomic_write_json(root / "latest.json", {"epoch": epoch, "folder": folder.name})
    for old in root.iterdir():
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(paths: RunPaths, model: torch.nn.Module, updater: ParameterUpdater) -> dict[str, Any] | None:
    """Restore the latest complete checkpoint; return its state (None when there is none)."""
    from safetensors.torch import load_file

    pointer = paths.checkpoints / "latest.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    folder = paths.checkpoints / info["folder"]
    weights = load_file(str(folder / "weights.safetensors"))
    params = dict(_trainable(model))
    if set(weights) != set(params):
        raise TrainingError(f"{folder}: checkpoint does not match the model's trainable parameters")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    device = next(model.parameters()).device
    updater.rule.load_state_dict(extra["rule"], device)
    torch.set_rng_state(extra["rng"]["torch"])
    if extra["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    random.setstate(extra["rng"]["python"])
    return json.loads((folder / "state.json").read_text())


# ------------------------------------------------------------------------------------ helpers
def _write_summary(paths: RunPaths, columns: list[str], rows: list[dict[str, Any]]) -> None:
    atomic_write_csv(paths.summary, columns, [[r[c] for c in columns] for r in rows])


def _write_predictions(path: Path, rows: Sequence[MCRow], letters: Sequence[str]) -> None:
    atomic_write_jsonl(
        path,
        ({"label": r.label, "predict_label": x, "question": r.question} for r, x in zip(rows, letters, strict=True)),
    )


def _wrap_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"lora_targets {missing} are not module names of this model")
    lcfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def _fmt_seconds(s: float) -> str:
    return f"{s:.1f}s"


# ------------------------------------------------------------------------------------ the recipe
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
) -> list[dict[str, Any]]:
    """Run (or resume) one training run into ``out_dir``; return the summary rows.

    ``model``/``tokenizer`` may be given directly (tests, notebooks); otherwise ``model_cfg`` loads
    them. Everything that can be checked is checked before the model is loaded.
    """
    # ---- 1. validate configuration, sets and run directory (cheap, before any model work)
    validate_train_config(cfg)
    roles = roles_for(cfg.setting, cfg.method)
    files = resolve_set_files(data, roles)
    sets: dict[str, list[MCRow]] = {name: read_mc_jsonl(path, allow_empty=True) for name, path in files.items()}
    if roles.reference is not None and not sets[roles.reference]:
        raise ConfigError(
            f"the reference set {roles.reference} ({files[roles.reference]}) is empty: CNL needs mastered "
            "questions for its reference gradient (the model answered none of them correctly)"
        )
    for name in roles.train:
        if not sets[name]:
            raise ConfigError(f"the training set {name} ({files[name]}) is empty: nothing to inject")

    paths = RunPaths(Path(out_dir))
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"{paths.root} exists and is not a directory; choose another --out")
    resolved = {
        "train": to_dict(cfg),
        "data": {k: (str(v) if v is not None else None) for k, v in to_dict(data).items()},
        "model": to_dict(model_cfg),
    }
    set_info = {
        name: {"file": str(path.resolve()), "sha256": _file_digest(path), "count": len(sets[name])}
        for name, path in files.items()
    }
    if paths.run_json.exists():
        previous = json.loads(paths.run_json.read_text())
        if not resume:
            raise ConfigError(
                f"{paths.root} already holds a run ({previous.get('method')}/{previous.get('optimizer')}, "
                f"status {previous.get('status')}); use --resume to continue it or choose another --out"
            )
        _check_resumable(previous, resolved, set_info)
        done = previous.get("epochs_done", 0)
        if previous.get("status") == "finished" and done >= cfg.epochs:
            if echo:
                print(f"{paths.root}: run already finished ({done} epochs); nothing to do")
            return _read_summary_rows(paths)
        if done and not (paths.checkpoints / "latest.json").exists():
            raise ConfigError(
                f"{paths.root}: {done} epoch(s) finished but no checkpoint is left to continue from (checkpoints "
                "are removed when a run finishes, unless --keep-checkpoint); start a new run in another --out"
            )
    paths.root.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(paths.log)
    try:
        return _run(
            cfg,
            roles,
            sets,
            set_info,
            resolved,
            paths,
            model,
            tokenizer,
            model_cfg,
            model_tag,
            resume,
            progress,
            echo,
        )
    finally:
        log.removeHandler(handler)
        handler.close()


def _check_resumable(previous: dict[str, Any], resolved: dict[str, Any], set_info: dict[str, Any]) -> None:
    """A resumed run must have the same configuration (epochs may grow) and the same sets."""
    old_train = dict(previous["config"]["train"])
    new_train = dict(resolved["train"])
    for d in (old_train, new_train):
        # options that change neither the numbers nor the run's identity may differ on resume
        for k in (
            "epochs",
            "save_model",
            "keep_checkpoint",
            "checkpoint",
            "eval_batch_size",
            "ref_batch_size",
            "ref_chunks",
            "sign_storage",
            "update_in_backward",
        ):
            d.pop(k, None)
    diff = sorted(k for k in new_train if old_train.get(k) != new_train[k])
    if diff:
        raise ConfigError(
            "--resume with a different configuration: "
            + ", ".join(f"{k} was {old_train.get(k)!r}, now {new_train[k]!r}" for k in diff)
        )
    old_sets = {k: v["sha256"] for k, v in previous["sets"].items()}
    new_sets = {k: v["sha256"] for k, v in set_info.items()}
    if old_sets != new_sets:
        raise ConfigError("--resume with different set files than the run was started with")
    # The checkpoint holds only the trainable weights (LoRA: the adapters), so a different base model
    # or dtype would silently continue on other weights. The device may change.
    old_model = previous["config"].get("model") or {}
    new_model = resolved["model"]
    mdiff = [k for k in ("model", "dtype") if not _same_model_value(k, old_model.get(k), new_model.get(k))]
    if mdiff:
        raise ConfigError(
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


def _read_summary_rows(paths: RunPaths) -> list[dict[str, Any]]:
    import csv

    if not paths.summary.exists():
        return []
    with open(paths.summary, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _run(
    cfg: TrainConfig,
    roles: SetRoles,
    sets: dict[str, list[MCRow]],
    set_info: dict[str, Any],
    resolved: dict[str, Any],
    paths: RunPaths,
    model: torch.nn.Module | None,
    tokenizer: Any,
    model_cfg: ModelConfig,
    model_tag: str | None,
    resume: bool,
    progress: bool | None,
    echo: bool,
) -> list[dict[str, Any]]:
    def say(msg: str) -> None:
        log.info(msg)
        if echo:
            tqdm.write(msg, file=sys.stdout)

    # ---- 2. model
    if model_cfg.dtype != "float32":
        say(
            f"note: training in {model_cfg.dtype}; SPEC trains in float32, and updates at small learning rates "
            "can vanish below the precision of 16-bit weights"
        )
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if model is None:
        from .models import load_from_config

        def check(tok: Any) -> None:  # no chat template / ambiguous letters: fail before the weights load
            PromptEncoder(tok).check([r for rows in sets.values() for r in rows])

        model, tokenizer, source = load_from_config(model_cfg, check_tokenizer=check)
        model_tag = source.tag
        model_source = None if source.kind == "embedded" else source.path_or_id
    else:
        model_source = model_cfg.model
    if model_source is not None and Path(model_source).exists():
        model_source = str(Path(model_source).resolve())  # analyses find the base model from anywhere
    assert tokenizer is not None
    if cfg.method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        model = _wrap_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- 3. encode every set once
    encoder = PromptEncoder(tokenizer)
    enc: dict[str, list[Encoded]] = {name: encoder.encode_all(rows) for name, rows in sets.items()}
    train_rows: list[MCRow] = [r for name in roles.train for r in sets[name]]
    train_enc: list[Encoded] = [e for name in roles.train for e in enc[name]]
    if cfg.method == "replay":  # I ∪ M1, shuffled once with a fixed seed (SPEC §4)
        order = list(range(len(train_enc)))
        random.Random(cfg.replay_seed).shuffle(order)
        train_rows = [train_rows[i] for i in order]
        train_enc = [train_enc[i] for i in order]

    # ---- 4. the update rule, applied in the backward pass
    rule = make_rule(
        cfg.optimizer,
        momentum=cfg.momentum,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        eps=cfg.eps,
        adamw_weight_decay=cfg.adamw_weight_decay,
    )
    updater = ParameterUpdater(_trainable(model), rule, cfg.lr)
    columns = summary_columns(roles)
    rows: list[dict[str, Any]] = []
    start_epoch = 1
    if resume:
        state = _load_checkpoint(paths, model, updater)
        if state is not None:
            rows = state["summary"]
            start_epoch = state["epoch"] + 1
            say(f"resuming after epoch {state['epoch']}")
    _write_summary(paths, columns, rows)

    run_info: dict[str, Any] = {
        "method": cfg.method,
        "optimizer": cfg.optimizer,
        "setting": roles.setting,
        "model": model_tag,
        "model_source": model_source,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "roles": dataclasses.asdict(roles),
        "sets": set_info,
        "learn_set": roles.learn,
        "forget_set": roles.forget,
        "learn_total": len(sets[roles.learn]),
        "forget_total": len(sets[roles.forget]),
        "trainable_parameters": updater.n_elements,
        "columns": columns,
        "config": resolved,
        "status": "running",
        "epochs_done": len(rows),
    }
    atomic_write_json(paths.run_json, run_info)
    atomic_write_text(paths.config, yaml.safe_dump(resolved, sort_keys=False))
    say(
        f"{cfg.method}/{cfg.optimizer} {roles.setting}: train on {'+'.join(roles.train)} ({len(train_enc)}), "
        f"learning on {roles.learn} ({len(sets[roles.learn])}), forgetting on {roles.forget} "
        f"({len(sets[roles.forget])}), reference {roles.reference or '-'}, lr {cfg.lr:g}, "
        f"{updater.n_elements / 1e6:.2f}M trainable parameters"
    )

    if cfg.update_in_backward:
        updater.attach()
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            # -- 1. reference gradient sign at the current parameters
            t0 = time.perf_counter()
            if roles.reference is not None:
                updater.enabled = False
                updater.reference = None
                ref, _ = reference_sign(
                    model,
                    enc[roles.reference],
                    [p for _, p in updater.params],
                    batch_size=cfg.ref_batch_size,
                    pad_id=pad_id,
                    storage=cfg.sign_storage,
                    chunks=cfg.ref_chunks,
                    progress=progress,
                )
                updater.reference = ref
                updater.enabled = True
            t_ref = time.perf_counter() - t0

            # -- 2. one masked update per training question, file order, batch size 1
            t0 = time.perf_counter()
            model.train()
            loss_sum = 0.0
            updater.pop_masked()
            bar = tqdm(
                train_enc,
                desc=f"epoch {epoch} train",
                unit="q",
                disable=(progress is False) or None,
                leave=False,
            )
            with sparse_embedding_grads(model, cfg.sparse_embedding_grad and cfg.method != "lora"):
                for i, e in enumerate(bar):
                    loss = batch_losses(model, [e], pad_id)[0]
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        row = train_rows[i]
                        raise TrainingError(
                            f"epoch {epoch}, training sample {i + 1} (line {row.line}): loss is {value}; "
                            f"try a smaller learning rate. Finished epochs are kept in {paths.root}"
                        )
                    loss.backward()
                    if not cfg.update_in_backward:
                        updater.step()
                    loss_sum += value
            bar.close()
            bad = [n for n, p in updater.params if not bool(torch.isfinite(p).all())]
            if bad:  # caught before anything of this epoch is written: the last checkpoint stays good
                raise TrainingError(
                    f"epoch {epoch}: the weights became non-finite ({', '.join(bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}); try a smaller learning rate. "
                    f"Finished epochs are kept in {paths.root}"
                )
            masked = updater.pop_masked()
            masked_fraction = masked / (updater.n_elements * len(train_enc)) if roles.reference else 0.0
            t_train = time.perf_counter() - t0

            # -- 3. evaluation on the learning and forgetting sets
            t0 = time.perf_counter()
            counts: dict[str, int] = {}
            for name in dict.fromkeys((roles.learn, roles.forget)):
                preds = predict(
                    model,
                    enc[name],
                    batch_size=cfg.eval_batch_size,
                    pad_id=pad_id,
                    desc=f"epoch {epoch} eval {name}",
                    progress=progress,
                )
                _write_predictions(paths.prediction_file(epoch, name), sets[name], preds.letters)
                counts[name] = preds.n_correct
            t_eval = time.perf_counter() - t0

            learned = counts[roles.learn]
            forgotten = len(sets[roles.forget]) - counts[roles.forget]
            row = {
                "epoch": epoch,
                "train_avg_loss": round(loss_sum / len(train_enc), 6),
                roles.learn_column: learned,
                roles.forget_column: forgotten,
                "masked_fraction": round(masked_fraction, 6),
                "reference_seconds": round(t_ref, 3),
                "train_seconds": round(t_train, 3),
                "eval_seconds": round(t_eval, 3),
                "epoch_seconds": round(time.perf_counter() - t_epoch, 3),
            }
            rows.append(row)
            if cfg.checkpoint:
                _save_checkpoint(paths, epoch, model, updater, {"epoch": epoch, "summary": rows})
            _write_summary(paths, columns, rows)
            run_info["epochs_done"] = epoch
            atomic_write_json(paths.run_json, run_info)
            say(
                f"epoch {epoch:>3}/{cfg.epochs}  loss {row['train_avg_loss']:.4f}  "
                f"learned {learned}/{len(sets[roles.learn])}  "
                f"forgotten {forgotten}/{len(sets[roles.forget])}  "
                f"masked {masked_fraction:.1%}  ref {_fmt_seconds(t_ref)} train {_fmt_seconds(t_train)} "
                f"eval {_fmt_seconds(t_eval)}"
            )
    except BaseException as e:
        # any stop leaves run.json saying so (finished epochs and their checkpoint are untouched)
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if isinstance(e, torch.OutOfMemoryError):
            e = TrainingError(
                f"out of memory in epoch {run_info['epochs_done'] + 1}: lower --ref-batch-size or "
                "--eval-batch-size, or use --ref-chunks 2 (or more); finished epochs are kept"
            )
        run_info["status"] = status
        run_info["error"] = f"{type(e).__name__}: {e}"
        atomic_write_json(paths.run_json, run_info)
        log.error(run_info["error"])
        if isinstance(e, TrainingError):
            raise e from None
        raise
    finally:
        updater.detach()

    if cfg.save_model:
        _save_model(model, tokenizer, paths.model)
        say(f"model saved to {paths.model}")
    if not cfg.keep_checkpoint:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
    run_info["status"] = "finished"
    atomic_write_json(paths.run_json, run_info)
    return rows


def _save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save in Hugging Face format (safetensors; LoRA: the adapter) atomically as a folder."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
