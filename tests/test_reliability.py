"""Issue #12 (reliability and security): one test per item, each reproducing the reported problem.

Every test here failed on the code before the fix (640221a) and passes now. The tiny offline Qwen2
(``tiny_qwen2_dir``) trains on 8 mastered + 8 injection questions, so a run takes well under a second;
subprocesses are used only where a second process is the point (locks, signals).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import errno
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from helpers import blocked_child, cli_error, cnl_adam_train_args

import cnl.io
import cnl.models
import cnl.rundir
import cnl.split
import cnl.train as T
from cnl.cli import main
from cnl.data import read_mc_jsonl
from cnl.datasets import format_question
from cnl.io import HOLDER_NAME, LOCK_NAME, locked_output
from cnl.scoring import PromptEncoder
from cnl.split import MANIFEST
from cnl.testing import make_mc_rows, write_jsonl

SRC = Path(cnl.io.__file__).resolve().parent  # the package under test
N_TRAIN = 8  # injection questions: training samples per epoch
EPOCHS = 3


# ------------------------------------------------------------------------------------------ fixtures
def train_args(model_dir: Path, sets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``cnl train`` of cnl/adam for 3 epochs on ``sets`` (later flags override these)."""
    return cnl_adam_train_args(model_dir, out, sets["mastered"], sets["injection"], *extra, epochs=EPOCHS)


def read_rows(run: Path) -> list[dict[str, str]]:
    """summary.csv's rows without the ``*_seconds`` columns (the numbers that must reproduce)."""
    with open(run / "summary.csv", newline="", encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in csv.DictReader(f)]


def predictions(run: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((run / "predictions").glob("*.jsonl"))}


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_lock_files(folder: Path) -> bool:
    return not (folder / LOCK_NAME).exists() and not (folder / HOLDER_NAME).exists()


@pytest.fixture(scope="module")
def reference_run(_one_thread: None, tiny_qwen2_dir: Path, sets: dict[str, Path], tmp_path_factory) -> Path:
    """The uninterrupted 3-epoch run every interrupted-then-resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_qwen2_dir, sets, out)) == 0
    assert len(read_rows(out)) == EPOCHS
    return out


@pytest.fixture(scope="module")
def kept_run(_one_thread: None, tiny_qwen2_dir: Path, sets: dict[str, Path], tmp_path_factory) -> Path:
    """A finished 1-epoch run that kept its checkpoint (copy it before changing it)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    assert main(train_args(tiny_qwen2_dir, sets, out, "--epochs", "1", "--keep-checkpoint")) == 0
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["folder"] == "epoch_001"
    return out


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def refuse_weights(mp: pytest.MonkeyPatch, *, tokenizer_may_load: bool = False) -> list[str]:
    """Record (and refuse) any load of model weights under ``mp``; with ``tokenizer_may_load`` only the
    weights themselves (``AutoModelForCausalLM.from_pretrained``), else the whole model loading."""
    calls: list[str] = []

    def refuse(*args, **kwargs):
        calls.append("weights")
        raise AssertionError("the model weights were loaded")

    mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    if not tokenizer_may_load:
        mp.setattr(cnl.models, "load_model_and_tokenizer", refuse)
    return calls


@pytest.fixture
def no_weights_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The weight loads attempted during the test (each one refused): must stay empty."""
    return refuse_weights(monkeypatch)


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (e.g. on reading a FIFO nobody writes to)."""

    def fire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds}s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# =============================================================================== 1. no unpickling
def test_1_crafted_pickle_in_checkpoint_is_never_loaded(kept_run, tiny_qwen2_dir, sets, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling it creates the marker file

    evil_file = tmp_path / "evil.pt"
    torch.save(Payload(), evil_file)  # what the old code's torch.load(weights_only=False) would run
    evil = evil_file.read_bytes()
    # the old checkpoint file name (loaded with torch.load(weights_only=False) before): ignored now
    ignored = copy_run(kept_run, tmp_path, "ignored")
    (ignored / "checkpoint" / "epoch_001" / "optimizer.pt").write_bytes(evil)
    assert main(train_args(tiny_qwen2_dir, sets, ignored, "--epochs", "2", "--resume")) == 0
    assert not marker.exists()
    assert info(ignored)["status"] == "finished" and len(read_rows(ignored)) == 2

    # every file of the checkpoint replaced by the pickle: refused as a damaged checkpoint, never unpickled
    for name in ("rank_0.safetensors", "rank_0.json", "meta.json"):
        crafted = copy_run(kept_run, tmp_path, f"crafted-{name}")
        folder = crafted / "checkpoint" / "epoch_001"
        (folder / "optimizer.pt").write_bytes(evil)
        (folder / name).write_bytes(evil)
        err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, crafted, "--epochs", "2", "--resume"))
        assert "damaged checkpoint" in err and "epoch_001" in err, name
        assert not marker.exists()
        assert len(read_rows(crafted)) == 1


