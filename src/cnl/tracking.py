"""``--report-to``: training curves where people look at them (TensorBoard, Weights & Biases).

The run directory's ``steps.csv`` and ``summary.csv`` always hold the numbers; a tracker sends the same
values on: per optimizer step the loss, the masked fraction and the learning rate (``train/...``), per
evaluation the KL of ``--probe`` and the sample counts (``steps/...``), per epoch the counts, the KL and the
general accuracy (``epoch/...``). Both packages are optional (the ``track`` extra):

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (torch's ``SummaryWriter``);
- ``wandb``: a run in ``RUN_DIR/wandb``, offline unless an API key is configured and the W&B server answers
  (``WANDB_MODE`` set by the user wins), so that training never waits on a network.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Tracker", "check_available", "open_tracker", "wandb_mode"]


class Tracker:
    """Where a run's curves go; the base class sends nothing (``--report-to none``)."""

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` (name -> number) at ``step``."""

    def close(self) -> None:
        """Flush and close (idempotent)."""


class _TensorBoard(Tracker):
    def __init__(self, folder: Path, config: Mapping[str, Any], resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--report-to tensorboard needs the tensorboard package: pip install 'cnl[track]' "
                "(or pip install tensorboard)"
            ) from None
        self.folder = folder
        # a resumed run recomputes the steps after its checkpoint: the events a killed run wrote for them go
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step)
        self.writer.add_text("config", f"```\n{_flat(config)}\n```", 0)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


class _WandB(Tracker):
    def __init__(self, folder: Path, config: Mapping[str, Any], name: str, resume_step: int | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "--report-to wandb needs the wandb package: pip install 'cnl[track]' (or pip install wandb)"
            ) from None
        folder.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode()
        id_file = folder / "cnl-run-id"  # a resumed cnl run continues its W&B run
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cnl"),
            name=name,
            dir=str(folder),
            mode=self.mode,
            config=dict(config),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
        )
        id_file.write_text(self.run.id)

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_mode() -> str:
    """``WANDB_MODE`` when the user set it; else ``online`` when an API key is configured and the W&B server
    answers within two seconds, ``offline`` otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path.home() / ".netrc"
        has_key = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    if not has_key:
        return "offline"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError:
        return "offline"
    return "online"


#: The package each tracker needs, and how to install it.
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_available(kind: str) -> None:
    """A :class:`ConfigError` before any work when the package of ``--report-to kind`` is not installed."""
    import importlib.util

    package = _PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"--report-to {kind} needs the {package} package: pip install 'cnl[track]' (or pip install {package})"
        )


def open_tracker(
    kind: str,
    run_dir: str | Path,
    config: Mapping[str, Any],
    name: str | None = None,
    resume_step: int | None = None,
) -> Tracker:
    """The tracker of ``--report-to kind`` for a run directory (``none``: one that sends nothing); a resumed run
    gives the first step it will log again (``resume_step``)."""
    root = Path(run_dir)
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return _TensorBoard(root / "tensorboard", config, resume_step)
    if kind == "wandb":
        return _WandB(root / "wandb", config, name or root.name, resume_step)
    raise ConfigError(f"unknown --report-to {kind!r} (choose from none, tensorboard, wandb)")


def _flat(config: Mapping[str, Any], prefix: str = "") -> str:
    """``key: value`` lines of a nested mapping (the configuration as TensorBoard's text tab shows it)."""
    lines = []
    for k, v in config.items():
        if isinstance(v, Mapping):
            lines.append(_flat(v, f"{prefix}{k}."))
        else:
            lines.append(f"{prefix}{k}: {v}")
    return "\n".join(x for x in lines if x)
