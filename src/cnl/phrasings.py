"""Other phrasings of the questions (``--eval-templates FILE``): is a fact learned under one phrasing known
under another?

The file is YAML (or JSON): a mapping of a short name to a phrasing, or a list of phrasings (named
``p1``, ``p2``, ...). A phrasing is either a template holding ``{question}`` once (``"Quick question:
{question}"``: the question's own text put in), or ``paraphrase:K``: each row's K-th entry (from 1) of its
own ``paraphrases`` field, a list of other wordings of the whole user message. The word ``paraphrases`` in
place of a file name means every paraphrase the rows carry (``paraphrase-1``, ``paraphrase-2``, ...).

A multiple-choice question keeps its options: a template wraps the whole user message (question, options,
instruction), and a paraphrase must list the same option letters. Evaluation then counts learned and
forgotten questions under each phrasing, beside the training phrasing's SPEC columns
(:mod:`cnl.train`, :mod:`cnl.report`).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import DataError, MCRow, OpenRow, option_letters

__all__ = ["Phrasing", "load_phrasings", "rephrase", "PARAPHRASES"]

#: ``--eval-templates paraphrases``: every paraphrase the rows carry.
PARAPHRASES = "paraphrases"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARAPHRASE = re.compile(r"^paraphrase:(\d+)$")


@dataclasses.dataclass(frozen=True)
class Phrasing:
    """One other phrasing: its name (a column suffix), and a template or a paraphrase index (from 1)."""

    name: str
    template: str | None = None
    paraphrase: int | None = None

    def text(self, row: Any, path: str = "") -> str:
        """The user message of ``row`` in this phrasing."""
        if self.template is not None:
            return self.template.replace("{question}", row.question)
        paraphrases = row.raw.get("paraphrases")
        assert self.paraphrase is not None
        if not isinstance(paraphrases, list) or len(paraphrases) < self.paraphrase:
            raise DataError(
                f"phrasing {self.name!r} takes paraphrase {self.paraphrase} of every question, and this row has "
                f"{len(paraphrases) if isinstance(paraphrases, list) else 'no'} 'paraphrases'",
                path or None,
                row.line or None,
            )
        text = paraphrases[self.paraphrase - 1]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"'paraphrases' entry {self.paraphrase} is not a non-empty string", path or None, row.line)
        return text


def _check_template(name: str, template: Any, source: str) -> Phrasing:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"phrasing name {name!r} must be letters, digits, '_', '-' or '.'", source)
    if not isinstance(template, str) or not template.strip():
        raise DataError(f"phrasing {name!r} must be a template text or paraphrase:K", source)
    m = _PARAPHRASE.match(template.strip())
    if m:
        k = int(m.group(1))
        if k < 1:
            raise DataError(f"phrasing {name!r}: paraphrases are numbered from 1", source)
        return Phrasing(name, paraphrase=k)
    fields = [f for _, f, _, _ in string.Formatter().parse(template.replace("{{", "").replace("}}", "")) if f]
    if fields != ["question"]:
        raise DataError(f"phrasing {name!r} must hold {{question}} exactly once (found {fields or 'none'})", source)
    return Phrasing(name, template=template)


def load_phrasings(spec: str, rows: Sequence[Sequence[Any]] = ()) -> list[Phrasing]:
    """The phrasings of ``--eval-templates``: a YAML/JSON file, or ``paraphrases`` (as many as the rows of
    ``rows`` (sets of rows) carry). Validated before any model loads."""
    if spec == PARAPHRASES:
        counts = [len(r.raw.get("paraphrases") or []) for group in rows for r in group]
        n = max(counts, default=0)
        if n == 0:
            raise DataError("--eval-templates paraphrases: no question carries a 'paraphrases' field")
        return [Phrasing(f"paraphrase-{k}", paraphrase=k) for k in range(1, n + 1)]
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise DataError("--eval-templates: file not found (a YAML list or mapping of phrasings)", path)
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML, or JSON (a subset of it)
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason})", path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"not valid YAML ({getattr(e, 'problem', e)})", path, mark.line + 1 if mark else None) from None
    items = list(raw.items()) if isinstance(raw, dict) else [(f"p{i}", t) for i, t in enumerate(raw or [], 1)]
    if not isinstance(raw, dict | list) or not items:
        raise DataError("expected a list or a mapping of phrasings", path)
    phrasings = [_check_template(str(name), template, str(path)) for name, template in items]
    if len({p.name for p in phrasings}) != len(phrasings):
        raise DataError("two phrasings share a name", path)
    return phrasings


def rephrase(rows: Sequence[Any], phrasing: Phrasing, path: str = "") -> list[Any]:
    """``rows`` with their user message in ``phrasing`` (a multiple-choice question keeps its letters)."""
    out = []
    for r in rows:
        text = phrasing.text(r, path)
        if isinstance(r, MCRow):
            try:
                letters = option_letters(text)
            except ValueError as e:
                raise DataError(f"phrasing {phrasing.name!r}: {e}", path or None, r.line or None) from None
            if letters != r.letters:
                raise DataError(
                    f"phrasing {phrasing.name!r} gives options {', '.join(letters) or 'none'}, the question has "
                    f"{', '.join(r.letters)}: a rephrased multiple-choice question keeps its options",
                    path or None,
                    r.line or None,
                )
            out.append(dataclasses.replace(r, question=text, raw={**r.raw, "question": text}))
        elif isinstance(r, OpenRow):
            out.append(dataclasses.replace(r, question=text, raw={**r.raw, "question": text}))
        else:  # pragma: no cover - the data layer makes only these two
            raise TypeError(type(r).__name__)
    return out
