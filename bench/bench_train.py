"""Benchmark: one CNL/SGD epoch of cnl's engine against a straightforward implementation.

    .venv/bin/python bench/bench_train.py [--rows 120] [--lr 1e-4] [--model M]

Both variants run the same SPEC §4 epoch (reference gradient over M, one masked SGD update per
question of I, evaluation on I and M) on the embedded SmolLM2-135M-Instruct (default) and the first
``--rows`` questions of ../shared/data/csqa.jsonl, split into M and I by the model itself. Each
variant runs in its own processes: a timing pass on every question, and a memory pass on a few (peak
memory does not depend on the number of steps) with glibc told to return freed memory at once; peak
memory is the rise of the resident set above the level after loading (Linux VmHWM, reset per
phase). Prints seconds and peak extra bytes per parameter for each phase, the ratios, and how far
apart the two results are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl.data import read_mc_jsonl, take_limit  # noqa: E402
from cnl.models import load_model_and_tokenizer  # noqa: E402
from cnl.scoring import PromptEncoder, predict  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    model, tok, _ = load_model_and_tokenizer(args.model, device="cpu")
    rows = take_limit(read_mc_jsonl(args.data), args.rows)
    enc = PromptEncoder(tok).encode_all(rows)
    split = json.loads(Path(args.split).read_text())
    M = [enc[i] for i in split["mastered"]]
    I_ = [enc[i] for i in split["injection"]]
    if args.measure == "memory":  # peak memory does not depend on how many steps a phase takes
        M, I_ = M[:8], I_[:4]
    C.prepare(model, I_[0])
    result = C.run_epoch(
        args.worker,
        model,
        M,
        I_,
        C.CpuPeak(),
        lr=args.lr,
        ref_batch_size=args.ref_batch_size,
        eval_batch_size=args.eval_batch_size,
        ref_chunks=args.ref_chunks,
    )
    torch.save(C.weights_digest(model), args.weights_out)
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(C.SHARED / "data" / "csqa.jsonl"))
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ref-batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--ref-chunks", type=int, default=1)
    ap.add_argument("--worker", choices=("naive", "cnl"), help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    ap.add_argument("--split", help=argparse.SUPPRESS)
    ap.add_argument("--weights-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.data).exists():
        sys.exit(f"data not found: {args.data} (the benchmark reads ../shared/data/csqa.jsonl)")

    model, tok, source = load_model_and_tokenizer(args.model, device="cpu")
    rows = take_limit(read_mc_jsonl(args.data), args.rows)
    preds = predict(model, PromptEncoder(tok).encode_all(rows), batch_size=16, progress=False)
    split = {
        "mastered": [i for i, ok in enumerate(preds.correct) if ok],
        "injection": [i for i, ok in enumerate(preds.correct) if not ok],
    }
    del model
    print(
        f"{source.tag}, {len(rows)} csqa rows: |M| = {len(split['mastered'])}, |I| = {len(split['injection'])}; "
        f"lr {args.lr:g}; {C.env_note()}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "split.json").write_text(json.dumps(split))
        for variant in ("naive", "cnl"):
            for measure in ("time", "memory"):
                # memory pass: glibc returns freed blocks at once, so the resident-set peak is the real peak
                # (it slows allocation, so the timing pass runs without it)
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else dict(os.environ)
                cmd = [
                    sys.executable, __file__, "--worker", variant, "--measure", measure,
                    "--split", str(Path(tmp) / "split.json"),
                    "--weights-out", str(Path(tmp) / f"{variant}-{measure}.pt"),
                    "--data", args.data, "--rows", str(args.rows), "--lr", str(args.lr),
                    "--ref-batch-size", str(args.ref_batch_size), "--eval-batch-size", str(args.eval_batch_size),
                    "--ref-chunks", str(args.ref_chunks),
                ]  # fmt: skip
                if args.model:
                    cmd += ["--model", args.model]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode != 0 or not line:
                    sys.exit(f"{variant} worker failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[0][7:])
                if measure == "time":
                    results[variant] = res
                else:
                    for phase in ("reference", "train", "eval"):
                        results[variant][f"{phase}_peak"] = res[f"{phase}_peak"]
        w_naive = torch.load(Path(tmp) / "naive-time.pt")
        w_cnl = torch.load(Path(tmp) / "cnl-time.pt")
    n = results["cnl"]["n_params"]
    print()
    print(f"{'phase':<10} {'naive s':>9} {'cnl s':>9} {'speed-up':>9} {'naive B/param':>14} {'cnl B/param':>12}")
    tot_n = tot_c = 0.0
    for phase in ("reference", "train", "eval"):
        a, b = results["naive"][f"{phase}_s"], results["cnl"][f"{phase}_s"]
        tot_n, tot_c = tot_n + a, tot_c + b
        pa, pb = results["naive"][f"{phase}_peak"] / n, results["cnl"][f"{phase}_peak"] / n
        print(f"{phase:<10} {a:>9.1f} {b:>9.1f} {a / b:>8.2f}x {pa:>14.2f} {pb:>12.2f}")
    print(f"{'epoch':<10} {tot_n:>9.1f} {tot_c:>9.1f} {tot_n / tot_c:>8.2f}x")
    peak_n = max(results["naive"][f"{p}_peak"] for p in ("reference", "train", "eval")) / n
    peak_c = max(results["cnl"][f"{p}_peak"] for p in ("reference", "train", "eval")) / n
    print(
        f"peak extra memory over the weights: naive {peak_n:.2f} B/param, cnl {peak_c:.2f} B/param "
        f"(ratio {peak_n / peak_c:.2f}x); cnl training phase {results['cnl']['train_peak'] / n:.2f} B/param, "
        f"reference sign {results['cnl']['sign_bytes'] / n:.3f} B/param"
    )
    diff = (w_naive - w_cnl).abs()
    print(
        f"results: learned {results['naive']['learned']} vs {results['cnl']['learned']}, mastered still correct "
        f"{results['naive']['mastered_correct']} vs {results['cnl']['mastered_correct']}; train loss "
        f"{results['naive']['train_avg_loss']:.5f} vs {results['cnl']['train_avg_loss']:.5f}; weights max |diff| "
        f"{float(diff.max()):.2e}, elements differing {float((diff > 0).float().mean()):.2e}"
    )


if __name__ == "__main__":
    main()
