"""``cnl data synth``: invented people, deterministic for a seed, as open-ended and multiple-choice facts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import cli_error, run_cli

from cnl.data import MCRow, OpenRow, read_jsonl
from cnl.synth import ATTRIBUTES, SynthError, make_people, mcq_rows, open_rows


def test_the_same_seed_gives_the_same_people_and_another_seed_others() -> None:
    a, b = make_people(12, groups=3, seed=5), make_people(12, groups=3, seed=5)
    assert a == b
    other = make_people(12, groups=3, seed=6)
    assert [p.name for p in other] != [p.name for p in a]
    assert len({p.name for p in a}) == 12  # distinct names
    assert [p.group for p in a] == ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    assert [p.group for p in make_people(7, groups=3)] == ["A"] * 3 + ["B"] * 2 + ["C"] * 2
    for p in a:
        assert list(p.facts) == list(ATTRIBUTES)
        for attr, value in p.facts.items():
            pool = ATTRIBUTES[attr][0]
            if pool is not None:
                assert value in pool
            else:
                assert re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, (19[5-9]\d|2000)", value), value


def test_open_and_multiple_choice_rows_state_the_same_facts() -> None:
    people = make_people(4, seed=1, attributes=("birth_city", "employer", "birth_date"))
    opened, mcq = open_rows(people), mcq_rows(people, seed=1)
    assert len(opened) == len(mcq) == 12
    assert mcq == mcq_rows(people, seed=1)  # the options' order is drawn with the seed too
    for o, m in zip(opened, mcq, strict=True):
        assert (o["person"], o["attribute"], o["answer"]) == (m["person"], m["attribute"], m["answer"])
        assert o["person"] in o["question"] and len(o["paraphrases"]) == 2
        assert all(o["person"] in q for q in o["paraphrases"]) and o["question"] not in o["paraphrases"]
        options = [line[3:] for line in m["question"].splitlines() if line[:3] in ("A: ", "B: ", "C: ", "D: ")]
        assert len(options) == 4 and len(set(options)) == 4
        assert options["ABCD".index(m["label"])] == m["answer"]
        pool = ATTRIBUTES[m["attribute"]][0]
        if pool is not None:  # distractors: other values of the same attribute
            assert set(options) <= set(pool)
        for p in m["paraphrases"]:  # a paraphrase keeps the options
            assert p.split("\n", 1)[1] == m["question"].split("\n", 1)[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 2, "groups": 3}, "2 people cannot fill 3 groups"),
        ({"n": 3, "attributes": ("shoe_size",)}, "unknown attribute(s) shoe_size"),
        ({"n": 3, "attributes": ()}, "at least one attribute"),
        ({"n": 3, "groups": 0}, "groups must be between 1 and 26"),
        ({"n": 10**6}, "have distinct names"),
    ],
)
def test_impossible_options_are_refused(kwargs: dict, message: str) -> None:
    n = kwargs.pop("n")
    with pytest.raises(SynthError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_people(n, **kwargs)


def test_cli_writes_both_formats_per_group_identically_for_a_seed(tmp_path: Path, capsys) -> None:
    argv = ["data", "synth", "--people", "6", "--groups", "2", "--seed", "3", "--attributes", "birth_city,field"]
    assert run_cli([*argv, "--out", str(tmp_path / "one")]) == 0
    assert run_cli([*argv, "--out", str(tmp_path / "two")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))
    assert names == ["mcq_A.jsonl", "mcq_B.jsonl", "open_A.jsonl", "open_B.jsonl", "people.json", "synth.json"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    opened = read_jsonl(tmp_path / "one" / "open_A.jsonl")
    mcq = read_jsonl(tmp_path / "one" / "mcq_B.jsonl")
    assert len(opened) == 6 and all(isinstance(r, OpenRow) for r in opened)  # 3 people x 2 attributes
    assert len(mcq) == 6 and all(isinstance(r, MCRow) for r in mcq)
    manifest = json.loads((tmp_path / "one" / "synth.json").read_text())
    assert manifest["questions"] == {"A": 6, "B": 6} and manifest["attributes"] == ["birth_city", "field"]
    people = json.loads((tmp_path / "one" / "people.json").read_text())
    assert {p["name"] for p in people if p["group"] == "A"} == {r.raw["person"] for r in opened}
    assert "unknown attribute(s) shoe" in cli_error(capsys, ["data", "synth", "--out", str(tmp_path / "x"),
                                                            "--attributes", "shoe"])  # fmt: skip
