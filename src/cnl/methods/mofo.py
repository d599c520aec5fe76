"""``mofo``: Momentum-Filtered Optimizer (Chen et al. 2024, "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning").

Adam's (or momentum's) state is updated from every element's gradient; then only the elements whose
first moment |m| is among the largest ``--mofo-fraction`` of their tensor move (the others keep their
value, like CNL's frozen elements). Norm and bias tensors (1-D) always move. Defaults: AdamW (MoFO is an
AdamW variant) and a fraction of 0.15, the value of MoFO's own runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..config import MethodOptions, TrainConfig
from ..errors import ConfigError
from ..optim import AdamRule, MomentumRule, UpdateHooks, UpdateRule
from .base import Method, register


@dataclass
class MoFOOptions(MethodOptions):
    """MoFO's own options."""

    fraction: float = 0.15
    """Share of each tensor's elements stepped: those with the largest |first moment| (MoFO's runs: 15%)."""

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"mofo_fraction must be in (0, 1], got {self.fraction}")


class MomentumFilter(UpdateHooks):
    """Zeroes the update outside each tensor's top ``fraction`` by |first moment|.

    :meth:`select` is the definition (the eager rule, then ``torch.kthvalue`` over the tensor's |m|).
    :meth:`fused_select` makes the same update on the CPU in two fused passes, bit for bit: a threshold
    ladder around the tensor's previous threshold counts the new |m| without writing anything; the update
    then moves the elements above the rung pair that holds the k-th largest |m|, leaves the few inside it
    unmoved and lists them, and ``torch.kthvalue`` over those few gives the exact threshold. When the
    ladder misses (the threshold moved further than the bracket), it retries once with a wide bracket, then
    falls back to :meth:`select`.
    """

    freezes = True

    def __init__(self, fraction: float, always: set[str]) -> None:
        self.fraction = fraction
        self.always = always
        #: per tensor: the last exact threshold and the relative half-width of the next bracket
        self.threshold: dict[str, float] = {}
        self.width: dict[str, float] = {}
        #: how often the ladder found the threshold, needed its wide retry, or fell back (benchmarks, tests)
        self.stats = {"ladder": 0, "wide": 0, "fallback": 0}

    def select(self, key: Any, param: torch.Tensor, u: torch.Tensor, state: dict[str, Any] | None) -> int:
        if key in self.always or state is None:
            return 0
        moment = state["exp_avg"] if "exp_avg" in state else state["momentum_buffer"]  # Adam's m; momentum's v
        flat = moment.detach().abs().reshape(-1)
        n = flat.numel()
        k = math.ceil(self.fraction * n)
        if k >= n:
            return 0
        threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest |m|
        drop = flat < threshold  # ties at the threshold all move
        u.view(-1).masked_fill_(drop, 0)
        if self.threshold.get(key) is not None:  # the fused path fell back here: its next guess is this one
            self.threshold[key], self.width[key] = float(threshold), 0.25
        return int(drop.sum())

    def fused_select(
        self, key: Any, rule: UpdateRule, state_key: Any, param: torch.Tensor, grad: torch.Tensor, lr: float
    ) -> int | None:
        """The rule's update filtered as :meth:`select` does, in fused CPU kernels; None where they do not apply."""
        if key in self.always:
            return rule.fused(state_key, param, grad, None, lr)
        n = param.numel()
        k = math.ceil(self.fraction * n)
        if k >= n:
            return rule.fused(state_key, param, grad, None, lr)
        st = rule.state.get(state_key)
        if isinstance(rule, AdamRule):
            st = st if st is not None else rule._fresh(param)
            mom, state = st["exp_avg"], (st["exp_avg"], st["exp_avg_sq"])
            first, beta = False, rule.beta1
        elif isinstance(rule, MomentumRule):
            first = st is None
            mom = torch.empty_like(param, dtype=torch.float32) if first else st["momentum_buffer"]
            state, beta = (mom,), rule.momentum
        else:
            return None
        if not kernels.band_available(param, grad, *state):
            return None
        adam = isinstance(rule, AdamRule)
        found = self._bracket(key, grad, mom, k, adam=adam, beta=beta, first=first)
        if found is None:
            self.stats["fallback"] += 1
            return None
        lo, hi, listed, need = found
        if adam:
            rule.state[state_key] = st
            st["step"] += 1
            hyper = {"lr": lr, "beta1": rule.beta1, "beta2": rule.beta2, "eps": rule.eps, "step": int(st["step"]),
                     "weight_decay": rule.weight_decay}  # fmt: skip
            done = kernels.adam_band(param, grad, *state, lo=lo, hi=hi, listed=listed, **hyper)
        else:
            if first:
                rule.state[state_key] = {"momentum_buffer": mom}
            done = kernels.momentum_band(param, grad, mom, lr=lr, mu=beta, first=first, lo=lo, hi=hi, listed=listed)
        # the ladder's counts and the update's band come from the same arithmetic: they cannot disagree
        assert done is not None and done[1].numel() == listed, "MoFO's band kernels disagree"
        moved, idx = done
        values = mom.view(-1)[idx.long()].abs()
        threshold = float(torch.kthvalue(values, listed - need + 1).values)  # the k-th largest |m| of the tensor
        if adam:
            moved += kernels.adam_settle(param, *state, idx, threshold, **hyper)
        else:
            moved += kernels.momentum_settle(param, mom, idx, threshold, lr=lr)
        previous = self.threshold.get(key)
        self.threshold[key] = threshold
        if previous:  # the next bracket: three times this step's relative change, within [0.5%, 50%]
            self.width[key] = min(0.5, max(0.005, 3 * abs(threshold / previous - 1)))
        return n - moved

    def _bracket(
        self, key: Any, grad: torch.Tensor, mom: torch.Tensor, k: int, *, adam: bool, beta: float, first: bool
    ) -> tuple[float, float, int, int] | None:
        """``(lo, hi, elements in [lo, hi), how many of them are in the top k)`` for the k-th largest new |m|, or
        None when neither the usual bracket nor a wide one holds it."""
        guess = self.threshold.get(key)
        if not guess:  # the first step: a strided sample of the new |m|
            flat_g, flat_m = grad.reshape(-1), mom.reshape(-1)
            step = max(1, flat_g.numel() // 65536)
            g, m = flat_g[::step], flat_m[::step]
            sample = (g * (1 - beta) + m * beta) if adam else (g if first else m * beta + g)
            guess = float(torch.quantile(sample.abs().float()[:65536], 1 - self.fraction))
            if not guess > 0:
                return None
            self.width[key] = 0.25
        for width, kind in ((self.width.get(key, 0.05), "ladder"), (4.0, "wide")):
            if width < 1:
                rungs = [guess * (1 - width + 2 * width * j / (kernels.LADDER - 1)) for j in range(kernels.LADDER)]
            else:  # geometric: from guess / (1 + width) to guess * (1 + width)
                rungs = [guess * (1 + width) ** (2 * j / (kernels.LADDER - 1) - 1) for j in range(kernels.LADDER)]
            counts = kernels.moment_ladder(grad, mom, rungs, adam=adam, beta=beta, first=first)
            if counts[0] >= k > counts[-1]:
                j = max(i for i, c in enumerate(counts) if c >= k)
                self.stats[kind] += 1
                return rungs[j], rungs[j + 1], counts[j] - counts[j + 1], k - counts[j + 1]
        return None


@register
class MoFO(Method):
    name = "mofo"
    summary = "Momentum-Filtered Optimizer: each step moves only the top 15% of every tensor by |momentum|"
    options_class = MoFOOptions
    defaults = {"optimizer": "adamw"}  # MoFO filters AdamW's update
    optimizers = ("momentum", "adam", "adamw")  # it needs a first moment
    sharding_refusal = "the top-k of a tensor needs the whole tensor, not one process's shard"

    def make_hooks(self, cfg: TrainConfig, params: list[tuple[str, torch.nn.Parameter]]) -> UpdateHooks:
        always = {n for n, p in params if p.dim() <= 1}
        return MomentumFilter(self.options(cfg).fraction, always)
