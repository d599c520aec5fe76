"""The documentation stays true to the code: README.md and every page of docs/.

* every ```python block compiles (the two library examples are also *run*, by tests/test_readme_example.py);
* every ``cnl`` command line of a ```bash (or unlabelled) block is accepted by the real argument parser,
  ``cnl.cli.build_parser()`` (parsed only: nothing is ever run);
* every relative link or image points to a file that exists (and, with ``#anchor``, to one of its headings);
* every docs page starts with a ``# Title`` and links back to the README.

Failures name the file and line, so a broken example is found in the page, not in this test.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]

#: Documented command lines that are deliberately not parsed, with the reason. Keep it tiny: write commands
#: that parse instead (no ``...`` placeholders). Each key is the command as the test sees it (continuations
#: joined, comment dropped, split on && and ;).
SKIPPED_COMMANDS: dict[str, str] = {}

#: Languages of fenced blocks whose lines are shell commands (an unlabelled block may hold commands too).
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}


@dataclass(frozen=True)
class Block:
    path: Path
    lang: str
    first_line: int  # 1-based line number of the block's first content line
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str
    argv: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------ parsing


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with its language and line numbers."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        for j in range(i + 1, len(lines)):
            if lines[j].strip() == fence:
                blocks.append(Block(path, lang, i + 2, tuple(lines[i + 1 : j])))
                i = j + 1
                break
        else:
            pytest.fail(f"{rel(path)}:{i + 1}: code block is never closed")
    return blocks


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of the lines outside fenced code blocks, inline code removed."""
    out: list[tuple[int, str]] = []
    in_fence = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append((n, re.sub(r"`[^`]*`", "", line)))
    return out


def split_shell_line(text: str) -> list[str]:
    """``text`` without its ``# comment``, cut at ``&&``, ``||``, ``;`` and ``|`` outside quotes."""
    segments: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(text):
                current.append(c)
                i += 1
                c = text[i]
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(text):
            current.append(c)
            i += 1
            c = text[i]
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            break
        elif text.startswith(("&&", "||"), i):
            segments.append("".join(current))
            current = []
            i += 2
            continue
        elif c in ";|":
            segments.append("".join(current))
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    segments.append("".join(current))
    return [s.strip() for s in segments if s.strip()]


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined: ``(line number of the first, text)``."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = block.first_line
    for k, line in enumerate(block.lines):
        if not pending:
            start = block.first_line + k
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(line)
        out.append((start, " ".join(part.strip() for part in pending)))
        pending = []
    if pending:
        out.append((start, " ".join(part.strip() for part in pending)))
    return out


_COMMAND_START = re.compile(r"^(?:\$\s+)?(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(\S+)")


def cnl_argv(segment: str) -> list[str] | None:
    """The arguments of ``cnl`` in a command segment, or None when the segment does not run cnl.

    Recognised: ``cnl ...``, ``path/to/cnl ...``, ``python -m cnl ...`` (any python), ``torchrun ... -m cnl ...``,
    each optionally after ``VAR=value`` assignments or a ``$`` prompt.
    """
    m = _COMMAND_START.match(segment)
    if not m:
        return None
    program = m.group(1).rsplit("/", 1)[-1]
    if program not in {"cnl", "torchrun"} and not re.fullmatch(r"python[0-9.]*", program):
        return None
    tokens = shlex.split(segment[m.start(1) :], posix=True)
    if program == "cnl":
        return tokens[1:]
    for k in range(1, len(tokens) - 1):
        if tokens[k] == "-m":
            return tokens[k + 2 :] if tokens[k + 1] == "cnl" else None
    return None


def documented_commands(paths: list[Path] = DOC_FILES) -> list[Command]:
    commands: list[Command] = []
    for path in paths:
        for block in fenced_blocks(path):
            if block.lang not in SHELL_LANGS:
                continue
            for line, text in logical_lines(block):
                for segment in split_shell_line(text):
                    try:
                        argv = cnl_argv(segment)
                    except ValueError as e:  # shlex: unbalanced quotes in what looks like a command
                        pytest.fail(f"{rel(path)}:{line}: cannot split {segment!r} like a shell: {e}")
                    if argv is not None:
                        commands.append(Command(path, line, segment, tuple(argv)))
    return commands


def python_blocks(paths: list[Path] = DOC_FILES) -> list[Block]:
    return [b for path in paths for b in fenced_blocks(path) if b.lang in {"python", "py"}]


