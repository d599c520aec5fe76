"""Tests for :mod:`cnl.io`: atomic writes never leave a half-written file under the final name."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock, Timeout
from helpers import mode_of, umask

import cnl.io
from cnl.errors import CnlError, ConfigError
from cnl.io import (
    atomic_dir,
    atomic_open,
    atomic_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    atomic_write_yaml,
    exclusive,
    file_digest,
    file_mode,
    read_yaml,
)


class Boom(RuntimeError):
    pass


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_open_success_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old content\n", encoding="utf-8")
    with atomic_open(target) as f:
        f.write("new ")
        # Not visible under the final name until the block ends.
        assert target.read_text(encoding="utf-8") == "old content\n"
        f.write("content")
    assert target.read_text(encoding="utf-8") == "new content"
    assert _leftovers(tmp_path) == []


def test_atomic_open_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("previous\n", encoding="utf-8")
    with pytest.raises(Boom), atomic_open(target) as f:
        f.write("partial data that must never appear")
        raise Boom("interrupted")
    assert target.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_open_failure_without_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(Boom), atomic_open(target, "wb") as f:
        f.write(b"\x00\x01")
        raise Boom
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_keyboard_interrupt_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("kept", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as f:
        f.write("x")
        raise KeyboardInterrupt
    assert target.read_text(encoding="utf-8") == "kept"
    assert _leftovers(tmp_path) == []


def test_jsonl_failure_in_row_generator_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    assert atomic_write_jsonl(target, [{"a": 1}, {"a": 2}]) == 2
    before = target.read_bytes()

    def rows():
        yield {"a": 3}
        raise Boom("generator failed")

    with pytest.raises(Boom):
        atomic_write_jsonl(target, rows())
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_unserialisable_row_keeps_previous(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    atomic_write_jsonl(target, [{"ok": True}])
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"ok": True}, {"bad": object()}])
    assert target.read_text(encoding="utf-8") == '{"ok": true}\n'
    assert _leftovers(tmp_path) == []


def test_jsonl_non_ascii_round_trip(tmp_path: Path) -> None:
    rows = [
        {"question": "Où est le café à Zürich ? 東京 Москва", "label": "A"},
        {"question": "the patient’s “chart” — naïve", "label": "B", "extra": ["ü", 1]},
        {"question": "line\nbreak\r\nand tab\t and \u2028 separator", "label": "C"},
    ]
    target = tmp_path / "u.jsonl"
    assert atomic_write_jsonl(target, rows) == 3
    raw = target.read_bytes()
    assert "café".encode() in raw and "東京".encode() in raw  # kept as UTF-8, not \\u escapes
    assert b"\\u00e9" not in raw
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 4  # one object per line, final newline
    assert [json.loads(line) for line in lines[:-1]] == rows


def test_jsonl_empty(tmp_path: Path) -> None:
    target = tmp_path / "e.jsonl"
    assert atomic_write_jsonl(target, []) == 0
    assert target.read_bytes() == b""


def test_text_newlines_not_translated(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    atomic_write_text(target, "a\nb\r\nc")
    assert target.read_bytes() == b"a\nb\r\nc"


def test_json_bytes_csv(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": "é", "n": [1, 2]})
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"x": "é", "n": [1, 2]} and "é" in text and text.endswith("\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\xff\x00")
    assert (tmp_path / "b.bin").read_bytes() == b"\xff\x00"
    atomic_write_csv(tmp_path / "c.csv", ["epoch", "name"], [[1, "a,b"], [2, "ü"]])
    assert (tmp_path / "c.csv").read_text(encoding="utf-8") == 'epoch,name\n1,"a,b"\n2,ü\n'
    assert _leftovers(tmp_path) == []


def test_creates_parent_directories(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.json"
    atomic_write_json(target, {"ok": 1})
    assert json.loads(target.read_text()) == {"ok": 1}


def test_atomic_save(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")

    def save(path: str) -> None:
        assert path != str(target) and Path(path).parent == tmp_path
        Path(path).write_bytes(b"new")

    atomic_save(target, save)
    assert target.read_bytes() == b"new"

    def failing(path: str) -> None:
        Path(path).write_bytes(b"half")
        raise Boom

    with pytest.raises(Boom):
        atomic_save(target, failing)
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_replace_keeps_other_readers_view(tmp_path: Path) -> None:
    # A reader that opened the old file keeps reading the old content (the file is replaced, not rewritten).
    target = tmp_path / "r.txt"
    atomic_write_text(target, "old")
    with target.open(encoding="utf-8") as reader:
        atomic_write_text(target, "new")
        assert reader.read() == "old"
    assert target.read_text(encoding="utf-8") == "new"
    assert os.listdir(tmp_path) == ["r.txt"]


# ------------------------------------------------------------------------------------ permissions


def _mkstemp_saver(path: str) -> None:
    # A saver that replaces the file with one created 0600 (as tempfile.mkstemp does).
    fd, other = tempfile.mkstemp(dir=os.path.dirname(path))
    os.write(fd, b"saved")
    os.close(fd)
    os.replace(other, path)


def _write_with_open(path: Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(b"x")


WRITERS: dict[str, Callable[[Path], object]] = {
    "open": _write_with_open,
    "bytes": lambda p: atomic_write_bytes(p, b"\x00\x01"),
    "text": lambda p: atomic_write_text(p, "text"),
    "json": lambda p: atomic_write_json(p, {"a": 1}),
    "yaml": lambda p: atomic_write_yaml(p, {"a": 1}),
    "jsonl": lambda p: atomic_write_jsonl(p, [{"a": 1}]),
    "csv": lambda p: atomic_write_csv(p, ["a"], [[1]]),
    "save": lambda p: atomic_save(p, lambda tmp: Path(tmp).write_bytes(b"saved")),
    "save-mkstemp": lambda p: atomic_save(p, _mkstemp_saver),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writers_give_umask_permissions(tmp_path: Path, writer: str, mask: int, expected: int) -> None:
    target = tmp_path / "out"
    with umask(mask):
        assert file_mode() == expected
        WRITERS[writer](target)
        assert mode_of(target) == expected
        # Replacing an existing file with other permissions gives the umask's, not the old file's.
        target.chmod(0o400)
        WRITERS[writer](target)
        assert mode_of(target) == expected
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ atomic_dir
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_atomic_dir_builds_new_directory(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "model"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final and tmp.is_dir()
        (tmp / "a.txt").write_text("a")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.bin").write_bytes(b"b")
        assert not final.exists()  # nothing under the final name until the block ends
    assert _tree(final) == {"a.txt": b"a", "nested/b.bin": b"b"}
    assert _siblings(final.parent) == ["model"]


@pytest.mark.parametrize("exchange", ["renameat2", "fallback"])
def test_atomic_dir_replaces_existing_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str) -> None:
    calls: list[tuple[Path, Path]] = []
    real = cnl.io._exchange

    def spy(a: Path, b: Path) -> bool:
        calls.append((a, b))
        return False if exchange == "fallback" else real(a, b)

    monkeypatch.setattr(cnl.io, "_exchange", spy)
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    (final / "shared.txt").write_text("old")
    (final / "old_dir").mkdir()
    (final / "old_dir" / "x").write_text("x")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        (tmp / "shared.txt").write_text("new")
        assert _tree(final) == {"old.txt": b"old", "shared.txt": b"old", "old_dir/x": b"x"}
    assert len(calls) == 1  # the swap path was taken
    assert _tree(final) == {"new.txt": b"new", "shared.txt": b"new"}
    assert not (final / "old_dir").exists()
    assert _siblings(tmp_path) == ["model"]  # neither the .tmp nor an .old folder is left


def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "in_a").write_text("a")
    (b / "in_b").write_text("b")
    if not cnl.io._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    assert _tree(a) == {"in_b": b"b"} and _tree(b) == {"in_a": b"a"}


@pytest.mark.parametrize("exchange", ["renameat2", "fallback"])
@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_dir_failure_keeps_old_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: str, error: type[BaseException]
) -> None:
    if exchange == "fallback":
        monkeypatch.setattr(cnl.io, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(error), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("half")
        raise error()
    assert _tree(final) == {"old.txt": b"old"}
    assert _siblings(tmp_path) == ["model"]


def test_atomic_dir_failure_without_old_directory(tmp_path: Path) -> None:
    with pytest.raises(Boom), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "f").write_text("x")
        raise Boom
    assert _siblings(tmp_path) == []


@pytest.mark.parametrize(("mask", "fmode", "dmode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
@pytest.mark.parametrize("exchange", ["renameat2", "fallback"])
def test_atomic_dir_gives_umask_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mask: int, fmode: int, dmode: int, exchange: str
) -> None:
    if exchange == "fallback":
        monkeypatch.setattr(cnl.io, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("old")
    with umask(mask), atomic_dir(final) as tmp:
        fd, name = tempfile.mkstemp(dir=tmp, suffix=".bin")  # created 0600 by design
        os.write(fd, b"weights")
        os.close(fd)
        os.replace(name, tmp / "weights.bin")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.txt").write_text("x")
        (tmp / "sub" / "x.txt").chmod(0o600)
    assert mode_of(final) == dmode
    assert mode_of(final / "sub") == dmode
    assert mode_of(final / "weights.bin") == fmode
    assert mode_of(final / "sub" / "x.txt") == fmode
    assert _tree(final) == {"sub/x.txt": b"x", "weights.bin": b"weights"}


# ------------------------------------------------------------------------------------ exclusive
def _other_process_try_lock(path: Path) -> str:
    code = (
        "import sys\n"
        "from filelock import FileLock, Timeout\n"
        "lock = FileLock(sys.argv[1])\n"
        "try:\n"
        "    lock.acquire(timeout=0)\n"
        "except Timeout:\n"
        "    print('busy')\n"
        "else:\n"
        "    lock.release()\n"
        "    print('acquired')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_exclusive_blocks_other_holders_until_released(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "run.lock"  # parent folder created by exclusive
    with exclusive(path):
        assert path.exists()
        with pytest.raises(Timeout):
            FileLock(str(path)).acquire(timeout=0)
        with pytest.raises(Timeout), exclusive(path, timeout=0):
            pass
        assert _other_process_try_lock(path) == "busy"
    other = FileLock(str(path))
    other.acquire(timeout=0)  # free again in this process
    other.release()
    assert _other_process_try_lock(path) == "acquired"
    with exclusive(path, timeout=0):  # and for exclusive itself
        pass


def test_exclusive_released_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    with pytest.raises(Boom), exclusive(path):
        raise Boom
    assert _other_process_try_lock(path) == "acquired"


def test_exclusive_lock_file_has_umask_permissions(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    with umask(0o022), exclusive(path):
        assert mode_of(path) == 0o644


# ------------------------------------------------------------------------------------ read_yaml
def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert isinstance(err.value, CnlError)
    message = str(err.value)
    assert str(path) in message
    return message


def test_read_yaml_mapping(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1.0e-3\nname: é\nmethods:\n  lora:\n    lr: 2\n", encoding="utf-8")
    assert read_yaml(p) == {"lr": 1e-3, "name": "é", "methods": {"lora": {"lr": 2}}}
    atomic_write_yaml(p, {"b": [1, 2], "a": None})
    assert list(read_yaml(p)) == ["b", "a"]  # written in insertion order, read back the same


def test_read_yaml_errors_name_the_file(tmp_path: Path) -> None:
    assert "not found" in _config_error(tmp_path / "missing.yaml")
    assert "not a file" in _config_error(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("lr: 1\nname: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _config_error(bad)
    bad = tmp_path / "broken.yaml"
    bad.write_text("lr: 1\nepochs: 2\nmethod: a: b\n", encoding="utf-8")
    message = _config_error(bad)
    assert f"{bad}:3:" in message and "not valid YAML" in message
    bad.write_text("lr: 1\nlist: [1, 2\n", encoding="utf-8")
    assert "not valid YAML" in _config_error(bad)
    bad = tmp_path / "list.yaml"
    bad.write_text("- lr: 1\n- epochs: 2\n", encoding="utf-8")
    assert "expected a mapping" in _config_error(bad) and "list" in _config_error(bad)
    bad.write_text("just a string\n", encoding="utf-8")
    assert "str" in _config_error(bad)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n"])
def test_read_yaml_empty_is_empty_mapping(tmp_path: Path, text: str) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text(text, encoding="utf-8")
    assert read_yaml(p) == {}


# ------------------------------------------------------------------------------------ file_digest
@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (5 << 19) + 7])
def test_file_digest_is_sha256_prefix(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:16]
    assert file_digest(p) == expected and len(expected) == 16
    assert file_digest(str(p)) == expected


def test_file_digest_sees_a_change_past_the_first_block(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = bytearray(b"a" * ((1 << 20) + 100))
    p.write_bytes(bytes(data))
    before = file_digest(p)
    data[-1] = ord("b")  # only the second 1 MiB block differs
    p.write_bytes(bytes(data))
    assert file_digest(p) != before
    assert file_digest(p) == hashlib.sha256(bytes(data)).hexdigest()[:16]


def test_remove_atomic_leftovers_removes_only_what_atomic_dir_leaves(tmp_path: Path) -> None:
    from cnl.io import atomic_dir, remove_atomic_leftovers

    final = tmp_path / "model"
    building: list[Path] = []

    class Killed(BaseException):
        pass

    # a killed process leaves its half-built directory; simulate by keeping it past the block
    with pytest.raises(Killed), atomic_dir(final) as tmp:
        building.append(tmp)
        (tmp / "w.bin").write_bytes(b"x")
        keep = tmp.with_name(tmp.name.replace(".tmp", ".old"))
        keep.mkdir()
        raise Killed
    assert not building[0].exists()  # a failure Python sees is cleaned up by atomic_dir itself
    killed = tmp_path / f".model.{'a' * 12}.tmp"
    killed.mkdir()
    others = [tmp_path / ".model.notahex.tmp", tmp_path / f".other.{'a' * 12}.tmp", tmp_path / "model.lock"]
    for p in others[:2]:
        p.mkdir()
    others[2].write_text("")
    removed = remove_atomic_leftovers(final)
    assert sorted(removed) == sorted([killed, keep])
    assert not killed.exists() and not keep.exists()
    assert all(p.exists() for p in others)
    assert remove_atomic_leftovers(tmp_path / "nowhere" / "x") == []
