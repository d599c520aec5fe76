"""The run directory: the one place that knows its layout and file formats.

``cnl train`` writes one directory per run; ``cnl report``, ``cnl analyze distance`` and ``cnl compare``
read it back through :class:`RunDir` only::

    run.json          method, optimizer, setting, roles, sets (file, sha256, count), status, epochs done
    config.yaml       the resolved configuration (``--config`` takes it back)
    summary.csv       one row per finished epoch (SPEC columns, then masked fraction and seconds)
    predictions/      epoch_001_injection.jsonl, ... (label, predict_label, question; open-ended: question,
                      answer, prediction, correct)
    train.log
    checkpoint/       latest.json -> epoch_NNN/ (meta.json; rank_R.safetensors + rank_R.json per process:
                      weights, optimizer and method state, RNG; never a pickle)
    model/            with --save-model: Hugging Face format (LoRA: the adapter)
    wise/alpha_A/     ``cnl interpolate``: the WiSE-FT point (1 − A) θ₀ + A θ of the final weights, a run
                      directory of its own (run.json, summary.csv with one row, predictions/)

Every write goes through :mod:`cnl.io` (atomic files, atomic directories).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .distributed import SINGLE
from .errors import CnlError
from .io import (
    atomic_dir,
    atomic_save,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_yaml,
    file_digest,
    lock_holder,
    locked_output,
)

__all__ = ["RunDir", "RunDirError", "RunSeries", "INT_COLUMNS", "capture_rng", "restore_rng"]

#: Summary columns holding counts (read back as int); ``epoch`` too. Every other column is a float.
INT_COLUMNS = ("epoch", "wrong_to_correct", "correct_to_wrong", "correct2_to_wrong", "wrong2_to_correct")


class RunDirError(CnlError):
    """A run directory is missing, damaged or not what the caller expects."""


#: Version of the checkpoint layout (``meta.json``'s ``format``).
CHECKPOINT_FORMAT = 2
#: How to recover from a checkpoint that cannot be used.
RECOVER_HINT = "delete the checkpoint/ folder and --resume again (the run then starts over from epoch 1)"


@dataclass(frozen=True)
class RunSeries:
    """Learned and forgotten counts per finished epoch of a run (what reports plot), and the accuracy on
    the general-knowledge set when the run had one (``--general``)."""

    epochs: list[int]
    learned: list[int]
    forgotten: list[int]
    general: list[float] | None = None
    #: Learned and forgotten per epoch under each other phrasing (``--eval-templates``), by its name.
    phrasings: dict[str, tuple[list[int], list[int]]] | None = None


class RunDir:
    """Paths and readers/writers of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
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

    @property
    def reference_file(self) -> Path:
        """``--reference self:...``: the model's own answers the run protects (written once, at its start)."""
        return self.root / "reference.jsonl"

    def write_reference(self, rows: Sequence[Any]) -> None:
        atomic_write_jsonl(self.reference_file, [r.raw for r in rows])

    @property
    def steps(self) -> Path:
        """``steps.csv``: one row per optimizer step (loss, masked fraction, learning rate; the KL drift and the
        sample counts at evaluation steps)."""
        return self.root / "steps.csv"

    def start_steps(self, columns: Sequence[str], epochs_done: int) -> None:
        """Begin ``steps.csv`` with ``columns``, keeping the rows of the first ``epochs_done`` epochs (a resumed
        run drops the steps of the epoch it recomputes)."""
        kept = [r for r in self._raw_steps() if int(r.get("epoch") or 0) <= epochs_done] if epochs_done else []
        atomic_write_csv(self.steps, columns, ([r.get(c) or "" for c in columns] for r in kept))

    def _raw_steps(self) -> list[dict[str, str]]:
        if not self.steps.exists():
            return []
        with open(self.steps, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def append_step(self, columns: Sequence[str], row: dict[str, Any]) -> None:
        """Add one row to ``steps.csv`` (flushed, so that a killed run keeps the steps it took)."""
        with open(self.steps, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else row[c] for c in columns])

    def read_steps(self) -> list[dict[str, Any]]:
        """``steps.csv``'s rows (numbers as floats, the step and epoch as ints, empty cells None); [] without one."""
        out = []
        for r in self._raw_steps():
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v in ("", None):
                    row[k] = None
                elif k in ("step", "epoch"):
                    row[k] = int(v)
                else:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
        return out

    def prediction_file(self, epoch: int, set_name: str) -> Path:
        return self.predictions / f"epoch_{epoch:03d}_{set_name}.jsonl"

    # ------------------------------------------------------------------ run.json / config.yaml
    def exists(self) -> bool:
        """Whether a run was started here (``run.json`` exists)."""
        return self.run_json.exists()

    def read_info(self) -> dict[str, Any]:
        """``run.json`` as a dict, or a clear error naming what is wrong."""
        if not self.root.is_dir():
            raise RunDirError(f"{self.root}: not a run directory (no such directory)")
        if not self.run_json.exists():
            raise RunDirError(
                f"{self.root}: not a run directory (no run.json); pass directories written by 'cnl train'"
            )
        hint = (
            "summary.csv and predictions/ still hold the finished epochs; restore run.json from a backup, or run "
            "the training again into a new --out"
        )
        try:
            info = json.loads(self.run_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{self.run_json}: damaged, not valid JSON ({e}); {hint}") from None
        except OSError as e:
            raise RunDirError(f"{self.run_json}: cannot be read ({e.strerror})") from None
        if not isinstance(info, dict):
            raise RunDirError(f"{self.run_json}: damaged, expected a JSON object; {hint}")
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, info)

    def live_status(self, info: dict[str, Any] | None = None) -> str:
        """The run's status: run.json's (``running``, ``finished``, ``failed``, ``interrupted``), except that a
        run whose run.json says ``running`` while no process holds its directory is ``stopped``: the process
        that ran it is gone without a word (``kill -9``, a node lost, torchrun's rank 0 killed). That is then
        recorded in run.json (under the directory's lock), so every later reader sees it too."""
        info = self.read_info() if info is None else info
        status = str(info.get("status", "unknown"))
        if status != "running" or lock_holder(self.root) is not None:
            return status
        from .errors import OutputError

        try:
            with locked_output(self.root, "cnl (recording a stopped run)"):
                current = self.read_info()
                if current.get("status") == "running":
                    done = current.get("epochs_done", 0)
                    current["status"] = "stopped"
                    current["error"] = (
                        "the process running it stopped without a word (killed, or its machine went down); "
                        f"--resume continues after epoch {done}"
                    )
                    self.write_info(current)
                    info.update(current)
                return str(current.get("status"))
        except OutputError:  # taken again in the meantime: someone is running it
            return "running"

    def write_config(self, resolved: dict[str, Any]) -> None:
        atomic_write_yaml(self.config, resolved)

    # ------------------------------------------------------------------ summary.csv
    def write_summary(self, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
        atomic_write_csv(self.summary, columns, [[r[c] for c in columns] for r in rows])

    def read_summary(self) -> list[dict[str, Any]]:
        """The finished epochs' rows, by column name, with counts as int and the rest as float."""
        if not self.summary.exists():
            return []
        data = self.summary.read_bytes()
        hint = (
            "the predictions/ files hold every finished epoch; delete the damaged row (the epoch is then missing), "
            "or --resume with a kept checkpoint (--keep-checkpoint) to recompute from it"
        )
        if data and not data.endswith(b"\n"):  # every row is written with its newline: cut inside the last row
            raise RunDirError(f"{self.summary}: damaged, its last row is cut short (no final newline); {hint}")
        out = []
        try:
            with open(self.summary, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                for r in reader:
                    if None in r or None in r.values():  # a row with more or fewer fields than the header
                        raise RunDirError(
                            f"{self.summary}:{reader.line_num}: damaged row (wrong number of fields); {hint}"
                        )
                    try:
                        out.append({k: (int(v) if k.split("@")[0] in INT_COLUMNS else float(v)) for k, v in r.items()})
                    except ValueError:
                        raise RunDirError(f"{self.summary}:{reader.line_num}: damaged row {r}; {hint}") from None
        except UnicodeDecodeError as e:
            raise RunDirError(f"{self.summary}: damaged, not UTF-8 text ({e.reason}); {hint}") from None
        return out

    def series(self, info: dict[str, Any] | None = None) -> RunSeries:
        """Learned/forgotten per epoch, by the column names the run's setting uses."""
        info = self.read_info() if info is None else info
        roles = info.get("roles") or {}
        learn, forget = roles.get("learn_column"), roles.get("forget_column")
        if learn is None or forget is None:
            raise RunDirError(f"{self.run_json}: damaged, no learn/forget column names in 'roles'")
        rows = self.read_summary()
        done = info.get("epochs_done")
        if isinstance(done, int) and len(rows) < done:
            raise RunDirError(
                f"{self.summary}: damaged, {len(rows)} row(s) but run.json says {done} epoch(s) finished (the file "
                "was cut short); the predictions/ files still hold every finished epoch, and --resume with "
                "--keep-checkpoint recomputes from the last checkpoint"
            )
        general = [r["general_accuracy"] for r in rows] if rows and "general_accuracy" in rows[0] else None
        names = [c.split("@", 1)[1] for c in (rows[0] if rows else {}) if c.startswith(f"{learn}@")]
        phrasings = {p: ([r[f"{learn}@{p}"] for r in rows], [r[f"{forget}@{p}"] for r in rows]) for p in names}
        return RunSeries(
            [r["epoch"] for r in rows],
            [r[learn] for r in rows],
            [r[forget] for r in rows],
            general,
            phrasings or None,
        )

    # ------------------------------------------------------------------ predictions
    def write_predictions(self, epoch: int, set_name: str, rows: Sequence[Any], predictions: Any) -> None:
        """One JSONL line per question. Multiple choice (SPEC §4): ``label``, ``predict_label``, ``question``.
        Open-ended: ``question``, ``answer`` (and ``aliases``), ``prediction`` (the generated answer, or the
        answer the fast path found the model gives exactly) and ``correct``."""
        from .data import OpenRow

        def line(r: Any, answer: str, ok: bool) -> dict[str, Any]:
            if not isinstance(r, OpenRow):
                return {"label": r.label, "predict_label": answer, "question": r.question}
            extra = {"aliases": list(r.aliases)} if r.aliases else {}
            return {"question": r.question, "answer": r.answer, **extra, "prediction": answer, "correct": ok}

        atomic_write_jsonl(
            self.prediction_file(epoch, set_name),
            (line(r, a, ok) for r, a, ok in zip(rows, predictions.answers, predictions.correct, strict=True)),
        )

    def read_predictions(self, epoch: int, set_name: str) -> tuple[list[str], list[bool]]:
        """``(the answers, whether each is correct)`` of a prediction file, in order (multiple choice: the
        ``predict_label``, correct when it is the ``label``; open-ended: the ``prediction`` and ``correct``)."""
        path = self.prediction_file(epoch, set_name)
        if not path.is_file():
            raise RunDirError(f"{path}: missing (the run wrote no predictions for {set_name} at epoch {epoch})")
        try:
            text_lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise RunDirError(f"{path}: damaged, not UTF-8 text ({e.reason})") from None
        answers: list[str] = []
        correct: list[bool] = []
        for line, text in enumerate(text_lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if "correct" in row:  # open-ended
                    answers.append(str(row["prediction"]))
                    correct.append(bool(row["correct"]))
                else:
                    answers.append(str(row["predict_label"]))
                    correct.append(answers[-1] == row["label"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise RunDirError(f"{path}:{line}: damaged prediction row") from None
        return answers, correct

    # ------------------------------------------------------------------ set files
    @staticmethod
    def describe_set(path: Path, count: int) -> dict[str, Any]:
        """What run.json records of an input set: its absolute file, digest and size."""
        return {"file": str(path.resolve()), "sha256": file_digest(path), "count": count}

    def verify_sets(self, info: dict[str, Any], names: Sequence[str]) -> dict[str, Path]:
        """The files of the run's sets ``names``, checked to still exist unchanged since the run."""
        files = {}
        for name in names:
            meta = (info.get("sets") or {}).get(name)
            if isinstance(meta, dict) and meta.get("file") is None and meta.get("count") == 0:
                raise RunDirError(f"{self.root}: the run was given no {name} set")
            if not isinstance(meta, dict) or "file" not in meta or "sha256" not in meta:
                raise RunDirError(f"{self.root}: run.json records no {name} set (file and sha256)")
            path = Path(meta["file"])
            if not path.is_file():
                raise RunDirError(f"{self.root}: its {name} set {path} is gone")
            if file_digest(path) != meta["sha256"]:
                raise RunDirError(f"{self.root}: its {name} set {path} changed since the run")
            files[name] = path
        return files

    # ------------------------------------------------------------------ checkpoints
    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest.json").exists()

    def save_checkpoint(self, epoch: int, state: dict[str, Any], meta: dict[str, Any], dist: Any = SINGLE) -> None:
        """Write epoch ``epoch``'s checkpoint as a complete folder, then point ``latest.json`` at it. Call it
        on every process (one process is the case of one rank).

        ``state`` is this process's own tree of dicts, lists, numbers, strings and tensors (its shards under
        torchrun: weights, optimizer state with the method's hook state, RNG); its tensors go to
        ``rank_R.safetensors`` and the rest to ``rank_R.json``. Rank 0 adds ``meta.json`` (``meta``: epoch,
        summary rows; the world size). Loading therefore never unpickles anything. The folder is built
        under a temporary name and renamed into place once every rank has written, and the pointer is
        written after that, so a kill at any moment leaves the previous checkpoint valid; older folders
        are removed only afterwards.
        """
        import uuid

        from safetensors.torch import save_file

        name = f"epoch_{epoch:03d}"
        tmp = Path(dist.broadcast(str(self.checkpoints / f".{name}.{uuid.uuid4().hex[:12]}.tmp")))

        def agree(error: BaseException | None) -> None:
            """Every rank stops (and the half-written folder goes) when any rank failed."""
            if dist.any(error is not None):
                if dist.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise error or RunDirError(f"{tmp}: another process could not write its part of the checkpoint")

        tensors: dict[str, torch.Tensor] = {}
        error: BaseException | None = None
        try:
            skeleton = _split_tensors(state, "", tensors)
            if dist.is_main:
                tmp.mkdir(parents=True)
        except Exception as e:
            error = e
        agree(error)
        try:
            atomic_save(tmp / f"rank_{dist.rank}.safetensors", lambda p: save_file(tensors, p))
            atomic_write_json(tmp / f"rank_{dist.rank}.json", skeleton)
        except Exception as e:  # a full disk may surface as safetensors' own error, not an OSError
            error = e
        agree(error)
        if dist.is_main:
            atomic_write_json(tmp / "meta.json", {**meta, "world_size": dist.world, "format": CHECKPOINT_FORMAT})
            final = self.checkpoints / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_json(self.checkpoints / "latest.json", {"epoch": epoch, "folder": name})
            for old in self.checkpoints.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load_checkpoint(self, dist: Any = SINGLE) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(meta, this process's state)`` of the latest checkpoint, or None when there is none. A damaged
        or foreign checkpoint is a :class:`RunDirError` that names the file and how to recover."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        try:
            folder = self.checkpoints / str(json.loads(pointer.read_text(encoding="utf-8"))["folder"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise RunDirError(f"{pointer}: damaged checkpoint pointer; {RECOVER_HINT}") from None
        if not folder.is_dir():
            raise RunDirError(f"{pointer} points at {folder.name}, which is missing; {RECOVER_HINT}")
        if not (folder / "meta.json").exists() and (folder / "state.json").exists():
            raise RunDirError(
                f"{folder}: a checkpoint of an older cnl, which this version does not read; {RECOVER_HINT}"
            )
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise TypeError("meta.json is not a JSON object")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise RunDirError(
                f"{folder / 'meta.json'}: damaged checkpoint ({type(e).__name__}: {e}); {RECOVER_HINT}"
            ) from None
        if meta.get("world_size") != dist.world:
            raise RunDirError(
                f"{folder}: written by {meta.get('world_size')} process(es), resumed with {dist.world}; "
                "use the same number"
            )
        try:
            tensors = load_file(str(folder / f"rank_{dist.rank}.safetensors"))
            skeleton = json.loads((folder / f"rank_{dist.rank}.json").read_text(encoding="utf-8"))
            state = _join_tensors(skeleton, tensors)
        except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise RunDirError(f"{folder}: damaged checkpoint ({type(e).__name__}: {e}); {RECOVER_HINT}") from None
        if not isinstance(state, dict):
            raise RunDirError(
                f"{folder / f'rank_{dist.rank}.json'}: damaged checkpoint (not an object); {RECOVER_HINT}"
            )
        return meta, state

    # ------------------------------------------------------------------ state carried to the next round
    @property
    def carry(self) -> Path:
        return self.root / "carry"

    def save_carry(self, state: dict[str, Any]) -> None:
        """The method's state for the next round of ``cnl continual`` (safetensors + JSON, like a checkpoint)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split_tensors(state, "", tensors)
        with atomic_dir(self.carry) as tmp:
            atomic_save(tmp / "state.safetensors", lambda p: save_file(tensors, p))
            atomic_write_json(tmp / "state.json", skeleton)

    def load_carry(self) -> dict[str, Any] | None:
        """:meth:`save_carry`'s state, or None when the run carried nothing."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not self.carry.is_dir():
            return None
        try:
            return _join_tensors(
                json.loads((self.carry / "state.json").read_text(encoding="utf-8")),
                load_file(str(self.carry / "state.safetensors")),
            )
        except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise RunDirError(f"{self.carry}: damaged ({type(e).__name__}: {e}); run this round again") from None

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    # ------------------------------------------------------------------ WiSE-FT points (cnl interpolate)
    @property
    def wise(self) -> Path:
        """``wise/``: the run's WiSE-FT points, one run directory per mixing weight α."""
        return self.root / "wise"

    def wise_point(self, alpha: float) -> Path:
        """The run directory of the point at ``alpha`` (``wise/alpha_0.25``; ``alpha_0``, ``alpha_1``)."""
        text = repr(float(alpha))
        return self.wise / f"alpha_{text[:-2] if text.endswith('.0') else text}"

    def wise_points(self) -> list[Path]:
        """The point directories written so far (each with its run.json), by name."""
        if not self.wise.is_dir():
            return []
        return sorted(d for d in self.wise.iterdir() if d.name.startswith("alpha_") and (d / "run.json").is_file())

    # ------------------------------------------------------------------ the final model
    def save_model(self, model: torch.nn.Module, tokenizer: Any, state_dict: dict[str, Any] | None = None) -> None:
        """Save in Hugging Face format (safetensors; LoRA: the adapter), replacing ``model/`` atomically;
        ``state_dict`` overrides the model's own tensors (a sharded model's gathered weights)."""
        with atomic_dir(self.model) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as JSON (torch's state as a list of byte values)."""
    import random

    version, internal, gauss = random.getstate()
    cuda = [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state().tolist(), "cuda": cuda, "python": [version, list(internal), gauss]}


def restore_rng(state: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


_TENSOR = "__tensor__"


def _split_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Copy of ``obj`` with every tensor replaced by ``{"__tensor__": key}`` and stored in ``out``.

    Keys are numbered (``prefix`` only makes them readable), so no two entries can collide; a tensor
    that shares memory with one already stored is copied, because safetensors refuses shared storage.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{len(out)}{prefix}"
        t = obj.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and any(u.numel() and u.untyped_storage().data_ptr() == ptr for u in out.values()):
            t = t.clone()
        out[key] = t.contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if _TENSOR in obj:
            raise TypeError(f"a checkpoint cannot store a dict with the reserved key {_TENSOR!r}")
        return {str(k): _split_tensors(v, f"{prefix}/{k}", out) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj
