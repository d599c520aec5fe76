"""Benchmark: batched scoring against one question at a time (SPEC §2 prediction).

    .venv/bin/python bench/bench_scoring.py [--rows 200] [--batch-size 16] [--model M]

Scores the first ``--rows`` questions of ../shared/data/csqa.jsonl with the embedded
SmolLM2-135M-Instruct (default) both ways in the same process, checks that the predictions agree,
and prints questions per second and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl.data import read_mc_jsonl, take_limit  # noqa: E402
from cnl.models import load_model_and_tokenizer  # noqa: E402
from cnl.scoring import PromptEncoder, predict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(C.SHARED / "data" / "csqa.jsonl"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"data not found: {args.data} (the benchmark reads ../shared/data/csqa.jsonl)")
    model, tok, source = load_model_and_tokenizer(args.model, device=args.device)
    rows = take_limit(read_mc_jsonl(args.data), args.rows)
    enc = PromptEncoder(tok).encode_all(rows)
    predict(model, enc[:4], batch_size=4, progress=False)  # warm-up
    timings = {}
    preds = {}
    for name, bs in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        t0 = time.perf_counter()
        preds[name] = predict(model, enc, batch_size=bs, progress=False)
        timings[name] = time.perf_counter() - t0
    (a, ta), (b, tb) = timings.items()
    same = preds[a].letters == preds[b].letters
    gap = max(
        abs(x - y)
        for pa, pb in zip(preds[a].candidate_logits, preds[b].candidate_logits, strict=True)
        for x, y in zip(pa, pb, strict=True)
    )
    print(f"{source.tag} on {next(model.parameters()).device}, {len(rows)} csqa questions; {C.env_note()}")
    print(f"{a:<16} {len(rows) / ta:8.1f} q/s  ({ta:.1f}s)")
    print(f"{b:<16} {len(rows) / tb:8.1f} q/s  ({tb:.1f}s)")
    print(
        f"speed-up {ta / tb:.2f}x; identical predictions: {same}; max candidate-logit gap {gap:.1e}; "
        f"accuracy {preds[b].n_correct / len(rows):.1%}"
    )


if __name__ == "__main__":
    main()
