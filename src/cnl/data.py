"""Question sets as JSONL (SPEC §1, and open-ended questions): reading with full validation, subsets, halves.

Two formats, recognised per file (``--format`` forces one); one set holds one format:

- **multiple choice** (SPEC's, the default and unchanged): at least ``label`` (the answer letter) and
  ``question`` (the whole user message: question, options, instruction). The candidate letters of a
  question are read from its option lines (``A: ...``, ``B: ...``) after the last ``Options:`` line, never
  hard-coded, so data with three or five options works as well as the published four-option sets;
- **open-ended**: ``question`` (the user message) and ``answer`` (the assistant's), optionally
  ``aliases`` (other accepted answers, a list of strings).

Every other field is carried through untouched. Validation reads the whole file before anything
expensive happens, and a problem raises :class:`DataError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CnlError

log = logging.getLogger("cnl.data")

__all__ = [
    "DataError",
    "MCRow",
    "OpenRow",
    "FORMATS",
    "row_format",
    "rows_format",
    "read_jsonl",
    "json_lines",
    "validate_open_row",
    "option_letters",
    "read_mc_jsonl",
    "validate_row",
    "take_limit",
    "rows_digest",
    "split_halves",
    "HALVES_SEED",
    "HALVES_GROUP_KEY",
    "rows_from_dicts",
    "resolve_dataset",
    "check_regular_file",
    "duplicate_lines",
    "resolve_general",
]

#: Seed of the published halving (SPEC §3): ``random.Random(42).shuffle``, first ceil(n/2) rows = part 1.
HALVES_SEED = 42
#: Field whose values halve separately (the published mmlu halves are split per ``subject``).
HALVES_GROUP_KEY = "subject"

# An option line: a capital letter, a colon, then the option text ("A: light"). The published sets use
# exactly this form; the text may be empty only in malformed data, which validation reports.
_OPTION_RE = re.compile(r"^([A-Z]):(?:[ \t]|$)", re.MULTILINE)
_OPTIONS_HEADER_RE = re.compile(r"^Options:[ \t]*$", re.MULTILINE)


class DataError(CnlError, ValueError):
    """A dataset file or row cannot be used; the message names file, line and problem."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.detail = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class MCRow:
    """One validated multiple-choice question.

    Attributes:
        question: the whole user message (question, options, instruction).
        label: the answer letter.
        letters: the candidate letters found in the question's options, in order.
        raw: the original JSON object, every field kept (rewritten files start from it).
        line: 1-based line number in the source file (0 when built in memory).
    """

    question: str
    label: str
    letters: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)
    line: int = 0


@dataclass(frozen=True)
class OpenRow:
    """One validated open-ended question.

    Attributes:
        question: the user message.
        answer: the expected answer (the assistant's message in training).
        aliases: other accepted answers.
        raw: the original JSON object, every field kept.
        line: 1-based line number in the source file (0 when built in memory).
    """

    question: str
    answer: str
    aliases: tuple[str, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)
    line: int = 0

    @property
    def label(self) -> str:
        """The expected answer (the name multiple-choice rows give their letter)."""
        return self.answer


#: The data formats (``--format``): ``auto`` recognises each file's.
FORMATS = ("auto", "mcq", "open")


def row_format(obj: Any) -> str | None:
    """``mcq`` for a row with a ``label``, ``open`` for one with an ``answer`` and no ``label``; None otherwise
    (the named multiple-choice sets also carry the correct option's text as ``answer``: a label decides)."""
    if not isinstance(obj, dict):
        return None
    if "label" in obj:
        return "mcq"
    if "answer" in obj:
        return "open"
    return None


def rows_format(rows: Sequence[Any]) -> str:
    """``open`` when the rows are open-ended questions, else ``mcq`` (an empty set counts as multiple choice)."""
    return "open" if rows and isinstance(rows[0], OpenRow) else "mcq"


