"""``cnl-lora``: CNL's masked update on LoRA's adapters.

The adapters, their defaults and options are ``lora``'s (r 16, α 32, dropout 0.05 on q/k/v/o/gate/up/down, lr
1e-5; sgd, momentum, adamw; the flags are ``--cnl-lora-r`` ...), and each step is ``cnl``'s rule on them:
θ ← θ − η · [u ⊙ g_M ≥ 0] ⊙ u over the adapter elements, g_M the mean gradient of the reference set with
respect to the adapters, recomputed at the start of every epoch. The loop computes that sign over the
trainable parameters, here the adapters, so nothing beyond the two declarations is needed.

LoRA starts with B = 0, so g_M of every A is zero in the first epoch: A is not masked there (an element
whose reference is zero always moves), B is. A saved model is the adapter, as with ``lora``; ``cnl continual``
merges it into the weights at each round's end.
"""

from __future__ import annotations

from .base import register
from .lora import LoRA


@register
class CNLLoRA(LoRA):
    name = "cnl-lora"
    summary = "CNL's mask on LoRA's adapters: an adapter element moves only where its update agrees in sign with g_M"
    uses_reference = True
    sign_reference = True
