"""``cnl continual``: rounds of injection on a tiny offline model, each method in its continual form, the
protected set growing with what was learned, resume mid-round, the ledger and the continual-learning
measures (checked against a hand computation), and ``cnl report`` on continual directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import blocked_child, cli_error, run_cli
from safetensors.torch import load_file

from cnl.continual import accuracy_matrix, definition_state, ledger, metrics
from cnl.data import read_jsonl, split_halves
from cnl.methods import method_names
from cnl.testing import make_mc_rows, make_open_rows, make_tiny_model, make_tiny_tokenizer, memorize, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A saved tiny Qwen2 that learned 6 facts (M), and two sets of 6 facts it does not know (rounds 1, 2)."""
    d = tmp_path_factory.mktemp("continual")
    rows = make_open_rows(18, seed=11)
    tok = make_tiny_tokenizer("chatml")
    model = memorize(make_tiny_model("qwen2", vocab_size=len(tok), seed=0), tok, rows[:6], steps=80)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    parts = {"m": rows[:6], "a": rows[6:12], "b": rows[12:]}
    files = {k: write_jsonl(d / f"{k}.jsonl", part) for k, part in parts.items()}
    config = {
        "optimizer": "adamw",
        "lr": 2e-3,
        "epochs": 1,
        "methods": {
            "replay": {"optimizer": "sgd", "lr": 1e-2},
            "lora": {"lr": 1e-2},
            "osf": {"optimizer": "sgd", "lr": 1e-2},  # adam(w) would leave its subspace: refused
        },
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    return {"dir": d, "model": d / "model", "config": d / "config.yaml", **files}


def base_argv(world: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [
        "continual",
        *("--out", str(out), "--model", str(world["model"]), "--device", "cpu", "--config", str(world["config"])),
        *("--mastered", str(world["m"]), "--rounds", f"{world['a']},{world['b']}"),
        *extra,
    ]


@pytest.fixture(scope="module")
def every_method(world: dict[str, Any]) -> Path:
    """``cnl continual --methods all``: two rounds of one epoch with every registered method."""
    out = world["dir"] / "all"
    assert run_cli(base_argv(world, out, "--methods", "all")) == 0
    return out


def run_info(out: Path, k: int) -> dict[str, Any]:
    return json.loads((out / "rounds" / f"{k:02d}" / "run.json").read_text())


def correct_at_round_end(out: Path, k: int, name: str) -> list[bool]:
    info = run_info(out, k)
    last = info["epochs_done"]
    path = out / "rounds" / f"{k:02d}" / "predictions" / f"epoch_{last:03d}_{name}.jsonl"
    return [json.loads(x)["correct"] for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ every method
@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_two_rounds_from_the_previous_rounds_weights(every_method: Path, method: str) -> None:
    out = every_method / method
    assert definition_state(out)["status"] == "finished"
    one, two = run_info(out, 1), run_info(out, 2)
    assert one["status"] == two["status"] == "finished" and one["method"] == method
    start = "merged" if method in ("lora", "cnl-lora") else "model"  # an adapter, merged at the round's end
    assert Path(two["config"]["model"]["model"]) == (out / "rounds" / "01" / start).resolve()
    assert (out / "rounds" / "02" / start / "config.json").is_file()
    # every set of the sequence is evaluated in every round; the first before training too
    assert {"set_0", "set_1", "set_2"} <= set(two["sets"])
    assert (out / "rounds" / "01" / "predictions" / "epoch_000_set_2.jsonl").is_file()
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["sets"] == ["set_0", "set_1", "set_2"] and len(matrix["matrix"]) == 3


@pytest.mark.parametrize("method", ["cnl", "agem", "ewc"])
def test_the_protected_set_is_m_plus_what_earlier_rounds_taught_and_the_model_still_answers(
    world: dict[str, Any], every_method: Path, method: str
) -> None:
    out = every_method / method
    learned = [r.raw for r, ok in zip(read_jsonl(world["a"]), correct_at_round_end(out, 1, "set_1"), strict=True) if ok]
    protected = [r.raw for r in read_jsonl(out / "protected" / "round_02.jsonl")]
    assert protected == [r.raw for r in read_jsonl(world["m"])] + learned
    for k in (1, 2):  # the protected set is the reference (cnl), the memory (agem), the old task (ewc)
        assert run_info(out, k)["config"]["data"]["mastered"] == str(out / "protected" / f"round_{k:02d}.jsonl")


def test_replay_trains_on_a_buffer_drawn_from_the_protected_set(every_method: Path) -> None:
    out = every_method / "replay"
    protected = [r.raw for r in read_jsonl(out / "protected" / "round_02.jsonl")]
    buffer = [r.raw for r in read_jsonl(out / "protected" / "round_02_buffer.jsonl")]
    assert buffer == split_halves(protected)[0]
    info = run_info(out, 2)
    assert info["setting"] == "replay" and info["config"]["data"]["mastered1"].endswith("round_02_buffer.jsonl")


def test_lora_trains_a_fresh_adapter_each_round_merged_at_its_end(world: dict[str, Any], every_method: Path) -> None:
    out = every_method / "lora"
    for k in (1, 2):
        assert (out / "rounds" / f"{k:02d}" / "model" / "adapter_config.json").is_file()
        assert (out / "rounds" / f"{k:02d}" / "merged" / "config.json").is_file()
    # round 1's merged weights: the start weights plus its adapter's product, scaled by alpha / r
    base = load_file(str(world["model"] / "model.safetensors"))
    merged = load_file(str(out / "rounds" / "01" / "merged" / "model.safetensors"))
    adapter = load_file(str(out / "rounds" / "01" / "model" / "adapter_model.safetensors"))
    config = json.loads((out / "rounds" / "01" / "model" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    targets = [k[: -len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")]
    assert targets
    for t in targets:
        name = t.removeprefix("base_model.model.") + ".weight"
        delta = scale * adapter[f"{t}.lora_B.weight"] @ adapter[f"{t}.lora_A.weight"]
        torch.testing.assert_close(merged[name], base[name] + delta)
    assert not any("lora_" in k for k in merged)


def test_online_ewc_accumulates_the_fisher_over_rounds(world, tmp_path, monkeypatch) -> None:
    """Round 1 computes the Fisher of the protected set (EWC); at each round's end the round's own training
    set's Fisher is added to γ times the one it used; round 2 uses that sum and computes no other."""
    import cnl.methods.ewc as E

    calls: list[str] = []

    def fake_fisher(ctx: Any, which: str = "reference") -> dict[str, torch.Tensor]:
        calls.append(which)
        return {n: torch.full_like(p, float(len(calls))) for n, p in ctx.params}

    monkeypatch.setattr(E, "diagonal_fisher", fake_fisher)
    out = tmp_path / "ewc"
    assert run_cli(base_argv(world, out, "--method", "ewc", "--ewc-gamma", "0.5")) == 0
    assert calls == ["reference", "train", "train"]  # round 1: epoch 1's reference, its end; round 2: its end
    one = load_file(str(out / "rounds" / "01" / "carry" / "state.safetensors"))
    two = load_file(str(out / "rounds" / "02" / "carry" / "state.safetensors"))
    assert {float(t.unique()) for t in one.values()} == {2 + 0.5 * 1}
    assert {float(t.unique()) for t in two.values()} == {3 + 0.5 * 2.5}


@pytest.mark.parametrize("anchor", ["start", "original"])
def test_l2_anchors_at_each_rounds_start_or_the_original_weights(world, tmp_path, monkeypatch, anchor) -> None:
    import cnl.methods.l2 as L

    made: list[Any] = []
    original_make = L.L2SP.make_hooks

    def make_hooks(self, cfg, params):
        hooks = original_make(self, cfg, params)
        made.append(hooks)
        return hooks

    monkeypatch.setattr(L.L2SP, "make_hooks", make_hooks)
    out = tmp_path / "l2"
    assert run_cli(base_argv(world, out, "--method", "l2", "--optimizer", "sgd", "--l2-anchor", anchor)) == 0
    start_of = {
        "original": load_file(str(world["model"] / "model.safetensors")),
        "start": load_file(str(out / "rounds" / "01" / "model" / "model.safetensors")),
    }[anchor]
    round_two = made[-1].anchor
    assert round_two and all(torch.equal(round_two[n], start_of[n].float()) for n in round_two if n in start_of)
    assert any(n in start_of for n in round_two)


# ------------------------------------------------------------------------------------------ the ledger
def test_the_ledger_records_every_item_at_every_evaluation(world: dict[str, Any], every_method: Path) -> None:
    out = every_method / "cnl"
    with open(out / "ledger.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["set", "item", "question", "before", "r1e1", "r2e1"]
    assert [r["set"] for r in rows] == ["set_0"] * 6 + ["set_1"] * 6 + ["set_2"] * 6
    questions = [r.question for name in ("m", "a", "b") for r in read_jsonl(world[name])]
    assert [r["question"] for r in rows] == questions
    for k, point in ((1, "r1e1"), (2, "r2e1")):
        for name in ("set_0", "set_1", "set_2"):
            flags = [int(r[point]) for r in rows if r["set"] == name]
            assert flags == [int(x) for x in correct_at_round_end(out, k, name)]
    names, matrix = accuracy_matrix(out)
    for i, point in enumerate(("before", "r1e1", "r2e1")):
        for j, name in enumerate(names):
            flags = [int(r[point]) for r in rows if r["set"] == name]
            assert matrix[i][j] == pytest.approx(sum(flags) / len(flags))
    assert ledger(out)[0] == list(rows[0])


def test_measures_against_a_hand_computation() -> None:
    r = [
        [0.9, 0.1, 0.0, 0.2],
        [0.8, 0.7, 0.1, 0.2],
        [0.6, 0.5, 0.8, 0.3],
        [0.7, 0.4, 0.6, 0.9],
    ]
    m = metrics(r)
    assert m["rounds"] == 3
    # BWT = mean over j < 3 of R[3][j] - R[j][j] = ((.7-.9) + (.4-.7) + (.6-.8)) / 3
    assert m["bwt"] == pytest.approx(-0.7 / 3)
    # A_i = mean of R[i][0..i]
    assert m["average_accuracy"] == pytest.approx([0.9, 0.75, (0.6 + 0.5 + 0.8) / 3, 0.65])
    # F_i = mean over j < i of (max over l in [j, i-1] of R[l][j]) - R[i][j]
    assert m["forgetting"] == pytest.approx([0.0, 0.1, (0.3 + 0.2) / 2, (0.2 + 0.3 + 0.2) / 3])


def test_report_shows_the_matrix_the_measures_and_the_figures(every_method: Path, tmp_path: Path, capsys) -> None:
    # --methods wrote a report of every method into OUT/report
    report = json.loads((every_method / "report" / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == list(method_names())
    for r in report["rows"]:
        saved = json.loads((every_method / r["run"] / "matrix.json").read_text())
        assert r["matrix"] == saved["matrix"] and r["bwt"] == pytest.approx(saved["bwt"])
        assert (every_method / "report" / f"ledger_{r['run']}.png").stat().st_size > 1000
    assert (every_method / "report" / "retention.png").stat().st_size > 1000
    md = (every_method / "report" / "report.md").read_text()
    assert "| cnl | cnl/adamw | finished |" in md and "BWT" in md
    # cnl report on continual directories; mixing them with run directories is refused
    out = tmp_path / "rep"
    assert run_cli(["report", str(every_method / "ft"), str(every_method / "cnl"), "--out", str(out)]) == 0
    assert [r["run"] for r in json.loads((out / "report.json").read_text())["rows"]] == ["ft", "cnl"]
    line = cli_error(capsys, ["report", str(every_method / "ft"), str(every_method / "ft" / "rounds" / "01"),
                              "--out", str(tmp_path / "x")])  # fmt: skip
    assert "continual directories, reported apart from run directories" in line


# ------------------------------------------------------------------------------------------ inputs
def test_protect_original_and_a_file(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "orig"
    assert run_cli(base_argv(world, out, "--method", "cnl", "--protect", "original")) == 0
    m = [r.raw for r in read_jsonl(world["m"])]
    assert [r.raw for r in read_jsonl(out / "protected" / "round_02.jsonl")] == m
    mine = write_jsonl(tmp_path / "mine.jsonl", m[:2])
    out = tmp_path / "file"
    assert run_cli(base_argv(world, out, "--method", "cnl", "--protect", str(mine))) == 0
    assert [r.raw for r in read_jsonl(out / "protected" / "round_02.jsonl")] == m[:2]


def test_a_plan_file_with_per_round_options_and_split_rounds(world: dict[str, Any], tmp_path: Path) -> None:
    plan = tmp_path / "rounds.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "mastered": str(world["m"]),
                "rounds": [{"injection": str(world["a"]), "epochs": 2}, {"injection": str(world["b"]), "lr": 1e-3}],
            }
        )
    )
    out = tmp_path / "plan"
    argv = ["continual", "--out", str(out), "--plan", str(plan), "--model", str(world["model"]), "--device", "cpu"]
    assert run_cli([*argv, "--config", str(world["config"]), "--method", "ft"]) == 0
    assert (run_info(out, 1)["epochs_done"], run_info(out, 2)["epochs_done"]) == (2, 1)
    assert (run_info(out, 1)["config"]["train"]["lr"], run_info(out, 2)["config"]["train"]["lr"]) == (2e-3, 1e-3)
    out = tmp_path / "cut"
    argv = ["continual", "--out", str(out), "--injection", str(world["a"]), "--split-rounds", "3"]
    assert run_cli([*argv, "--mastered", str(world["m"]), "--model", str(world["model"]), "--device", "cpu",
                    "--config", str(world["config"]), "--method", "ft"]) == 0  # fmt: skip
    cut = [len(read_jsonl(out / "sets" / f"a_round_{k:02d}.jsonl")) for k in (1, 2, 3)]
    assert cut == [2, 2, 2] and json.loads((out / "matrix.json").read_text())["rounds"] == 3


def test_multiple_choice_rounds(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    rows = make_mc_rows(12, seed=4)
    files = [write_jsonl(tmp_path / f"{k}.jsonl", rows[i : i + 4]) for i, k in zip((0, 4, 8), "mab", strict=True)]
    out = tmp_path / "mc"
    argv = ["continual", "--out", str(out), "--model", str(tiny_qwen2_dir), "--device", "cpu", "--method", "cnl"]
    argv += ["--mastered", str(files[0]), "--rounds", f"{files[1]},{files[2]}", "--lr", "1e-3", "--epochs", "1"]
    assert run_cli(argv) == 0
    with open(out / "ledger.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--methods", "ft", "--method", "cnl"], "give --method (one continual run) or --methods"),
        (["--methods", "ft,ft"], "name each method once"),
        (["--protect", "nowhere.jsonl"], "--protect nowhere.jsonl: choose learned, original, or an existing set file"),
        (["--split-rounds", "2"], "give the rounds one way"),
    ],
)
def test_bad_continual_options_are_refused_before_any_work(world, tmp_path, capsys, change, message) -> None:
    out = tmp_path / "bad"
    assert message in cli_error(capsys, base_argv(world, out, *change))
    assert not (out / "rounds").exists()


def test_another_setting_than_in_set_is_refused(world, tmp_path, capsys) -> None:
    plan = tmp_path / "rounds.yaml"
    plan.write_text(yaml.safe_dump({"mastered": str(world["m"]), "rounds": [{"injection": str(world["a"]),
                                                                              "setting": "ood-wrong"}]}))  # fmt: skip
    argv = ["continual", "--out", str(tmp_path / "bad"), "--plan", str(plan), "--model", str(world["model"])]
    assert "round 1: cnl continual runs the in-set setting" in cli_error(capsys, [*argv, "--method", "cnl"])


def test_rounds_of_another_format_are_refused(world, tmp_path, capsys) -> None:
    mc = write_jsonl(tmp_path / "mc.jsonl", make_mc_rows(3))
    argv = base_argv(world, tmp_path / "bad", "--method", "cnl")
    argv[argv.index("--rounds") + 1] = f"{world['a']},{mc}"
    assert "round 2's injection set is mcq, the original M open: one format" in cli_error(capsys, argv)


# ------------------------------------------------------------------------------------------ resume
def test_a_killed_run_resumes_in_its_round_and_a_changed_definition_is_refused(world, tmp_path, capsys) -> None:
    out = tmp_path / "killed"
    argv = base_argv(world, out, "--method", "cnl", "--epochs", "2")
    # round 1: 2 epochs of 6 updates; blocked in round 2's second epoch, after two of its updates
    with blocked_child(tmp_path, argv[:], stop_at=6 * 2 + 6 + 3) as child:
        child.kill()
        child.wait()
    assert definition_state(out)["status"] == "stopped"
    assert run_info(out, 1)["status"] == "finished" and run_info(out, 2)["epochs_done"] == 1
    capsys.readouterr()
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "run already finished (2 epochs)" in printed and "continuing after epoch 1" in printed
    whole = tmp_path / "whole"
    assert run_cli(base_argv(world, whole, "--method", "cnl", "--epochs", "2")) == 0
    for name in ("ledger.csv", "matrix.json"):
        assert (out / name).read_text() == (whole / name).read_text()
    changed = base_argv(world, out, "--method", "cnl", "--epochs", "2", "--lr", "5e-3")
    assert "holds a continual run with another round definition (train differ)" in cli_error(capsys, changed)


# ------------------------------------------------------------------------------------------ the reference
def test_reference_sample_draws_n_questions_per_epoch_with_the_seed(world, tmp_path, monkeypatch, capsys) -> None:
    import cnl.train as T

    drawn: list[list[tuple[int, ...]]] = []
    original = T.sign_reference

    def recording(model, questions, params, **kw):
        drawn[-1].append(tuple(q.input_ids for q in questions))
        return original(model, questions, params, **kw)

    monkeypatch.setattr(T, "sign_reference", recording)
    m = world["m"].read_text().splitlines()
    argv = ["train", "--model", str(world["model"]), "--device", "cpu", "--method", "cnl", "--epochs", "3"]
    argv += ["--mastered", str(world["m"]), "--injection", str(world["a"]), "--lr", "1e-3"]
    for name, extra in (("one", ["--reference-sample", "3"]), ("two", ["--reference-sample", "3"]),
                        ("all", []), ("more", ["--reference-sample", "50"])):  # fmt: skip
        drawn.append([])
        assert run_cli([*argv, *extra, "--out", str(tmp_path / name)]) == 0
    one, two, whole, more = drawn
    assert [len(e) for e in one] == [3, 3, 3] and one == two  # N each epoch, the same for the same seed
    assert len(set(one)) > 1  # drawn anew each epoch
    assert all(set(e) <= set(whole[0]) for e in one)  # from the reference set, in its order
    assert all(list(e) == sorted(e, key=whole[0].index) for e in one)
    assert [len(e) for e in whole] == [len(m)] * 3 and more == whole  # N >= |M|: the whole set
    info = json.loads((tmp_path / "one" / "run.json").read_text())
    assert info["config"]["train"]["reference_sample"] == 3
    bad = [*argv, "--reference-sample", "-1", "--out", str(tmp_path / "bad")]
    assert "reference_sample must be >= 0 (0: the whole reference set), got -1" in cli_error(capsys, bad)


def test_plain_fine_tuning_needs_no_mastered_set(world, tmp_path, capsys) -> None:
    argv = ["train", "--model", str(world["model"]), "--device", "cpu", "--injection", str(world["a"])]
    argv += ["--epochs", "1", "--lr", "1e-3", "--out", str(tmp_path / "ft")]
    assert run_cli([*argv, "--method", "ft"]) == 0
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["sets"]["mastered"] == {"file": None, "sha256": None, "count": 0}
    assert "forgetting on mastered (none given)" in (tmp_path / "ft" / "train.log").read_text()
    argv[-1] = str(tmp_path / "cnl")
    assert "needs the mastered set(s)" in cli_error(capsys, [*argv, "--method", "cnl"])
