"""``lora``: PEFT LoRA adapters on the attention and MLP projections, no mask (SPEC §4).

Defaults (SPEC §4, the reference's LoRA runs): r 16, α 32, dropout 0.05, targets q/k/v/o/gate/up/down
projections, lr 1e-5; optimizers sgd, momentum and adamw (AdamW with torch's default weight decay 0.01,
as the reference's LoRA runs use torch's AdamW). Only the adapters train; a saved model is the adapter,
which ``peft.PeftModel.from_pretrained`` loads onto the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..params import DEFAULT_LORA_TARGETS
from .base import Method, register


@dataclass
class LoRAOptions(MethodOptions):
    """LoRA's own options (``--lora-r`` ..., or ``lora: {r: ...}`` in a YAML file)."""

    r: int = 16
    """LoRA rank (SPEC §4: 16)."""
    alpha: int = 32
    """LoRA α: the adapter's output is scaled by α / r (SPEC §4: 32)."""
    dropout: float = 0.05
    """Dropout on the adapter's input (SPEC §4: 0.05)."""
    targets: str = DEFAULT_LORA_TARGETS
    """Comma-separated names of the modules that get adapters (SPEC §4: every attention and MLP projection)."""

    def target_list(self) -> list[str]:
        """The module names of ``targets``, at least one."""
        targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not targets:
            raise ConfigError(f"lora_targets names no module (got {self.targets!r}); e.g. q_proj,v_proj")
        return targets

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora_r must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        self.target_list()


@register
class LoRA(Method):
    name = "lora"
    summary = "PEFT LoRA adapters (r 16, alpha 32, dropout 0.05) on q/k/v/o/gate/up/down, no mask"
    options_class = LoRAOptions
    # SPEC §4: the reference trains LoRA at 1e-5 whatever the model, and its AdamW is torch's, whose
    # default weight decay is 0.01 (not CNL's 0.1)
    defaults = {"lr": 1e-5, "adamw_weight_decay": 0.01}
    optimizers = ("sgd", "momentum", "adamw")
    sharding_refusal = "PEFT adapters under FSDP2 are not wired up yet"

    def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        opts: LoRAOptions = self.options(cfg)
        targets = opts.target_list()
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"lora_targets {missing} are not module names of this model")
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )
        return get_peft_model(model, config)
