"""Collaborative Neuron Learning (CNL): fine-tune a language model on new facts without forgetting.

The method itself lives in :mod:`cnl.mask` (the sign rule) and :mod:`cnl.reference` (the reference
gradient); everything else (data, models, scoring, training, analyses) is built around it.
"""

__version__ = "0.1.0"
