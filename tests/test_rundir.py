"""Tests for :mod:`cnl.rundir`: the run directory's files written and read back, and clear errors on damage."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mode_of, umask
from transformers import AutoModelForCausalLM, AutoTokenizer

from cnl.data import rows_from_dicts
from cnl.errors import CnlError
from cnl.rundir import INT_COLUMNS, RunDir, RunDirError, RunSeries
from cnl.scoring import Predictions
from cnl.sets import roles_for
from cnl.testing import make_mc_rows, make_tiny_model, make_tiny_tokenizer, write_jsonl


def run_error(fn: Any, *args: Any) -> str:
    """The message of the RunDirError (a CnlError) that ``fn(*args)`` raises."""
    with pytest.raises(RunDirError) as err:
        fn(*args)
    assert isinstance(err.value, CnlError)
    return str(err.value)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality where tensors must be ``torch.equal`` with the same dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert type(a) is type(b) and a == b, where


# ------------------------------------------------------------------------------------ checkpoints
def nested_state(epoch: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(epoch)
    version, internal, gauss = random.Random(epoch).getstate()
    return {
        "epoch": epoch,
        "summary": [{"epoch": e, "train_avg_loss": 0.5 / e, "wrong_to_correct": e} for e in range(1, epoch + 1)],
        "rule": {
            "state": {
                "model.layers.0.mlp.up_proj.weight": {
                    "m": torch.randn(3, 4, generator=gen),
                    "v": torch.rand(3, 4, generator=gen, dtype=torch.float64),
                    "t": torch.tensor(epoch, dtype=torch.int64),  # a scalar int64 tensor
                },
                "model.norm.weight": {"m": torch.randn(4, generator=gen).to(torch.bfloat16), "t": 7},
            }
        },
        "rng": {
            "torch": torch.get_rng_state(),  # uint8
            "cuda": [],
            "python": [version, list(internal), gauss],
        },
        "flags": [True, False, None, "text é", 1.5, -3, [[]], {}],
        "empty": {},
        "half": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "bools": torch.tensor([True, False, True]),
        "int8": torch.tensor([-1, 0, 1], dtype=torch.int8),
        "empty_tensor": torch.zeros(0, 5),
        "tuple": (1, torch.ones(2, dtype=torch.int32)),
        "non_contiguous": torch.arange(12.0).reshape(3, 4).t(),
    }


def weights_for(epoch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + epoch)
    return {
        "model.embed_tokens.weight": torch.randn(5, 4, generator=gen),
        "model.norm.weight": torch.randn(4, generator=gen).to(torch.bfloat16),
    }


def save(rd: RunDir, epoch: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """A checkpoint as the training loop writes one: this process's tree (weights and state) and the meta."""
    rd.save_checkpoint(epoch, {"weights": weights, "state": state}, {"epoch": epoch, "summary": [{"epoch": epoch}]})


