"""GPU benchmark: one CNL/SGD epoch of cnl's engine against the reference implementation's loop, on a
randomly initialised model of Qwen2.5-1.5B-Instruct's configuration (no download needed).

    python bench/gpu_bench_train.py [--rows 120] [--mastered 40] [--lr 1e-7] [--device cuda]
    python bench/gpu_bench_train.py --tiny --device cpu      # the same code on a tiny model (tests)

Questions: the first ``--rows`` of ../shared/data/csqa.jsonl when present, else synthetic ones; the
first ``--mastered`` play M (reference set) and the rest I (training set) — with random weights a
model-made split would mean nothing. The tokenizer is cnl's small offline test tokenizer (its ids
are a subset of the model's vocabulary). Each variant starts from the same weights; prints per-phase
seconds and peak memory above the weights (GPU: allocated; CPU: resident), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from cnl import kernels  # noqa: E402
from cnl.data import read_mc_jsonl, rows_from_dicts, take_limit  # noqa: E402
from cnl.testing import make_mc_rows, make_tiny_tokenizer  # noqa: E402


def build_model(seed: int, device: torch.device, tiny: bool) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    from cnl.testing import make_tiny_model

    torch.manual_seed(seed)
    if tiny:
        return make_tiny_model("qwen2", vocab_size=len(make_tiny_tokenizer("chatml")), seed=seed).to(device)
    cfg = C.config_for("qwen2.5-1.5b")
    cfg._attn_implementation = "sdpa"
    with device:
        model = Qwen2ForCausalLM(cfg)
    return model.float().eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--mastered", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-7)
    ap.add_argument("--ref-batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--variants", default="reference,cnl")
    ap.add_argument("--device", default="auto", help="cuda (default when present) or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of Qwen2.5-1.5B's shape")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    device = device or torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu --tiny, or bench/bench_train.py on the CPU)")
    data = C.SHARED / "data" / "csqa.jsonl"
    rows = take_limit(read_mc_jsonl(data), args.rows) if data.exists() else rows_from_dicts(make_mc_rows(args.rows))
    tok = make_tiny_tokenizer("chatml")
    tok.padding_side = "left"
    M, I_ = rows[: args.mastered], rows[args.mastered :]
    meter = C.CudaPeak() if device.type == "cuda" else C.CpuPeak()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"{where}; {'tiny' if args.tiny else 'Qwen2.5-1.5B'} config, random weights; |M| = {len(M)}, |I| = {len(I_)}; "
        f"{'csqa' if data.exists() else 'synthetic'} questions; updates: {kernels.describe(device)}; {C.env_note()}"
    )
    results: dict[str, dict] = {}
    for variant in args.variants.split(","):
        model = build_model(0, device, args.tiny)
        n = sum(p.numel() for p in model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        r = C.run_epoch(
            variant,
            model,
            tok,
            M,
            I_,
            meter,
            lr=args.lr,
            ref_batch_size=args.ref_batch_size,
            eval_batch_size=args.eval_batch_size,
        )
        r["params"], r["weights_bytes"] = n, weights
        r["counts"] = [r["learned"], r["mastered_correct"]]
        results[variant] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'phase':<10} " + " ".join(f"{v + ' s':>10} {v + ' GiB':>10}" for v in results))
    for phase in ("reference", "train", "eval"):
        cells = " ".join(
            f"{results[v][phase + '_s']:>10.2f} {results[v][phase + '_peak'] / 2**30:>10.2f}" for v in results
        )
        print(f"{phase:<10} {cells}")
    if {"reference", "cnl"} <= set(results):
        a, b = results["reference"], results["cnl"]
        n = b["params"]
        for phase in ("reference", "train", "eval"):
            print(
                f"{phase}: speed-up {a[phase + '_s'] / b[phase + '_s']:.2f}x, peak extra "
                f"{a[phase + '_peak'] / n:.2f} vs {b[phase + '_peak'] / n:.2f} B/param"
            )
        ta = sum(a[p + "_s"] for p in ("reference", "train", "eval"))
        tb = sum(b[p + "_s"] for p in ("reference", "train", "eval"))
        print(f"epoch: {ta:.1f}s vs {tb:.1f}s ({ta / tb:.2f}x); weights {b['weights_bytes'] / 2**30:.2f} GiB")
        print(
            f"counts: learned {a['learned']} vs {b['learned']}, mastered still correct {a['mastered_correct']} vs "
            f"{b['mastered_correct']}; train loss {a['train_avg_loss']:.5f} vs {b['train_avg_loss']:.5f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
