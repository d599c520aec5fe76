"""``cnl report``: compare finished runs side by side, reading only their run directories.

For every run: method, optimizer, setting, learned (count and % of the learning set) and forgotten
(count and % of the forgetting set) at the final epoch and at the epoch with most learned; when an
``ft`` run on the same sets is among them, every other run's forgetting reduction against it. Writes
``report.md``, ``report.json`` and ``curves.png`` (learned and forgotten per epoch, shared axes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CnlError
from .io import atomic_save, atomic_write_json, atomic_write_text
from .methods import is_baseline
from .rundir import RunDir

__all__ = ["RunRecord", "load_run_record", "check_same_sets", "build_report", "render_markdown", "plot_curves"]


@dataclass
class RunRecord:
    """What a report needs from one run directory."""

    path: Path
    info: dict[str, Any]
    epochs: list[int]
    learned: list[int]
    forgotten: list[int]
    general: list[float] | None = None
    #: Learned and forgotten per epoch under each other phrasing (``--eval-templates``).
    phrasings: dict[str, tuple[list[int], list[int]]] | None = None
    #: ``finished``, or how the run stands: ``running``, ``interrupted``, ``failed``, ``stopped`` (its process gone).
    status: str = "finished"
    #: ``steps.csv``'s rows (per optimizer step; the KL drift and sample counts at evaluation steps).
    steps: list[dict[str, Any]] = field(default_factory=list)
    #: The probe's KL drift from the start per epoch (``--probe``), else None.
    kl: list[float] | None = None

    @property
    def complete(self) -> bool:
        """Whether the run finished every epoch it was started for."""
        return self.status == "finished"

    @property
    def label(self) -> str:
        return f"{self.info['method']}/{self.info['optimizer']}"

    @property
    def name(self) -> str:
        return self.path.name


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Read a run directory through :class:`~cnl.rundir.RunDir` (clear error when it is not one)."""
    rundir = RunDir(run_dir)
    info = rundir.read_info()
    if not rundir.summary.exists():
        raise CnlError(f"{rundir.root}: no summary.csv")
    series = rundir.series(info)
    if not series.epochs:
        raise CnlError(f"{rundir.root}: summary.csv has no finished epoch yet")
    return RunRecord(
        path=rundir.root,
        info=info,
        epochs=series.epochs,
        learned=series.learned,
        forgotten=series.forgotten,
        general=series.general,
        phrasings=series.phrasings,
        status=rundir.live_status(info),
        steps=rundir.read_steps(),
        kl=[float(r["kl_drift"]) for r in rundir.read_summary()] if "kl_drift" in info.get("columns", ()) else None,
    )


def check_same_sets(runs: list[RunRecord], *, mixed_forget_sets: bool = False) -> None:
    """Refuse runs whose learning sets (and, unless ``mixed_forget_sets``, forgetting sets) differ."""
    first = runs[0]

    def key(r: RunRecord, role: str) -> tuple[str, str]:
        name = r.info[f"{role}_set"]
        return name, r.info["sets"][name]["sha256"]

    roles = ("learn",) if mixed_forget_sets else ("learn", "forget")
    for r in runs[1:]:
        for role in roles:
            a, b = key(first, role), key(r, role)
            if a[1] != b[1]:
                raise CnlError(
                    f"runs measure {'learning' if role == 'learn' else 'forgetting'} on different sets: "
                    f"{first.path} uses {a[0]} ({first.info['sets'][a[0]]['file']}), "
                    f"{r.path} uses {b[0]} ({r.info['sets'][b[0]]['file']}); report runs on the same sets"
                )


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


