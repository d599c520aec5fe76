"""The only place cnl writes files: atomic files and directories, digests, YAML reading, locks.

Every output goes through here. A file is written to a temporary sibling in the destination
directory, flushed and fsync'ed, then moved into place with ``os.replace`` (atomic on POSIX), so an
interrupted command leaves either the old complete file or the new complete file, never a fragment.
Files get the permissions a plain ``open()`` would give (``0o666`` minus the umask), so other users of
a shared server can read results under the usual umask 022. A directory (a saved model, a checkpoint)
is built in a temporary sibling and swapped into place (:func:`atomic_dir`); ``filelock`` guards
work that two processes must not do at once (:func:`exclusive`).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import ctypes.util
import errno
import getpass
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from .errors import ConfigError, OutputError

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_write_csv",
    "atomic_write_yaml",
    "atomic_save",
    "atomic_dir",
    "remove_atomic_leftovers",
    "exclusive",
    "locked_output",
    "lock_holder",
    "refuse_foreign_files",
    "check_writable",
    "file_digest",
    "read_yaml",
    "file_mode",
]

PathLike = str | os.PathLike[str]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file: what ``open(path, "w")`` would give (``0o666`` minus the umask)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def _temp_sibling(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file next to ``path``, moved onto ``path`` when the block succeeds, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp creates 0600, unreadable by the group
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; move it onto ``path`` only on success."""
    binary = "b" in mode
    with (
        _temp_sibling(Path(path)) as (fd, _),
        os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else "") as f,
    ):
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_yaml(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as YAML (keys in insertion order) to ``path`` atomically."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def atomic_write_jsonl(path: PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (non-ASCII kept as is) atomically; return the row count."""
    n = 0
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def atomic_write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (header + rows) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_save(path: PathLike, save: Callable[[str], None]) -> None:
    """Run ``save(tmp_path)`` (e.g. ``safetensors.save_file`` or ``fig.savefig``), then move into place."""
    with _temp_sibling(Path(path)) as (fd, tmp):
        os.close(fd)
        save(tmp)
        os.chmod(tmp, file_mode())  # the writer may have recreated the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------ directories
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE))
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _chmod_tree(folder: Path) -> None:
    """Give files and folders written by third-party savers the usual permissions (some use mkstemp)."""
    fmode, dmode = file_mode(), 0o777 & ~_umask()
    os.chmod(folder, dmode)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for name in files:
            os.chmod(os.path.join(root, name), fmode)


def _aside(final: Path, kind: str) -> Path:
    """A temporary sibling of ``final`` (``.name.<12 hex>.tmp`` being built, ``.old`` being replaced)."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.{kind}")


def remove_atomic_leftovers(path: PathLike) -> list[Path]:
    """Remove what :func:`atomic_dir` left beside ``path`` when its process was killed; return them.

    Only call it while no other process can be building ``path`` (e.g. under :func:`exclusive`).
    """
    final = Path(path)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[0-9a-f]{{12}}\.(?:tmp|old)")
    removed = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling (yielded) and put it in place of ``path`` on success.

    An existing ``path`` is swapped out in one atomic step where the kernel supports it (Linux
    ``renameat2``), else with two renames; either way a reader never sees a half-written directory
    under the final name, and a failure leaves the old directory untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(final, "tmp")
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        _chmod_tree(tmp)
        _fsync_tree(tmp)
        if not final.exists():
            os.rename(tmp, final)
            return
        if _exchange(tmp, final):  # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _aside(final, "old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock_path: PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``lock_path`` (``filelock``; released if the process dies)."""
    from filelock import FileLock

    p = Path(lock_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p), timeout=timeout, mode=file_mode()):
        yield


#: Files of a held output directory: the lock (``filelock``) and who holds it.
LOCK_NAME = ".cnl.lock"
HOLDER_NAME = ".cnl.lock.json"


def _exists(p: Path) -> bool:
    """``p.exists()``, False (not an exception) for a name the file system cannot even look up (too long)."""
    try:
        return p.exists()
    except OSError:
        return False


def check_writable(folder: PathLike) -> None:
    """Fail now, with a clear message, when files cannot be created in ``folder`` (or its nearest existing parent)."""
    p = Path(folder)
    if str(folder) == "":
        raise OutputError("the output is an empty path (it would write into the current directory); name a directory")
    probe_in = p
    while not _exists(probe_in):
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if _exists(probe_in) and not probe_in.is_dir():
        raise OutputError(f"{probe_in} exists and is not a directory; choose another output")
    try:
        limit = os.pathconf(probe_in, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in p.parts[len(probe_in.parts) :] if probe_in != p else ():
        if len(os.fsencode(part)) > limit:
            raise OutputError(
                f"{p}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, longer than the {limit} the file "
                "system allows; choose a shorter output name"
            )
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cnl-write-test.", dir=probe_in)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise OutputError(
            f"cannot write into {probe_in} ({why}); choose another output or fix its permissions"
        ) from None