def validate_open_row(obj: Any, *, path: str | Path | None = None, line: int | None = None) -> OpenRow:
    """Check one decoded JSON value as an open-ended question, or raise :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(
                f"field '{key}' is missing (an open-ended question needs 'question' and 'answer')", path, line
            )
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f"field '{key}' must be a string, got {type(value).__name__}", path, line)
        if not value.strip():
            raise DataError(f"field '{key}' is empty", path, line)
    aliases = obj.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise DataError("field 'aliases' must be a list of non-empty strings (other accepted answers)", path, line)
    for key, value in obj.items():
        _check_unicode(value, key, path, line)
    return OpenRow(obj["question"], obj["answer"], tuple(aliases), raw=obj, line=line or 0)


def option_letters(question: str) -> tuple[str, ...]:
    """Return the option letters of ``question`` in order of appearance.

    Only the part after the last ``Options:`` line is searched when there is one, so a question stem
    that itself contains lines such as ``A: hello`` (a dialogue) does not add spurious options.
    Raises ``ValueError`` when a letter appears twice.
    """
    headers = list(_OPTIONS_HEADER_RE.finditer(question))
    body = question[headers[-1].end() :] if headers else question
    letters: list[str] = []
    for m in _OPTION_RE.finditer(body):
        letter = m.group(1)
        if letter in letters:
            raise ValueError(f"option {letter} appears twice in the question")
        letters.append(letter)
    return tuple(letters)


def validate_row(obj: Any, *, path: str | Path | None = None, line: int | None = None) -> MCRow:
    """Check one decoded JSON value and turn it into an :class:`MCRow`, or raise :class:`DataError`."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, line)
    for key in ("question", "label"):
        if key not in obj:
            raise DataError(f"field '{key}' is missing (every row needs 'question' and 'label')", path, line)
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(f"field '{key}' must be a string, got {type(value).__name__}", path, line)
        if not value.strip():
            raise DataError(f"field '{key}' is empty", path, line)
    for key, value in obj.items():
        _check_unicode(value, key, path, line)
    question: str = obj["question"]
    label = obj["label"].strip()
    try:
        letters = option_letters(question)
    except ValueError as e:
        raise DataError(str(e), path, line) from None
    if not letters:
        raise DataError(
            "no options found in 'question' (expected lines such as 'A: ...' after an 'Options:' line)",
            path,
            line,
        )
    if len(letters) < 2:
        raise DataError(
            f"only one option ({letters[0]}) found in 'question'; a multiple-choice question needs at least two",
            path,
            line,
        )
    if label not in letters:
        raise DataError(f"label {obj['label']!r} is not among the question's options {', '.join(letters)}", path, line)
    return MCRow(question=question, label=label, letters=letters, raw=obj, line=line or 0)


