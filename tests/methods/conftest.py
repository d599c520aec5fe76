"""Fixtures of the method tests: the tiny sets, and every training run a test starts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from method_helpers import NEW

import cnl.train as T
from cnl.methods import get_method
from cnl.testing import make_mc_rows, write_jsonl


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """M = 4 rows (M1, M2 its halves), I = 4 rows (I1, I2 its halves)."""
    d = tmp_path_factory.mktemp("sets")
    rows = make_mc_rows(8, seed=5)
    m, i = rows[:4], rows[4:]
    parts = {
        "mastered": m,
        "injection": i,
        "mastered1": m[:2],
        "mastered2": m[2:],
        "injection1": i[:2],
        "injection2": i[2:],
    }
    return {"files": {name: write_jsonl(d / f"{name}.jsonl", rs) for name, rs in parts.items()}, "rows": parts}


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[T.Run]:
    """Every :class:`cnl.train.Run` that :func:`cnl.train.train` loads during the test."""
    caught: list[T.Run] = []
    orig = T.load

    def spy(*args: Any, **kwargs: Any) -> T.Run:
        run = orig(*args, **kwargs)
        caught.append(run)
        return run

    monkeypatch.setattr(T, "load", spy)
    return caught


@pytest.fixture(autouse=True)
def _no_leftover_patches() -> Iterator[None]:
    """The method objects are process-wide: a test must not leave an instance attribute on them."""
    yield
    for name in NEW:
        assert "begin_epoch" not in vars(get_method(name))
