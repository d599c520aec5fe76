"""``lora``: PEFT LoRA adapters on the attention and MLP projections, no mask (SPEC §4).

Defaults (SPEC §4, the reference's LoRA runs): r 16, α 32, dropout 0.05, targets q/k/v/o/gate/up/down
projections, lr 1e-5; optimizers sgd, momentum and adamw. Only the adapters train; a saved model is the
adapter, which ``peft.PeftModel.from_pretrained`` loads onto the base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from . import register
from .base import Method

if TYPE_CHECKING:
    from ..config import TrainConfig


def lora_targets(cfg: TrainConfig) -> list[str]:
    """The module names of ``--lora-targets`` (comma-separated), at least one."""
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    if not targets:
        raise ConfigError(f"lora_targets names no module (got {cfg.lora_targets!r}); e.g. q_proj,v_proj")
    return targets


@register
class LoRA(Method):
    name = "lora"
    summary = "PEFT LoRA adapters (r 16, alpha 32, dropout 0.05) on q/k/v/o/gate/up/down, no mask"
    # SPEC §4: the reference trains LoRA at 1e-5 whatever the model, and its AdamW is torch's, whose
    # default weight decay is 0.01 (not CNL's 0.1)
    defaults = {"lr": 1e-5, "adamw_weight_decay": 0.01}
    optimizers = ("sgd", "momentum", "adamw")
    supports_sharding = False  # PEFT adapters under FSDP2 are not wired up yet

    def check(self, cfg: TrainConfig) -> None:
        lora_targets(cfg)

    def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(cfg)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"lora_targets {missing} are not module names of this model")
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
