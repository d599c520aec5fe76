"""Collaborative Neuron Learning (CNL): fine-tune a language model on new facts without forgetting.

The method itself lives in :mod:`cnl.mask` (the sign rule) and :mod:`cnl.reference` (the reference
gradient); everything else (data, models, scoring, training, analyses) is built around it.

For your own training code:

- :class:`MaskedOptimizer` (:mod:`cnl.optimizer`): wraps torch's SGD, Adam or AdamW into a
  ``torch.optim.Optimizer`` whose updates are masked by a sign reference;
- :func:`reference_from` (:mod:`cnl.reference`): the sign reference of a model on the data to protect
  (:func:`answer_examples` turns open-ended questions into examples it takes; :func:`self_reference` the
  model's own answers to prompts, when there is no labelled set to protect);
- :class:`CNLCallback` and :func:`protect` (:mod:`cnl.hf`): both, inside ``transformers.Trainer`` and
  TRL's ``SFTTrainer``.

They are imported on first use, so ``import cnl`` (and the ``cnl`` command's start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "MaskedOptimizer",
    "SignReference",
    "reference_from",
    "answer_examples",
    "self_reference",
    "CNLCallback",
    "protect",
    "__version__",
]

_LAZY = {
    "MaskedOptimizer": "cnl.optimizer",
    "SignReference": "cnl.mask",
    "reference_from": "cnl.reference",
    "answer_examples": "cnl.scoring",
    "self_reference": "cnl.selfref",
    "CNLCallback": "cnl.hf",
    "protect": "cnl.hf",
}

if TYPE_CHECKING:
    from .hf import CNLCallback, protect
    from .mask import SignReference
    from .optimizer import MaskedOptimizer
    from .reference import reference_from
    from .scoring import answer_examples
    from .selfref import self_reference


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
