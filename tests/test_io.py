"""Tests for :mod:`cnl.io`: atomic writes never leave a half-written file under the final name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cnl.io import (
    atomic_open,
    atomic_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
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