def build_report(runs: list[RunRecord], *, mixed_forget_sets: bool = False) -> dict[str, Any]:
    """The paper-style comparison table as data.

    ``mixed_forget_sets``: runs may measure forgetting on different sets of one split (replay and the
    out-of-set settings use M2, the in-set runs M); forgetting is then compared in percent of each
    run's own set, and each row names its set.
    """
    if not runs:
        raise CnlError("no runs given")
    check_same_sets(runs, mixed_forget_sets=mixed_forget_sets)
    fts = [r for r in runs if is_baseline(r.info["method"])]
    ft = fts[0] if fts else None
    rows = []
    for r in runs:
        lt, ft_total = r.info["learn_total"], r.info["forget_total"]
        best = max(range(len(r.epochs)), key=lambda i: (r.learned[i], -r.forgotten[i], -i))
        row: dict[str, Any] = {
            "run": r.name,
            "path": str(r.path),
            "method": r.info["method"],
            "optimizer": r.info["optimizer"],
            "setting": r.info["setting"],
            "status": r.status,
            "epochs_planned": r.info.get("epochs"),
            "forget_set": r.info["forget_set"],
            "epochs": r.epochs[-1],
            "learn_total": lt,
            "forget_total": ft_total,
            "final_learned": r.learned[-1],
            "final_learned_pct": _pct(r.learned[-1], lt),
            "final_forgotten": r.forgotten[-1],
            "final_forgotten_pct": _pct(r.forgotten[-1], ft_total),
            "best_epoch": r.epochs[best],
            "best_learned": r.learned[best],
            "best_learned_pct": _pct(r.learned[best], lt),
            "best_forgotten": r.forgotten[best],
            "best_forgotten_pct": _pct(r.forgotten[best], ft_total),
            "is_baseline": is_baseline(r.info["method"]),
            "final_general": r.general[-1] if r.general else None,
            "general_before": r.info.get("general_accuracy_before"),
            "final_kl_drift": r.kl[-1] if r.kl else None,
            "reference": (r.info.get("config", {}).get("train") or {}).get("reference", "mastered"),
            "forgetting_reduction_pct": None,
            "baseline_run": None,
            "phrasings": {
                p: {
                    "learned": learned[-1],
                    "forgotten": forgotten[-1],
                    **{f"{k}_before": v for k, v in (r.info.get("phrasings_before") or {}).get(p, {}).items()},
                }
                for p, (learned, forgotten) in (r.phrasings or {}).items()
            },
        }
        if fts and not row["is_baseline"]:
            # the ft run with the same optimizer when there is one, else the first ft run
            baseline = next((f for f in fts if f.info["optimizer"] == r.info["optimizer"]), fts[0])
            base = _pct(baseline.forgotten[-1], baseline.info["forget_total"])
            row["baseline_run"] = baseline.name
            mine = row["final_forgotten_pct"]
            row["forgetting_reduction_pct"] = 100.0 * (base - mine) / base if base else None
        rows.append(row)
    return {
        "learn_set": runs[0].info["learn_set"],
        "forget_set": runs[0].info["forget_set"],
        "baseline": ft.name if ft else None,
        "rows": rows,
        "pareto": pareto_points(runs),
    }


