"""``osf``: Orthogonal Subspace Fine-tuning (Nayak et al. 2025, "Sculpting Subspaces: Constrained Full
Fine-Tuning in LLMs for Continual Learning"), through PEFT's ``OSFConfig`` (peft 0.21), as ``lora`` uses LoRA.

What PEFT does. Each target matrix W (out × in) is split by an SVD of the start weights, W = U S Vᵀ, into
its top k singular directions, the *high* subspace (U_h, V_h: frozen, k = ⌊effective_rank · min(out, in)⌋),
and the rest, the *low* part U_l diag(s_l) V_lᵀ, whose three factors train. The layer computes
W x + (U_l diag(s_l) V_lᵀ − U_l⁰ diag(s_l⁰) V_l⁰ᵀ) x (the start is exact). Gradient hooks on the factors
project ∇U_l ← (I − U_h U_hᵀ) ∇U_l and ∇V_l ← ∇V_l (I − V_h V_hᵀ) (V_l as rows; s_l is not projected), so
with SGD or momentum every column of U_l and every row of V_l stays orthogonal to the high subspace and the
change of the weight keeps U_hᵀ ΔW = 0 and ΔW V_h = 0, i.e. ΔW = (I − U_h U_hᵀ) ΔW (I − V_h V_hᵀ): what the
start weights encode most strongly (their largest singular directions) is left exactly as it was, and the
update is free in the rest. Everything else is frozen: PEFT marks only the factors trainable, so the
embeddings, norms, output head and the target modules' biases do not move (the paper's own code trained
them; PEFT does not).

Defaults and their sources:

- ``--osf-effective-rank 0.5``: PEFT's default (None: ⌊min(out, in) / 2⌋ per matrix, which 0.5 gives too),
  the 50% of the paper's released T5 code;
- ``--osf-targets`` q/k/v/o/gate/up/down projections: PEFT's ``TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING``
  for llama, qwen2, mistral and gemma, every attention and MLP matrix as in the paper;
- the learning rate: the paper's released code trains with AdamW at 1e-5, an optimizer this method refuses
  (below), so OSF keeps the run's own lr (the preset's), like ``ft``;
- optimizers sgd and momentum only. They keep the update exactly orthogonal to the high subspace (a sum of
  projected gradients). Adam and AdamW do not: their per-element division by √v̂ takes the factors' update
  out of the projected subspace (measured on the tiny test model, three steps: the part of ΔW inside the high
  subspace reached 64% (adam) and 66% (adamw) of ΔW's largest element, against 7e-6, float rounding, with
  sgd and momentum). AdamW's decay alone would not break it: it scales the factors, which stay orthogonal.

A saved model (``--save-model``) is the full model with ΔW merged into each target matrix, in plain Hugging
Face format (``AutoModelForCausalLM.from_pretrained`` loads it; PEFT's adapter would be as large as the target
matrices: (out + in + 1) · (min(out, in) − k) numbers each). Memory: the trainable factors are about the size
of the target matrices at 50%, and PEFT keeps a frozen copy of their start values, so the target matrices
cost about 3× their size before the optimizer's state. The checkpoint keeps the trainable factors; ``--resume``
decomposes the start weights again (the same SVD on the same machine).

``cnl continual``: every round decomposes its own start weights, the previous round's merged model, so the
high subspace it protects is that of the weights as they are after the earlier rounds (what they learned
included), and, as the paper grows the preserved rank from task to task, the preserved share grows:
round k preserves 1 − (1 − effective_rank)(1 − rank_growth)^(k−1) of each matrix's directions
(``--osf-rank-growth``, 0.2: 50%, 60%, 68%, 74%, ... of them; each round freezes 20% of what the round before
left trainable, never all of it). The paper's T5 script grows it linearly (+0.07 · max(out, in) per task,
until the matrix is entirely frozen); the geometric growth here is our choice, so that a long sequence keeps
something to train. Each round's ``config.yaml`` records the share it used.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..params import ATTENTION_KINDS, FFN_KINDS
from .base import Method, register

#: The modules OSF decomposes by default: PEFT's OSF mapping for llama/qwen2/mistral/gemma.
DEFAULT_OSF_TARGETS = ",".join((*ATTENTION_KINDS, *FFN_KINDS))
#: PEFT's name of the one adapter a run trains.
ADAPTER = "default"


@dataclass
class OSFOptions(MethodOptions):
    """OSF's own options (``--osf-effective-rank`` ..., or ``osf: {effective_rank: ...}`` in a YAML file)."""

    effective_rank: float = 0.5
    """Share of each target matrix's singular directions preserved (frozen): its top ⌊share · min(out, in)⌋,
    in (0, 1) (PEFT's default: half)."""
    targets: str = DEFAULT_OSF_TARGETS
    """Comma-separated names of the linear modules decomposed and trained (PEFT's OSF default for llama/qwen2:
    every attention and MLP projection); every other parameter is frozen."""
    rank_growth: float = 0.2
    """cnl continual: each round after the first also preserves this share of the directions the round before
    left trainable (round k: 1 − (1 − effective_rank)(1 − rank_growth)^(k−1)); 0: the same share every round,
    always recomputed from the round's start weights."""

    def target_list(self) -> list[str]:
        """The module names of ``targets``, at least one."""
        targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not targets:
            raise ConfigError(f"osf_targets names no module (got {self.targets!r}); e.g. q_proj,v_proj")
        return targets

    def validate(self) -> None:
        if not 0 < self.effective_rank < 1:
            raise ConfigError(
                f"osf_effective_rank (the share of directions preserved) must be in (0, 1), got {self.effective_rank}"
            )
        if not 0 <= self.rank_growth < 1:
            raise ConfigError(f"osf_rank_growth must be in [0, 1), got {self.rank_growth}")
        self.target_list()


