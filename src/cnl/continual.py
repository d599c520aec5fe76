"""``cnl continual``: knowledge injected round after round, with what is known protected as it grows.

A sequence of rounds, each one a training run of its own (:func:`cnl.train.train`: any method, optimizer
and options) that starts from the previous round's weights and trains on the round's injection set, with
the *protected set* as its reference (CNL's M, A-GEM's memory, EWC's old task, replay's buffer):

- ``--protect learned`` (default): the original M plus every item learned in earlier rounds and still
  answered correctly at the end of the round before;
- ``--protect original``: the original M only;
- ``--protect FILE``: that set, every round.

Every round evaluates every set of the sequence after every epoch (set 0: the original M; set k: round
k's injection set), and the first one before training too, so the run directories hold the whole history:
:func:`ledger` (which item was answered correctly when) and :func:`accuracy_matrix` (R[i][j]: accuracy on set
j after round i, row 0 before training) are read from them, and :func:`metrics` derives average accuracy,
backward transfer and forgetting (docs/continual.md gives the formulas).

Each method's continual form: cnl and agem protect the protected set (reference, memory); replay trains on
I and a buffer, the first half of the protected set (SPEC's halving); ewc is online EWC (the Fisher
accumulated over rounds, :meth:`cnl.methods.ewc.EWC.round_end`); l2 anchors at each round's start, or the
original weights with ``--l2-anchor original``; lora (and cnl-lora) trains a fresh adapter each round, merged
into the weights at the round's end; osf decomposes each round's start weights anew, preserving a share that
grows round by round (:meth:`cnl.methods.base.Method.round_config`); ft, mofo and hft are unchanged per round.

The output directory::

    continual.json      the rounds (files and their digests, options), the protection, the status
    sets/               set_0.jsonl (the original M, when taken from a --start-from run) and cut rounds
    protected/          round_01.jsonl, ...: the protected set each round used
    rounds/01/ ...      each round's run directory (model/ or merged/: its weights, the next round's start)
    ledger.csv          one row per item of every set: answered correctly (1) or not (0) before training and
                        after every epoch of every round
    matrix.json         R, average accuracy, backward transfer, forgetting per round

A killed run continues at its last finished epoch of its current round (``--resume`` of that round's run);
a changed round definition is refused.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import DataConfig, ModelConfig
from .data import DataError, read_jsonl, rows_format, split_halves
from .errors import ConfigError
from .io import atomic_write_json, atomic_write_jsonl, atomic_write_text, file_digest, locked_output
from .resolve import ResolvedConfigs, resolve_configs
from .rundir import RunDir, RunDirError

__all__ = [
    "PROTECT",
    "RoundSpec",
    "ContinualPlan",
    "read_rounds_file",
    "plan_continual",
    "run_continual",
    "accuracy_matrix",
    "ledger",
    "metrics",
    "is_continual",
    "definition_state",
]

#: What the protected set holds (besides a file of its own).
PROTECT = ("learned", "original")
DEFINITION = "continual.json"


@dataclasses.dataclass
class RoundSpec:
    """One round: its injection set, and options of its own (``epochs``, ``lr``, ``method``, ...)."""

    injection: Path
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The rows of a round cut from a larger set (``--split-rounds``), written to ``injection`` once the
    #: output directory is held; None: ``injection`` is the user's file.
    rows: list[Any] | None = None

    def read(self) -> list[Any]:
        """The round's injection rows."""
        return list(self.rows) if self.rows is not None else read_jsonl(self.injection)


@dataclasses.dataclass
class ContinualPlan:
    """A continual run resolved and checked, before any model work."""

    out: Path
    rounds: list[RoundSpec]
    configs: list[ResolvedConfigs]
    set0: Path
    set0_rows: list[Any] | None  # rows to write as sets/set_0.jsonl (taken from a --start-from run), or None
    start_model: str | None
    protect: str
    definition: dict[str, Any]

    @property
    def model(self) -> ModelConfig:
        return self.configs[0].model

    def round_dir(self, k: int) -> Path:
        return self.out / "rounds" / f"{k:02d}"

    def sets(self) -> dict[str, Path]:
        """Every set of the sequence by its name: set_0 (the original M), set_k (round k's injection set)."""
        return {"set_0": self.set0, **{f"set_{k}": r.injection for k, r in enumerate(self.rounds, 1)}}


