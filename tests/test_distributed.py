"""Sharded training under torchrun (FSDP2 on gloo, CPU) and mini-batches.

Two processes with ``--batch-size 1`` take the same questions per step as one process with
``--batch-size 2``, so they must give the same counts and weights equal to float rounding; resume,
checkpoints and ``--save-model`` must work under torchrun; bad combinations fail before any work.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli, torchrun
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
        assert float(torch.linalg.norm(a[k] - b[k])) <= 10 * rel * float(torch.linalg.norm(a[k])), k  # 0 vs 0 too


#: (method, optimizer, its options, relative tolerance of the weights): CNL, and the peers whose hooks run on
#: each process's shard (the penalties element-wise, A-GEM's dot products as all-reduced sums).
SHARDED = [
    ("cnl", "sgd", [], 1e-6),
    ("cnl", "momentum", [], 1e-5),
    ("ewc", "sgd", ["--ewc-lambda", "1", "--ewc-fisher", "once"], 1e-5),  # lr·λ·max F near 1: rounding grows
    ("l2", "momentum", ["--l2-alpha", "10"], 1e-5),
    ("agem", "sgd", [], 1e-6),
    ("freeze", "momentum", [], 1e-5),  # the bottom layer and the (tied) embedding out of training, in the shards too
]


@pytest.mark.parametrize(("method", "optimizer", "options", "rel"), SHARDED, ids=[f"{m}-{o}" for m, o, *_ in SHARDED])
def test_two_processes_equal_one_process_with_twice_the_batch(
    tmp_path, sets, tiny_qwen2_dir, method, optimizer, options, rel
):
    one = tmp_path / "one"
    opt = ["--method", method, "--optimizer", optimizer, *options]
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
    if method == "ewc":  # the method's state (the Fisher of the start weights, the anchor) in sharded checkpoints
        cut = tmp_path / "cut"
        first = torchrun(2, [*train_args(tiny_qwen2_dir, sets, cut, "--batch-size", "1", *opt), "--epochs", "1",
                             "--keep-checkpoint"])  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        ckpt = cut / "checkpoint" / "epoch_001"
        assert sorted(p.name for p in ckpt.iterdir()) == sorted(
            ["meta.json", *(f"rank_{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors"))]
        )
        state = load_file(str(ckpt / "rank_1.safetensors"))
        assert any("fisher" in k for k in state) and any("anchor" in k for k in state)
        resumed = torchrun(2, [*train_args(tiny_qwen2_dir, sets, cut, "--batch-size", "1", *opt), "--resume"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert summary(cut) == summary(two)
        assert_close_weights(weights(cut), weights(two), 1e-7)


def test_resume_after_killing_a_rank(tmp_path, sets, tiny_qwen2_dir):
    full = tmp_path / "full"
    args = ["--epochs", "3", "--batch-size", "1"]
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
    assert 1 <= done < 3
    resumed = torchrun(2, [*train_args(tiny_qwen2_dir, sets, cut, *args), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert summary(cut) == summary(full)
    assert_close_weights(weights(cut), weights(full))


def test_bad_combinations_fail_before_any_work(tmp_path, sets, tiny_qwen2_dir, capsys):
    """What two processes refuse, checked by ``plan_run`` as rank 0 of two (what every rank runs before
    any model work; the torchrun tests above show the ranks then agree)."""
    from cnl.config import DataConfig, ModelConfig
    from cnl.distributed import Dist
    from cnl.errors import ConfigError
    from cnl.resolve import train_config
    from cnl.train import ResumeMismatch, plan_run

    two = Dist(rank=0, world=2)
    data = DataConfig(mastered=str(sets["mastered"]), injection=str(sets["injection"]))
    cpu = ModelConfig(device="cpu")
    # a step larger than the training set (20 questions), with one process and with two
    out = tmp_path / "big"
    assert run_cli(train_args(tiny_qwen2_dir, sets, out, "--batch-size", "21")) == 2
    assert "more than the 20" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match="more than the 20"):
        plan_run(train_config(batch_size=11), data, cpu, tmp_path / "big2", dist=two)
    # LoRA and MoFO are not sharded (yet); --ref-chunks splits one process's parameters
    for method, optimizer in (("lora", "sgd"), ("mofo", "adamw")):
        with pytest.raises(ConfigError, match=f"--method {method} does not run sharded"):
            plan_run(train_config(method=method, optimizer=optimizer), data, cpu, tmp_path / method, dist=two)
    with pytest.raises(ConfigError, match="--ref-chunks"):
        plan_run(train_config(ref_chunks=2), data, cpu, tmp_path / "chunks", dist=two)
    assert not any((tmp_path / n).exists() for n in ("big2", "lora", "mofo", "chunks"))
    # --cpu-offload needs several processes
    assert run_cli(train_args(tiny_qwen2_dir, sets, tmp_path / "off", "--cpu-offload")) == 2
    assert "several processes" in capsys.readouterr().err
    # a world size that changed on resume
    one = tmp_path / "one"
    assert run_cli([*train_args(tiny_qwen2_dir, sets, one, "--keep-checkpoint"), "--epochs", "1"]) == 0
    from cnl.resolve import resolve_configs

    c = resolve_configs(train={"optimizer": "sgd", "lr": 0.02, "epochs": 2}, model={"model": str(tiny_qwen2_dir)})
    with pytest.raises(ResumeMismatch, match="started with 1"):
        plan_run(c.train, data, c.model, one, resume=True, dist=two)


@pytest.mark.integration
def test_embedded_model_two_processes_one_epoch(tmp_path, shared_dir):
    """The real SmolLM2 under torchrun: one epoch of CNL on 2 ranks equals one process with batch 2."""
    from cnl.data import read_mc_jsonl, take_limit

    rows = [r.raw for r in take_limit(read_mc_jsonl(shared_dir / "data" / "csqa.jsonl"), 8)]
    sets = {
        "mastered": write_jsonl(tmp_path / "m.jsonl", rows[:3]),
        "injection": write_jsonl(tmp_path / "i.jsonl", rows[3:]),
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