def pareto_points(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One point per run and epoch: learned and forgotten in percent, and whether it is on the best
    trade-off front (no other point learns at least as much while forgetting at most as much, one of
    the two strictly)."""
    points = [
        {
            "run": r.name,
            "method": r.info["method"],
            "epoch": e,
            "learned_pct": _pct(lv, r.info["learn_total"]),
            "forgotten_pct": _pct(fv, r.info["forget_total"]),
            "complete": r.complete,
        }
        for r in runs
        for e, lv, fv in zip(r.epochs, r.learned, r.forgotten, strict=True)
    ]
    for p in points:
        p["front"] = not any(
            q["learned_pct"] >= p["learned_pct"]
            and q["forgotten_pct"] <= p["forgotten_pct"]
            and (q["learned_pct"] > p["learned_pct"] or q["forgotten_pct"] < p["forgotten_pct"])
            for q in points
        )
    return points


def plot_pareto(report: dict[str, Any], path: str | Path) -> Any:
    """Learned (x) against forgotten (y), in percent, one point per method and epoch; the front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["pareto"]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    status = {r["run"]: r["status"] for r in report["rows"]}
    for run in dict.fromkeys(p["run"] for p in points):
        mine = [p for p in points if p["run"] == run]
        xs, ys = [p["learned_pct"] for p in mine], [p["forgotten_pct"] for p in mine]
        done = all(p["complete"] for p in mine)
        label = run if done else f"{run} ({status.get(run, 'incomplete')})"
        (line,) = ax.plot(xs, ys, marker="o", ms=5, lw=0.8, alpha=0.8, ls="-" if done else "--", label=label)
        for p in mine:
            ax.annotate(str(p["epoch"]), (p["learned_pct"], p["forgotten_pct"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=line.get_color())  # fmt: skip
    front = sorted((p for p in points if p["front"]), key=lambda p: p["learned_pct"])
    if front:
        ax.plot([p["learned_pct"] for p in front], [p["forgotten_pct"] for p in front], color="black", lw=1.5,
                ls="--", drawstyle="steps-post", label="best trade-off front")  # fmt: skip
        ax.scatter([p["learned_pct"] for p in front], [p["forgotten_pct"] for p in front], s=90,
                   facecolors="none", edgecolors="black", zorder=3)  # fmt: skip
    ax.set_xlabel(f"learned: % of {report['learn_set']} answered correctly (more is better)")
    ax.set_ylabel("forgotten: % of the forgetting set answered wrongly (less is better)")
    ax.set_title("learning against forgetting, one point per method and epoch (numbers: epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def render_markdown(report: dict[str, Any], figure: str | None = "curves.png") -> str:
    """Markdown with the comparison table (and the figures, when given)."""
    rows = report["rows"]
    mixed = len({r["forget_set"] for r in rows}) > 1
    general = any(r.get("final_general") is not None for r in rows)
    kl = any(r.get("final_kl_drift") is not None for r in rows)
    references = any(r.get("reference", "mastered") != "mastered" for r in rows)
    forget = (
        "forgetting on each run's own set (column *forgets on*), compared in percent"
        if mixed
        else f"forgetting on **{report['forget_set']}** ({rows[0]['forget_total']} questions)"
    )
    lines = [
        "# CNL comparison",
        "",
        f"Learning measured on **{report['learn_set']}** ({rows[0]['learn_total']} questions), {forget}.",
        "",
        "| run | method | optimizer | setting | status | "
        + ("forgets on | " if mixed else "")
        + "epochs | learned (final) | forgotten (final) | best epoch | learned (best) | forgotten (best) "
        + "| forgetting reduction vs ft |"
        + (" general accuracy |" if general else "")
        + (" KL drift |" if kl else "")
        + (" reference |" if references else ""),
        "| --- | --- | --- | --- | --- | "
        + ("--- | " if mixed else "")
        + "---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if general else "")
        + (" ---: |" if kl else "")
        + (" --- |" if references else ""),
    ]
    several = sum(1 for x in rows if x["is_baseline"]) > 1
    for r in rows:
        red = r["forgetting_reduction_pct"]
        if r["is_baseline"]:
            red_s = "baseline"
        elif red is None:
            red_s = "n/a" if report["baseline"] is None else "n/a (ft forgot nothing)"
        else:
            red_s = f"{red:.1f}%" + (f" (vs {r['baseline_run']})" if several else "")
        gen = r.get("final_general")
        lines.append(
            f"| {r['run']} | {r['method']} | {r['optimizer']} | {r['setting']} | {status_text(r)} | "
            + (f"{r['forget_set']} ({r['forget_total']}) | " if mixed else "")
            + f"{r['epochs']} | {r['final_learned']} ({r['final_learned_pct']:.1f}%) "
            f"| {r['final_forgotten']} ({r['final_forgotten_pct']:.1f}%) "
            f"| {r['best_epoch']} | {r['best_learned']} ({r['best_learned_pct']:.1f}%) "
            f"| {r['best_forgotten']} ({r['best_forgotten_pct']:.1f}%) | {red_s} |"
            + ((f" {gen:.1%} |" if gen is not None else " - |") if general else "")
            + ((f" {r['final_kl_drift']:.4f} |" if r["final_kl_drift"] is not None else " - |") if kl else "")
            + (f" {r['reference']} |" if references else "")
        )
    lines += [
        "",
        "Learned: questions of the learning set answered correctly (% of the set). Forgotten: questions of the "
        "forgetting set now answered wrongly (% of the set). Best epoch: the epoch with most learned. Forgetting "
        "reduction: (forgotten % by ft − forgotten % by the run) / forgotten % by ft, at the final epoch. "
        "Status: *finished*, or how an incomplete run stands (its last finished epoch is shown; dashed in the "
        "figures): *running*, *interrupted*, *failed*, or *stopped* (its process is gone: `--resume` continues it)."
        + (" General accuracy: on the general-knowledge set of `--general`, at the final epoch." if general else "")
        + (" KL drift: the mean forward KL of the answer distributions on `--probe` from the start's." if kl else "")
        + (" Reference: what the run protected (`--reference`)." if references else ""),
    ]
    phrased = [r for r in rows if r.get("phrasings")]
    if phrased:
        lines += [
            "",
            "## Under other phrasings",
            "",
            "Learned and forgotten at the final epoch when the questions are asked in other words "
            "(`--eval-templates`), beside the training phrasing; in brackets, before training.",
            "",
            "| run | phrasing | learned | forgotten |",
            "| --- | --- | ---: | ---: |",
        ]
        for r in phrased:
            lines.append(f"| {r['run']} | (training) | {r['final_learned']} | {r['final_forgotten']} |")
            for p, v in r["phrasings"].items():
                lines.append(f"| {r['run']} | {p} | {_with_before(v, 'learned')} | {_with_before(v, 'forgotten')} |")
    if figure:
        lines += ["", f"![learned and forgotten per epoch]({figure})"]
        lines += ["", "![learned against forgotten, the best trade-off front marked](pareto.png)"]
        if report.get("steps_figure"):
            lines += [
                "",
                f"![step by step: loss, KL drift from the start, forgetting on a sample]({report['steps_figure']})",
            ]
    return "\n".join(lines) + "\n"


def _with_before(counts: dict[str, Any], key: str) -> str:
    """``12 (3)``: the final count and, when known, the count before training."""
    before = counts.get(f"{key}_before")
    return f"{counts[key]}" + (f" ({before})" if before is not None else "")


def status_text(row: dict[str, Any]) -> str:
    """``finished``, or e.g. ``interrupted (2 of 3 epochs)``."""
    if row["status"] == "finished":
        return "finished"
    planned = row.get("epochs_planned")
    return f"{row['status']} ({row['epochs']} of {planned} epochs)" if planned else str(row["status"])


def _forget_key(run: RunRecord) -> tuple[str, int]:
    return run.info["forget_set"], run.info["forget_total"]


def plot_curves(runs: list[RunRecord], path: str | Path) -> Any:
    """Learned and forgotten per epoch for every run on shared axes; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Runs that forget on different sets (replay and the out-of-set settings: M2; in-set: M) are drawn
    # in percent of each run's own set, as the report compares them; counts would mislead.
    mixed = len({_forget_key(r) for r in runs}) > 1
    fig, (ax_l, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for r in runs:
        style = {"marker": "o", "ms": 3, "ls": "-" if r.complete else "--"}
        state = "" if r.complete else f", {r.status}"
        (line,) = ax_l.plot(r.epochs, r.learned, label=f"{r.name} ({r.label}{state})", **style)
        total = r.info["forget_total"]
        forgotten = [100.0 * f / total if total else 0.0 for f in r.forgotten] if mixed else r.forgotten
        suffix = f", of {r.info['forget_set']}" if mixed else ""
        ax_f.plot(r.epochs, forgotten, color=line.get_color(), label=f"{r.name} ({r.label}{suffix}{state})", **style)
    info = runs[0].info
    ax_l.set_title(f"learned: {info['learn_set']} answered correctly (of {info['learn_total']})")
    if mixed:
        common = Counter(_forget_key(r) for r in runs).most_common(1)[0][0]
        ax_f.set_title(f"forgotten: % of {common[0]} ({common[1]}) answered wrongly")
        ax_f.set_ylabel("% of the run's forgetting set (legend: another set)")
        # a legend for the runs on another set only: the left panel's legend names every run
        marked = [(line, r) for line, r in zip(ax_f.lines, runs, strict=True) if _forget_key(r) != common]
        labels = [f"{r.name}: of {r.info['forget_set']} ({r.info['forget_total']})" for _, r in marked]
        ax_f.legend([line for line, _ in marked], labels, fontsize=8)
    else:
        ax_f.set_title(f"forgotten: {info['forget_set']} answered wrongly (of {info['forget_total']})")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_l, ax_f):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is ax_l or not mixed:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_l.set_ylabel("questions")
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *, mixed_forget_sets: bool = False) -> dict[str, Any]:
    """Read the runs, write ``report.md``, ``report.json``, ``curves.png`` and ``pareto.png`` into ``out_dir``."""
    runs = [load_run_record(d) for d in run_dirs]
    report = build_report(runs, mixed_forget_sets=mixed_forget_sets)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CnlError(f"--out {out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_curves(runs, out / "curves.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(plot_pareto(report, out / "pareto.png"))
    report["steps_figure"] = None
    if any(r.steps for r in runs):
        plt.close(plot_steps(runs, out / "steps.png"))
        report["steps_figure"] = "steps.png"
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def plot_steps(runs: list[RunRecord], path: str | Path) -> Any:
    """Step by step (``steps.csv``): the training loss (a moving mean over ~2% of the steps), and, where runs
    measured them, the probe's KL drift from the start and the forgotten count on the sample of the forgetting
    set; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has = {k: any(s.get(k) is not None for r in runs for s in r.steps) for k in ("kl_drift", "forgotten_sample")}
    panels = ["loss", *(k for k, v in has.items() if v)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    titles = {
        "loss": ("training loss per step (moving mean)", "loss"),
        "kl_drift": ("KL drift from the start on the probe", "mean forward KL (nats)"),
        "forgotten_sample": ("forgotten on the sample of the forgetting set", "questions"),
    }
    for ax, key in zip(axes[0], panels, strict=True):
        for r in runs:
            pts = [(s["step"], s[key]) for s in r.steps if s.get(key) is not None]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            if key == "loss":
                k = max(1, len(y) // 50)
                y = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
            style = {"ls": "-" if r.complete else "--", "marker": None if key == "loss" else "o", "ms": 3}
            ax.plot(x, y, label=f"{r.name} ({r.label})", **style)
        ax.set_title(titles[key][0], fontsize=10)
        ax.set_ylabel(titles[key][1])
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig
