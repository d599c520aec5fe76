"""``ft``: plain fine-tuning (SPEC §4, ``use_freeze=0``): θ ← θ − η u with no mask."""

from __future__ import annotations

from .base import Method, register


@register
class FineTuning(Method):
    name = "ft"
    summary = "plain fine-tuning: the optimizer's update, no mask"
    baseline = True  # SPEC §6: forgetting reductions are measured against plain fine-tuning
