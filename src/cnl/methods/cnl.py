"""``cnl``: Collaborative Neuron Learning (SPEC §4, ``use_freeze=1``).

θ ← θ − η · [u ⊙ g_M ≥ 0] ⊙ u, where u is the optimizer's update and g_M the mean gradient over the
reference set, recomputed at the start of every epoch. The mask itself is :mod:`cnl.mask`; the
loop computes the reference because this method says it uses one.
"""

from __future__ import annotations

from .base import Method, register


@register
class CollaborativeNeuronLearning(Method):
    name = "cnl"
    summary = "masked update: an element moves only where the update agrees in sign with g_M"
    uses_reference = True
    sign_reference = True
