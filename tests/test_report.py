"""Tests for :mod:`cnl.report` and ``cnl report`` on run directories written by hand (no model needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli
from PIL import Image

from cnl.errors import CnlError
from cnl.report import (
    build_report,
    check_same_sets,
    load_run_record,
    plot_curves,
    render_markdown,
    write_report,
)

IN_SET_COLUMNS = ["epoch", "train_avg_loss", "wrong_to_correct", "correct_to_wrong", "masked_fraction"]
SETS = {
    "mastered": {"file": "/data/x_correct_m.jsonl", "sha256": "aaaa000011112222", "count": 60},
    "injection": {"file": "/data/x_wrong_m.jsonl", "sha256": "bbbb000011112222", "count": 40},
}


def make_run(
    root: Path,
    name: str,
    method: str,
    learned: list[int],
    forgotten: list[int],
    *,
    optimizer: str = "sgd",
    setting: str = "in-set",
    columns: list[str] | None = None,
    learn_set: str = "injection",
    forget_set: str = "mastered",
    sets: dict[str, Any] | None = None,
    learn_total: int = 40,
    forget_total: int = 60,
) -> Path:
    """A run directory as 'cnl train' writes it: run.json and summary.csv."""
    d = root / name
    d.mkdir(parents=True)
    columns = columns or IN_SET_COLUMNS
    info = {
        "method": method,
        "optimizer": optimizer,
        "setting": setting,
        "columns": columns,
        "roles": {
            "setting": setting,
            "learn": learn_set,
            "forget": forget_set,
            "learn_column": columns[2],
            "forget_column": columns[3],
        },
        "learn_set": learn_set,
        "forget_set": forget_set,
        "learn_total": learn_total,
        "forget_total": forget_total,
        "sets": sets or SETS,
        "status": "finished",
        "epochs_done": len(learned),
    }
    (d / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with open(d / "summary.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for i, (lv, fv) in enumerate(zip(learned, forgotten, strict=True), start=1):
            extra = [0.25] * (len(columns) - 4)
            w.writerow([i, round(3.0 / i, 6), lv, fv, *extra])
    return d


@pytest.fixture
def ft_cnl(tmp_path: Path) -> tuple[Path, Path]:
    ft = make_run(tmp_path, "ft-sgd", "ft", [10, 12, 11], [6, 9, 12])
    cnl = make_run(tmp_path, "cnl-sgd", "cnl", [8, 12, 12], [0, 0, 3])
    return ft, cnl


# ------------------------------------------------------------------------------------- load_run_record


def test_load_run_record(ft_cnl: tuple[Path, Path]) -> None:
    r = load_run_record(ft_cnl[1])
    assert r.epochs == [1, 2, 3]
    assert r.learned == [8, 12, 12]
    assert r.forgotten == [0, 0, 3]
    assert r.label == "cnl/sgd"
    assert r.name == "cnl-sgd"


def test_load_run_record_reads_the_settings_columns(tmp_path: Path) -> None:
    cols = ["epoch", "train_avg_loss", "wrong2_to_correct", "correct_to_wrong"]
    d = make_run(tmp_path, "ood", "cnl", [1, 2], [3, 4], setting="ood-wrong", columns=cols, learn_set="injection2")
    r = load_run_record(d)
    assert (r.learned, r.forgotten) == ([1, 2], [3, 4])


def test_not_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnlError, match="not a run directory") as e:
        load_run_record(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(CnlError, match="not a run directory"):
        load_run_record(tmp_path / "missing")


def test_run_without_summary_or_epochs(tmp_path: Path) -> None:
    d = make_run(tmp_path, "r", "ft", [], [])
    with pytest.raises(CnlError, match="no finished epoch"):
        load_run_record(d)
    (d / "summary.csv").unlink()
    with pytest.raises(CnlError, match="no summary.csv"):
        load_run_record(d)


# ---------------------------------------------------------------------------------------- build_report


def test_build_report_numbers(ft_cnl: tuple[Path, Path]) -> None:
    runs = [load_run_record(d) for d in ft_cnl]
    rep = build_report(runs)
    assert rep["learn_set"] == "injection" and rep["forget_set"] == "mastered"
    assert rep["baseline"] == "ft-sgd"
    ft, cnl = rep["rows"]
    assert ft["run"] == "ft-sgd" and cnl["run"] == "cnl-sgd"
    assert (ft["method"], ft["optimizer"], ft["setting"], ft["epochs"]) == ("ft", "sgd", "in-set", 3)
    assert (ft["learn_total"], ft["forget_total"]) == (40, 60)

    # final epoch
    assert (ft["final_learned"], ft["final_forgotten"]) == (11, 12)
    assert ft["final_learned_pct"] == pytest.approx(27.5)
    assert ft["final_forgotten_pct"] == pytest.approx(20.0)
    assert (cnl["final_learned"], cnl["final_forgotten"]) == (12, 3)
    assert cnl["final_learned_pct"] == pytest.approx(30.0)  # 12 of 40
    assert cnl["final_forgotten_pct"] == pytest.approx(5.0)  # 3 of 60

    # best epoch: most learned; ft's is epoch 2 (12); cnl ties at 12 in epochs 2 and 3: fewer forgotten wins
    assert (ft["best_epoch"], ft["best_learned"], ft["best_forgotten"]) == (2, 12, 9)
    assert ft["best_forgotten_pct"] == pytest.approx(15.0)
    assert (cnl["best_epoch"], cnl["best_learned"], cnl["best_forgotten"]) == (2, 12, 0)
    assert cnl["best_learned_pct"] == pytest.approx(30.0)
    assert cnl["best_forgotten_pct"] == 0.0

    # forgetting reduction vs ft at the final epoch: (12 - 3) / 12
    assert ft["forgetting_reduction_pct"] is None
    assert cnl["forgetting_reduction_pct"] == pytest.approx(75.0)


def test_best_epoch_ties(tmp_path: Path) -> None:
    # most learned first; among those, fewest forgotten (here a later epoch) ...
    a = make_run(tmp_path, "a", "cnl", [5, 7, 6, 7], [1, 4, 0, 2])
    row = build_report([load_run_record(a)])["rows"][0]
    assert (row["best_epoch"], row["best_learned"], row["best_forgotten"]) == (4, 7, 2)
    # ... and among full ties the earliest
    b = make_run(tmp_path, "b", "cnl", [5, 7, 7, 7], [1, 2, 2, 4])
    row = build_report([load_run_record(b)])["rows"][0]
    assert (row["best_epoch"], row["best_learned"], row["best_forgotten"]) == (2, 7, 2)


def test_reduction_can_be_negative_and_order_does_not_matter(tmp_path: Path) -> None:
    cnl = make_run(tmp_path, "cnl", "cnl", [3], [8])
    ft = make_run(tmp_path, "ft", "ft", [4], [5])
    rep = build_report([load_run_record(cnl), load_run_record(ft)])  # ft not first
    assert rep["baseline"] == "ft"
    assert rep["rows"][0]["forgetting_reduction_pct"] == pytest.approx(-60.0)  # (5 - 8) / 5


def test_no_ft_run_means_no_reduction(tmp_path: Path) -> None:
    a = make_run(tmp_path, "cnl-sgd", "cnl", [1, 2], [0, 1])
    b = make_run(tmp_path, "cnl-adam", "cnl", [3, 4], [2, 2], optimizer="adam")
    rep = build_report([load_run_record(a), load_run_record(b)])
    assert rep["baseline"] is None
    assert all(r["forgetting_reduction_pct"] is None for r in rep["rows"])
    md = render_markdown(rep)
    assert md.count("| n/a |") == 2
    assert "| baseline |" not in md and "ft forgot nothing" not in md


def test_ft_forgot_nothing_means_no_reduction(tmp_path: Path) -> None:
    ft = make_run(tmp_path, "ft", "ft", [1, 2], [3, 0])
    c = make_run(tmp_path, "cnl", "cnl", [1, 1], [0, 0])
    rep = build_report([load_run_record(ft), load_run_record(c)])
    assert rep["rows"][1]["forgetting_reduction_pct"] is None
    md = render_markdown(rep)
    assert "n/a (ft forgot nothing)" in md
    assert "| baseline |" in md


def test_zero_totals_do_not_divide_by_zero(tmp_path: Path) -> None:
    d = make_run(tmp_path, "r", "ft", [0], [0], learn_total=0, forget_total=0)
    row = build_report([load_run_record(d)])["rows"][0]
    assert row["final_learned_pct"] == 0.0 and row["final_forgotten_pct"] == 0.0


def test_no_runs_refused() -> None:
    with pytest.raises(CnlError, match="no runs"):
        build_report([])


@pytest.mark.parametrize("role", ["forget", "learn"])
def test_runs_on_different_sets_refused(tmp_path: Path, role: str) -> None:
    other = json.loads(json.dumps(SETS))
    changed = "mastered" if role == "forget" else "injection"
    other[changed] = {"file": f"/elsewhere/{changed}.jsonl", "sha256": "ffff999988887777", "count": 60}
    a = make_run(tmp_path, "a", "ft", [1], [2])
    b = make_run(tmp_path, "b", "cnl", [1], [2], sets=other)
    runs = [load_run_record(a), load_run_record(b)]
    with pytest.raises(CnlError) as e:
        check_same_sets(runs)
    msg = str(e.value)
    assert str(a) in msg and str(b) in msg
    assert changed in msg
    assert SETS[changed]["file"] in msg and other[changed]["file"] in msg
    assert ("forgetting" if role == "forget" else "learning") in msg
    with pytest.raises(CnlError):
        build_report(runs)


def test_forget_set_of_another_setting_refused(tmp_path: Path) -> None:
    """An ood-correct run measures forgetting on M2; it cannot share a table with an in-set run."""
    sets = {**SETS, "mastered2": {"file": "/data/x_correct2_m.jsonl", "sha256": "cccc", "count": 30}}
    cols = ["epoch", "train_avg_loss", "wrong_to_correct", "correct2_to_wrong"]
    a = make_run(tmp_path, "a", "ft", [1], [2])
    b = make_run(tmp_path, "b", "cnl", [1], [2], setting="ood-correct", columns=cols, forget_set="mastered2", sets=sets)
    with pytest.raises(CnlError, match="mastered2"):
        build_report([load_run_record(a), load_run_record(b)])


# --------------------------------------------------------------------------------------------- markdown


def test_render_markdown_table(ft_cnl: tuple[Path, Path]) -> None:
    rep = build_report([load_run_record(d) for d in ft_cnl])
    md = render_markdown(rep)
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| run | method |"))
    assert "learned (final)" in lines[header] and "forgetting reduction vs ft" in lines[header]
    assert lines[header + 1].startswith("| --- |")
    body = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        body.append(line)
    assert len(body) == 2
    ncols = lines[header].count("|")
    assert all(line.count("|") == ncols for line in body)
    assert body[0].startswith("| ft-sgd | ft | sgd | in-set | finished | 3 ")
    assert "| 11 (27.5%) | 12 (20.0%) | 2 | 12 (30.0%) | 9 (15.0%) | baseline |" in body[0]
    assert body[1].startswith("| cnl-sgd | cnl | sgd | in-set | finished | 3 ")
    assert "| 12 (30.0%) | 3 (5.0%) | 2 | 12 (30.0%) | 0 (0.0%) | 75.0% |" in body[1]
    assert "**injection** (40 questions)" in md and "**mastered** (60 questions)" in md
    assert "![learned and forgotten per epoch](curves.png)" in md
    assert "curves.png" not in render_markdown(rep, figure=None)


# ---------------------------------------------------------------------------------------------- figure


def test_plot_curves_draws_every_run(ft_cnl: tuple[Path, Path], tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    third = make_run(tmp_path, "cnl-adam", "cnl", [2, 3, 5, 9], [1, 1, 0, 0], optimizer="adam")
    runs = [load_run_record(d) for d in (*ft_cnl, third)]
    path = tmp_path / "fig" / "curves.png"
    path.parent.mkdir()
    fig = plot_curves(runs, path)
    try:
        assert len(fig.axes) == 2
        ax_l, ax_f = fig.axes
        assert len(ax_l.lines) == len(runs) and len(ax_f.lines) == len(runs)
        for r, ll, lf in zip(runs, ax_l.lines, ax_f.lines, strict=True):
            assert list(ll.get_xdata()) == r.epochs and list(lf.get_xdata()) == r.epochs
            assert list(ll.get_ydata()) == r.learned
            assert list(lf.get_ydata()) == r.forgotten
            assert ll.get_color() == lf.get_color()  # one colour per run on both panels
            assert r.name in ll.get_label()
        assert len({line.get_color() for line in ax_l.lines}) == len(runs)
        assert "injection" in ax_l.get_title() and "40" in ax_l.get_title()
        assert "mastered" in ax_f.get_title() and "60" in ax_f.get_title()
        legend = ax_l.get_legend()
        assert legend is not None and len(legend.get_texts()) == len(runs)
    finally:
        plt.close(fig)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 100 and im.size[1] > 100


# ------------------------------------------------------------------------------------------ write/CLI


def test_write_report_files(ft_cnl: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    rep = write_report(list(ft_cnl), out)
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "pareto.png", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == json.loads(json.dumps(rep))
    assert (out / "report.md").read_text(encoding="utf-8") == render_markdown(rep)


def test_cli_report(ft_cnl: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-out"
    code = run_cli(["report", str(ft_cnl[0]), str(ft_cnl[1]), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for name in ("report.md", "report.json", "curves.png"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [r["run"] for r in rep["rows"]] == ["ft-sgd", "cnl-sgd"]
    assert rep["rows"][1]["forgetting_reduction_pct"] == pytest.approx(75.0)
    assert "75.0%" in captured.out and "baseline" in captured.out
    assert "12 (30.0%)" in captured.out
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG"


def test_cli_report_mismatched_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = {**SETS, "mastered": {"file": "/other/m.jsonl", "sha256": "dddd", "count": 60}}
    a = make_run(tmp_path, "a", "ft", [1], [2])
    b = make_run(tmp_path, "b", "cnl", [1], [2], sets=other)
    out = tmp_path / "out"
    code = run_cli(["report", str(a), str(b), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ")
    assert "different sets" in captured.err and str(a) in captured.err and str(b) in captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()  # nothing written


def test_cli_report_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nothing").mkdir()
    code = run_cli(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert "not a run directory" in captured.err and "Traceback" not in captured.err


def test_each_run_is_compared_with_the_ft_run_of_its_optimizer(tmp_path: Path) -> None:
    ft_sgd = make_run(tmp_path, "ft-sgd", "ft", [10], [20])
    ft_adam = make_run(tmp_path, "ft-adam", "ft", [12], [10], optimizer="adam")
    cnl_adam = make_run(tmp_path, "cnl-adam", "cnl", [11], [5], optimizer="adam")
    cnl_mom = make_run(tmp_path, "cnl-momentum", "cnl", [9], [5], optimizer="momentum")
    rows = {
        r["run"]: r for r in build_report([load_run_record(d) for d in (ft_sgd, ft_adam, cnl_adam, cnl_mom)])["rows"]
    }
    assert rows["cnl-adam"]["baseline_run"] == "ft-adam"
    assert rows["cnl-adam"]["forgetting_reduction_pct"] == pytest.approx(50.0)
    assert rows["cnl-momentum"]["baseline_run"] == "ft-sgd"  # no ft/momentum: the first ft run
    assert rows["cnl-momentum"]["forgetting_reduction_pct"] == pytest.approx(75.0)
    assert rows["ft-adam"]["baseline_run"] is None


def test_pareto_front_marks_the_undominated_points(tmp_path: Path) -> None:
    from cnl.report import pareto_points

    ft = load_run_record(make_run(tmp_path, "ft-sgd", "ft", [10, 20, 30], [6, 30, 60]))
    cnl = load_run_record(make_run(tmp_path, "cnl-sgd", "cnl", [8, 12, 12], [0, 0, 3]))
    points = {(p["run"], p["epoch"]): p for p in pareto_points([ft, cnl])}
    assert len(points) == 6
    assert points[("ft-sgd", 1)]["learned_pct"] == 25.0 and points[("ft-sgd", 1)]["forgotten_pct"] == 10.0
    front = {k for k, p in points.items() if p["front"]}
    # cnl epoch 2 (30% learned, 0% forgotten) dominates cnl epochs 1 and 3 and ft epoch 1 (25%, 10%);
    # ft's later epochs learn more than anything else, at a price
    assert front == {("cnl-sgd", 2), ("ft-sgd", 2), ("ft-sgd", 3)}


def test_mixed_forgetting_sets_compare_in_percent(tmp_path: Path) -> None:
    half = {**SETS, "mastered2": {"file": "/data/x_correct2_m.jsonl", "sha256": "cccc000011112222", "count": 30}}
    ft = make_run(tmp_path, "ft-sgd", "ft", [10, 12], [6, 30])  # 30 of 60 forgotten: 50%
    replay = make_run(
        tmp_path,
        "replay-sgd",
        "replay",
        [9, 11],
        [3, 6],
        setting="replay",
        forget_set="mastered2",
        sets=half,
        forget_total=30,
        columns=[*IN_SET_COLUMNS[:3], "correct2_to_wrong", "masked_fraction"],
    )
    with pytest.raises(CnlError, match="different sets"):
        build_report([load_run_record(ft), load_run_record(replay)])
    rep = build_report([load_run_record(ft), load_run_record(replay)], mixed_forget_sets=True)
    row = rep["rows"][1]
    assert row["forget_set"] == "mastered2" and row["final_forgotten_pct"] == 20.0
    assert row["forgetting_reduction_pct"] == pytest.approx(60.0)  # (50% - 20%) / 50%
    md = render_markdown(rep)
    assert "forgets on" in md and "mastered2 (30)" in md
    # the curves follow: forgetting in percent of each run's own set, not counts on one axis
    import matplotlib.pyplot as plt

    fig = plot_curves([load_run_record(ft), load_run_record(replay)], tmp_path / "curves.png")
    try:
        _, ax_f = fig.axes
        assert [list(line.get_ydata()) for line in ax_f.lines] == [[10.0, 50.0], [10.0, 20.0]]
        assert "%" in ax_f.get_title() and "mastered2" in ax_f.lines[1].get_label()
        assert [t.get_text() for t in ax_f.get_legend().get_texts()] in (
            ["replay-sgd: of mastered2 (30)"],
            ["ft-sgd: of mastered (60)"],  # a tie: either set may be called the common one
        )
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ cost


def add_costs(run: Path, seconds: list[tuple[float, float, float, float]], **info: Any) -> Path:
    """Give a run of :func:`make_run` the seconds columns ``cnl train`` writes (reference, train, eval, epoch per
    epoch) and ``info``'s keys in run.json."""
    with open(run / "summary.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    phases = ["reference_seconds", "train_seconds", "eval_seconds", "epoch_seconds"]
    with open(run / "summary.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow([*rows[0], *phases])
        for row, s in zip(rows[1:], seconds, strict=True):
            w.writerow([*row, *s])
    data = json.loads((run / "run.json").read_text(encoding="utf-8"))
    data["columns"] = [*data["columns"], *phases]
    (run / "run.json").write_text(json.dumps({**data, **info}), encoding="utf-8")
    return run


SECONDS = [(1.0, 10.0, 2.0, 13.5), (0.0, 12.0, 3.0, 15.5), (0.5, 11.0, 4.0, 16.0)]


def test_cost_columns(ft_cnl: tuple[Path, Path]) -> None:
    ft, cnl = ft_cnl
    add_costs(ft, SECONDS, peak_memory_bytes=[3 * 2**30, 5 * 2**29, None], trainable_parameters=100)
    add_costs(cnl, SECONDS[::-1], peak_memory_bytes=[2**30], method_bytes_per_param=4.5)
    rep = build_report([load_run_record(d) for d in ft_cnl])
    row_ft, row_cnl = rep["rows"]
    for row in (row_ft, row_cnl):
        assert row["mean_reference_seconds"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
        assert row["mean_train_seconds"] == pytest.approx((10.0 + 12.0 + 11.0) / 3)
        assert row["mean_eval_seconds"] == pytest.approx((2.0 + 3.0 + 4.0) / 3)
        assert row["mean_epoch_seconds"] == pytest.approx((13.5 + 15.5 + 16.0) / 3)
        assert row["total_seconds"] == pytest.approx(45.0)
    assert row_ft["peak_memory_gib"] == pytest.approx(3.0)  # the largest over the processes
    assert row_cnl["peak_memory_gib"] == pytest.approx(1.0)
    assert row_ft["method_bytes_per_param"] is None  # not recorded: never invented
    assert row_cnl["method_bytes_per_param"] == pytest.approx(4.5)

    lines = render_markdown(rep).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| run | method |"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    cost = ["s/epoch reference", "s/epoch train", "s/epoch eval", "s/epoch total", "peak memory (GiB)"]
    assert names[-6:] == [*cost, "method bytes/param"]
    cells = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][-6:]
        for line in lines[header + 2 : header + 4]
    }
    assert cells["ft-sgd"] == ["0.5", "11.0", "3.0", "15.0", "3.00", "n.a."]
    assert cells["cnl-sgd"] == ["0.5", "11.0", "3.0", "15.0", "1.00", "4.5"]
    assert json.loads(json.dumps(rep))["rows"][1]["method_bytes_per_param"] == 4.5


def test_cost_columns_not_recorded(ft_cnl: tuple[Path, Path]) -> None:
    rep = build_report([load_run_record(d) for d in ft_cnl])
    row = rep["rows"][0]
    assert row["mean_train_seconds"] is None and row["total_seconds"] is None
    assert row["peak_memory_gib"] is None and row["method_bytes_per_param"] is None
    assert rep["budget"] is None
    body = next(line for line in render_markdown(rep).splitlines() if line.startswith("| ft-sgd |"))
    assert body.endswith("| n.a. | n.a. | n.a. | n.a. | n.a. | n.a. |")
    assert "At equal wall time" not in render_markdown(rep)


def test_budget_picks_the_epoch_closest_in_cumulative_time(tmp_path: Path) -> None:
    # cumulative: fast 10, 20, 30, 40; slow 25, 50, 75
    fast = add_costs(make_run(tmp_path, "fast", "ft", [1, 2, 3, 4], [5, 6, 7, 8]), [(0, 9, 1, 10.0)] * 4)
    slow = add_costs(make_run(tmp_path, "slow", "cnl", [10, 20, 30], [1, 2, 3]), [(0, 20, 5, 25.0)] * 3)
    runs = [load_run_record(d) for d in (fast, slow)]

    b = build_report(runs, budget=52.0)["budget"]
    assert (b["seconds"], b["auto"]) == (52.0, False)
    got = {r["run"]: (r["epoch"], r["cumulative_seconds"], r["learned"], r["forgotten"]) for r in b["rows"]}
    assert got == {"fast": (4, 40.0, 4, 8), "slow": (2, 50.0, 20, 2)}

    b = build_report(runs, budget=24.0)["budget"]
    got = {r["run"]: (r["epoch"], r["cumulative_seconds"]) for r in b["rows"]}
    assert got == {"fast": (2, 20.0), "slow": (1, 25.0)}
    assert b["rows"][1]["learned_pct"] == pytest.approx(25.0) and b["rows"][1]["forgotten_pct"] == pytest.approx(
        100 / 60
    )

    rep = build_report(runs, budget="auto")  # the shortest total: fast's 40 s
    assert (rep["budget"]["seconds"], rep["budget"]["auto"]) == (40.0, True)
    got = {r["run"]: (r["epoch"], r["cumulative_seconds"]) for r in rep["budget"]["rows"]}
    assert got == {"fast": (4, 40.0), "slow": (2, 50.0)}  # |50 - 40| < |25 - 40|
    md = render_markdown(rep)
    assert "## At equal wall time" in md and "40.0 s (auto" in md
    assert "| slow | 2 | 50.0 | 20 (50.0%) | 2 (3.3%) |" in md
    assert "| fast | 4 | 40.0 | 4 (10.0%) | 8 (13.3%) |" in md


def test_budget_without_epoch_times(ft_cnl: tuple[Path, Path]) -> None:
    add_costs(ft_cnl[0], SECONDS)
    runs = [load_run_record(d) for d in ft_cnl]
    rows = build_report(runs, budget="auto")["budget"]["rows"]
    assert rows[0]["epoch"] == 3 and rows[1]["epoch"] is None
    assert "| cnl-sgd | n.a. | n.a. | n.a. | n.a. |" in render_markdown(build_report(runs, budget=20))
    with pytest.raises(CnlError, match="no run records its epoch times"):
        build_report([runs[1]], budget="auto")


@pytest.mark.parametrize("bad", ["0", "-5", "soon", "nan", "inf", ""])
def test_budget_bad_value(ft_cnl: tuple[Path, Path], bad: str) -> None:
    with pytest.raises(CnlError, match="positive number of seconds, or 'auto'"):
        build_report([load_run_record(d) for d in ft_cnl], budget=bad)


def test_cli_report_budget(ft_cnl: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add_costs(ft_cnl[0], SECONDS)
    add_costs(ft_cnl[1], [(0, 1, 1, 2.0)] * 3)
    out = tmp_path / "cli-out"
    code = run_cli(["report", *map(str, ft_cnl), "--out", str(out), "--budget", "29"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["budget"]["seconds"] == 29.0
    assert [(r["run"], r["epoch"]) for r in rep["budget"]["rows"]] == [("ft-sgd", 2), ("cnl-sgd", 3)]
    assert "## At equal wall time" in (out / "report.md").read_text(encoding="utf-8")
    printed = capsys.readouterr().out  # the terminal table shows the cost too
    assert "s/epoch" in printed and "peak GiB" in printed and "method B/param" in printed
    per_epoch = {r["run"]: r["mean_epoch_seconds"] for r in rep["rows"]}
    assert f"{per_epoch['cnl-sgd']:.1f}" in printed

    code = run_cli(["report", *map(str, ft_cnl), "--out", str(tmp_path / "auto"), "--budget", "auto"])
    assert code == 0
    rep = json.loads((tmp_path / "auto" / "report.json").read_text(encoding="utf-8"))
    assert rep["budget"]["seconds"] == 6.0 and rep["budget"]["auto"] is True
    assert [(r["run"], r["epoch"]) for r in rep["budget"]["rows"]] == [("ft-sgd", 1), ("cnl-sgd", 3)]


@pytest.mark.parametrize("bad", ["0", "-1", "soon"])
def test_cli_report_bad_budget(
    ft_cnl: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    out = tmp_path / "out"
    code = run_cli(["report", *map(str, ft_cnl), "--out", str(out), f"--budget={bad}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--budget" in err and "positive number of seconds, or 'auto'" in err and "Traceback" not in err
    assert not out.exists()
