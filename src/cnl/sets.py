"""Which question set plays which role in each setting (SPEC §4 settings table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config import DataConfig
from .data import DataError, check_regular_file
from .errors import ConfigError
from .split import read_split_manifest

__all__ = ["SETTINGS", "REFERENCE", "SetRoles", "resolve_set_files", "roles_for", "with_reference"]

#: The settings of SPEC §4 (``replay`` belongs to the replay method).
SETTINGS = ("in-set", "ood-correct", "ood-wrong", "replay")

#: The set name of a reference given by ``--reference`` (a file, or the model's own answers) rather than by the
#: setting: it is never read from ``--split`` or the set flags.
REFERENCE = "reference"

# set name -> DataConfig field / split.json part
_PARTS = {
    "mastered": "correct",
    "injection": "wrong",
    "mastered1": "correct1",
    "mastered2": "correct2",
    "injection1": "wrong1",
    "injection2": "wrong2",
}


@dataclass(frozen=True)
class SetRoles:
    """The roles of a setting.

    Attributes:
        setting: the setting's name.
        reference: set whose mean gradient is the CNL reference (None: not needed).
        train: sets trained on, concatenated (replay shuffles them once).
        learn: set on which learning (wrong → correct) is counted.
        forget: set on which forgetting (correct → wrong) is counted.
        learn_column / forget_column: the summary.csv column names of SPEC §4.
    """

    setting: str
    reference: str | None
    train: tuple[str, ...]
    learn: str
    forget: str
    learn_column: str
    forget_column: str

    def needed(self) -> list[str]:
        """Every set this setting reads, without repeats."""
        names = [self.reference, *self.train, self.learn, self.forget]
        return list(dict.fromkeys(n for n in names if n is not None))


def roles_for(setting: str, uses_reference: bool) -> SetRoles:
    """Roles for a setting; ``uses_reference`` fills the reference role (CNL methods only, SPEC §4)."""
    masked = uses_reference
    if setting == "in-set":
        return SetRoles(
            setting,
            "mastered" if masked else None,
            ("injection",),
            "injection",
            "mastered",
            "wrong_to_correct",
            "correct_to_wrong",
        )
    if setting == "replay":
        return SetRoles(
            setting,
            None,
            ("injection", "mastered1"),
            "injection",
            "mastered2",
            "wrong_to_correct",
            "correct2_to_wrong",
        )
    if setting == "ood-correct":
        return SetRoles(
            setting,
            "mastered1" if masked else None,
            ("injection",),
            "injection",
            "mastered2",
            "wrong_to_correct",
            "correct2_to_wrong",
        )
    if setting == "ood-wrong":
        return SetRoles(
            setting,
            "mastered" if masked else None,
            ("injection1",),
            "injection2",
            "mastered",
            "wrong2_to_correct",
            "correct_to_wrong",
        )
    raise ConfigError(f"unknown setting {setting!r} (choose from {', '.join(SETTINGS)})")


def with_reference(roles: SetRoles, kind: str, method: str) -> SetRoles:
    """The roles when ``--reference`` is not the setting's own set (``kind`` ``file`` or ``self``): the reference
    role is the :data:`REFERENCE` set; replay trains on it beside the injection set (its buffer) and counts
    forgetting on the whole M. A method without a reference has nothing it could protect with it."""
    if kind == "mastered":
        return roles
    if roles.setting == "replay":
        return replace(roles, train=(roles.train[0], REFERENCE), forget="mastered", forget_column="correct_to_wrong")
    if roles.reference is None:
        raise ConfigError(
            f"--method {method} protects no reference set, so --reference does not apply to it "
            "(it does to cnl, agem, ewc and replay)"
        )
    return replace(roles, reference=REFERENCE)


def resolve_set_files(data: DataConfig, roles: SetRoles, optional: Sequence[str] = ()) -> dict[str, Path]:
    """Paths of every set the roles need, from ``--split DIR`` or the explicit file flags; the sets named in
    ``optional`` may be left out (they are then absent from the result).

    Raises a :class:`DataError` naming every missing file (and how to provide it) before any work.
    """
    given = {name: getattr(data, name) for name in _PARTS}
    if data.split is not None:
        if any(v is not None for v in given.values()):
            raise ConfigError("give either --split DIR or explicit set files (--mastered, --injection, ...), not both")
        result = read_split_manifest(data.split)
        files = result.manifest["files"]
        paths = {name: result.out_dir / files[part]["file"] for name, part in _PARTS.items() if part in files}
        origin = f"split directory {data.split}"
    else:
        if given["mastered"] is None and given["injection"] is None:
            raise ConfigError("no data: give --split DIR (from 'cnl split') or --mastered FILE --injection FILE")
        paths = {name: Path(v) for name, v in given.items() if v is not None}
        origin = "the command line"
    needed = [n for n in roles.needed() if n != REFERENCE and (n in paths or n not in optional)]
    missing = [n for n in needed if n not in paths]
    if missing:
        flags = " ".join(f"--{n} FILE" for n in missing)
        raise ConfigError(
            f"setting '{roles.setting}' needs the {', '.join(missing)} set(s), which {origin} does not give: "
            f"pass {flags}, or use --split DIR from 'cnl split' (it writes every half)"
        )
    absent = [f"{n} ({paths[n]})" for n in needed if not paths[n].exists()]
    if absent:
        raise DataError(f"set file(s) not found: {', '.join(absent)}")
    for n in needed:
        check_regular_file(paths[n])  # a directory or a FIFO is named as such
    return {n: paths[n] for n in needed}