@contextlib.contextmanager
def locked_output(folder: PathLike, purpose: str, *, for_own_steps: bool = False) -> Iterator[Path]:
    """Hold ``folder`` for one cnl process: a second one is refused with a message naming the holder.

    ``for_own_steps``: later steps of this same process may take it again (``cnl compare`` holds its split,
    run and report directories from the start, and its own split, training and report steps then write
    there); otherwise a second hold is refused, in this process too. A folder inside one that another
    process holds is refused as well.

    The lock is a ``filelock`` on ``folder/.cnl.lock`` (the kernel drops it when its process dies, so a
    killed run's lock never blocks the next one); ``.cnl.lock.json`` says who holds it. Both are removed
    on release. A folder this call had to create is removed again when the block fails before writing
    anything into it.
    """
    from filelock import FileLock, Timeout

    root = Path(folder)
    check_writable(root)
    key = str(root.resolve())
    if key in _HELD:
        if not _HELD[key]:
            raise OutputError(
                f"{root} is in use by another cnl process ({_describe_holder(root)}); wait for it to "
                "finish or stop it, or choose another output"
            )
        yield root  # held for this process's own steps (compare holds its directories for them)
        return
    created = [d for d in (root, *root.parents) if not d.exists()]  # removed again when nothing is written
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {root} ({e.strerror}); choose another output") from None
    lock_file = root / LOCK_NAME
    if lock_file.exists() and not lock_file.is_file():
        raise OutputError(f"cannot lock {root}: {lock_file} is not a file (cnl keeps its lock there); remove it")
    lock = FileLock(str(lock_file), timeout=0, mode=file_mode())
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"{root} is in use by another cnl process ({_describe_holder(root)}); wait for it to "
            "finish or stop it, or choose another output"
        ) from None
    except OSError as e:
        raise OutputError(f"cannot lock {root} ({lock_file}: {e.strerror}); choose another output") from None
    try:
        _check_ancestors(root)
    except BaseException:
        lock.release()
        raise
    ok = False
    try:
        atomic_write_json(
            root / HOLDER_NAME,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "user": _user(),
                "purpose": purpose,
                "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        _HELD[key] = for_own_steps
        yield root
        ok = True
    finally:
        _HELD.pop(key, None)
        # unlinked while still held: a process that opened the file before cannot take it, one that comes
        # after makes a new one, and the finished output holds no lock files
        for name in (HOLDER_NAME, LOCK_NAME):
            with contextlib.suppress(OSError):
                (root / name).unlink()
        lock.release()
        if not ok:
            for d in created:  # the folder, then the parents this call made, each only when nothing is in it
                try:
                    d.rmdir()
                except OSError:
                    break


def refuse_foreign_files(folder: PathLike, markers: Sequence[str], command: str) -> None:
    """Refuse an existing output folder that holds files cnl did not write: one without any of ``markers``
    (the files or folders ``command`` writes there first, e.g. ``run.json``) but with other entries. cnl
    writes into a new or empty folder, or into one of its own (a run being resumed, a report replaced),
    never over a user's files (a ``config.yaml`` or ``summary.csv`` of theirs)."""
    root = Path(folder)
    if not root.is_dir() or any((root / m).exists() for m in markers):
        return
    mine = (LOCK_NAME, HOLDER_NAME)
    others = sorted(
        e.name
        for e in root.iterdir()
        if e.name not in mine
        and not (e.name.startswith(".") and (e.name.endswith(".tmp") or "cnl-write-test" in e.name))
    )
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise OutputError(
            f"{root} holds files that {command} did not write ({shown}); it writes into a new or empty directory "
            "or one of its own, never over your files: choose another --out"
        )


#: Output folders this process holds (resolved path -> whether its own later steps may use them too).
_HELD: dict[str, bool] = {}


def _check_ancestors(root: Path) -> None:
    """Refuse a folder inside one that another cnl process holds (``train --out C/runs/x`` while
    ``cnl compare --out C`` runs): that process may write there at any moment."""
    for parent in root.resolve().parents:
        if str(parent) in _HELD or not (parent / LOCK_NAME).is_file():
            continue
        if lock_holder(parent) is not None:
            raise OutputError(
                f"{root} is inside {parent}, which is in use by another cnl process ({_describe_holder(parent)}); "
                "wait for it to finish or stop it, or choose another output"
            )


def lock_holder(folder: PathLike) -> dict[str, Any] | None:
    """Who holds ``folder`` (its ``.cnl.lock.json``, or ``{}`` when that cannot be read) while a live process
    holds its lock; None when no process holds it (a killed holder's lock is free again)."""
    from filelock import FileLock, Timeout

    root = Path(folder)
    lock_file = root / LOCK_NAME
    if str(root.resolve()) in _HELD:
        return _read_holder(root)
    if not lock_file.is_file():
        return None
    probe = FileLock(str(lock_file), timeout=0, mode=file_mode())
    try:
        probe.acquire()
    except Timeout:
        return _read_holder(root)
    except OSError:
        return None
    probe.release()
    return None


def _read_holder(root: Path) -> dict[str, Any]:
    try:
        holder = json.loads((root / HOLDER_NAME).read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _describe_holder(root: Path) -> str:
    try:
        h = json.loads((root / HOLDER_NAME).read_text(encoding="utf-8"))
        return f"{h['purpose']}, pid {h['pid']} on {h['host']} by {h['user']} since {h['since']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


# ------------------------------------------------------------------------------------ reading
def file_digest(path: PathLike) -> str:
    """First 16 hex digits of the file's SHA-256 (how run directories identify their input files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_yaml(path: PathLike) -> dict[str, Any]:
    """Read a YAML mapping (preset or config file), with a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    if not p.is_file():
        raise ConfigError(f"{p}: not a file (expected a YAML file of option: value)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    return data
