"""Sharded training under torchrun (FSDP2 on gloo, CPU) and mini-batches.

Two processes with ``--batch-size 1`` take the same questions per step as one process with
``--batch-size 2``, so they must give the same counts and weights equal to float rounding; resume,
checkpoints and ``--save-model`` must work under torchrun; bad combinations fail before any work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from cnl.testing import make_mc_rows, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist_sets")
    rows = make_mc_rows(30, seed=5)
    return {"mastered": write_jsonl(d / "m.jsonl", rows[:10]), "injection": write_jsonl(d / "i.jsonl", rows[10:])}


def train_args(model_dir: Path, sets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--optimizer", "sgd",
        "--lr", "0.02", "--epochs", "2", "--mastered", str(sets["mastered"]), "--injection", str(sets["injection"]),
        "--save-model", *extra,
    ]  # fmt: skip


def torchrun(nproc: int, argv: list[str], **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "cnl", *argv]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)


def summary(run: Path) -> list[dict]:
    import csv

    with open(run / "summary.csv", newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in csv.DictReader(f)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float = 1e-6) -> None:
    """The weights equal within ``rel`` relative to their norm, and every tensor within 10 ``rel`` (two
    processes score unpadded prompts where one process pads a batch of two, so products round
    differently, by about 1e-7 per step)."""
    assert set(a) == set(b)
    diff = torch.cat([(a[k] - b[k]).reshape(-1) for k in a])
    norm = torch.cat([a[k].reshape(-1) for k in a])
    assert float(torch.linalg.norm(diff) / torch.linalg.norm(norm)) <= rel
    for k in a:
        assert float(torch.linalg.norm(a[k] - b[k]) / torch.linalg.norm(a[k])) <= 10 * rel, k


@pytest.mark.parametrize(("optimizer", "rel"), [("sgd", 1e-6), ("momentum", 1e-5)])
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, sets, tiny_qwen2_dir, optimizer, rel):
    one = tmp_path / "one"
    opt = ["--optimizer", optimizer]
    assert run_cli(train_args(tiny_qwen2_dir, sets, one, "--batch-size", "2", *opt)) == 0
    two = tmp_path / "two"
    proc = torchrun(2, train_args(tiny_qwen2_dir, sets, two, "--batch-size", "1", *opt))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows_one, rows_two = summary(one), summary(two)
    for a, b in zip(rows_one, rows_two, strict=True):
        assert {k: a[k] for k in ("epoch", "wrong_to_correct", "correct_to_wrong")} == {
            k: b[k] for k in ("epoch", "wrong_to_correct", "correct_to_wrong")
        }
        assert float(a["train_avg_loss"]) == pytest.approx(float(b["train_avg_loss"]), rel=1e-5)
        assert float(a["masked_fraction"]) == pytest.approx(float(b["masked_fraction"]), abs=1e-4)
    assert_close_weights(weights(one), weights(two), rel)
    info = json.loads((two / "run.json").read_text())
    assert (info["world_size"], info["batch_size"], info["status"]) == (2, 1, "finished")
    # only rank 0 wrote: one log, one set of predictions, no lock files left
    assert sorted(p.name for p in (two / "predictions").iterdir()) == sorted(
        p.name for p in (one / "predictions").iterdir()
    )
    assert not list(two.glob(".cnl.lock*"))


def test_resume_after_killing_a_rank(tmp_path, sets, tiny_qwen2_dir):
    full = tmp_path / "full"
    args = ["--epochs", "5", "--batch-size", "1"]
    assert torchrun(2, train_args(tiny_qwen2_dir, sets, full, *args)).returncode == 0
    cut = tmp_path / "cut"
    proc = torchrun(2, train_args(tiny_qwen2_dir, sets, cut, *args), background=True)
    pointer = cut / "checkpoint" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not pointer.exists():
        time.sleep(0.05)
    assert pointer.exists(), "no checkpoint appeared"
    import psutil

    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "cnl" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.wait(timeout=120)
    assert proc.returncode != 0
    done = json.loads((cut / "run.json").read_text())["epochs_done"]
    assert 1 <= done < 5
    resumed = torchrun(2, [*train_args(tiny_qwen2_dir, sets, cut, *args), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert summary(cut) == summary(full)
    assert_close_weights(weights(cut), weights(full))


def test_bad_combinations_fail_before_any_work(tmp_path, sets, tiny_qwen2_dir, capsys):
    # a step larger than the training set (20 questions)
    out = tmp_path / "big"
    assert run_cli(train_args(tiny_qwen2_dir, sets, out, "--batch-size", "21")) == 2
    assert "more than the 20" in capsys.readouterr().err and not out.exists()
    # LoRA is not sharded yet
    lora = torchrun(2, train_args(tiny_qwen2_dir, sets, tmp_path / "lora", "--method", "lora", "--optimizer", "sgd"))
    assert lora.returncode != 0 and "does not run sharded" in lora.stderr
    assert not (tmp_path / "lora").exists()
    # --cpu-offload needs several processes
    assert run_cli(train_args(tiny_qwen2_dir, sets, tmp_path / "off", "--cpu-offload")) == 2
    assert "several processes" in capsys.readouterr().err
    # a world size that changed on resume
    one = tmp_path / "one"
    assert run_cli([*train_args(tiny_qwen2_dir, sets, one, "--keep-checkpoint"), "--epochs", "1"]) == 0
    again = torchrun(2, [*train_args(tiny_qwen2_dir, sets, one, "--keep-checkpoint"), "--epochs", "2", "--resume"])
    assert again.returncode != 0 and "started with 1" in again.stderr


@pytest.mark.integration
def test_embedded_model_two_processes_one_epoch(tmp_path, shared_dir):
    """The real SmolLM2 under torchrun: one epoch of CNL on 2 ranks equals one process with batch 2."""
    from cnl.data import read_mc_jsonl, take_limit

    rows = [r.raw for r in take_limit(read_mc_jsonl(shared_dir / "data" / "csqa.jsonl"), 12)]
    sets = {
        "mastered": write_jsonl(tmp_path / "m.jsonl", rows[:4]),
        "injection": write_jsonl(tmp_path / "i.jsonl", rows[4:]),
    }
    common = ["train", "--device", "cpu", "--lr", "3e-5", "--epochs", "1", "--optimizer", "sgd"]
    common += ["--mastered", str(sets["mastered"]), "--injection", str(sets["injection"])]
    proc = torchrun(2, [*common, "--batch-size", "1", "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    a, b = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert [(r["wrong_to_correct"], r["correct_to_wrong"]) for r in a] == [
        (r["wrong_to_correct"], r["correct_to_wrong"]) for r in b
    ]
    assert float(a[0]["train_avg_loss"]) == pytest.approx(float(b[0]["train_avg_loss"]), rel=1e-4)
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2 and len(info["peak_memory_bytes"]) == 2
