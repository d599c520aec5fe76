"""Shared pytest fixtures: tiny offline models and tokenizers, synthetic data, GPU and ../shared gating."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cnl.testing import make_mc_rows, save_tiny_model_dir

#: ``<repo>/../shared``: the read-only integration data (datasets, reference splits) next to the repository.
SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _test_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs offline; unit tests run torch on one thread.

    Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine two OpenMP
    threads spinning against other processes make each step up to 20x slower. Integration tests (the
    real model) keep torch's default.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread for a module-scoped fixture's own work (see :func:`_test_environment`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` directory next to the repository; skips the test when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip("../shared not found: integration data is absent")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (llama3 template, seed 0) directory, built once per session. Do not modify it."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Qwen2 (chatml template, seed 0) directory, built once per session. Do not modify it."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", seed=0)


def _load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` freshly loaded from :func:`tiny_llama_dir` (safe to train or mutate)."""
    return _load(tiny_llama_dir)


@pytest.fixture
def tiny_qwen2(tiny_qwen2_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` freshly loaded from :func:`tiny_qwen2_dir` (safe to train or mutate)."""
    return _load(tiny_qwen2_dir)


@pytest.fixture
def mc_rows() -> list[dict[str, str]]:
    """24 synthetic four-option rows (seed 0), short/medium/long in turn. A fresh list per test."""
    return make_mc_rows(24, seed=0)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``mastered.jsonl`` and ``injection.jsonl``, 8 distinct synthetic questions each (a module may define
    its own ``sets`` instead)."""
    from cnl.testing import write_jsonl

    d = tmp_path_factory.mktemp("sets")
    rows = make_mc_rows(16, seed=5)
    return {
        "mastered": write_jsonl(d / "mastered.jsonl", rows[:8]),
        "injection": write_jsonl(d / "injection.jsonl", rows[8:]),
    }
