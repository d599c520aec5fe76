"""Benchmark: batched scoring against one question at a time (SPEC §2 prediction), and open-ended answers.

    .venv/bin/python bench/bench_scoring.py [--rows 200] [--batch-size 16] [--model M]
    .venv/bin/python bench/bench_scoring.py --open nq-open [--rows 200]

Multiple choice: scores the first ``--rows`` questions of ../shared/data/csqa.jsonl with the embedded
SmolLM2-135M-Instruct (default) both ways in the same process, checks that the predictions agree,
and prints questions per second and the ratio.

Open-ended (``--open NAME|FILE``): the first ``--rows`` questions answered three ways in one process:
``model.generate`` one question at a time (the baseline), cnl's batched greedy decoding (left padding, KV
cache, stop at the end of the turn), and the fast path (one teacher-forced pass per question: does greedy
decoding give exactly the answer's tokens, then end the turn?). The generations must be token-identical,
and the three verdicts of "the answer exactly" identical; the generations' ``contains`` verdicts are
compared too. Generation runs for as many tokens as ``exact`` needs (the longest answer + 4), and again
for ``contains`` (+ 32).
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


def open_ended(args: argparse.Namespace) -> None:
    import torch

    from cnl.answers import default_max_new_tokens, fast_matches, greedy, matches
    from cnl.data import resolve_dataset
    from cnl.scoring import iter_batches

    model, tok, source = load_model_and_tokenizer(args.model, device=args.device)
    rows, tag = resolve_dataset(args.open, limit=args.rows, fmt="open")
    encoder = PromptEncoder(tok)
    enc = encoder.encode_all(rows)
    pad = encoder.pad_id
    batches = list(iter_batches(enc, args.batch_size))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731

    def one_at_a_time(n: int) -> list[list[int]]:
        out = []
        for e in enc:
            ids = torch.tensor([e.input_ids], device=model.device)
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=list(e.stop_ids), pad_token_id=pad)  # fmt: skip
            out.append(g[0, ids.shape[1] :].tolist())
        return out

    def batched(n: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in enc]
        for idx in batches:
            gen = greedy(model, [enc[i].input_ids for i in idx], [enc[i].stop_ids for i in idx], max_new_tokens=n,
                         pad_id=pad)  # fmt: skip
            for i, g in zip(idx, gen, strict=True):
                out[i] = g
        return out

    def fast() -> list[int | None]:
        out: list[int | None] = [None] * len(enc)
        for idx in batches:
            for i, hit in zip(idx, fast_matches(model, [enc[i] for i in idx], pad), strict=True):
                out[i] = hit
        return out

    def exact_tokens(outs: list[list[int]]) -> list[bool]:
        return [
            any(o == [*v, o[-1]] and o[-1] in e.stop_ids for v in e.variants) if o else False
            for o, e in zip(outs, enc, strict=True)
        ]

    def contains(outs: list[list[int]]) -> list[bool]:
        return [
            matches(decode([t for t in o if t not in e.stop_ids]), e.answers, "contains")
            for o, e in zip(outs, enc, strict=True)
        ]

    greedy(model, [enc[0].input_ids], [enc[0].stop_ids], max_new_tokens=2, pad_id=pad)  # warm-up
    timings: dict[str, float] = {}
    results: dict[str, object] = {}
    n_exact, n_contains = default_max_new_tokens(enc, "exact"), default_max_new_tokens(enc, "contains")
    for name, fn in (
        ("fast path", fast),
        (f"batched generation ({args.batch_size}), exact's {n_exact} tokens", lambda: batched(n_exact)),
        (f"one at a time (model.generate), exact's {n_exact} tokens", lambda: one_at_a_time(n_exact)),
        (f"batched generation ({args.batch_size}), contains' {n_contains} tokens", lambda: batched(n_contains)),
        (f"one at a time (model.generate), contains' {n_contains} tokens", lambda: one_at_a_time(n_contains)),
    ):
        t0 = time.perf_counter()
        results[name] = fn()
        timings[name] = time.perf_counter() - t0
    names = list(timings)
    fast_v = [h is not None for h in results[names[0]]]
    print(f"{source.tag} on {next(model.parameters()).device}, {len(rows)} {tag} questions; {C.env_note()}")
    for name in names:
        print(f"{name:<58} {len(rows) / timings[name]:8.2f} q/s  ({timings[name]:.1f}s)")
    same_exact = results[names[1]] == results[names[2]]
    same_contains = results[names[3]] == results[names[4]]
    print(f"generations token-identical, batched vs one at a time: exact's {same_exact}, contains' {same_contains}")
    verdicts = [fast_v, exact_tokens(results[names[1]]), exact_tokens(results[names[2]])]
    print(
        f"'exactly the answer' verdicts identical (fast path, batched, one at a time): "
        f"{verdicts[0] == verdicts[1] == verdicts[2]} ({sum(verdicts[0])} of {len(rows)} answered exactly)"
    )
    ca, cb = contains(results[names[3]]), contains(results[names[4]])
    print(f"'contains' verdicts identical (batched, one at a time): {ca == cb} ({sum(ca)} of {len(rows)} correct)")
    print(
        f"batched generation / one at a time: {timings[names[2]] / timings[names[1]]:.2f}x (exact's length), "
        f"{timings[names[4]] / timings[names[3]]:.2f}x (contains'); fast path / batched generation: "
        f"{timings[names[1]] / timings[names[0]]:.2f}x (exact's length)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(C.SHARED / "data" / "csqa.jsonl"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--open", default=None, metavar="NAME|FILE", help="open-ended questions (e.g. nq-open)")
    args = ap.parse_args()
    if args.open:
        open_ended(args)
        return
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