def _check_unicode(value: Any, key: str, path: str | Path | None, line: int | None) -> None:
    """A :class:`DataError` when a string in ``value`` holds a lone surrogate (a JSON ``\\udXXX`` escape without
    its pair): such text is not Unicode, and no tokenizer or file can take it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"field '{key}' holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start + 1}): "
                "not valid Unicode text; fix the \\u escape in the file",
                path,
                line,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(v, f"{key}.{k}", path, line)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{key}[{i}]", path, line)


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, JSON value)`` for each non-blank line of a JSONL file (a UTF-8 byte-order mark and CRLF
    endings are fine); a line that is not UTF-8 or not JSON raises :class:`DataError` with the file and line."""
    check_regular_file(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw_line in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", path, lineno) from None
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", path, lineno) from None


def read_jsonl(path: str | Path, *, fmt: str = "auto", allow_empty: bool = False) -> list[Any]:
    """Read and validate a whole JSONL file of questions: :class:`MCRow` or :class:`OpenRow`, one format.

    ``fmt`` ``auto`` takes the format of the first row (``label``: multiple choice; ``answer`` without a
    label: open-ended) and refuses a file that mixes them; ``mcq`` or ``open`` forces one. Blank lines, CRLF
    line endings, a UTF-8 byte-order mark, extra fields and non-ASCII text are fine. Anything else wrong
    raises :class:`DataError` with the file and line, before the caller does any work. An empty file is an
    error too, unless ``allow_empty`` (a split can legitimately write an empty mastered or injection set).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    p = Path(path)
    rows: list[Any] = []
    chosen = None if fmt == "auto" else fmt
    first_line = 0
    for lineno, obj in json_lines(p):
        kind = row_format(obj)
        if chosen is None:
            chosen, first_line = kind or "mcq", lineno
        elif fmt == "auto" and kind is not None and kind != chosen:
            names = {"mcq": "multiple-choice ('label')", "open": "open-ended ('answer', no 'label')"}
            raise DataError(
                f"this row is {names[kind]} but line {first_line} is {names[chosen]}: one set holds one format",
                p,
                lineno,
            )
        validate = validate_open_row if chosen == "open" else validate_row
        rows.append(validate(obj, path=p, line=lineno))
    if not rows and not allow_empty:
        raise DataError("no rows: the file is empty", p)
    dups = duplicate_lines(rows)
    if dups:
        shown = ", ".join(f"line {a} repeats line {b}" for a, b in dups[:3])
        log.warning("%s: %d duplicate question(s) (%s%s)", p, len(dups), shown, ", ..." if len(dups) > 3 else "")
    return rows


def read_mc_jsonl(path: str | Path, *, allow_empty: bool = False) -> list[Any]:
    """Read and validate a whole JSONL file of questions in either format (:func:`read_jsonl`, format
    recognised from the file)."""
    return read_jsonl(path, allow_empty=allow_empty)


def check_regular_file(path: Path) -> None:
    """A clear :class:`DataError` unless ``path`` is an existing regular file (not a directory or FIFO)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror})", path) from None
    if stat.S_ISDIR(mode):
        raise DataError("is a directory, expected a JSONL file", path)
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise DataError(f"is {kind}, expected a JSONL file", path)


def duplicate_lines(rows: Sequence[Any]) -> list[tuple[int, int]]:
    """``(line, first line)`` of every question whose text and label (answer) repeat an earlier row of the file."""
    first: dict[tuple[str, str], int] = {}
    dups = []
    for r in rows:
        key = (r.question, r.label)
        if key in first:
            dups.append((r.line, first[key]))
        else:
            first[key] = r.line
    return dups


def rows_from_dicts(objs: Sequence[dict[str, Any]], source: str = "<memory>", fmt: str = "auto") -> list[Any]:
    """Validate in-memory rows (e.g. a prepared named dataset), in the format of the first (or ``fmt``);
    row i is reported as line i+1."""
    chosen = (row_format(objs[0]) or "mcq") if fmt == "auto" and objs else fmt
    validate = validate_open_row if chosen == "open" else validate_row
    return [validate(o, path=source, line=i + 1) for i, o in enumerate(objs)]


def rows_digest(rows: Sequence[Any]) -> str:
    """First 16 hex digits of the SHA-256 of the rows' content (each row's JSON object, keys sorted, in
    order): what identifies a dataset whatever file or name it came from."""
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        obj = r.raw if isinstance(r, MCRow | OpenRow) else r
        h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def take_limit(rows: Sequence[MCRow], limit: int | None) -> list[MCRow]:
    """The first ``limit`` rows (deterministic, file order); all rows when ``limit`` is None."""
    if limit is None:
        return list(rows)
    if limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    return list(rows[:limit])


def _group_value(row: Any, key: str) -> Any:
    """``row[key]`` for a dict or an :class:`MCRow` (its ``raw`` object); None when absent."""
    obj = row.raw if isinstance(row, MCRow | OpenRow) else row
    return obj.get(key) if isinstance(obj, dict) else None


