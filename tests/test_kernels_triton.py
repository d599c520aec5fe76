"""The Triton kernels (CUDA's fused updates) against the eager rules, run by Triton's CPU interpreter.

Skipped unless ``triton`` is installed. The interpreter evaluates ``tl.fma`` as a multiply and an add, so
here the weights are compared to the eager rule within float rounding, while the frozen counts, the
decoded signs and the momentum state must be exact; bit-exactness on a GPU is checked by
``bench/gpu_check.py`` when one is lent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from cnl.kernels import triton_kernels as T
    from cnl.mask import SignReference
    from cnl.optimizer import build_optimizer
    import cnl.kernels as K

    def eager(optimizer, storage, n, steps, gen_seed):
        gen = torch.Generator().manual_seed(gen_seed)
        p = torch.nn.Parameter(torch.randn(n, generator=gen))
        ref = SignReference(storage) if storage else None
        r = torch.randn(n, generator=gen); r[::5] = 0
        if ref is not None:
            ref.set(p, r)
        opt = build_optimizer([("p", p)], optimizer, 1e-2, fused=False)
        opt.reference = ref
        grads = []
        for _ in range(steps):
            g = torch.randn(n, generator=gen); g[::7] = 0
            grads.append(g.clone()); p.grad = g; opt.step_parameter(p)
        return p.detach(), opt.state.get(p, {}), opt.pop_counts()[0], grads, ref

    for optimizer in ("sgd", "momentum", "adam", "adamw"):
        for storage in (None, "bits", "int8"):
            n = 3 * 1024 + 300
            want, st, frozen, grads, ref = eager(optimizer, storage, n, 3, 1)
            gen = torch.Generator().manual_seed(1)
            p = torch.randn(n, generator=gen)
            signs = ref.raw(next(iter(ref.keys()))) if ref is not None else None
            m = torch.zeros(n); v = torch.zeros(n); total = 0
            for step, g in enumerate(grads, start=1):
                data, code = (signs[0], {"bits": 1, "int8": 2}[signs[1]]) if signs else (None, 0)
                if optimizer == "sgd":
                    c = T.run("cnl_sgd", n, [p, g, data], code, [-1e-2])
                elif optimizer == "momentum":
                    c = T.run("cnl_momentum", n, [p, g, v, data], code, [-1e-2, 0.9, int(step == 1)])
                else:
                    wd = 0.1 if optimizer == "adamw" else 0.0
                    bc1, bc2 = 1 - 0.9**step, 1 - 0.999**step
                    scalars = [-1e-2, 0.9, 1 - 0.9, 0.999, 1 - 0.999, bc1, bc2, 1e-8, wd, int(wd > 0)]
                    c = T.run("cnl_adam", n, [p, g, m, v, data], code, scalars)
                total += int(c)
            assert total == frozen, (optimizer, storage, total, frozen)
            torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
            if optimizer == "momentum":
                assert torch.equal(v, st["momentum_buffer"])
            if optimizer in ("adam", "adamw"):
                assert st["step"] == len(grads)
                torch.testing.assert_close(m, st["exp_avg"], rtol=1e-5, atol=1e-8)
                torch.testing.assert_close(v, st["exp_avg_sq"], rtol=1e-5, atol=1e-10)
            print("ok", optimizer, storage, frozen)
    """
)


def test_triton_kernels_match_the_eager_rules_in_the_interpreter(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 12
