"""``cnl report``: compare finished runs side by side, reading only their run directories.

For every run: method, optimizer, setting, learned (count and % of the learning set) and forgotten
(count and % of the forgetting set) at the final epoch and at the epoch with most learned; when an
``ft`` run on the same sets is among them, every other run's forgetting reduction against it. Writes
``report.md``, ``report.json`` and ``curves.png`` (learned and forgotten per epoch, shared axes). A run's
WiSE-FT points (``cnl interpolate``: ``RUN/wise/alpha_*``) join the table as rows of their own and draw its WiSE
curve on the Pareto figure.

Cost per run: mean wall seconds per epoch of each phase (``summary.csv``'s ``reference_seconds``, ``train_seconds``,
``eval_seconds``) and in all (``epoch_seconds``), peak memory (run.json's ``peak_memory_bytes``, the largest over
the processes) and the extra bytes per parameter the method holds (run.json's ``method_bytes_per_param``); "n.a."
where the run does not record it. ``budget``: a second table at equal wall time, each run at the epoch whose
cumulative ``epoch_seconds`` is closest to the budget.
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

__all__ = [
    "RunRecord",
    "load_run_record",
    "with_wise_points",
    "check_same_sets",
    "build_report",
    "render_markdown",
    "plot_curves",
    "cost_columns",
    "parse_budget",
    "budget_table",
]


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
    #: Wall seconds per epoch by phase (``reference``, ``train``, ``eval``, ``epoch``), for the phases summary.csv has.
    seconds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the run finished every epoch it was started for."""
        return self.status == "finished"

    @property
    def label(self) -> str:
        return f"{self.info['method']}/{self.info['optimizer']}"

    @property
    def wise_source(self) -> str | None:
        """For a WiSE-FT point of ``cnl interpolate``: the name of the run whose weights it mixes; else None."""
        if "source_run" not in self.info:
            return None
        if self.path.parent.name == "wise":
            return self.path.parent.parent.name
        return Path(str(self.info["source_run"])).name

    @property
    def name(self) -> str:
        source = self.wise_source
        if source is not None:
            return f"{source} wise α={float(self.info['alpha']):g}"
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
    summary = rundir.read_summary()
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
        kl=[float(r["kl_drift"]) for r in summary] if "kl_drift" in info.get("columns", ()) else None,
        seconds={
            phase: [float(r[f"{phase}_seconds"]) for r in summary]
            for phase in PHASES
            if summary and all(f"{phase}_seconds" in r for r in summary)
        },
    )


#: The phases summary.csv times per epoch (``<phase>_seconds``); ``epoch`` is the whole epoch's wall time.
PHASES = ("reference", "train", "eval", "epoch")


def _mean(xs: list[float] | None) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cost_columns(r: RunRecord) -> dict[str, Any]:
    """The run's cost: mean wall seconds per epoch of each phase and in all, the total wall time, peak memory in GiB
    (the largest over the processes) and the method's extra bytes per parameter; None where not recorded."""
    peak = r.info.get("peak_memory_bytes")
    peaks = [p for p in (peak if isinstance(peak, list) else [peak]) if isinstance(p, (int, float))]
    extra = r.info.get("method_bytes_per_param")
    return {
        **{f"mean_{phase}_seconds": _mean(r.seconds.get(phase)) for phase in PHASES},
        "total_seconds": sum(r.seconds["epoch"]) if "epoch" in r.seconds else None,
        "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
        "method_bytes_per_param": float(extra) if isinstance(extra, (int, float)) else None,
    }