def _pickle_uses(tree: ast.AST) -> list[str]:
    """Imports of pickle-like modules, ``torch.load``/``pickle.load(s)`` calls, ``weights_only=False``."""
    banned = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in banned]
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in banned or (top == "torch" and any(a.name == "load" for a in node.names)):
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr in ("load", "loads")
                and isinstance(f.value, ast.Name)
                and f.value.id in {"torch", *banned}
            ):
                found.append(f"{f.value.id}.{f.attr}()")
            for kw in node.keywords:
                if isinstance(kw.value, ast.Constant) and (kw.arg, kw.value.value) in (
                    ("weights_only", False),
                    ("allow_pickle", True),
                ):
                    found.append(f"{kw.arg}={kw.value.value}")
    return found


def test_1_no_torch_load_or_pickle_in_src():
    # the checker finds what the old code did
    old = "import torch\nimport pickle\nx = torch.load(p, map_location='cpu', weights_only=False)\n"
    assert len(_pickle_uses(ast.parse(old))) == 3
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    bad = {str(p.relative_to(SRC)): u for p in files if (u := _pickle_uses(ast.parse(p.read_text(encoding="utf-8"))))}
    assert not bad, bad


# ============================================================================ 2. one writer per directory
def test_2_run_directory_lock_refuses_a_second_writer_and_recovers_after_kill_9(
    reference_run, tiny_qwen2_dir, sets, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "x"
    argv = train_args(tiny_qwen2_dir, sets, out)
    with blocked_child(tmp_path, argv, N_TRAIN + 3) as proc, monkeypatch.context() as mp:
        loads = refuse_weights(mp)
        assert (out / LOCK_NAME).exists()
        holder = json.loads((out / HOLDER_NAME).read_text())
        assert holder["pid"] == proc.pid and holder["purpose"] == "cnl train"
        before = snapshot(out)
        # (a) a second train and a --resume are refused, naming the holder; nothing of X changes
        for extra in ((), ("--resume",)):
            err = cli_error(capsys, [*argv, *extra])
            assert "in use by another cnl process" in err
            assert f"pid {proc.pid}" in err and "cnl train" in err
        # (c) so are split and report into the same directory
        split = ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(sets["mastered"]), "--out", str(out)]
        for other in (split, ["report", str(reference_run), "--out", str(out)]):
            err = cli_error(capsys, other)
            assert "in use by another cnl process" in err and f"pid {proc.pid}" in err
        assert snapshot(out) == before and not loads
        assert info(out)["status"] == "running" and len(read_rows(out)) == 1
        # (b) kill -9 leaves the lock files behind ...
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert (out / LOCK_NAME).exists() and (out / HOLDER_NAME).exists()
    # ... and the stale lock does not block --resume, which completes the run exactly
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert info(out)["status"] == "finished"
    assert read_rows(out) == read_rows(reference_run) and predictions(out) == predictions(reference_run)
    # (d) a finished run directory holds no lock files
    assert no_lock_files(out) and no_lock_files(reference_run)


def test_2_split_report_and_compare_outputs_are_locked_too(
    reference_run, tiny_qwen2_dir, sets, tmp_path, capsys, no_weights_load
):
    out = tmp_path / "held"
    with locked_output(out, "test holder"):
        before = snapshot(out)
        commands = [
            ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(sets["mastered"]), "--out", str(out)],
            ["report", str(reference_run), "--out", str(out)],
            ["compare", "--model", str(tiny_qwen2_dir), "--dataset", str(sets["mastered"]), "--out", str(out)],
        ]
        for argv in commands:
            err = cli_error(capsys, argv)
            assert "in use by another cnl process" in err and "test holder" in err and f"pid {os.getpid()}" in err
        assert snapshot(out) == before
    assert not no_weights_load
    assert no_lock_files(out)


