"""Atomic file writes: a reader never sees a half-written file under its final name.

Every output of cnl goes through here. Data is written to a temporary file in the destination
directory, flushed and fsync'ed, then moved into place with ``os.replace`` (atomic on POSIX), so an
interrupted command leaves either the old complete file or the new complete file, never a fragment.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_csv",
    "atomic_save",
]


@contextlib.contextmanager
def _temp_sibling(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file next to ``path``, moved onto ``path`` when the block succeeds, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; move it onto ``path`` only on success."""
    binary = "b" in mode
    with (
        _temp_sibling(Path(path)) as (fd, _),
        os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as f,
    ):
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (non-ASCII kept as is) atomically; return the row count."""
    n = 0
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def atomic_write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (header + rows) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_save(path: str | os.PathLike[str], save: Callable[[str], None]) -> None:
    """Run ``save(tmp_path)`` (e.g. ``torch.save`` or ``safetensors.save_file``), then move into place."""
    with _temp_sibling(Path(path)) as (fd, tmp):
        os.close(fd)
        save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