def parse_budget(value: str | float) -> float | str:
    """``--budget``: a positive number of seconds, or ``auto``; a clear error otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise CnlError(f"--budget {value!r}: give a positive number of seconds, or 'auto' (the shortest run's time)")
    return seconds


def budget_table(runs: list[RunRecord], budget: str | float) -> dict[str, Any]:
    """Each run at equal wall time: the epoch whose cumulative ``epoch_seconds`` is closest to the budget (the
    earlier on a tie), its cumulative seconds and its learned and forgotten counts. ``auto``: the smallest total
    wall time among the runs. Runs that record no epoch times (older runs) get no epoch; WiSE-FT points (no
    training: their cost is their source run's) are left out."""
    budget = parse_budget(budget)
    timed = [r for r in runs if "epoch" in r.seconds and r.wise_source is None]
    if budget == "auto":
        if not timed:
            raise CnlError("--budget auto: no run records its epoch times (summary.csv's epoch_seconds)")
        seconds = min(sum(r.seconds["epoch"]) for r in timed)
    else:
        seconds = float(budget)
    rows = []
    for r in runs:
        if r.wise_source is not None:
            continue
        row: dict[str, Any] = {"run": r.name, "epoch": None, "cumulative_seconds": None}
        if any(r is t for t in timed):
            cumulative, total = [], 0.0
            for s in r.seconds["epoch"]:
                total += s
                cumulative.append(total)
            i = min(range(len(cumulative)), key=lambda k: (abs(cumulative[k] - seconds), k))
            lt, ft_total = r.info["learn_total"], r.info["forget_total"]
            row.update(
                epoch=r.epochs[i],
                cumulative_seconds=cumulative[i],
                learned=r.learned[i],
                learned_pct=_pct(r.learned[i], lt),
                forgotten=r.forgotten[i],
                forgotten_pct=_pct(r.forgotten[i], ft_total),
            )
        rows.append(row)
    return {"seconds": seconds, "auto": budget == "auto", "rows": rows}


def with_wise_points(runs: list[RunRecord]) -> list[RunRecord]:
    """The runs, each followed by its WiSE-FT points (``RUN/wise/alpha_*``, in α order) that mix its final epoch's
    weights and are not among the runs already (points of an earlier final epoch are left out)."""
    given = {r.path.resolve() for r in runs}
    out = []
    for r in runs:
        out.append(r)
        if r.wise_source is not None:
            continue
        points = [load_run_record(d) for d in RunDir(r.path).wise_points() if d.resolve() not in given]
        fresh = [p for p in points if p.info.get("source_epoch") == r.epochs[-1]]
        out += sorted(fresh, key=lambda p: float(p.info["alpha"]))
        given |= {p.path.resolve() for p in fresh}
    return out


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


def build_report(
    runs: list[RunRecord], *, mixed_forget_sets: bool = False, budget: str | float | None = None
) -> dict[str, Any]:
    """The paper-style comparison table as data.

    ``mixed_forget_sets``: runs may measure forgetting on different sets of one split (replay and the
    out-of-set settings use M2, the in-set runs M); forgetting is then compared in percent of each
    run's own set, and each row names its set. ``budget`` (seconds, or ``auto``): the table at equal wall time
    (:func:`budget_table`) under ``budget``.
    """
    if not runs:
        raise CnlError("no runs given")
    if budget is not None:
        parse_budget(budget)  # a bad value fails before anything is read further
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
            "wise_source": r.wise_source,
            "wise_alpha": r.info.get("alpha") if r.wise_source is not None else None,
            "forgetting_reduction_pct": None,
            "baseline_run": None,
            **cost_columns(r),
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
        "budget": budget_table(runs, budget) if budget is not None else None,
    }