# ======================================================================================== 3. SIGTERM
def test_3_sigterm_records_interrupted_exits_143_and_resume_finishes(
    reference_run, tiny_qwen2_dir, sets, tmp_path, capsys
):
    out = tmp_path / "term"
    argv = train_args(tiny_qwen2_dir, sets, out)
    with blocked_child(tmp_path, argv, N_TRAIN + 3) as proc:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143, (tmp_path / "child.log").read_text()
    assert "terminated (SIGTERM)" in (tmp_path / "child.log").read_text()
    run = info(out)
    assert run["status"] == "interrupted" and "Terminated" in run["error"] and run["epochs_done"] == 1
    assert "Terminated" in (out / "train.log").read_text()
    assert [r["epoch"] for r in read_rows(out)] == ["1"]
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["epoch"] == 1
    assert no_lock_files(out)

    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert info(out)["status"] == "finished"
    assert read_rows(out) == read_rows(reference_run) and predictions(out) == predictions(reference_run)


# ================================================================================== 4. prompt length
def _with_long_question(rows: list[dict[str, str]], index: int) -> list[dict[str, str]]:
    long_stem = "Why is " + "really " * 250 + "the sky blue?"
    rows = [dict(r) for r in rows]
    rows[index] = {
        "label": "B",
        "question": format_question(long_stem, ["red", "blue", "green", "gold"], style="reply"),
    }
    return rows


def _prompt_length(model_dir: Path, path: Path, line: int) -> int:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    row = next(r for r in read_mc_jsonl(path) if r.line == line)
    return len(PromptEncoder(tok).encode(row).input_ids)


def test_4_long_prompt_fails_before_the_weights_load_or_is_skipped(tiny_qwen2_dir, sets, tmp_path, capsys, monkeypatch):
    injection = write_jsonl(tmp_path / "long_injection.jsonl", _with_long_question(read_jsonl(sets["injection"]), 2))
    n = _prompt_length(tiny_qwen2_dir, injection, 3)
    assert n > 512
    long_sets = {"mastered": sets["mastered"], "injection": injection}
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        loads = refuse_weights(mp, tokenizer_may_load=True)
        err = cli_error(capsys, train_args(tiny_qwen2_dir, long_sets, out, "--epochs", "1"))
        assert f"long_injection.jsonl:3: the prompt is {n} tokens" in err and "512" in err
        assert "--skip-long-prompts" in err
        data = write_jsonl(tmp_path / "long_quiz.jsonl", _with_long_question(make_mc_rows(12), 4))
        split_out = tmp_path / "split"
        split_argv = ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(split_out)]
        err = cli_error(capsys, split_argv)
        assert f"long_quiz.jsonl:5: the prompt is {_prompt_length(tiny_qwen2_dir, data, 5)} tokens" in err
    assert not loads

    # --skip-long-prompts: the run goes on without that question, and says so
    capsys.readouterr()
    assert main(train_args(tiny_qwen2_dir, long_sets, out, "--epochs", "1", "--skip-long-prompts")) == 0
    assert "skipped 1 question(s)" in capsys.readouterr().out
    assert "skipped 1 question(s)" in (out / "train.log").read_text()
    run = info(out)
    assert run["skipped_long_prompts"] == {"injection": [3]}
    assert run["learn_total"] == 7 and run["status"] == "finished"
    assert len((out / "predictions" / "epoch_001_injection.jsonl").read_text().splitlines()) == 7

    assert main([*split_argv, "--skip-long-prompts"]) == 0
    manifest = json.loads((split_out / MANIFEST).read_text())
    assert manifest["skipped_long_prompts"] == [5] and manifest["n"] == 11
    long_q = read_jsonl(data)[4]["question"]
    split_rows = [r for p in split_out.glob("*.jsonl") for r in read_jsonl(p)]
    assert split_rows and all(r["question"] != long_q for r in split_rows)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ====================================================================== 5. unwritable or full output
def test_5a_out_under_a_regular_file_is_refused_before_the_model_loads(
    tiny_qwen2_dir, sets, tmp_path, capsys, no_weights_load
):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, afile / "run"))
    assert "afile" in err and "not a directory" in err
    err = cli_error(
        capsys, ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(sets["mastered"]), "--out", str(afile / "s")]
    )
    assert "afile" in err and "not a directory" in err
    assert afile.read_text() == "keep" and not no_weights_load


@pytest.mark.parametrize(("code", "why"), [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "disk is full")])
def test_5b_read_only_or_full_output_is_refused_before_the_model_loads(
    tiny_qwen2_dir, sets, tmp_path, capsys, monkeypatch, no_weights_load, code, why
):
    real = cnl.io.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".cnl-write-test"):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(cnl.io.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "ro" / "run"
    for argv in (
        train_args(tiny_qwen2_dir, sets, out),
        ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(sets["mastered"]), "--out", str(out)],
    ):
        err = cli_error(capsys, argv)
        assert f"cannot write into {tmp_path}" in err and why in err
    assert not (tmp_path / "ro").exists() and not no_weights_load


