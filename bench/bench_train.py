"""Benchmark: cnl's training engine against the reference implementation's loop, and ft against cnl.

    .venv/bin/python bench/bench_train.py [--rows 40] [--lr 1e-5] [--model M] [--memory]

On the embedded SmolLM2-135M-Instruct (default) and the first ``--rows`` questions of
../shared/data/csqa.jsonl, split into M and I by the model itself:

1. **Epoch.** SPEC CNL/SGD epochs (reference gradient over M, one masked update per question of I,
   evaluation on I and M) by the reference implementation's loop re-implemented (bench/_common.py) and
   by cnl's engine with its fused updates and with its eager rules: seconds per phase of the last of
   ``--epochs`` (2: the first carries one-off warm-up costs; its total is printed too), the ratios,
   and how far apart the results are. ``--memory`` adds a pass per variant measuring peak resident memory
   per phase (glibc told to return freed memory at once).
2. **Per update.** Seconds per training update of ft and cnl, for sgd and adamw, by cnl's engine and by
   the reference's loop, all in one run on the same questions (the reference gradient is computed
   beforehand and not timed). A masked update is measured against the same optimizer's unmasked one.

Each measurement runs in its own process from the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl import kernels  # noqa: E402
from cnl.data import read_mc_jsonl, take_limit  # noqa: E402
from cnl.models import load_model_and_tokenizer  # noqa: E402
from cnl.scoring import PromptEncoder, predict  # noqa: E402

PHASES = ("reference", "train", "eval")


def load(args: argparse.Namespace):
    model, tok, source = load_model_and_tokenizer(args.model, device="cpu")
    rows = take_limit(read_mc_jsonl(args.data), args.rows)
    return model, tok, source, rows


def worker_epoch(args: argparse.Namespace) -> dict:
    if args.worker != "reference":  # what `cnl train` does; the reference's own loop runs as published
        from cnl.allocator import reuse_freed_memory

        reuse_freed_memory()
    model, tok, _, rows = load(args)
    split = json.loads(Path(args.split).read_text())
    M, I_ = [rows[i] for i in split["mastered"]], [rows[i] for i in split["injection"]]
    if args.measure == "memory":  # peak memory does not depend on how many steps a phase takes
        M, I_ = M[:4], I_[:3]
    C.prepare(model, PromptEncoder(tok).encode(I_[0]))
    epochs = [C.run_epoch(args.worker, model, tok, M, I_, C.CpuPeak(), lr=args.lr) for _ in range(args.epochs)]
    torch.save(C.weights_digest(model), args.weights_out)
    last = dict(epochs[-1])
    last["first_epoch_s"] = sum(epochs[0][f"{p}_s"] for p in PHASES)
    return last


def worker_updates(args: argparse.Namespace) -> dict:
    """Seconds per update of ft and cnl (sgd, adamw), by cnl's engine and by the reference's loop (both
    with the default allocator, so that the table compares the loops alone)."""
    model, tok, _, rows = load(args)
    split = json.loads(Path(args.split).read_text())
    M, I_ = [rows[i] for i in split["mastered"]], [rows[i] for i in split["injection"]]
    enc = PromptEncoder(tok)
    m_enc, i_enc = enc.encode_all(M), enc.encode_all(I_)
    C.prepare(model, i_enc[0])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    sign = C.cnl_reference(model, m_enc, 8)
    gref = C.reference_mean_grad(model, tok, M)
    model.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    warm = 2  # the first updates allocate optimizer state; timed from the third
    for optimizer in ("sgd", "adamw"):
        for impl in ("cnl", "reference"):
            for method in ("ft", "cnl", "ft", "cnl"):  # twice each, interleaved; the best counts
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(start[n])
                if impl == "cnl":
                    ref = sign if method == "cnl" else None
                    from cnl.optimizer import build_optimizer
                    from cnl.train import train_epoch

                    up = build_optimizer(model.named_parameters(), optimizer, args.lr)
                    up.reference = ref
                    with tempfile.TemporaryDirectory() as steps, up.in_backward():
                        log = C.step_logger(steps)  # the loop's per-step steps.csv row is timed too
                        train_epoch(model, i_enc[:warm], up, progress=False, on_step=log)
                        t0 = time.perf_counter()
                        train_epoch(model, i_enc[warm:], up, progress=False, on_step=log)
                        dt = time.perf_counter() - t0
                else:
                    g = gref if method == "cnl" else None
                    state: dict = {}
                    C.reference_train(model, tok, I_[:warm], args.lr, g, optimizer, state)
                    t0 = time.perf_counter()
                    C.reference_train(model, tok, I_[warm:], args.lr, g, optimizer, state)
                    dt = time.perf_counter() - t0
                key = f"{impl} {method}/{optimizer}"
                out[key] = min(out.get(key, float("inf")), dt / len(I_[warm:]))
    return out


def run_worker(args: argparse.Namespace, tmp: Path, mode: str, variant: str, measure: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else dict(os.environ)
    cmd = [
        sys.executable, __file__, "--worker", variant, "--mode", mode, "--measure", measure,
        "--split", str(tmp / "split.json"), "--weights-out", str(tmp / f"{variant}-{measure}.pt"),
        "--data", args.data, "--rows", str(args.rows), "--lr", str(args.lr), "--epochs", str(args.epochs),
    ]  # fmt: skip
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{variant} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(C.SHARED / "data" / "csqa.jsonl"))
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--variants", default="reference,cnl,cnl-eager")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per variant; the last one is reported")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory per phase")
    ap.add_argument("--skip-updates", action="store_true", help="skip the per-update table")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("epoch", "updates"), default="epoch", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    ap.add_argument("--split", help=argparse.SUPPRESS)
    ap.add_argument("--weights-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = worker_epoch(args) if args.mode == "epoch" else worker_updates(args)
        print("RESULT " + json.dumps(result))
        return
    if not Path(args.data).exists():
        sys.exit(f"data not found: {args.data} (the benchmark reads ../shared/data/csqa.jsonl)")

    model, tok, source, rows = load(args)
    enc = PromptEncoder(tok)
    ours = enc.encode_all(rows)
    theirs = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": r.question}], tokenize=False, add_generation_prompt=True
            )
        )["input_ids"]
        for r in rows
    ]
    same_prompts = all(list(a.input_ids) == list(b) for a, b in zip(ours, theirs, strict=True))
    preds = predict(model, ours, batch_size=16, progress=False)
    split = {
        "mastered": [i for i, ok in enumerate(preds.correct) if ok],
        "injection": [i for i, ok in enumerate(preds.correct) if not ok],
    }
    del model
    print(
        f"{source.tag}, {len(rows)} csqa rows: |M| = {len(split['mastered'])}, |I| = {len(split['injection'])}; "
        f"lr {args.lr:g}; updates: {kernels.describe('cpu')}; identical prompt tokens in both loops: "
        f"{same_prompts}; {C.env_note()}"
    )
    variants = args.variants.split(",")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "split.json").write_text(json.dumps(split))
        for variant in variants:
            results[variant] = run_worker(args, tmp, "epoch", variant, "time")
            if args.memory:
                mem = run_worker(args, tmp, "epoch", variant, "memory")
                for phase in PHASES:
                    results[variant][f"{phase}_peak"] = mem[f"{phase}_peak"]
        weights = {v: torch.load(tmp / f"{v}-time.pt") for v in variants}
        updates = None if args.skip_updates else run_worker(args, tmp, "updates", "updates", "time")

    base = variants[0]
    n = results[base]["n_params"]
    print(
        f"\n1. One CNL/SGD epoch (epoch {args.epochs} of {args.epochs}), seconds per phase (speed-up against {base})\n"
    )
    print(f"{'phase':<10} " + " ".join(f"{v:>22}" for v in variants))
    totals = {v: 0.0 for v in variants}
    for phase in PHASES:
        cells = []
        for v in variants:
            s = results[v][f"{phase}_s"]
            totals[v] += s
            cells.append(f"{s:>11.1f} ({results[base][f'{phase}_s'] / s:>5.2f}x)")
        print(f"{phase:<10} " + " ".join(f"{c:>22}" for c in cells))
    print(f"{'epoch':<10} " + " ".join(f"{f'{totals[v]:.1f} ({totals[base] / totals[v]:.2f}x)':>22}" for v in variants))
    firsts = {v: results[v]["first_epoch_s"] for v in variants}
    print(
        f"{'epoch 1':<10} " + " ".join(f"{f'{firsts[v]:.1f} ({firsts[base] / firsts[v]:.2f}x)':>22}" for v in variants)
    )
    if args.memory:
        print(f"\npeak extra memory above the loaded weights, bytes per parameter ({n / 1e6:.1f}M parameters)")
        for phase in PHASES:
            print(f"{phase:<10} " + " ".join(f"{results[v][f'{phase}_peak'] / n:>22.2f}" for v in variants))
    for v in variants[1:]:
        diff = (weights[base] - weights[v]).abs()
        print(
            f"{v} vs {base}: learned {results[v]['learned']} vs {results[base]['learned']}, mastered still correct "
            f"{results[v]['mastered_correct']} vs {results[base]['mastered_correct']}; train loss "
            f"{results[v]['train_avg_loss']:.5f} vs {results[base]['train_avg_loss']:.5f}; weights max |diff| "
            f"{float(diff.max()):.2e} ({float((diff > 0).float().mean()):.1e} of elements differ)"
        )
    if updates:
        print("\n2. Seconds per training update (best of two; masked against the same optimizer unmasked)\n")
        print(f"{'optimizer':<10} {'loop':<10} {'ft':>8} {'cnl':>8} {'cnl / ft':>9}")
        for optimizer in ("sgd", "adamw"):
            for impl in ("cnl", "reference"):
                ft, cn = updates[f"{impl} ft/{optimizer}"], updates[f"{impl} cnl/{optimizer}"]
                print(f"{optimizer:<10} {impl:<10} {ft:>8.3f} {cn:>8.3f} {cn / ft:>8.2f}x")
            print(
                f"{optimizer:<10} cnl's cnl update vs the reference's: "
                f"{updates[f'reference cnl/{optimizer}'] / updates[f'cnl cnl/{optimizer}']:.2f}x faster"
            )


if __name__ == "__main__":
    main()