# ------------------------------------------------------------------------------------------ the checks

COMMANDS = documented_commands()
PYTHON_BLOCKS = python_blocks()


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"{rel(b.path)}:{b.first_line}")
def test_python_block_compiles(block: Block) -> None:
    code = "\n" * (block.first_line - 1) + "\n".join(block.lines) + "\n"
    try:
        compile(code, str(block.path), "exec")
    except SyntaxError as e:
        pytest.fail(f"{rel(block.path)}:{e.lineno}: the ```python block does not compile: {e.msg}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_documented_command_parses(command: Command) -> None:
    from cnl.cli import build_parser

    if command.text in SKIPPED_COMMANDS:
        pytest.skip(f"{command.where}: {SKIPPED_COMMANDS[command.text]}")
    if "..." in command.argv or "…" in command.argv:
        pytest.fail(f"{command.where}: placeholder '...' in a documented command: {command.text}")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(command.argv))
    except SystemExit as e:
        if e.code == 0 and {"-h", "--help", "--version"} & set(command.argv):
            return
        lines = stderr.getvalue().strip().splitlines()
        why = lines[-1] if lines else f"SystemExit({e.code!r})"
        pytest.fail(f"{command.where}: `cnl` rejects the documented command\n  {command.text}\n  {why}")


def test_commands_are_found() -> None:
    """The extractor still sees the documented commands (a broken extractor would pass vacuously)."""
    where = {c.path for c in COMMANDS}
    assert README in where
    assert len(COMMANDS) >= 20, [c.text for c in COMMANDS]
    assert any(c.text.startswith("torchrun") for c in COMMANDS)
    assert any(c.text.startswith(".venv/bin/cnl") for c in COMMANDS)
    documented = {c.text for c in COMMANDS}
    stale = sorted(set(SKIPPED_COMMANDS) - documented)
    assert not stale, f"SKIPPED_COMMANDS names commands the docs no longer hold: {stale}"


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings_raw(path: Path) -> set[str]:
    """Anchors of the file's headings, inline code kept (prose_lines drops it)."""
    out: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6}\s", line):
            out.add(github_anchor(line))
    return out


@pytest.mark.parametrize("path", DOC_FILES, ids=rel)
def test_relative_links_point_to_files(path: Path) -> None:
    broken: list[str] = []
    for n, text in prose_lines(path):
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            if file_part.startswith("/"):
                broken.append(f"{rel(path)}:{n}: {target} is absolute; link relative to the page")
                continue
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{rel(path)}:{n}: {target} -> {rel(dest)} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in headings_raw(dest):
                broken.append(f"{rel(path)}:{n}: {target}: {rel(dest)} has no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", DOC_FILES[1:], ids=rel)
def test_docs_page_has_title_and_link_back(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{rel(path)}:1: a docs page starts with a '# Title'"
    assert any("](../README.md" in line for line in lines), f"{rel(path)}: no link back to ../README.md"


def test_readme_links_every_docs_page() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [rel(p) for p in DOC_FILES[1:] if f"]({rel(p)})" not in text]
    assert not missing, f"README.md does not link {missing}"


# ------------------------------------------------------------------------------------------ the extractor


def test_extractor_on_a_sample(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# T\n\n```bash\n# a comment\nbash setup.sh && .venv/bin/cnl compare --out x  # trailing\n"
        "torchrun --standalone --nproc-per-node 2 -m cnl train \\\n    --split s --out o\n"
        "CNL_MALLOC=system python -m cnl report a --out r; python -m pytest -q\n"
        "echo 'cnl split # not a comment'\n```\n\n```python\nx = 1\n```\n\n```\noutput with cnl's text\n```\n",
        encoding="utf-8",
    )
    found = [(c.line, c.argv) for c in documented_commands([page])]
    assert found == [
        (5, ("compare", "--out", "x")),
        (6, ("train", "--split", "s", "--out", "o")),
        (8, ("report", "a", "--out", "r")),
    ]
    (block,) = python_blocks([page])
    assert (block.first_line, block.lines) == (13, ("x = 1",))
    assert split_shell_line("a 'b;c' ; d # e") == ["a 'b;c'", "d"]
    assert github_anchor("### The rule itself: `cnl.mask`") == "the-rule-itself-cnlmask"
    assert github_anchor("## Scaling out: mini-batches and many GPUs") == "scaling-out-mini-batches-and-many-gpus"