#: The largest share a round preserves: all but one direction of any matrix under a million on a side (the
#: geometric growth approaches 1 but would round to it after a hundred rounds or so).
MAX_SHARE = 1 - 1e-6


def preserved_share(effective_rank: float, rank_growth: float, k: int) -> float:
    """The share round ``k`` (1, 2, ...) of ``cnl continual`` preserves: 1 − (1 − r)(1 − g)^(k−1) (at most
    :data:`MAX_SHARE`)."""
    return min(round(1 - (1 - effective_rank) * (1 - rank_growth) ** (k - 1), 10), MAX_SHARE)


def preserved_rank(share: float, shape: torch.Size | tuple[int, ...]) -> int:
    """The number of top singular directions of a ``shape`` matrix that ``share`` preserves (PEFT's rule)."""
    return int(min(shape) * share)


def osf_layers(model: torch.nn.Module) -> dict[str, Any]:
    """PEFT's OSF layers of ``model`` by module name (as in the unwrapped model: ``model.layers.0...``)."""
    from peft.tuners.osf.layer import OSFLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: m for name, m in inner.named_modules() if isinstance(m, OSFLayer)}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's tensors with each target matrix's ΔW merged in (plain names, no OSF factor)."""
    inner = model.get_base_model()
    out = {
        name.replace(".base_layer.", "."): t
        for name, t in inner.state_dict().items()
        if ".osf_svd_params." not in name and "._osf_" not in name
    }
    for name, layer in osf_layers(model).items():
        weight = layer.get_base_layer().weight
        out[f"{name}.weight"] = (weight + layer.get_delta_weight(ADAPTER)).to(weight.dtype)
    return out


def _save_merged(self: Any, save_directory: Any, *args: Any, state_dict: Any = None, **kwargs: Any) -> None:
    """``save_pretrained`` of an OSF-wrapped model: the full model, ΔW merged (not PEFT's adapter)."""
    if state_dict is not None:  # a sharded model's gathered weights: OSF does not run sharded
        raise ValueError("an OSF model saves its own merged weights")
    self.get_base_model().save_pretrained(save_directory, *args, state_dict=merged_state_dict(self), **kwargs)


@register
class OrthogonalSubspaceFineTuning(Method):
    name = "osf"
    summary = (
        "Orthogonal Subspace Fine-tuning (PEFT OSF): the attention and MLP matrices train only orthogonally to "
        "their start weights' top singular directions (half of them by default); sgd or momentum"
    )
    options_class = OSFOptions
    # exact orthogonality needs an update that is a sum of projected gradients (module docstring)
    optimizers = ("sgd", "momentum")
    sharding_refusal = "PEFT adapters under FSDP2 are not wired up yet"

    def prepare_model(self, model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
        from peft import OSFConfig, get_peft_model

        opts: OSFOptions = self.options(cfg)
        targets = opts.target_list()
        modules = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
        missing = [t for t in targets if not any(name.rsplit(".", 1)[-1] == t for name, _ in modules)]
        if missing:
            raise ConfigError(f"osf_targets {missing} are not module names of this model")
        for name, m in modules:
            if not isinstance(m, torch.nn.Linear):
                raise ConfigError(f"osf_targets: {name} is a {type(m).__name__}; OSF decomposes linear layers only")
            if preserved_rank(opts.effective_rank, m.weight.shape) < 1:
                shape = "×".join(map(str, m.weight.shape))
                raise ConfigError(
                    f"osf_effective_rank {opts.effective_rank:g} preserves no direction of {name} ({shape}); "
                    f"give at least {1 / min(m.weight.shape):.3g}"
                )
        for p in model.parameters():
            p.requires_grad_(False)
        config = OSFConfig(effective_rank=float(opts.effective_rank), target_modules=targets, task_type="CAUSAL_LM")
        wrapped = get_peft_model(model, config)
        wrapped.save_pretrained = types.MethodType(_save_merged, wrapped)  # --save-model: the merged full model
        return wrapped

    # cnl continual: a round starts from the previous round's merged model (its saved model), decomposed anew
    # in prepare_model; the preserved share grows from round to round, recorded in each round's configuration
    def round_config(self, cfg: TrainConfig, k: int) -> None:
        opts: OSFOptions = self.options(cfg)
        if k > 1 and opts.rank_growth > 0:
            opts.effective_rank = preserved_share(opts.effective_rank, opts.rank_growth, k)
            opts.validate()
