"""What cnl knows about the parameter names and blocks of a Hugging Face causal LM, in one place.

The analyses group parameters by layer and module kind, HFT freezes them by kind, FSDP2 shards the
decoder blocks one by one, and LoRA puts adapters on the projections. All of them ask this module, so a
model family with other names needs one change here, not four.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "ATTENTION_KINDS",
    "FFN_KINDS",
    "MODULE_KINDS",
    "DEFAULT_LORA_TARGETS",
    "classify_parameter",
    "decoder_layers",
]

#: The attention projections (HFT freezes 2 of these 4 per layer).
ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: The feed-forward matrices of a gated MLP.
FFN_KINDS = ("gate_proj", "up_proj", "down_proj")
#: Module kinds in report order.
MODULE_KINDS = ("embedding", *ATTENTION_KINDS, *FFN_KINDS, "norm", "output_head", "other")
#: The modules LoRA adapts by default (SPEC §4: every attention and MLP projection).
DEFAULT_LORA_TARGETS = ",".join((*ATTENTION_KINDS, *FFN_KINDS))

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
#: Attribute paths of the decoder blocks in the usual Hugging Face architectures.
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


def classify_parameter(name: str) -> tuple[int | None, str]:
    """``(layer index or None, module kind)`` of a parameter name such as
    ``model.layers.3.self_attn.q_proj.weight``; the kind is one of :data:`MODULE_KINDS`."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else None
    parts = name.split(".")
    for kind in (*ATTENTION_KINDS, *FFN_KINDS):
        if kind in parts:
            return layer, kind
    if "embed_tokens" in parts or "wte" in parts or "embeddings" in parts:
        return layer, "embedding"
    if "lm_head" in parts:
        return layer, "output_head"
    if any("norm" in p for p in parts):
        return layer, "norm"
    return layer, "other"


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers`` and the usual aliases),
    through a PEFT wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in _BLOCK_PATHS:
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (looked for {', '.join(_BLOCK_PATHS)})")