def split_halves(
    rows: Sequence[Any], seed: int = HALVES_SEED, group_key: str | None = HALVES_GROUP_KEY
) -> tuple[list[Any], list[Any]]:
    """SPEC §3 halves: shuffle with ``random.Random(seed)``; first ceil(n/2) rows, then the rest.

    Rows that carry a ``group_key`` field (``subject``, as the published mmlu files do) are halved
    within each group, as the published implementation does: one ``random.Random(seed)`` shuffles
    each group in turn (groups in order of first appearance), the first ceil(n_g/2) rows of every
    group go to part 1, the rest to part 2, groups concatenated. Rows without the field form one
    group, so for them this is exactly one shuffle of the whole list. ``group_key=None`` always
    shuffles the whole list. This reproduces the published ``correct1/correct2`` and
    ``wrong1/wrong2`` files of all four datasets exactly.
    """
    groups: dict[Any, list[Any]] = {}
    for row in rows:
        key = _group_value(row, group_key) if group_key is not None else None
        try:
            groups.setdefault(key, []).append(row)
        except TypeError:  # an unhashable field value: group by its JSON text
            groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(row)
    rng = random.Random(seed)
    first: list[Any] = []
    second: list[Any] = []
    for members in groups.values():
        shuffled = list(members)
        rng.shuffle(shuffled)
        k = math.ceil(len(shuffled) / 2)
        first.extend(shuffled[:k])
        second.extend(shuffled[k:])
    return first, second


def resolve_dataset(name_or_path: str, *, limit: int | None = None, fmt: str = "auto") -> tuple[list[Any], str]:
    """Rows and tag for ``--dataset``: a named dataset (csqa, arc_c, medqa, mmlu; open-ended: nq-open,
    jeopardy, sciq-open, squad-open) or a JSONL path (either format; ``fmt`` forces one).

    An existing file wins over a name, so a local ``csqa`` file can still be used. The tag is the
    dataset name or the file's stem and names the split files. The whole file is validated before
    ``limit`` is applied, so a bad line anywhere is reported before any model work starts.
    """
    from .datasets import NAMED_DATASETS, OPEN_DATASETS, load_named_dataset, load_open_dataset

    p = Path(name_or_path).expanduser()
    if p.is_file() or p.suffix in (".jsonl", ".json") or "/" in name_or_path:
        rows = read_jsonl(p, fmt=fmt)
        tag = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.stem
    elif name_or_path in NAMED_DATASETS:
        rows = rows_from_dicts(load_named_dataset(name_or_path), source=f"dataset '{name_or_path}'", fmt=fmt)
        tag = name_or_path
    elif name_or_path in OPEN_DATASETS:
        rows = rows_from_dicts(load_open_dataset(name_or_path), source=f"dataset '{name_or_path}'", fmt=fmt)
        tag = name_or_path
    else:
        known = ", ".join((*NAMED_DATASETS, *OPEN_DATASETS))
        raise DataError(f"'{name_or_path}' is neither a JSONL file nor a named dataset ({known})")
    return take_limit(rows, limit), tag


#: Questions a general-knowledge set is sampled to when its spec gives no size (``--general mmlu``).
GENERAL_DEFAULT_SIZE = 500


def resolve_general(spec: str, fmt: str = "auto") -> tuple[list[Any], str]:
    """Rows and tag of a general-knowledge set: ``NAME[:N]`` or ``FILE.jsonl[:N]``.

    ``N`` questions (default :data:`GENERAL_DEFAULT_SIZE`; ``all`` for every one) are sampled with a
    fixed seed and kept in file order, so that a set such as MMLU, stored subject by subject, is covered
    across its subjects rather than by its first few.
    """
    name, sep, size = spec.rpartition(":")
    if not sep or (size != "all" and not size.isdigit()):
        name, size = spec, str(GENERAL_DEFAULT_SIZE)
    rows, tag = resolve_dataset(name, fmt=fmt)
    if size != "all":
        n = int(size)
        if n < 1:
            raise DataError(f"general set {spec!r}: the size must be at least 1")
        if n < len(rows):
            keep = sorted(random.Random(0).sample(range(len(rows)), n))
            rows = [rows[i] for i in keep]
    return rows, tag
