"""Misuse and damage, round two: every case a user hit that ran code, gave a silently wrong result, lost
their files or printed a traceback, reproduced on the tiny offline model, and what cnl does now.

Grouped as the issue reports them: security (crafted pickles under torchrun; the kernel cache's tests are
in test_kernel_cache.py), silently wrong results (a changed dataset, mismatched checkpoint tensors, runs
that did not finish, single-option questions, lone surrogates), data loss (compare's directories, a
user's own files in --out), tracebacks instead of messages (full disk, damaged checkpoints, bad paths,
suggestions the command rejected, stale status, custom optimizers). Each category (data, options,
resume, signals, torchrun) also keeps a case that was already handled well, so it stays so.
"""

from __future__ import annotations

import csv
import errno
import json
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import blocked_child, cli_error, cnl_adam_train_args, torchrun
from safetensors.torch import load_file, save_file

import cnl.rundir
from cnl.cli import main
from cnl.data import DataError, read_mc_jsonl
from cnl.io import LOCK_NAME, lock_holder
from cnl.optimizer import MaskedOptimizer
from cnl.report import load_run_record, plot_curves
from cnl.testing import make_mc_rows, write_jsonl

N_TRAIN = 8


# ------------------------------------------------------------------------------------------ fixtures
def train_args(model_dir: Path, sets: dict[str, Path], out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return cnl_adam_train_args(model_dir, out, sets["mastered"], sets["injection"], *extra, epochs=epochs)


def info(run: Path) -> dict:
    return json.loads((run / "run.json").read_text(encoding="utf-8"))


def rows_of(run: Path) -> list[dict[str, str]]:
    with open(run / "summary.csv", newline="", encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def kept_run(_one_thread: None, tiny_qwen2_dir: Path, sets: dict[str, Path], tmp_path_factory) -> Path:
    """A finished 1-epoch cnl/adam run that kept its checkpoint (copy it before changing it)."""
    out = tmp_path_factory.mktemp("kept") / "run"
    assert main(train_args(tiny_qwen2_dir, sets, out, "--keep-checkpoint", epochs=1)) == 0
    return out


def copy_run(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


class Payload:
    """Unpickling it creates the marker file (what a crafted checkpoint would run)."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(tmp_path: Path) -> tuple[bytes, Path]:
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save(Payload(), evil)
    return evil.read_bytes(), marker


# ================================================================================ security
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_1_crafted_pickles_in_a_sharded_checkpoint_are_never_loaded(tmp_path, sets, tiny_qwen2_dir):
    """Under torchrun (gloo, 2 ranks): every file of a sharded checkpoint replaced by a crafted pickle, and
    torch.distributed.checkpoint's pickled ``.metadata`` planted beside them: ``--resume`` stops on every
    rank with a message naming the damage; nothing is unpickled. Then one rank's file alone is damaged:
    both ranks stop with the message (neither waits for the other)."""
    evil, marker = crafted_pickle(tmp_path)
    run = tmp_path / "run"
    argv = [*train_args(tiny_qwen2_dir, sets, run, "--optimizer", "sgd", "--lr", "0.02", epochs=1), "--keep-checkpoint"]
    first = torchrun(2, argv)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run / "checkpoint" / "epoch_001"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["meta.json", "rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    good = {n: (folder / n).read_bytes() for n in names}
    for n in names:
        (folder / n).write_bytes(evil)
    (folder / "shards").mkdir()
    (folder / "shards" / ".metadata").write_bytes(evil)  # the old torch.distributed.checkpoint layout
    resume = [*argv[:-1], "--epochs", "2", "--resume"]
    proc = torchrun(2, resume)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: " in out and "damaged checkpoint" in out and "delete the checkpoint/ folder" in out, out[-3000:]
    assert "/cnl/" not in "".join(line for line in out.splitlines() if line.strip().startswith("File "))
    assert not marker.exists()

    shutil.rmtree(folder / "shards")
    for n, data in good.items():
        (folder / n).write_bytes(data)
    rank1 = folder / "rank_1.safetensors"
    rank1.write_bytes(good["rank_1.safetensors"][: len(good["rank_1.safetensors"]) // 2])
    t0 = time.monotonic()
    proc = torchrun(2, resume)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - t0 < 120
    assert "rank_1" in out or "another process stopped" in out, out[-3000:]
    assert info(run)["epochs_done"] == 1


# ================================================================================ silently wrong results
def test_3_compare_refuses_a_split_of_changed_data(tmp_path, tiny_qwen2_dir, capsys):
    data = write_jsonl(tmp_path / "quiz.jsonl", make_mc_rows(12, seed=1))
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", str(data), "--out", str(out), "--model", str(tiny_qwen2_dir), "--device", "cpu"]
    argv += ["--epochs", "1", "--lr", "1e-3"]
    assert main(argv) == 0
    before = (out / "report" / "report.json").read_bytes()
    write_jsonl(data, make_mc_rows(12, seed=2))  # other questions at the same path
    err = cli_error(capsys, argv)
    assert str(out / "split") in err and "dataset_sha256" in err and "another --out" in err
    assert (out / "report" / "report.json").read_bytes() == before  # the old results are untouched
    write_jsonl(data, make_mc_rows(12, seed=1))  # the same content again: reused
    assert main(argv) == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            "shape",
            r"checkpoint tensor model.embed_tokens.weight is \[1, 32\] torch.float32, the model's is \[\d+, 32\]",
        ),
        ("dtype", r"checkpoint tensor model.embed_tokens.weight is \[\d+, 32\] torch.int64"),
        ("state-shape", r"damaged optimizer state .*'exp_avg' of parameter model.norm.weight has shape \[3\]"),
        ("state-dtype", r"damaged optimizer state .*'exp_avg' of parameter model.norm.weight is torch.int64"),
        ("structure", r"damaged checkpoint \(missing 'optimizer'\)"),
    ],
)
def test_4_checkpoint_tensors_are_checked_against_the_model(
    tmp_path, kept_run, tiny_qwen2_dir, sets, capsys, change, expected
):
    run = copy_run(kept_run, tmp_path)
    folder = run / "checkpoint" / "epoch_001"
    tensors = load_file(str(folder / "rank_0.safetensors"))
    skeleton = json.loads((folder / "rank_0.json").read_text())
    emb = skeleton["weights"]["model.embed_tokens.weight"]["__tensor__"]
    names = [n for n, _ in torch.nn.Module.named_parameters(_tiny(tiny_qwen2_dir))]
    norm = skeleton["optimizer"]["state"][str(names.index("model.norm.weight"))]["exp_avg"]["__tensor__"]
    if change == "shape":
        tensors[emb] = tensors[emb][:1].clone()
    elif change == "dtype":
        tensors[emb] = tensors[emb].to(torch.int64)
    elif change == "state-shape":
        tensors[norm] = tensors[norm][:3].clone()
    elif change == "state-dtype":
        tensors[norm] = tensors[norm].to(torch.int64)
    else:
        del skeleton["optimizer"]
        (folder / "rank_0.json").write_text(json.dumps(skeleton))
    save_file(tensors, str(folder / "rank_0.safetensors"))
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, run, "--resume"))
    assert re.search(expected, err), err
    assert "epoch_001" in err and "delete the checkpoint/ folder" in err
    assert len(rows_of(run)) == 1  # nothing of epoch 2 was written


def _tiny(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_5_report_shows_runs_that_did_not_finish(tmp_path, kept_run, reference_like, capsys):
    finished, interrupted = reference_like
    out = tmp_path / "report"
    assert main(["report", str(finished), str(interrupted), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "status" in printed and "interrupted (1 of 2 epochs)" in printed
    rows = {r["run"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["finished"]["status"] == "finished" and rows["interrupted"]["status"] == "interrupted"
    assert {p["complete"] for p in json.loads((out / "report.json").read_text())["pareto"]} == {True, False}
    md = (out / "report.md").read_text()
    assert "| status |" in md and "| interrupted (1 of 2 epochs) |" in md and "| finished |" in md
    fig = plot_curves([load_run_record(finished), load_run_record(interrupted)], tmp_path / "c.png")
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].lines}
    assert styles["finished (cnl/adam)"] == "-" and styles["interrupted (cnl/adam, interrupted)"] == "--"


@pytest.fixture
def reference_like(tmp_path, kept_run) -> tuple[Path, Path]:
    """A finished 2-epoch-planned run and one interrupted after 1 of 2 epochs (run.json as SIGINT leaves it)."""
    finished = copy_run(kept_run, tmp_path, "finished")
    interrupted = copy_run(kept_run, tmp_path, "interrupted")
    meta = info(interrupted)
    meta.update(status="interrupted", epochs=2)
    (interrupted / "run.json").write_text(json.dumps(meta))
    return finished, interrupted


def test_6_single_option_questions_are_refused(tmp_path, tiny_qwen2_dir, capsys):
    rows = make_mc_rows(4)
    rows[2] = {"question": "Question: Pick one.\nOptions:\nA: the only one\n\nReply with A.", "label": "A"}
    data = write_jsonl(tmp_path / "one.jsonl", rows)
    with pytest.raises(DataError, match="one.jsonl:3: only one option"):
        read_mc_jsonl(data)
    err = cli_error(capsys, ["split", "--dataset", str(data), "--out", str(tmp_path / "s"), "--model", "nowhere"])
    assert "one.jsonl:3" in err and "at least two" in err


def test_7_lone_surrogate_names_the_file_and_line(tmp_path, tiny_qwen2_dir, sets, capsys):
    lines = (sets["injection"]).read_text().splitlines()
    obj = json.loads(lines[4])
    obj["question"] = obj["question"].replace("Question:", "Question: \\ud83d broken", 1)
    lines[4] = json.dumps(obj).replace("\\\\ud83d", "\\ud83d")  # a lone high surrogate, as JSON writes it
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    err = cli_error(capsys, train_args(tiny_qwen2_dir, {**sets, "injection": bad}, out))
    assert f"{bad}:5" in err and "lone surrogate" in err and "U+D83D" in err and "model" not in err.split(":")[0]
    assert not out.exists()


# ================================================================================ data loss
def test_8_compare_holds_every_directory_it_writes(tmp_path, tiny_qwen2_dir, capsys):
    data = write_jsonl(tmp_path / "quiz.jsonl", make_mc_rows(12, seed=1))
    out = tmp_path / "cmp"
    argv = ["compare", "--dataset", str(data), "--out", str(out), "--model", str(tiny_qwen2_dir), "--device", "cpu"]
    argv += ["--epochs", "2", "--lr", "1e-3", "--methods", "ft"]
    with blocked_child(tmp_path, argv, 12 + 3) as proc:  # blocked in ft's second epoch
        split = ["split", "--dataset", str(data), "--model", str(tiny_qwen2_dir), "--device", "cpu", "--force"]
        for cmd in (
            [*split, "--out", str(out / "split")],
            ["train", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--split", str(out / "split"),
             "--out", str(out / "runs" / "cnl-sgd")],
            ["report", str(out / "runs" / "ft-sgd"), "--out", str(out / "report")],
            ["train", "--model", str(tiny_qwen2_dir), "--device", "cpu", "--split", str(out / "split"),
             "--out", str(out / "runs" / "ft-sgd"), "--resume"],
        ):  # fmt: skip
            err = cli_error(capsys, cmd)
            assert "in use by another cnl process" in err and "cnl compare" in err, err
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert lock_holder(out) is None  # the holder is gone, its lock with it
    assert main(argv) == 0  # and the comparison resumes


@pytest.mark.parametrize(
    ("command", "planted"),
    [
        ("train-config", "config.yaml"),
        ("train", "summary.csv"),
        ("train", "train.log"),
        ("split", "notes.txt"),
        ("report", "report.md"),
        ("compare", "README.md"),
        ("eval", "eval.md"),
    ],
)
def test_9_files_the_user_owns_in_out_are_never_overwritten(
    tmp_path, tiny_qwen2_dir, sets, kept_run, capsys, command, planted
):
    out = tmp_path / "exp"
    out.mkdir()
    mine = out / planted
    mine.write_text("# my own file, with comments\nlr: 1.0e-3\n")
    model = ["--model", str(tiny_qwen2_dir), "--device", "cpu"]
    argv = {
        "train-config": [*train_args(tiny_qwen2_dir, sets, out), "--config", str(mine)],
        "train": train_args(tiny_qwen2_dir, sets, out),
        "split": ["split", "--dataset", str(sets["mastered"]), "--out", str(out), *model],
        "report": ["report", str(kept_run), "--out", str(out)],
        "compare": ["compare", "--dataset", str(sets["mastered"]), "--out", str(out), *model],
        "eval": ["eval", "--general", str(sets["mastered"]), "--out", str(out), *model],
    }[command]
    err = cli_error(capsys, argv)
    assert str(out) in err and planted in err and "choose another --out" in err
    assert mine.read_text() == "# my own file, with comments\nlr: 1.0e-3\n"
    assert sorted(p.name for p in out.iterdir()) == [planted]


def test_9_a_run_being_resumed_keeps_the_users_notes(tmp_path, kept_run, tiny_qwen2_dir, sets):
    run = copy_run(kept_run, tmp_path)
    (run / "NOTES.md").write_text("mine")
    assert main(train_args(tiny_qwen2_dir, sets, run, "--resume")) == 0
    assert (run / "NOTES.md").read_text() == "mine" and len(rows_of(run)) == 2


# ================================================================================ tracebacks instead of messages
def test_10_full_disk_as_a_safetensors_error_during_the_checkpoint(tmp_path, tiny_qwen2_dir, sets, capsys, monkeypatch):
    from safetensors import SafetensorError

    real, calls = cnl.rundir.atomic_save, [0]

    def save(path, fn):
        calls[0] += 1
        if str(path).endswith(".safetensors") and "epoch_002" in str(path):
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                'message: "No space left on device" })'
            )
        return real(path, fn)

    monkeypatch.setattr(cnl.rundir, "atomic_save", save)
    out = tmp_path / "full"
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out))
    assert "disk is full" in err and "checkpoint of epoch 2" in err and "--no-checkpoint" in err
    assert [r["epoch"] for r in rows_of(out)] == ["1", "2"] and info(out)["status"] == "failed"


def test_10_full_disk_during_save_model_names_the_path(tmp_path, tiny_qwen2_dir, sets, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cnl.rundir.RunDir, "save_model", full)
    out = tmp_path / "full"
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out, "--save-model"))
    assert "disk is full" in err and str(out / "model") in err
    assert info(out)["status"] == "failed" and info(out)["epochs_done"] == 2  # not 'running'
    monkeypatch.undo()
    assert main(train_args(tiny_qwen2_dir, sets, out, "--save-model", "--resume")) == 0
    assert (out / "model" / "config.json").exists() and info(out)["status"] == "finished"


def test_12_damaged_summary_and_run_json_come_with_a_recovery_hint(tmp_path, kept_run, capsys):
    cut = copy_run(kept_run, tmp_path, "cut")
    text = (cut / "summary.csv").read_text()
    (cut / "summary.csv").write_text(text[:-3])
    err = cli_error(capsys, ["report", str(cut), "--out", str(tmp_path / "r1")])
    assert "cut short" in err and "predictions/" in err
    bad = copy_run(kept_run, tmp_path, "bad")
    (bad / "run.json").write_text('{"method": "cnl", "optim')
    err = cli_error(capsys, ["report", str(bad), "--out", str(tmp_path / "r2")])
    assert "run.json" in err and "damaged" in err and "new --out" in err


def test_13_bad_paths_are_messages(tmp_path, tiny_qwen2_dir, sets, capsys, monkeypatch):
    long_name = tmp_path / ("x" * 300)
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, long_name))
    assert "longer than" in err and "choose a shorter output name" in err
    argv = train_args(tiny_qwen2_dir, sets, tmp_path / "x")
    argv[argv.index("--out") + 1] = ""
    err = cli_error(capsys, argv)
    assert "empty --out" in err and not (Path.cwd() / "run.json").exists()
    locked = tmp_path / "lockdir"
    (locked / LOCK_NAME).mkdir(parents=True)
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, locked))
    assert "cannot lock" in err and LOCK_NAME in err
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("CNL_CACHE", str(afile))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    err = cli_error(capsys, ["split", "--dataset", str(sets["mastered"]), "--out", str(tmp_path / "s"),
                             "--model", str(gguf)])  # fmt: skip
    assert "CNL_CACHE" in err and "is a file, not a directory" in err
    monkeypatch.delenv("CNL_CACHE")
    monkeypatch.setenv("HOME", str(afile))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    err = cli_error(capsys, ["split", "--dataset", str(sets["mastered"]), "--out", str(tmp_path / "s"),
                             "--model", str(gguf)])  # fmt: skip
    assert "HOME" in err and "is a file, not a directory" in err


def test_14_skip_long_prompts_where_it_is_suggested(tmp_path, sets, capsys):
    from cnl.testing import save_tiny_model_dir

    short = save_tiny_model_dir(tmp_path / "short", arch="qwen2", seed=0, max_position_embeddings=400)
    rows = make_mc_rows(6, seed=2)
    rows[1]["question"] = rows[1]["question"].replace("Question:", "Question: " + "very " * 200, 1)
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    model = ["--model", str(short), "--device", "cpu"]
    for base in (
        ["eval", "--general", str(data), "--out", str(tmp_path / "ev"), *model],
        ["analyze", "neurons", "--mastered", str(data), "--injection", str(sets["injection"]),
         "--out", str(tmp_path / "nn"), *model],
    ):  # fmt: skip
        err = cli_error(capsys, base)
        assert "long.jsonl:2" in err and "--skip-long-prompts" in err
        assert main([*base, "--skip-long-prompts"]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["skipped_long_prompts"] == {str(data): 1}


def test_15_sighup_stops_like_sigterm_and_resume_finishes(tmp_path, tiny_qwen2_dir, sets):
    out = tmp_path / "run"
    with blocked_child(tmp_path, train_args(tiny_qwen2_dir, sets, out), N_TRAIN + 3) as proc:
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 128 + signal.SIGHUP
    assert "terminated (SIGHUP)" in (tmp_path / "child.log").read_text()
    assert info(out)["status"] == "interrupted" and info(out)["epochs_done"] == 1
    assert main(train_args(tiny_qwen2_dir, sets, out, "--resume")) == 0
    assert info(out)["status"] == "finished"


def test_15_a_killed_holder_is_recorded_by_the_next_reader(tmp_path, tiny_qwen2_dir, sets, capsys):
    """kill -9 (as when torchrun's rank 0 is killed) leaves run.json saying 'running': the next report sees
    from the lock that nobody holds the run, shows and records 'stopped'; --resume says so and finishes."""
    out = tmp_path / "run"
    with blocked_child(tmp_path, train_args(tiny_qwen2_dir, sets, out), N_TRAIN + 3) as proc:
        capsys.readouterr()
        assert main(["report", str(out), "--out", str(tmp_path / "live")]) == 0
        assert json.loads((tmp_path / "live" / "report.json").read_text())["rows"][0]["status"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert info(out)["status"] == "running"
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["rows"][0]["status"] == "stopped"
    assert info(out)["status"] == "stopped" and "--resume continues after epoch 1" in info(out)["error"]
    capsys.readouterr()
    assert main(train_args(tiny_qwen2_dir, sets, out, "--resume")) == 0
    assert "the process that ran it before is gone" in capsys.readouterr().out
    assert info(out)["status"] == "finished"


def test_16_custom_optimizer_subclasses_are_refused_by_name() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]

    class MySGD(torch.optim.SGD):
        def step(self, closure=None):  # a different rule, which a wrapper would silently replace
            return None

    class Renamed(torch.optim.AdamW):  # the same rule under another name: fine
        pass

    with pytest.raises(ValueError, match=r"test_misuse\..*MySGD overrides step\(\)"):
        MaskedOptimizer(MySGD(p, lr=0.1))
    MaskedOptimizer(Renamed(p, lr=0.1))
    for _ in range(2):  # torch wraps a class's step for its profiler once an instance exists: still torch's own
        MaskedOptimizer(torch.optim.AdamW(p, lr=0.1))
        MaskedOptimizer(torch.optim.SGD(p, lr=0.1, momentum=0.9))


# ================================================================================ still good, per category
def test_still_good_data_bad_json_names_file_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q\\nOptions:\\nA: x\\nB: y", "label": "A"}\n{oops\n')
    err = cli_error(capsys, ["split", "--dataset", str(bad), "--out", str(tmp_path / "s"), "--model", "nowhere"])
    assert f"{bad}:2" in err and "not valid JSON" in err


def test_still_good_options_bad_option_before_any_work(tmp_path, tiny_qwen2_dir, sets, capsys):
    out = tmp_path / "run"
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out, "--ewc-lambda", "3"))
    assert "--ewc-lambda is an option of --method ewc" in err and not out.exists()


def test_still_good_resume_refuses_other_options(tmp_path, kept_run, tiny_qwen2_dir, sets, capsys):
    run = copy_run(kept_run, tmp_path)
    err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, run, "--lr", "5e-3", "--resume"))
    assert "different configuration" in err and "lr" in err


def test_still_good_signals_lock_names_its_holder(tmp_path, tiny_qwen2_dir, sets, capsys):
    out = tmp_path / "run"
    with blocked_child(tmp_path, train_args(tiny_qwen2_dir, sets, out), N_TRAIN + 3) as proc:
        err = cli_error(capsys, train_args(tiny_qwen2_dir, sets, out, "--resume"))
        assert f"pid {proc.pid}" in err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
