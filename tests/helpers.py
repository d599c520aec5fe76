"""Helpers shared by the test modules (importable because pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------ a second process
#: ``cnl train`` in a child process that blocks (writing ``marker``) at training sample ``stop_at``.
_CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    torch.set_num_threads(1)
    import cnl.train as T
    from cnl.cli import main
    stop_at, marker = int(sys.argv[1]), sys.argv[2]
    orig, calls = T.batch_losses, [0]
    def slow(*a, **k):
        calls[0] += 1
        if calls[0] == stop_at:
            with open(marker, "w") as f:
                f.write("blocked")
            time.sleep(600)
        return orig(*a, **k)
    T.batch_losses = slow
    sys.exit(main(sys.argv[3:]))
    """
)


@contextlib.contextmanager
def blocked_child(tmp_path: Path, argv: list[str], stop_at: int) -> Iterator[subprocess.Popen]:
    """A child ``cnl <argv>`` blocked at its ``stop_at``-th training loss (``n_train + 3``: in epoch 2, after
    two of its updates), yielded once it is blocked there; killed on exit if still alive."""
    marker = tmp_path / "child.marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path / "child.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(stop_at), str(marker), *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"the child did not reach training loss {stop_at} in time"
                time.sleep(0.05)
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------ training a tiny model
def train_tiny(
    out: Path, files: dict[str, Path], *, model: Any, tokenizer: Any, resume: bool = False, **cfg: Any
) -> list[dict[str, Any]]:
    """:func:`cnl.train.train` on a model in memory, on the CPU, quietly; ``cfg`` are training options in any
    of their forms (``method="lora", lora_r=4``), ``files`` the set files by name (``mastered=...``)."""
    import cnl.train as T
    from cnl.config import DataConfig, ModelConfig
    from cnl.resolve import train_config

    return T.train(
        train_config(**cfg),
        DataConfig(**{k: str(v) for k, v in files.items()}),
        ModelConfig(device="cpu"),
        out,
        resume=resume,
        model=model,
        tokenizer=tokenizer,
        model_tag="tiny",
        progress=False,
        echo=False,
    )


def cli_error(capsys: Any, argv: list[str]) -> str:
    """Run ``cnl argv``: exit status 2 and exactly one ``error:`` line, no traceback; return that line."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert "error: " in err, err
    line = err[err.index("error: ") :]  # (a model-loading progress bar may come before it)
    assert line.count("\n") == 1, err
    return line


def torchrun(nproc: int, argv: list[str], **kw: Any) -> Any:
    """``torchrun --standalone --nproc-per-node N -m cnl argv`` (``background=True``: a Popen)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "cnl", *argv]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)
