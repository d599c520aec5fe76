"""``cnl eval``: accuracy of a model, or of a run's saved model, on general-knowledge sets.

Forgetting outside the mastered set is what users fear most, so besides M and I a model can be scored on
any named or JSONL multiple-choice set (``mmlu:500``: 500 questions sampled with a fixed seed; the offline
copies serve when the hub is unreachable), with SPEC §2's prediction. ``cnl train --general SPEC`` does
the same after every epoch (the ``general_accuracy`` column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CnlError

__all__ = ["general_sets", "accuracies", "write_eval"]


def general_sets(specs: list[str], fmt: str = "auto") -> dict[str, list[Any]]:
    """The questions of every ``NAME[:N]``/``FILE[:N]`` spec (either format; ``fmt`` forces one), validated
    before any model loads."""
    from .data import resolve_general

    sets: dict[str, list[Any]] = {}
    for spec in specs:
        rows, _ = resolve_general(spec, fmt=fmt)
        if spec in sets:
            raise CnlError(f"--general {spec} given twice")
        sets[spec] = rows
    return sets


def accuracies(
    model: Any,
    encoded: dict[str, list[Any]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
    tokenizer: Any = None,
    score: str = "contains",
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Correct answers and accuracy per set (open-ended sets answered and judged by ``score``)."""
    from .scoring import predict

    out = {}
    for name, enc in encoded.items():
        preds = predict(
            model, enc, batch_size=batch_size, pad_id=pad_id, desc=f"eval {name}", tokenizer=tokenizer, score=score,
            max_new_tokens=max_new_tokens,
        )  # fmt: skip
        out[name] = {"questions": len(enc), "correct": preds.n_correct, "accuracy": preds.n_correct / len(enc)}
    return out


def write_eval(out_dir: str | Path, content: dict[str, Any]) -> None:
    from .io import atomic_write_json

    atomic_write_json(Path(out_dir) / "eval.json", content)
