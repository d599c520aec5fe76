"""Helpers shared by the test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from cnl.cli import main


def run_cli(argv: list[str]) -> int:
    """``cnl.cli.main(argv)``'s exit status, whether it returns or raises ``SystemExit`` (argparse)."""
    try:
        return main(argv)
    except SystemExit as e:
        code = e.code
        return 0 if code is None else code if isinstance(code, int) else 1


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under ``mask``, restoring the previous umask afterwards."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def mode_of(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


#: SPEC §4: the optimizers each of the seed's methods runs with.
SPEC_OPTIMIZERS = {
    "cnl": ("sgd", "momentum", "adam", "adamw"),
    "ft": ("sgd", "momentum", "adam", "adamw"),
    "lora": ("sgd", "momentum", "adamw"),
    "replay": ("sgd",),
}


def cnl_adam_train_args(
    model_dir: Path, out: Path, mastered: Path, injection: Path, *extra: str, epochs: int = 3
) -> list[str]:
    """``cnl train`` argv: cnl/adam at lr 1e-3 on a tiny model directory, in-set on ``mastered`` and
    ``injection``, CPU (flags in ``extra`` come last, so they override these)."""
    return [
        "train",
        *("--model", str(model_dir), "--device", "cpu", "--out", str(out)),
        *("--method", "cnl", "--optimizer", "adam", "--lr", "1e-3", "--epochs", str(epochs)),
        *("--mastered", str(mastered), "--injection", str(injection)),
        *extra,
    ]