def pareto_points(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One point per run and epoch: learned and forgotten in percent, and whether it is on the best
    trade-off front (no other point learns at least as much while forgetting at most as much, one of
    the two strictly). A WiSE-FT point (``cnl interpolate``) names its ``source`` run and its ``alpha``."""
    points = [
        {
            "run": r.name,
            "method": r.info["method"],
            "epoch": e,
            "learned_pct": _pct(lv, r.info["learn_total"]),
            "forgotten_pct": _pct(fv, r.info["forget_total"]),
            "complete": r.complete,
            "source": r.wise_source,
            "alpha": r.info.get("alpha") if r.wise_source is not None else None,
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


def run_style(i: int) -> dict[str, Any]:
    """Colour and marker of the i-th run in a figure: tab10's colours, then tab20's lighter ones, with another
    marker each round, so that up to 20 runs (every method and more) stay apart."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    colour = tab20[2 * (i % 10) + (i // 10) % 2]
    return {"color": colour, "marker": "os^vDP"[(i // 10) % 6]}


def plot_pareto(report: dict[str, Any], path: str | Path) -> Any:
    """Learned (x) against forgotten (y), in percent, one point per method and epoch; the front marked; each run's
    WiSE-FT points as a dotted curve in its colour, in α order, labelled with α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["pareto"]
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    status = {r["run"]: r["status"] for r in report["rows"]}
    colours: dict[str, Any] = {}
    for i, run in enumerate(dict.fromkeys(p["run"] for p in points if p.get("source") is None)):
        mine = [p for p in points if p["run"] == run]
        xs, ys = [p["learned_pct"] for p in mine], [p["forgotten_pct"] for p in mine]
        done = all(p["complete"] for p in mine)
        label = run if done else f"{run} ({status.get(run, 'incomplete')})"
        (line,) = ax.plot(xs, ys, ms=5, lw=0.8, alpha=0.8, ls="-" if done else "--", label=label, **run_style(i))
        colours[run] = line.get_color()
        for p in mine:
            ax.annotate(str(p["epoch"]), (p["learned_pct"], p["forgotten_pct"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=line.get_color())  # fmt: skip
    _plot_wise(ax, points, colours)
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


def _plot_wise(ax: Any, points: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    """Each source run's WiSE-FT curve: its points in α order, ending at its final epoch (α = 1) when that was not
    computed, dotted with diamonds in the run's colour, each labelled with its α."""
    wise = [p for p in points if p.get("source") is not None]
    for source in dict.fromkeys(p["source"] for p in wise):
        curve = sorted((p for p in wise if p["source"] == source), key=lambda p: p["alpha"])
        final = [p for p in points if p["run"] == source and p.get("source") is None]
        if final and curve[-1]["alpha"] < 1:
            curve.append({**final[-1], "alpha": 1.0})
        xs, ys = [p["learned_pct"] for p in curve], [p["forgotten_pct"] for p in curve]
        (line,) = ax.plot(
            xs, ys, marker="D", ms=4, lw=1.0, ls=":", color=colours.get(source), label=f"{source} WiSE-FT (α)"
        )
        for p in curve:
            ax.annotate(f"α={p['alpha']:g}", (p["learned_pct"], p["forgotten_pct"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points", color=line.get_color())  # fmt: skip


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
        + " s/epoch reference | s/epoch train | s/epoch eval | s/epoch total | peak memory (GiB) | method bytes/param |"
        + (" general accuracy |" if general else "")
        + (" KL drift |" if kl else "")
        + (" reference |" if references else ""),
        "| --- | --- | --- | --- | --- | "
        + ("--- | " if mixed else "")
        + "---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + " ---: | ---: | ---: | ---: | ---: | ---: |"
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
            + "".join(f" {format_or_na(r.get(f'mean_{phase}_seconds'), '.1f')} |" for phase in PHASES)
            + f" {format_or_na(r.get('peak_memory_gib'), '.2f')} |"
            + f" {format_or_na(r.get('method_bytes_per_param'), 'g')} |"
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
        "figures): *running*, *interrupted*, *failed*, or *stopped* (its process is gone: `--resume` continues it). "
        "s/epoch: mean wall seconds per epoch of each phase (reference answers, training, evaluation) and of the "
        "whole epoch. Peak memory: the largest over the processes. Method bytes/param: the extra bytes per "
        "parameter the method holds (run.json's `method_bytes_per_param`). n.a.: not recorded by the run."
        + (" General accuracy: on the general-knowledge set of `--general`, at the final epoch." if general else "")
        + (" KL drift: the mean forward KL of the answer distributions on `--probe` from the start's." if kl else "")
        + (" Reference: what the run protected (`--reference`)." if references else "")
        + (
            " *RUN wise α=A*: WiSE-FT, the weights (1 − A) θ₀ + A θ of run RUN's start θ₀ and final epoch θ "
            "(`cnl interpolate`, no training)."
            if any(r.get("wise_source") for r in rows)
            else ""
        ),
    ]
    lines += _budget_markdown(report)
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


def format_or_na(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``n.a.`` when the run does not record it."""
    return "n.a." if value is None else format(value, spec)


def _budget_markdown(report: dict[str, Any]) -> list[str]:
    """The table at equal wall time (``--budget``), or nothing."""
    budget = report.get("budget")
    if not budget:
        return []
    how = " (auto: the shortest run's total)" if budget["auto"] else ""
    lines = [
        "",
        "## At equal wall time",
        "",
        f"Each run at the epoch whose cumulative wall time (the sum of its epochs' seconds) is closest to "
        f"{budget['seconds']:.1f} s{how}; n.a.: the run records no epoch times.",
        "",
        "| run | epoch | cumulative seconds | learned | forgotten |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for b in budget["rows"]:
        if b["epoch"] is None:
            lines.append(f"| {b['run']} | n.a. | n.a. | n.a. | n.a. |")
        else:
            lines.append(
                f"| {b['run']} | {b['epoch']} | {b['cumulative_seconds']:.1f} | {b['learned']} "
                f"({b['learned_pct']:.1f}%) | {b['forgotten']} ({b['forgotten_pct']:.1f}%) |"
            )
    return lines


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
    for i, r in enumerate(runs):
        style = {"ms": 3, "ls": "-" if r.complete else "--", **run_style(i)}
        state = "" if r.complete else f", {r.status}"
        ax_l.plot(r.epochs, r.learned, label=f"{r.name} ({r.label}{state})", **style)
        total = r.info["forget_total"]
        forgotten = [100.0 * f / total if total else 0.0 for f in r.forgotten] if mixed else r.forgotten
        suffix = f", of {r.info['forget_set']}" if mixed else ""
        ax_f.plot(r.epochs, forgotten, label=f"{r.name} ({r.label}{suffix}{state})", **style)
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


def write_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    mixed_forget_sets: bool = False,
    budget: str | float | None = None,
) -> dict[str, Any]:
    """Read the runs, write ``report.md``, ``report.json``, ``curves.png`` and ``pareto.png`` into ``out_dir``
    (with ``budget``: the table at equal wall time too)."""
    if budget is not None:
        parse_budget(budget)
    runs = with_wise_points([load_run_record(d) for d in run_dirs])
    report = build_report(runs, mixed_forget_sets=mixed_forget_sets, budget=budget)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CnlError(f"--out {out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_curves([r for r in runs if r.wise_source is None] or runs, out / "curves.png")  # points: no epochs
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