def is_continual(path: str | Path) -> bool:
    """Whether ``path`` is a ``cnl continual`` output directory."""
    return (Path(path) / DEFINITION).is_file()


# ------------------------------------------------------------------------------------------ the rounds
def read_rounds_file(path: str | Path) -> tuple[Path | None, list[RoundSpec]]:
    """A YAML file of rounds: ``rounds:`` a list of ``{injection: FILE, <option>: value, ...}`` (per-round
    training options: ``epochs``, ``lr``, ``method``, ...), and optionally ``mastered: FILE`` (the original M).
    Relative files are relative to the YAML file's folder."""
    from .io import read_yaml

    p = Path(path)
    raw = read_yaml(p)
    unknown = sorted(set(raw) - {"rounds", "mastered"})
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {unknown} (expected rounds, mastered)")
    items = raw.get("rounds")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{p}: 'rounds' must be a list of rounds, each with its injection file")

    def resolve(value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{p}: {where} must be a file name")
        f = Path(value).expanduser()
        return f if f.is_absolute() else p.parent / f

    rounds = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"injection": item}
        if not isinstance(item, dict) or "injection" not in item:
            raise ConfigError(f"{p}: round {i} must be a mapping with an 'injection' file")
        overrides = {k: v for k, v in item.items() if k != "injection"}
        rounds.append(RoundSpec(resolve(item["injection"], f"round {i}'s injection"), overrides))
    mastered = resolve(raw["mastered"], "'mastered'") if raw.get("mastered") is not None else None
    return mastered, rounds


def _cut(injection: Path, k: int, folder: Path) -> list[RoundSpec]:
    """``injection`` cut into ``k`` rounds in file order (sizes differ by one at most), each to be written
    into ``folder`` when the run starts."""
    rows = read_jsonl(injection)
    if not 1 <= k <= len(rows):
        raise ConfigError(f"--split-rounds {k}: {injection} has {len(rows)} questions; choose 1 to {len(rows)}")
    per, extra = divmod(len(rows), k)
    out, start = [], 0
    for i in range(k):
        n = per + (i < extra)
        out.append(RoundSpec(folder / f"{injection.stem}_round_{i + 1:02d}.jsonl", rows=rows[start : start + n]))
        start += n
    return out


def _start_run_set0(run: Path) -> tuple[str, list[Any]]:
    """A finished run's saved model and what it knows of its learning set (answered correctly at its end)."""
    rd = RunDir(run)
    info = rd.read_info()
    model = rd.model
    if not (model / "config.json").is_file():
        raise ConfigError(f"--start-from {run}: the run saved no full model (train it with --save-model, not LoRA)")
    series = rd.series(info)
    if not series.epochs:
        raise ConfigError(f"--start-from {run}: no finished epoch")
    learn = info["learn_set"]
    (file,) = rd.verify_sets(info, [learn]).values()
    rows = read_jsonl(file)
    _, correct = rd.read_predictions(series.epochs[-1], learn)
    known = [r for r, ok in zip(rows, correct, strict=True) if ok]
    if not known:
        raise ConfigError(f"--start-from {run}: the run answers none of its learning set; nothing to protect")
    return str(model.resolve()), known


