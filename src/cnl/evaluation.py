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

__all__ = ["run_model_source", "load_run_model", "general_sets", "accuracies", "write_eval"]


def general_sets(specs: list[str]) -> dict[str, list[Any]]:
    """The questions of every ``NAME[:N]``/``FILE[:N]`` spec, validated before any model loads."""
    from .data import resolve_general

    sets: dict[str, list[Any]] = {}
    for spec in specs:
        rows, _ = resolve_general(spec)
        if spec in sets:
            raise CnlError(f"--general {spec} given twice")
        sets[spec] = rows
    return sets


def run_model_source(run_dir: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """``(model folder, run.json, is a LoRA adapter)`` of a run that saved its model (``--save-model``)."""
    from .rundir import RunDir

    run = RunDir(run_dir)
    info = run.read_info()
    if not (run.model / "config.json").is_file() and not (run.model / "adapter_config.json").is_file():
        raise CnlError(f"{run.root} saved no model (train it with --save-model), or pass --model instead")
    return run.model, info, (run.model / "adapter_config.json").is_file()


def load_run_model(run_dir: str | Path, model_cfg: Any, check_tokenizer: Any = None) -> tuple[Any, Any, str]:
    """Load a run's saved model: the full weights, or the LoRA adapter on the run's base model."""
    import dataclasses

    from .models import load_from_config

    folder, info, adapter = run_model_source(run_dir)
    if not adapter:
        model, tok, source = load_from_config(dataclasses.replace(model_cfg, model=str(folder)), check_tokenizer)
        return model, tok, source.tag
    from peft import PeftModel

    base = info.get("model_source") or (info.get("config") or {}).get("model", {}).get("model")
    model, tok, source = load_from_config(dataclasses.replace(model_cfg, model=base), check_tokenizer)
    return PeftModel.from_pretrained(model, str(folder)).eval(), tok, f"{source.tag}+{Path(run_dir).name}"


def accuracies(model: Any, encoded: dict[str, list[Any]], *, batch_size: int = 16, pad_id: int = 0) -> dict[str, Any]:
    """Correct answers and accuracy per set."""
    from .scoring import predict

    out = {}
    for name, enc in encoded.items():
        preds = predict(model, enc, batch_size=batch_size, pad_id=pad_id, desc=f"eval {name}")
        out[name] = {"questions": len(enc), "correct": preds.n_correct, "accuracy": preds.n_correct / len(enc)}
    return out


def write_eval(out_dir: str | Path, content: dict[str, Any]) -> None:
    from .io import atomic_write_json

    atomic_write_json(Path(out_dir) / "eval.json", content)
