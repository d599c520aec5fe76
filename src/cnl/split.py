"""``cnl split`` (SPEC §3): score a dataset and write the mastered set M and the injection set I.

Files written into the output directory, every one atomically, the manifest last so that its
presence means the split is complete:

- ``{dataset}_correct_{model}.jsonl`` (M) and ``{dataset}_wrong_{model}.jsonl`` (I), each row the
  original object with ``predict_label`` added;
- the halves ``correct1/correct2`` and ``wrong1/wrong2`` (seed 42, first half = ceil(n/2));
- ``split.json``: the files with their counts, accuracy, predicted-letter histogram and timing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import DataError, MCRow, rows_format, split_halves
from .io import atomic_write_json, atomic_write_jsonl
from .scoring import Encoded, PromptEncoder, predict

__all__ = ["SPLIT_PARTS", "SplitResult", "split_file_name", "run_split", "read_split_manifest"]

#: Every part a split writes, in manifest order.
SPLIT_PARTS = ("correct", "wrong", "correct1", "correct2", "wrong1", "wrong2")
MANIFEST = "split.json"


def split_file_name(dataset_tag: str, part: str, model_tag: str) -> str:
    """The published file name of one part, e.g. ``csqa_correct_Qwen2.5-1.5B-Instruct.jsonl``."""
    return f"{dataset_tag}_{part}_{model_tag}.jsonl"


@dataclass
class SplitResult:
    """What a split produced (the content of ``split.json``)."""

    manifest: dict[str, Any]
    out_dir: Path

    @property
    def n_correct(self) -> int:
        return int(self.manifest["files"]["correct"]["count"])

    @property
    def n_wrong(self) -> int:
        return int(self.manifest["files"]["wrong"]["count"])

    @property
    def accuracy(self) -> float:
        return float(self.manifest["accuracy"])


def run_split(
    rows: Sequence[MCRow],
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    dataset_tag: str,
    model_tag: str,
    out_dir: str | Path,
    batch_size: int = 16,
    progress: bool | None = None,
    extra: dict[str, Any] | None = None,
    encoded: Sequence[Encoded] | None = None,
    score: str = "contains",
    max_new_tokens: int | None = None,
) -> SplitResult:
    """Score ``rows`` with ``model`` and write every split file plus the manifest into ``out_dir``.

    ``encoded`` (the rows already encoded for this tokenizer, e.g. while checking their lengths before
    the weights loaded) saves a second tokenization. Open-ended questions are answered and judged by
    ``score`` (:mod:`cnl.answers`); their rows get a ``prediction`` field instead of ``predict_label``."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    encoder = PromptEncoder(tokenizer)
    if encoded is None:
        encoded = encoder.encode_all(rows)
    preds = predict(
        model, encoded, batch_size=batch_size, pad_id=encoder.pad_id, desc="split", progress=progress,
        tokenizer=tokenizer, score=score, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    fmt = rows_format(rows)
    key = "prediction" if fmt == "open" else "predict_label"

    correct: list[dict[str, Any]] = []
    wrong: list[dict[str, Any]] = []
    for row, answer, ok in zip(rows, preds.answers, preds.correct, strict=True):
        rec = {**row.raw, key: answer}
        (correct if ok else wrong).append(rec)
    c1, c2 = split_halves(correct)
    w1, w2 = split_halves(wrong)
    parts = {"correct": correct, "wrong": wrong, "correct1": c1, "correct2": c2, "wrong1": w1, "wrong2": w2}

    # A manifest left by an earlier run into the same directory would vouch for files this run is
    # about to replace; remove it first, so that an interrupted run leaves no complete-looking split.
    (out / MANIFEST).unlink(missing_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for part in SPLIT_PARTS:
        name = split_file_name(dataset_tag, part, model_tag)
        atomic_write_jsonl(out / name, parts[part])
        files[part] = {"file": name, "count": len(parts[part])}
    n = len(rows)
    manifest: dict[str, Any] = {
        "dataset": dataset_tag,
        "model": model_tag,
        "n": n,
        "accuracy": len(correct) / n if n else 0.0,
        "files": files,
        "format": fmt,
        **(
            {"score": score, "max_new_tokens": max_new_tokens}
            if fmt == "open"
            else {
                "predicted_letters": dict(sorted(Counter(preds.answers).items())),
                "label_letters": dict(sorted(Counter(r.label for r in rows).items())),
            }
        ),
        "seconds": round(seconds, 3),
        "questions_per_second": round(n / seconds, 3) if seconds > 0 else None,
        "halves_seed": 42,
        **(extra or {}),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return SplitResult(manifest=manifest, out_dir=out)


def read_split_manifest(split_dir: str | Path) -> SplitResult:
    """Read ``split.json`` from a directory written by :func:`run_split` (clear error otherwise)."""
    d = Path(split_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise DataError("split directory not found", d)
    if not path.exists():
        raise DataError(f"no {MANIFEST} here: not a directory written by 'cnl split' (or it was interrupted)", d)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", path, e.lineno) from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise DataError("missing the 'files' table", path)
    return SplitResult(manifest=manifest, out_dir=d)