def test_5c_disk_full_while_writing_a_checkpoint_keeps_the_epoch(
    reference_run, tiny_qwen2_dir, sets, tmp_path, capsys, monkeypatch
):
    real, calls = cnl.rundir.RunDir.save_checkpoint, [0]

    def save_checkpoint(self, epoch, state, meta, dist):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, epoch, state, meta, dist)

    out = tmp_path / "full"
    argv = train_args(tiny_qwen2_dir, sets, out)
    with monkeypatch.context() as mp:
        mp.setattr(cnl.rundir.RunDir, "save_checkpoint", save_checkpoint)
        err = cli_error(capsys, argv)
    assert "disk is full" in err and "checkpoint of epoch 2" in err and "--no-checkpoint" in err
    assert [r["epoch"] for r in read_rows(out)] == ["1", "2"]  # the finished epoch's results are kept
    assert read_rows(out) == read_rows(reference_run)[:2]
    assert {"epoch_002_injection.jsonl", "epoch_002_mastered.jsonl"} <= set(predictions(out))
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["epoch"] == 1
    assert info(out)["status"] == "failed" and info(out)["epochs_done"] == 2

    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert read_rows(out) == read_rows(reference_run) and predictions(out) == predictions(reference_run)


def test_5d_disk_full_while_writing_split_files_is_a_message(tiny_qwen2_dir, tmp_path, capsys, monkeypatch):
    real, calls = cnl.split.atomic_write_jsonl, [0]

    def write(path, rows):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, rows)

    monkeypatch.setattr(cnl.split, "atomic_write_jsonl", write)
    data = write_jsonl(tmp_path / "quiz.jsonl", make_mc_rows(9))
    out = tmp_path / "split"
    err = cli_error(capsys, ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out)])
    assert "cannot write" in err and "No space left on device" in err
    assert not (out / MANIFEST).exists() and no_lock_files(out)


# ============================================================================ 6. damaged run directories
def test_6_report_names_a_damaged_summary_or_run_json(reference_run, tmp_path, capsys):
    rep = tmp_path / "report"
    text = (reference_run / "summary.csv").read_text()
    lines = text.splitlines(keepends=True)
    assert len(lines) == 1 + EPOCHS

    cut_mid_row = copy_run(reference_run, tmp_path, "mid")
    (cut_mid_row / "summary.csv").write_text("".join(lines[:-1]) + ",".join(lines[-1].split(",")[:3]))
    err = cli_error(capsys, ["report", str(cut_mid_row), "--out", str(rep)])
    assert "summary.csv" in err and "damaged" in err
    # cut inside the last field: every field is there, but the row has no newline
    (cut_mid_row / "summary.csv").write_text(text[:-3])
    err = cli_error(capsys, ["report", str(cut_mid_row), "--out", str(rep)])
    assert "summary.csv" in err and "cut short" in err

    cut_at_row = copy_run(reference_run, tmp_path, "boundary")
    (cut_at_row / "summary.csv").write_text("".join(lines[:-1]))
    err = cli_error(capsys, ["report", str(cut_at_row), "--out", str(rep)])
    assert "summary.csv" in err and f"2 row(s) but run.json says {EPOCHS} epoch(s)" in err

    bad_json = copy_run(reference_run, tmp_path, "json")
    (bad_json / "run.json").write_text('{"method": "cnl", "optim')
    err = cli_error(capsys, ["report", str(bad_json), "--out", str(rep)])
    assert "run.json" in err and "damaged" in err
    assert not rep.exists()  # the report folder this command created is removed again


def test_6_resume_names_a_damaged_checkpoint(kept_run, tiny_qwen2_dir, sets, tmp_path, capsys):
    run = copy_run(kept_run, tmp_path)
    argv = train_args(tiny_qwen2_dir, sets, run, "--epochs", "2", "--resume")
    pointer = run / "checkpoint" / "latest.json"
    good = pointer.read_text()
    pointer.write_text(json.dumps({"epoch": 1, "folder": "epoch_009"}))
    err = cli_error(capsys, argv)
    assert "latest.json points at epoch_009, which is missing" in err and "checkpoint/" in err
    pointer.write_text(good)

    weights = run / "checkpoint" / "epoch_001" / "rank_0.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = cli_error(capsys, argv)
    assert "epoch_001: damaged checkpoint" in err and "delete the checkpoint/ folder" in err
    assert len(read_rows(run)) == 1 and info(run)["status"] == "finished"