def load(rd: RunDir) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(weights, state)`` of the latest checkpoint (its meta checked), or None."""
    loaded = rd.load_checkpoint()
    if loaded is None:
        return None
    meta, tree = loaded
    assert meta["world_size"] == 1 and meta["summary"] == [{"epoch": meta["epoch"]}]
    return tree["weights"], tree["state"]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert not rd.has_checkpoint() and rd.load_checkpoint() is None
    for epoch in (1, 2, 3):
        save(rd, epoch, weights_for(epoch), nested_state(epoch))
        assert rd.has_checkpoint()
        assert json.loads((rd.checkpoints / "latest.json").read_text()) == {
            "epoch": epoch,
            "folder": f"epoch_{epoch:03d}",
        }
        # Older epoch folders are gone, and nothing else is left next to the newest one.
        assert sorted(p.name for p in rd.checkpoints.iterdir()) == [f"epoch_{epoch:03d}", "latest.json"]
    loaded = load(rd)
    assert loaded is not None
    weights, state = loaded
    assert_same(dict(sorted(weights_for(3).items())), dict(sorted(weights.items())), "weights")
    expected = nested_state(3)
    assert_same(expected, state)
    assert state["rng"]["torch"].dtype == torch.uint8
    assert state["rule"]["state"]["model.layers.0.mlp.up_proj.weight"]["t"].shape == ()
    torch.set_rng_state(state["rng"]["torch"])  # usable as an RNG state
    random.setstate((state["rng"]["python"][0], tuple(state["rng"]["python"][1]), state["rng"]["python"][2]))


def test_checkpoint_has_no_pickle(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    save(rd, 4, weights_for(4), nested_state(4))
    files = [p for p in rd.checkpoints.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    assert sorted(p.relative_to(rd.checkpoints).as_posix() for p in files) == [
        "epoch_004/meta.json",
        "epoch_004/rank_0.json",
        "epoch_004/rank_0.safetensors",
        "latest.json",
    ]
    for p in files:
        head = p.read_bytes()[:2]
        assert not head.startswith(b"\x80"), p  # pickle protocol 2+ magic
        assert not head.startswith(b"PK"), p  # torch.save's zip container
    json.loads((rd.checkpoints / "epoch_004" / "rank_0.json").read_text())  # plain JSON


def test_checkpoint_files_have_umask_permissions(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    with umask(0o022):
        save(rd, 1, weights_for(1), nested_state(1))
    for p in rd.checkpoints.rglob("*"):
        assert mode_of(p) == (0o755 if p.is_dir() else 0o644), p


def test_checkpoint_with_nothing_to_store(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    save(rd, 1, {}, {})
    assert load(rd) == ({}, {})


def test_checkpoint_refuses_unserialisable_and_keeps_previous(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    save(rd, 1, weights_for(1), nested_state(1))
    before = sorted(p.name for p in rd.checkpoints.iterdir())
    for bad in ({"x": object()}, {"x": [1, {"y": {1, 2}}]}, {"x": b"bytes"}):
        with pytest.raises(TypeError, match="cannot store"):
            save(rd, 2, weights_for(2), bad)
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    loaded = load(rd)
    assert loaded is not None
    assert_same(nested_state(1), loaded[1])


def test_remove_checkpoints(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    save(rd, 1, weights_for(1), {"epoch": 1})
    rd.remove_checkpoints()
    assert not rd.checkpoints.exists() and not rd.has_checkpoint() and rd.load_checkpoint() is None
    rd.remove_checkpoints()  # nothing to remove is fine


def test_checkpoint_keys_with_slashes_do_not_collide(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    state = {"a/b": torch.tensor([1]), "a": {"b": torch.tensor([2])}}
    save(rd, 1, {}, state)
    loaded = load(rd)
    assert loaded is not None
    assert_same(state, loaded[1])


def test_checkpoint_same_tensor_twice(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    t = torch.arange(4.0)
    save(rd, 1, {}, {"x": t, "y": t})
    loaded = load(rd)
    assert loaded is not None
    assert_same({"x": t, "y": t}, loaded[1])


# ------------------------------------------------------------------------------------ damaged checkpoints
HINT = "delete the checkpoint/ folder"


@pytest.fixture
def saved(tmp_path: Path) -> RunDir:
    rd = RunDir(tmp_path / "run")
    save(rd, 2, weights_for(2), nested_state(2))
    return rd


@pytest.mark.parametrize("pointer", ["{not json", "", "[1, 2]", '{"epoch": 2}', "\xff"])
def test_damaged_pointer(saved: RunDir, pointer: str) -> None:
    latest = saved.checkpoints / "latest.json"
    latest.write_bytes(pointer.encode("latin-1"))
    message = run_error(saved.load_checkpoint)
    assert str(latest) in message and "damaged checkpoint pointer" in message and HINT in message


def test_pointer_to_missing_folder(saved: RunDir) -> None:
    (saved.checkpoints / "latest.json").write_text('{"epoch": 7, "folder": "epoch_007"}')
    message = run_error(saved.load_checkpoint)
    assert "epoch_007" in message and "missing" in message and HINT in message


@pytest.mark.parametrize("name", ["rank_0.safetensors"])
@pytest.mark.parametrize("keep", [0, 4, 12, "half", "all-but-one"])
def test_truncated_safetensors(saved: RunDir, name: str, keep: int | str) -> None:
    p = saved.checkpoints / "epoch_002" / name
    data = p.read_bytes()
    n = len(data) // 2 if keep == "half" else len(data) - 1 if keep == "all-but-one" else keep
    assert isinstance(n, int)
    p.write_bytes(data[:n])
    message = run_error(saved.load_checkpoint)
    assert "epoch_002" in message and "damaged checkpoint" in message and HINT in message


@pytest.mark.parametrize("name", ["rank_0.safetensors", "rank_0.json", "meta.json"])
def test_missing_file(saved: RunDir, name: str) -> None:
    (saved.checkpoints / "epoch_002" / name).unlink()
    message = run_error(saved.load_checkpoint)
    assert "damaged checkpoint" in message and "epoch_002" in message and HINT in message


@pytest.mark.parametrize("name", ["rank_0.json", "meta.json"])
@pytest.mark.parametrize("content", [b"{truncated", b"", b"\xff\xfe", b"[1, 2]"])
def test_damaged_json(saved: RunDir, name: str, content: bytes) -> None:
    (saved.checkpoints / "epoch_002" / name).write_bytes(content)
    message = run_error(saved.load_checkpoint)
    assert "epoch_002" in message and "damaged checkpoint" in message and HINT in message


def test_checkpoint_of_an_older_cnl_is_named(saved: RunDir) -> None:
    folder = saved.checkpoints / "epoch_002"
    (folder / "meta.json").unlink()
    (folder / "state.json").write_text("{}")
    message = run_error(saved.load_checkpoint)
    assert "older cnl" in message and HINT in message


def test_checkpoint_of_another_world_size_is_refused(saved: RunDir) -> None:
    meta = saved.checkpoints / "epoch_002" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))
    message = run_error(saved.load_checkpoint)
    assert "written by 2 process(es), resumed with 1" in message


# ------------------------------------------------------------------------------------ run.json
def test_read_info_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    assert not rd.exists()
    info = {"method": "cnl", "roles": {"learn_column": "wrong_to_correct"}, "lr": 1e-7, "note": "é"}
    rd.write_info(info)
    assert rd.exists() and rd.read_info() == info


def test_read_info_errors(tmp_path: Path) -> None:
    missing = RunDir(tmp_path / "nope")
    message = run_error(missing.read_info)
    assert str(missing.root) in message and "no such directory" in message
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "no such directory" in run_error(RunDir(a_file).read_info)
    empty = RunDir(tmp_path / "empty")
    empty.root.mkdir()
    message = run_error(empty.read_info)
    assert str(empty.root) in message and "no run.json" in message
    for content in (b"{not json", b"", b"\xff\xfe{}"):
        empty.run_json.write_bytes(content)
        message = run_error(empty.read_info)
        assert str(empty.run_json) in message and "not valid JSON" in message
    for content in ("[1, 2]", '"text"', "3", "null"):
        empty.run_json.write_text(content)
        message = run_error(empty.read_info)
        assert str(empty.run_json) in message and "expected a JSON object" in message


# ------------------------------------------------------------------------------------ summary.csv
def test_read_summary_types(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    assert rd.read_summary() == []
    columns = ["epoch", "train_avg_loss", *INT_COLUMNS[1:], "masked_fraction", "train_seconds"]
    rows = [
        {c: (e if c in INT_COLUMNS else e / 4) for c in columns} | {"train_avg_loss": 1.25, "masked_fraction": 0}
        for e in (1, 2)
    ]
    rd.write_summary(columns, rows)
    got = rd.read_summary()
    assert got == rows
    for r in got:
        assert list(r) == columns
        for c, v in r.items():
            assert type(v) is (int if c in INT_COLUMNS else float), c
    rd.write_summary(columns, [])
    assert rd.read_summary() == []  # header only


def _info(setting: str) -> dict[str, Any]:
    return {"roles": dataclasses.asdict(roles_for(setting, True))}


def test_series_uses_the_recorded_column_names(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    # forget column before learn column, decoy columns of the other settings holding other numbers
    rd.summary.write_text(
        "correct2_to_wrong,train_avg_loss,wrong_to_correct,epoch,correct_to_wrong,wrong2_to_correct\n"
        "5,0.9,1,1,100,200\n"
        "6,0.8,3,2,101,201\n"
        "8,0.7,4,3,102,202\n",
        encoding="utf-8",
    )
    rd.write_info(_info("ood-correct"))
    assert rd.series() == RunSeries([1, 2, 3], [1, 3, 4], [5, 6, 8])
    s = rd.series(_info("ood-wrong"))  # the info given wins over run.json
    assert s == RunSeries([1, 2, 3], [200, 201, 202], [100, 101, 102])
    assert all(type(x) is int for x in s.learned + s.forgotten + s.epochs)
    assert rd.series(_info("in-set")) == RunSeries([1, 2, 3], [1, 3, 4], [100, 101, 102])


def test_series_without_roles(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.write_info({"method": "cnl"})
    message = run_error(rd.series)
    assert str(rd.run_json) in message and "roles" in message
    message = run_error(rd.series, {"roles": {"learn_column": "wrong_to_correct"}})
    assert "learn/forget" in message


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("1,0.5,2\n2,oops,3\n", 3),
        ("1,0.5,2\n2,0.4,\n", 3),  # empty count
        ("1.5,0.5,2\n", 2),  # epoch not an int
        ("1,0.5,2\n2,0.4\n", 3),  # a field short
        ("1,0.5,2.0\n", 2),  # a count written as a float
    ],
)
def test_read_summary_damaged_row_names_the_line(tmp_path: Path, body: str, line: int) -> None:
    rd = RunDir(tmp_path)
    rd.summary.write_text("epoch,train_avg_loss,wrong_to_correct\n" + body, encoding="utf-8")
    message = run_error(rd.read_summary)
    assert f"{rd.summary}:{line}:" in message and "damaged row" in message


def test_read_summary_row_with_extra_field_is_damaged(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.summary.write_text("epoch,train_avg_loss,wrong_to_correct\n1,0.5,2,9\n", encoding="utf-8")
    assert f"{rd.summary}:2:" in run_error(rd.read_summary)


def test_read_summary_line_number_after_blank_lines(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.summary.write_text("epoch,train_avg_loss\n1,0.5\n\n\n2,oops\n", encoding="utf-8")
    assert f"{rd.summary}:5:" in run_error(rd.read_summary)


def test_read_summary_not_utf8(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.summary.write_bytes(b"epoch,train_avg_loss\n1,0.5\n\xff,0.4\n")
    assert str(rd.summary) in run_error(rd.read_summary)


# ------------------------------------------------------------------------------------ predictions
def preds(answers: list[str], rows: list[Any]) -> Predictions:
    return Predictions(answers, [a == r.label for a, r in zip(answers, rows, strict=False)], [[] for _ in answers])


def test_predictions_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rows = rows_from_dicts(make_mc_rows(7, seed=3))
    letters = ["A", "B", "C", "D", "A", "B", "C"]
    rd.write_predictions(3, "injection", rows, preds(letters, rows))
    path = rd.prediction_file(3, "injection")
    assert path == tmp_path / "predictions" / "epoch_003_injection.jsonl"
    assert rd.read_predictions(3, "injection") == (letters, [x == r.label for x, r in zip(letters, rows, strict=True)])
    objs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert objs == [
        {"label": r.label, "predict_label": x, "question": r.question} for r, x in zip(rows, letters, strict=True)
    ]
    rd.write_predictions(3, "injection", rows[:2], preds(["D", "D"], rows))  # rewritten, not appended
    assert rd.read_predictions(3, "injection")[0] == ["D", "D"]
    with pytest.raises(ValueError):
        rd.write_predictions(4, "injection", rows, preds(letters[:-1], rows))
    assert not rd.prediction_file(4, "injection").exists()


def test_open_ended_predictions_round_trip(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rows = rows_from_dicts([{"question": "Q1", "answer": "Paris", "aliases": ["paris, france"]},
                            {"question": "Q2", "answer": "4"}])  # fmt: skip
    p = Predictions(["The capital is Paris.", "five"], [True, False], [[], []])
    rd.write_predictions(1, "injection", rows, p)
    objs = [json.loads(x) for x in rd.prediction_file(1, "injection").read_text().splitlines()]
    assert objs == [
        {"question": "Q1", "answer": "Paris", "aliases": ["paris, france"], "prediction": "The capital is Paris.",
         "correct": True},
        {"question": "Q2", "answer": "4", "prediction": "five", "correct": False},
    ]  # fmt: skip
    assert rd.read_predictions(1, "injection") == (["The capital is Paris.", "five"], [True, False])


def test_read_predictions_missing(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    message = run_error(rd.read_predictions, 1, "mastered")
    assert "epoch_001_mastered.jsonl" in message and "missing" in message


@pytest.mark.parametrize("bad", ["{broken", '{"label": "A"}', "[1, 2]", '"A"', "5", "null"])
def test_read_predictions_damaged_line(tmp_path: Path, bad: str) -> None:
    rd = RunDir(tmp_path)
    rows = rows_from_dicts(make_mc_rows(2))
    rd.write_predictions(1, "mastered", rows, preds(["A", "B"], rows))
    path = rd.prediction_file(1, "mastered")
    path.write_text(path.read_text(encoding="utf-8") + "\n" + bad + "\n", encoding="utf-8")
    message = run_error(rd.read_predictions, 1, "mastered")
    assert f"{path}:4:" in message and "damaged" in message  # line 3 is blank and skipped


def test_read_predictions_not_utf8(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    path = rd.prediction_file(1, "mastered")
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"predict_label": "A"}\n\xff\xfe\n')
    assert str(path) in run_error(rd.read_predictions, 1, "mastered")


# ------------------------------------------------------------------------------------ set files
def test_verify_sets(tmp_path: Path) -> None:
    rows = make_mc_rows(4)
    m = write_jsonl(tmp_path / "data" / "m.jsonl", rows[:2])
    i = write_jsonl(tmp_path / "data" / "i.jsonl", rows[2:])
    rd = RunDir(tmp_path / "run")
    meta = RunDir.describe_set(m, 2)
    assert meta["file"] == str(m.resolve()) and meta["count"] == 2 and len(meta["sha256"]) == 16
    info = {"sets": {"mastered": meta, "injection": RunDir.describe_set(i, 2)}}
    assert rd.verify_sets(info, ["mastered", "injection"]) == {"mastered": m.resolve(), "injection": i.resolve()}
    assert rd.verify_sets(info, []) == {}
    assert "no injection1 set" in run_error(rd.verify_sets, info, ["injection1"])
    assert "no mastered set" in run_error(rd.verify_sets, {}, ["mastered"])

    i.write_text(i.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # one byte more
    message = run_error(rd.verify_sets, info, ["mastered", "injection"])
    assert "injection" in message and str(i.resolve()) in message and "changed" in message
    m.unlink()
    message = run_error(rd.verify_sets, info, ["mastered"])
    assert str(m.resolve()) in message and "gone" in message


# ------------------------------------------------------------------------------------ the final model
def test_save_model_loads_back_and_replaces(tmp_path: Path) -> None:
    tok = make_tiny_tokenizer("chatml")
    model = make_tiny_model("qwen2", vocab_size=len(tok), seed=1)
    rd = RunDir(tmp_path / "run")
    with umask(0o022):
        rd.save_model(model, tok)
    (rd.model / "stray.txt").write_text("left over from the first save")
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)  # the second save must hold the new weights
    with umask(0o022):
        rd.save_model(model, tok)
    assert not (rd.model / "stray.txt").exists()
    assert sorted(p.name for p in rd.root.iterdir()) == ["model"]  # no temporary sibling left
    files = [p for p in rd.model.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in files)
    assert all(mode_of(p) == 0o644 for p in files)
    assert mode_of(rd.model) == 0o755

    loaded = AutoModelForCausalLM.from_pretrained(rd.model)
    expected = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    tok2 = AutoTokenizer.from_pretrained(rd.model)
    text = "Question: Why?\nOptions:\nA: x"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template