def plan_continual(
    *,
    out: str | Path,
    rounds: Sequence[RoundSpec],
    mastered: Path | None = None,
    start_from: Path | None = None,
    protect: str = "learned",
    config_file: Path | None = None,
    preset: str | None = None,
    train: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    strict_flags: bool = True,
) -> ContinualPlan:
    """Resolve and check every round (files, formats, options), the original M and the start, before any work.

    ``start_from``: a run directory (its saved model is the start, and what it answered correctly of its
    learning set the original M unless ``mastered`` is given) or a model (``mastered`` needed). Without
    ``strict_flags`` a method option of another method than the rounds' is ignored (``--methods``).
    """
    out = Path(out)
    if not rounds:
        raise ConfigError(
            "no rounds: give --rounds FILE,FILE,..., --plan ROUNDS.yaml, or --injection with --split-rounds"
        )
    model = dict(model or {})
    set0_rows = None
    start_model = model.get("model")
    if start_from is not None:
        if "model" in model:
            raise ConfigError("give --start-from or --model, not both")
        if (start_from / "run.json").is_file():
            start_model, known = _start_run_set0(start_from)
            if mastered is None:
                set0_rows = known
        elif start_from.exists():
            start_model = str(start_from.resolve())
        else:
            raise ConfigError(f"--start-from {start_from}: neither a run directory nor a model")
        model["model"] = start_model
    if mastered is None and set0_rows is None:
        raise ConfigError("the original mastered set is needed: --mastered FILE, or --start-from RUN_DIR")
    if protect not in PROTECT and not Path(protect).is_file():
        raise ConfigError(f"--protect {protect}: choose {', '.join(PROTECT)}, or an existing set file")
    set0 = out / "sets" / "set_0.jsonl" if set0_rows is not None else Path(mastered)  # type: ignore[arg-type]
    m_rows = set0_rows if set0_rows is not None else read_jsonl(set0)
    fmt = rows_format(m_rows)
    for k, r in enumerate(rounds, 1):
        rows = r.read()  # validated now, with its file and line on any problem
        if rows_format(rows) != fmt:
            raise DataError(f"round {k}'s injection set is {rows_format(rows)}, the original M {fmt}: one format")
    configs = []
    for k, r in enumerate(rounds, 1):
        c = resolve_configs(
            config_file=config_file,
            preset=preset,
            train={**(train or {}), **r.overrides},
            model=model,
            strict_flags=strict_flags,
        )
        from .methods import validate_train_config

        method = validate_train_config(c.train)
        method.round_config(c.train, k)
        if method.resolve_setting(c.train.setting) not in ("in-set", "replay"):
            raise ConfigError(f"round {k}: cnl continual runs the in-set setting (the protected set is M)")
        configs.append(c)
    definition = {
        "set_0": {"file": str(set0.resolve()) if set0_rows is None else "sets/set_0.jsonl",
                  "sha256": file_digest(set0) if set0_rows is None else _rows_sha(set0_rows)},
        "rounds": [
            {
                "injection": str(r.injection.resolve()),
                "sha256": file_digest(r.injection) if r.rows is None else _rows_sha(r.rows),
                "options": r.overrides,
            }
            for r in rounds
        ],
        "protect": protect if protect in PROTECT else {"file": str(Path(protect).resolve()),
                                                       "sha256": file_digest(protect)},
        "start_model": start_model,
        "train": [{k: v for k, v in _train_dict(c).items() if k not in _RESUMABLE} for c in configs],
    }  # fmt: skip
    return ContinualPlan(out, list(rounds), configs, set0, set0_rows, start_model, protect, definition)


def _rows_sha(rows: Sequence[Any]) -> str:
    from .data import rows_digest

    return rows_digest(rows)


def _train_dict(c: ResolvedConfigs) -> dict[str, Any]:
    from .config import to_dict

    return to_dict(c.train)


#: Training options that may change on --resume (they do not change a round's numbers).
_RESUMABLE = ("epochs", "save_model", "keep_checkpoint", "checkpoint", "eval_batch_size", "ref_batch_size")


# ------------------------------------------------------------------------------------------ running
def _protected(plan: ContinualPlan, k: int) -> list[Any]:
    """The protected set of round ``k`` (rows, in order: the original M, then the items of earlier rounds)."""
    if plan.protect not in PROTECT:
        return read_jsonl(plan.protect)
    rows = list(read_jsonl(plan.set0))
    if plan.protect == "original" or k == 1:
        return rows
    prev = RunDir(plan.round_dir(k - 1))
    last = prev.series().epochs[-1]
    for j in range(1, k):
        _, correct = prev.read_predictions(last, f"set_{j}")
        rows += [r for r, ok in zip(plan.rounds[j - 1].read(), correct, strict=True) if ok]
    return rows


def _round_start(plan: ContinualPlan, k: int) -> str | None:
    """The weights round ``k`` starts from: the start (round 1), else the previous round's saved model."""
    if k == 1:
        return plan.start_model
    prev = plan.round_dir(k - 1)
    merged = prev / "merged"
    return str((merged if merged.is_dir() else prev / "model").resolve())


def _merge_lora(round_dir: Path, model_cfg: ModelConfig) -> None:
    """A LoRA round's adapter merged into its start weights: ``merged/``, the next round's start."""
    import torch  # noqa: F401  (transformers and peft load on it)

    from .io import atomic_dir
    from .loading import load_for_sets

    if (round_dir / "merged" / "config.json").is_file():
        return
    loaded = load_for_sets(model_cfg, {}, run_dir=round_dir)
    merged = loaded.model.merge_and_unload()
    with atomic_dir(round_dir / "merged") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)