# =============================================================================== 7. messages, not tracebacks
def test_7_report_out_is_an_existing_file(reference_run, tmp_path, capsys):
    afile = tmp_path / "report.md"
    afile.write_text("mine")
    err = cli_error(capsys, ["report", str(reference_run), "--out", str(afile)])
    assert str(afile) in err and "not a directory" in err
    assert afile.read_text() == "mine"


def test_7_empty_lora_targets(tiny_qwen2_dir, sets, tmp_path, capsys, no_weights_load):
    out = tmp_path / "lora"
    argv = train_args(tiny_qwen2_dir, sets, out, "--method", "lora", "--optimizer", "adamw", "--lora-targets", "")
    assert "lora_targets names no module" in cli_error(capsys, argv)
    assert not out.exists() and not no_weights_load


# ================================================================================== 8. smaller issues
def test_8b_split_refuses_to_replace_a_split_without_force(tiny_qwen2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "quiz.jsonl", make_mc_rows(9))
    out = tmp_path / "split"
    argv = ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(data), "--out", str(out)]
    assert main(argv) == 0
    before = snapshot(out)
    err = cli_error(capsys, [*argv, "--limit", "6"])
    assert "already holds a split" in err and "--force" in err
    assert snapshot(out) == before
    assert main([*argv, "--limit", "6", "--force"]) == 0
    assert json.loads((out / MANIFEST).read_text())["n"] == 6
    assert no_lock_files(out)


def test_8c_bad_device_or_dtype_leaves_no_run_directory(tiny_qwen2_dir, sets, tmp_path, capsys, no_weights_load):
    out = tmp_path / "run"
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out, "--device", "cuda:999"))
    assert "cuda:999" in err
    assert not out.exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  dtype: float8\n")
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out, "--config", str(cfg)))
    assert "float8" in err
    assert not out.exists() and not no_weights_load


def test_8d_no_checkpoint_run_killed_then_resumed_starts_over(
    reference_run, tiny_qwen2_dir, sets, tmp_path, capsys, monkeypatch
):
    orig, calls = T.batch_losses, [0]

    def crash(*args, **kwargs):
        calls[0] += 1
        if calls[0] == N_TRAIN + 3:
            raise RuntimeError("simulated crash in epoch 2")
        return orig(*args, **kwargs)

    out = tmp_path / "nockpt"
    argv = train_args(tiny_qwen2_dir, sets, out, "--no-checkpoint")
    with monkeypatch.context() as mp:
        mp.setattr(T, "batch_losses", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(argv)
    assert info(out)["epochs_done"] == 1 and not (out / "checkpoint").exists()

    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "starting over from epoch 1" in capsys.readouterr().out
    assert info(out)["status"] == "finished"
    assert read_rows(out) == read_rows(reference_run) and predictions(out) == predictions(reference_run)
    # a finished run without a checkpoint cannot be extended: refused, results untouched
    before = snapshot(out)
    err = cli_error(capsys, [*argv, "--resume", "--epochs", str(EPOCHS + 1)])
    assert "kept no checkpoint" in err and "another --out" in err
    assert snapshot(out) == before


def test_8e_data_path_that_is_a_directory_or_fifo(tiny_qwen2_dir, sets, tmp_path, capsys, no_weights_load):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "run"
    with alarm(30):
        for path, kind in ((folder, "is a directory"), (fifo, "FIFO")):
            err = cli_error(capsys, train_args(tiny_qwen2_dir, {**sets, "injection": path}, out))
            assert kind in err and path.name in err and "not found" not in err
            split = ["split", "--model", str(tiny_qwen2_dir), "--dataset", str(path), "--out", str(out)]
            err = cli_error(capsys, split)
            assert kind in err and path.name in err and "not found" not in err
    assert not out.exists() and not no_weights_load


def test_8f_duplicate_questions_are_warned_about(tiny_qwen2_dir, sets, tmp_path, capsys):
    rows = read_jsonl(sets["injection"])
    dup = [rows[0], rows[1], rows[2], rows[3], rows[0], rows[5], rows[1], rows[7]]
    injection = write_jsonl(tmp_path / "dup.jsonl", dup)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(tiny_qwen2_dir, {**sets, "injection": injection}, out, "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "dup.jsonl" in err
    assert "2 duplicate question(s) (line 5 repeats line 1, line 7 repeats line 2)" in err
    assert info(out)["status"] == "finished" and info(out)["learn_total"] == 8
