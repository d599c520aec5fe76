"""Loading a model for some question sets: the one function that ``train``, ``split``, the analyses,
``eval`` and ``compare`` use.

Every question is encoded with the model's tokenizer (and its prompt length checked against the model's
context) *before* the weights load, so a missing chat template or a 10k-token question fails in
seconds, not after a 7B model has loaded. The model is a ``--model`` (hub id, directory, GGUF), a run's
saved model (``--run RUN_DIR``: the full weights, or a LoRA adapter put on the run's base model), or
one already in memory (tests, notebooks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CnlError
from .scoring import EncodedSets, PromptEncoder, encode_sets

__all__ = ["Loaded", "load_for_sets", "run_model_source"]


@dataclasses.dataclass
class Loaded:
    """A loaded model with its tokenizer, and the question sets encoded for it.

    Attributes:
        model: the model (on its device, in eval mode).
        tokenizer: its tokenizer (left padding, with a pad token).
        tag: a short name of the model (``SmolLM2-135M-Instruct``; ``base+run`` for a run's adapter).
        source: where it came from (a :class:`cnl.models.ModelSource`; None for a model given in memory).
        sets: the encoded questions (those too long for the context left out when asked).
        seconds: how long loading took.
    """

    model: Any
    tokenizer: Any
    tag: str
    source: Any
    sets: EncodedSets
    seconds: float = 0.0

    @property
    def path_or_id(self) -> str | None:
        """The model's file, directory or hub id (None for the embedded model or one given in memory)."""
        if self.source is None or self.source.kind == "embedded":
            return None
        return self.source.path_or_id


def run_model_source(run_dir: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """``(model folder, run.json, is a LoRA adapter)`` of a run that saved its model (``--save-model``)."""
    from .rundir import RunDir

    run = RunDir(run_dir)
    info = run.read_info()
    if not (run.model / "config.json").is_file() and not (run.model / "adapter_config.json").is_file():
        raise CnlError(f"{run.root} saved no model (train it with --save-model), or pass --model instead")
    return run.model, info, (run.model / "adapter_config.json").is_file()


def load_for_sets(
    model_cfg: Any,
    sets: dict[str, Sequence[Any]],
    *,
    sources: dict[str, str] | None = None,
    skip_long: bool = False,
    suggest_skip: bool = True,
    run_dir: str | Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    answer_loss_end: bool = False,
) -> Loaded:
    """Load the model of ``model_cfg`` (a :class:`cnl.config.ModelConfig`; or the saved model of
    ``run_dir``; or ``model``/``tokenizer`` as given) and encode every question of ``sets`` with its
    tokenizer first, in ``model_cfg.prompt_style`` (open-ended answers' losses with the end of the turn when
    ``answer_loss_end``). A prompt longer than the model's context is an error
    naming its file (``sources[name]``) and line (suggesting ``--skip-long-prompts`` where the command has it:
    ``suggest_skip``), unless ``skip_long`` leaves such questions out."""
    from .models import context_length, load_from_config

    t0 = time.perf_counter()
    fitted: list[EncodedSets] = []

    def encode(tok: Any, context: int | None) -> None:
        encoder = PromptEncoder(tok, style=model_cfg.prompt_style, answer_loss_end=answer_loss_end)
        fitted.append(
            encode_sets(
                encoder, dict(sets), sources=sources, max_length=context, skip_long=skip_long, suggest_skip=suggest_skip
            )
        )

    if model is not None:
        if tokenizer is None:
            raise ValueError("a model given in memory needs its tokenizer")
        encode(tokenizer, context_length(getattr(model, "config", None), tokenizer))
        tag, source = getattr(getattr(model, "config", None), "_name_or_path", None) or "model", None
    elif run_dir is not None:
        folder, info, adapter = run_model_source(run_dir)
        if adapter:
            from peft import PeftModel

            base = info.get("model_source") or (info.get("config") or {}).get("model", {}).get("model")
            base_model, tokenizer, source = load_from_config(dataclasses.replace(model_cfg, model=base), encode)
            model = PeftModel.from_pretrained(base_model, str(folder)).eval()
            tag = f"{source.tag}+{Path(run_dir).name}"
        else:
            model, tokenizer, source = load_from_config(dataclasses.replace(model_cfg, model=str(folder)), encode)
            tag = source.tag
    else:
        model, tokenizer, source = load_from_config(model_cfg, encode)
        tag = source.tag
    return Loaded(model, tokenizer, tag, source, fitted[0], time.perf_counter() - t0)
