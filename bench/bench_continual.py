"""Benchmark: what a round of ``cnl continual`` costs as the protected set grows, and ``--reference-sample``.

    .venv/bin/python bench/bench_continual.py --start runs/teach-A/model \\
        --protected runs/cl/cnl/protected/round_02.jsonl --injection data/people/open_C.jsonl \\
        [--sizes 20,40,80] [--samples 8,16,32]

1. Cost per round against size: for each size s, one CNL epoch's phases with a protected set of s questions
   and an injection set of s questions (the first s of each file, repeated when a file is shorter): the
   reference pass over the protected set, the training epoch over the injection set, the evaluation of both.
   Seconds per question of each phase staying flat is cost linear in |protected| + |injection|.
2. Sign agreement: at the start weights, the reference sign over the whole protected set against the sign
   over fixed-seed samples of N questions (``--reference-sample N``, as each epoch draws them): the share of
   elements whose sign agrees (the mask a conflicting update gets), and the time of each reference pass.

The forgetting side by side is a pair of ``cnl continual`` runs (docs/continual.md shows both commands).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl.data import read_jsonl  # noqa: E402
from cnl.models import load_model_and_tokenizer  # noqa: E402
from cnl.scoring import PromptEncoder, predict  # noqa: E402


def take(rows: list, n: int) -> list:
    """The first ``n`` rows, the file repeated as often as needed."""
    return [rows[i % len(rows)] for i in range(n)]


def sample(n_total: int, n: int, seed: int, epoch: int) -> list[int]:
    """The indices ``cnl train --reference-sample n`` draws in ``epoch`` (:meth:`cnl.train.Run.reference_questions`)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return sorted(torch.randperm(n_total, generator=g)[:n].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default=None, help="the round's start weights (default: embedded SmolLM2-135M)")
    ap.add_argument("--protected", required=True, help="the protected set (JSONL)")
    ap.add_argument("--injection", required=True, help="an injection set (JSONL)")
    ap.add_argument("--sizes", default="20,40,80")
    ap.add_argument("--samples", default="8,16,32")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--answer-loss-end", action="store_true", help="count the end-of-turn token in the loss")
    args = ap.parse_args()
    import torch

    from cnl.optimizer import build_optimizer
    from cnl.train import sign_reference, train_epoch

    model, tok, source = load_model_and_tokenizer(args.start, device="cpu")
    enc = PromptEncoder(tok, answer_loss_end=args.answer_loss_end)
    protected, injection = read_jsonl(args.protected), read_jsonl(args.injection)
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tok.pad_token_id or 0
    print(f"{source.tag}; protected {args.protected} ({len(protected)}), injection {args.injection} "
          f"({len(injection)}); {args.optimizer} lr {args.lr:g}; {C.env_note()}")  # fmt: skip
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    print("\n1. One CNL epoch per size: seconds, and seconds per question\n")
    print(f"{'size':>5} {'reference':>18} {'train':>18} {'evaluate':>18} {'epoch':>9}")
    for s in (int(x) for x in args.sizes.split(",")):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        m_enc, i_enc = enc.encode_all(take(protected, s)), enc.encode_all(take(injection, s))
        t0 = time.perf_counter()
        ref = sign_reference(model, m_enc, params, pad_id=pad, progress=False)
        t_ref = time.perf_counter() - t0
        opt = build_optimizer(model.named_parameters(), args.optimizer, lr=args.lr)
        opt.reference = ref
        t0 = time.perf_counter()
        with opt.in_backward():
            train_epoch(model, i_enc, opt, pad_id=pad, progress=False)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict(model, m_enc + i_enc, tokenizer=tok, score="exact-tokens", pad_id=pad, progress=False)
        t_eval = time.perf_counter() - t0
        cells = [f"{t:7.1f} ({t / n:5.2f}/q)" for t, n in ((t_ref, s), (t_train, s), (t_eval, 2 * s))]
        print(f"{s:>5} " + " ".join(f"{c:>18}" for c in cells) + f" {t_ref + t_train + t_eval:>9.1f}")

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    m_enc = enc.encode_all(protected)
    t0 = time.perf_counter()
    full = sign_reference(model, m_enc, params, pad_id=pad, progress=False)
    t_full = time.perf_counter() - t0
    total = sum(p.numel() for p in params)
    print(f"\n2. Reference sign over a sample against the whole protected set ({len(m_enc)} questions, "
          f"{t_full:.1f}s; {total / 1e6:.1f}M elements)\n")  # fmt: skip
    print(f"{'sample':>7} {'epoch':>6} {'sign agrees':>12} {'of nonzero':>11} {'seconds':>8} {'speed-up':>9}")
    for n in (int(x) for x in args.samples.split(",")):
        for epoch in (1, 2):
            keep = sample(len(m_enc), n, seed=0, epoch=epoch)
            t0 = time.perf_counter()
            part = sign_reference(model, [m_enc[i] for i in keep], params, pad_id=pad, progress=False)
            t = time.perf_counter() - t0
            agree = nonzero = both = 0
            for p in params:
                a, b = full.sign(p), part.sign(p)
                agree += int((a == b).sum())
                nz = (a != 0) & (b != 0)
                nonzero += int(nz.sum())
                both += int((nz & (a == b)).sum())
            print(f"{n:>7} {epoch:>6} {agree / total:>11.1%} {both / max(nonzero, 1):>11.1%} {t:>8.1f} "
                  f"{t_full / t:>8.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