def _check_definition(plan: ContinualPlan) -> None:
    path = plan.out / DEFINITION
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["definition"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: damaged ({e}); choose another --out") from None
    new = plan.definition
    what = [k for k in new if old.get(k) != new[k]]
    if what:
        raise ConfigError(
            f"{plan.out} holds a continual run with another round definition ({', '.join(what)} differ); "
            "resume it with the same rounds and options, or choose another --out"
        )


def run_continual(
    plan: ContinualPlan,
    *,
    say: Callable[[str], None] = print,
    progress: bool | None = None,
    echo: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every round; write the ledger and the matrix; return :func:`metrics`' content."""
    with locked_output(plan.out, "cnl continual", for_own_steps=True):
        from .io import refuse_foreign_files

        refuse_foreign_files(plan.out, (DEFINITION,), "cnl continual")
        _check_definition(plan)
        if plan.set0_rows is not None:
            atomic_write_jsonl(plan.set0, [r.raw for r in plan.set0_rows])
        for r in plan.rounds:
            if r.rows is not None:
                atomic_write_jsonl(r.injection, [x.raw for x in r.rows])
        state = {"definition": plan.definition, "status": "running", "rounds_done": 0}
        atomic_write_json(plan.out / DEFINITION, state)
        try:
            content = _run_rounds(plan, state, say=say, progress=progress, echo=echo)
        except BaseException as e:
            state["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            state["error"] = f"{type(e).__name__}: {e}"
            atomic_write_json(plan.out / DEFINITION, state)
            raise
        state["status"] = "finished"
        state.pop("error", None)
        atomic_write_json(plan.out / DEFINITION, state)
    return content


def _run_rounds(
    plan: ContinualPlan, state: dict[str, Any], *, say: Callable[[str], None], progress: bool | None, echo: bool
) -> dict[str, Any]:
    from .train import RoundLink, train

    watch = plan.sets()
    for k, (spec, c) in enumerate(zip(plan.rounds, plan.configs, strict=True), 1):
        rows = _protected(plan, k)
        protected = plan.out / "protected" / f"round_{k:02d}.jsonl"
        atomic_write_jsonl(protected, [r.raw for r in rows])
        data = {"mastered": str(protected), "injection": str(spec.injection)}
        if c.train.method == "replay":  # a buffer: the first half of the protected set
            buffer, rest = split_halves([r.raw for r in rows])
            data["mastered1"] = str(_write(plan.out / "protected" / f"round_{k:02d}_buffer.jsonl", buffer))
            data["mastered2"] = str(_write(plan.out / "protected" / f"round_{k:02d}_rest.jsonl", rest or buffer))
        cfg = dataclasses.replace(c.train, save_model=True)
        model_cfg = dataclasses.replace(plan.model, model=_round_start(plan, k))
        carried = RunDir(plan.round_dir(k - 1)).load_carry() if k > 1 else None
        say(
            f"\n== round {k}/{len(plan.rounds)}: {cfg.method}/{cfg.optimizer} on {spec.injection.name} "
            f"({len(spec.read())}), protecting {len(rows)} "
            f"({plan.protect if plan.protect in PROTECT else 'file'})"
        )
        train(
            cfg,
            DataConfig(**data),
            model_cfg,
            plan.round_dir(k),
            resume=True,
            progress=progress,
            echo=echo,
            link=RoundLink(watch=watch, before=k == 1, carried=carried),
        )
        if (plan.round_dir(k) / "model" / "adapter_config.json").is_file():  # lora, cnl-lora: an adapter
            _merge_lora(plan.round_dir(k), model_cfg)
        state["rounds_done"] = k
        atomic_write_json(plan.out / DEFINITION, state)
    return write_results(plan.out)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    atomic_write_jsonl(path, rows)
    return path


# ------------------------------------------------------------------------------------------ reading a run
def definition_state(out: str | Path) -> dict[str, Any]:
    """``continual.json``: the definition, ``rounds_done`` and the status (``running``, ``finished``,
    ``failed``, ``interrupted``; ``stopped`` when it says running and no process holds the directory)."""
    from .io import lock_holder

    path = Path(out) / DEFINITION
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{out}: not a cnl continual directory (no {DEFINITION})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: damaged ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("definition"), dict):
        raise RunDirError(f"{path}: damaged (no round definition)")
    if state.get("status") == "running" and lock_holder(out) is None:
        state["status"] = "stopped"
    return state


def _round_dirs(out: Path) -> list[RunDir]:
    """The run directories of the rounds that finished at least one epoch, in order."""
    dirs = []
    for d in sorted((Path(out) / "rounds").glob("[0-9][0-9]")):
        rd = RunDir(d)
        if rd.exists() and rd.series().epochs:
            dirs.append(rd)
    return dirs


def ledger(out: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)``: one row per item of every set (its set, index and question) with, per evaluation
    (``before``, then ``r{round}e{epoch}``), 1 when it was answered correctly, 0 when not."""
    out = Path(out)
    rounds = _round_dirs(out)
    if not rounds:
        raise RunDirError(f"{out}: no round has finished an epoch yet")
    first = rounds[0]
    names = [n for n in first.read_info()["sets"] if n.startswith("set_")]
    names.sort(key=lambda n: int(n.split("_")[1]))
    points: list[tuple[str, RunDir, int]] = [("before", first, 0)]
    for k, rd in enumerate(rounds, 1):
        points += [(f"r{k}e{e}", rd, e) for e in rd.series().epochs]
    columns = ["set", "item", "question", *(p for p, _, _ in points)]
    rows: list[dict[str, Any]] = []
    for name in names:
        flags = {}
        questions: list[str] = []
        for label, rd, epoch in points:
            path = rd.prediction_file(epoch, name)
            if not path.is_file():
                continue
            _, correct = rd.read_predictions(epoch, name)
            flags[label] = correct
            if not questions:
                questions = [json.loads(x)["question"] for x in path.read_text(encoding="utf-8").splitlines() if x]
        for i, q in enumerate(questions):
            rows.append(
                {
                    "set": name,
                    "item": i,
                    "question": q,
                    **{p: int(flags[p][i]) if p in flags else "" for p, _, _ in points},
                }
            )
    return columns, rows


def accuracy_matrix(out: str | Path) -> tuple[list[str], list[list[float | None]]]:
    """``(set names, R)``: R[i][j] the accuracy on set j after round i (row 0: before training), from the
    final epoch of each round; None where a set was not evaluated."""
    columns, rows = ledger(out)
    rounds = _round_dirs(Path(out))
    names = list(dict.fromkeys(r["set"] for r in rows))
    finals = ["before", *(f"r{k}e{rd.series().epochs[-1]}" for k, rd in enumerate(rounds, 1))]
    matrix: list[list[float | None]] = []
    for point in finals:
        line: list[float | None] = []
        for name in names:
            vals = [r[point] for r in rows if r["set"] == name and r[point] != ""]
            line.append(sum(vals) / len(vals) if vals else None)
        matrix.append(line)
    return names, matrix


def metrics(matrix: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """The continual-learning measures of R (T rounds, sets 0..T; row i after round i, row 0 before training):

    - average accuracy after round i: A_i = mean over the sets seen so far (j ≤ i) of R[i][j];
    - backward transfer: BWT = mean over j < T of (R[T][j] − R[j][j]) (negative: forgetting);
    - forgetting after round i: F_i = mean over j < i of (max over l in [j, i−1] of R[l][j] − R[i][j]).
    """
    t = len(matrix) - 1

    def r(i: int, j: int) -> float:
        v = matrix[i][j]
        return 0.0 if v is None else float(v)

    average = [sum(r(i, j) for j in range(i + 1)) / (i + 1) for i in range(t + 1)]
    bwt = sum(r(t, j) - r(j, j) for j in range(t)) / t if t else 0.0
    forgetting = [
        sum(max(r(k, j) for k in range(j, i)) - r(i, j) for j in range(i)) / i if i else 0.0 for i in range(t + 1)
    ]
    return {"rounds": t, "average_accuracy": average, "bwt": bwt, "forgetting": forgetting}


def write_results(out: str | Path) -> dict[str, Any]:
    """``ledger.csv`` and ``matrix.json`` of a continual directory; returns the matrix content."""
    out = Path(out)
    columns, rows = ledger(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "ledger.csv", buf.getvalue())
    names, matrix = accuracy_matrix(out)
    content = {"sets": names, "matrix": matrix, **metrics(matrix)}
    atomic_write_json(out / "matrix.json", content)
    return content
