"""Controlled knowledge (``cnl data synth``): invented people with fixed attributes, as questions.

Facts about people who do not exist are knowledge no model has before training: after a teaching round,
what the model answers is what it learned, with no letter bias and no contamination. Each person gets a
name (from pools of first and last names) and one value per attribute (birth city, birth date, university,
field of study, employer, home town), drawn with a seed from pools written for this module. Each attribute
has three phrasings of its question: the first is the question, the others are its ``paraphrases`` (for
``--eval-templates paraphrases``: cross-prompt generalisation).

The same facts come in both formats: open-ended (``question``, ``answer``) and 4-option multiple choice
in SPEC's prompt text (``label``; the distractors are other values of the same attribute). People are
split into groups (A, B, C, ...) to teach round after round (``cnl continual``).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from .errors import CnlError

__all__ = ["ATTRIBUTES", "Person", "make_people", "open_rows", "mcq_rows", "SynthError"]


class SynthError(CnlError, ValueError):
    """Impossible ``cnl data synth`` options."""


FIRST = (
    "Aldo", "Brina", "Caius", "Delphine", "Emrys", "Fenna", "Gideon", "Halla", "Ivo", "Jessamy", "Kasimir",
    "Linnea", "Marius", "Nerys", "Osric", "Perpetua", "Quillon", "Rosalind", "Soren", "Tamsin", "Ulric", "Vesna",
    "Wendel", "Ximena", "Yorick", "Zelda", "Anselm", "Bettina", "Corwin", "Dagny", "Eamon", "Florentyna", "Gustav",
    "Hedda", "Isandro", "Juniper", "Klaus", "Leocadia", "Mattias", "Noor",
)  # fmt: skip
LAST = (
    "Abernathy", "Brightwater", "Castellane", "Drummond", "Eversley", "Falkenrath", "Grimaldi", "Holloway",
    "Ingersoll", "Jablonski", "Kettleborough", "Lindqvist", "Marchetti", "Nightingale", "Okonkwo", "Pemberton",
    "Quintanilla", "Rasmussen", "Sandoval", "Thorncroft", "Umbridge", "Valdivia", "Whitlock", "Yarborough",
    "Zabrowski", "Ashdown", "Blackwood", "Cromwell", "Delacroix", "Elsworth",
)  # fmt: skip
CITIES = (
    "Lisbon", "Oslo", "Krakow", "Valencia", "Ghent", "Tampere", "Porto", "Bergen", "Lyon", "Trieste", "Gdansk",
    "Aarhus", "Graz", "Bilbao", "Brno", "Utrecht", "Cork", "Turin", "Leipzig", "Seville",
)  # fmt: skip
UNIVERSITIES = (
    "Halden University", "Marrow College", "the University of Westmere", "Ostbrook Institute of Technology",
    "Calloway University", "the Royal Academy of Tessaly", "Brightmoor College", "Vellum University",
    "the University of Northgate", "Larkspur Polytechnic", "Quenford University", "Saint Aurel College",
)  # fmt: skip
FIELDS = (
    "marine biology", "medieval history", "civil engineering", "linguistics", "astrophysics", "economics",
    "organic chemistry", "philosophy", "architecture", "statistics", "geology", "musicology",
)  # fmt: skip
EMPLOYERS = (
    "Norvik Shipping", "Altamira Foods", "Corvex Robotics", "Bellhaven Press", "Quarry Lane Bank",
    "Heliotrope Energy", "Saltmarsh Insurance", "Tindall Aerospace", "Marlow Pharmaceuticals", "Greyfriars Logistics",
    "Orison Software", "Fenwick Textiles",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip

#: attribute -> (the pool of values, three phrasings of the question with {name})
ATTRIBUTES: dict[str, tuple[tuple[str, ...] | None, tuple[str, str, str]]] = {
    "birth_city": (
        CITIES,
        ("In which city was {name} born?", "Where was {name} born?", "What is the birthplace of {name}?"),
    ),
    "birth_date": (
        None,
        ("When was {name} born?", "What is the date of birth of {name}?", "On what date was {name} born?"),
    ),
    "university": (
        UNIVERSITIES,
        ("Which university did {name} attend?", "Where did {name} study?", "At which university did {name} study?"),
    ),
    "field": (
        FIELDS,
        ("What did {name} study?", "What was the field of study of {name}?", "In which subject did {name} graduate?"),
    ),
    "employer": (
        EMPLOYERS,
        ("Which company does {name} work for?", "Who employs {name}?", "Where does {name} work?"),
    ),
    "home_town": (
        CITIES,
        ("In which city does {name} live?", "Where does {name} live now?", "What is the home town of {name}?"),
    ),
}


@dataclass(frozen=True)
class Person:
    """An invented person: a name, a group and one value per attribute."""

    name: str
    group: str
    facts: dict[str, str]


def _birth_date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2000)}"


def make_people(n: int, *, groups: int = 1, seed: int = 0, attributes: tuple[str, ...] | None = None) -> list[Person]:
    """``n`` people with distinct names, their facts drawn with ``seed``, dealt into ``groups`` groups (A, B, ...)
    of as equal sizes as can be, in order. The same arguments give the same people on any machine."""
    attributes = tuple(ATTRIBUTES) if attributes is None else attributes
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise SynthError(f"unknown attribute(s) {', '.join(unknown)} (known: {', '.join(ATTRIBUTES)})")
    if not attributes:
        raise SynthError("name at least one attribute")
    if not 1 <= groups <= 26:
        raise SynthError(f"groups must be between 1 and 26, got {groups}")
    if n < groups:
        raise SynthError(f"{n} people cannot fill {groups} groups")
    if n > len(FIRST) * len(LAST):
        raise SynthError(f"at most {len(FIRST) * len(LAST)} people have distinct names, got {n}")
    rng = random.Random(f"cnl-synth:{seed}")
    names = rng.sample([f"{f} {last}" for f in FIRST for last in LAST], n)
    per, extra = divmod(n, groups)
    group_of = [g for g in range(groups) for _ in range(per + (g < extra))]
    people = []
    for name, g in zip(names, group_of, strict=True):
        facts = {}
        for a in attributes:
            pool = ATTRIBUTES[a][0]
            facts[a] = _birth_date(rng) if pool is None else rng.choice(pool)
        people.append(Person(name, string.ascii_uppercase[g], facts))
    return people


def _distractors(rng: random.Random, attribute: str, answer: str, k: int = 3) -> list[str]:
    pool = ATTRIBUTES[attribute][0]
    if pool is None:  # dates: other dates of the same shape
        out: list[str] = []
        while len(out) < k:
            d = _birth_date(rng)
            if d != answer and d not in out:
                out.append(d)
        return out
    return rng.sample([v for v in pool if v != answer], k)


def open_rows(people: list[Person]) -> list[dict[str, Any]]:
    """One open-ended row per person and attribute: the question, the answer, the two other phrasings."""
    rows = []
    for p in people:
        for a, value in p.facts.items():
            q, *others = (t.format(name=p.name) for t in ATTRIBUTES[a][1])
            rows.append(
                {"question": q, "answer": value, "paraphrases": others, "person": p.name, "attribute": a,
                 "group": p.group}
            )  # fmt: skip
    return rows


def mcq_rows(people: list[Person], seed: int = 0) -> list[dict[str, Any]]:
    """The same facts as 4-option multiple-choice questions in SPEC's prompt text (distractors: other values
    of the attribute, drawn with ``seed``; the answer's position drawn too); paraphrases keep the options."""
    from .datasets import format_question

    rng = random.Random(f"cnl-synth-mcq:{seed}")
    rows = []
    for p in people:
        for a, value in p.facts.items():
            options = [value, *_distractors(rng, a, value)]
            rng.shuffle(options)
            label = "ABCD"[options.index(value)]
            stems = [t.format(name=p.name) for t in ATTRIBUTES[a][1]]
            q, *others = (format_question(s, options) for s in stems)
            rows.append(
                {"label": label, "question": q, "answer": value, "paraphrases": others, "person": p.name,
                 "attribute": a, "group": p.group}
            )  # fmt: skip
    return rows
