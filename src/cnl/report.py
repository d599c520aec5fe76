"""``cnl report``: compare finished runs side by side, reading only their run directories.

For every run: method, optimizer, setting, learned (count and % of the learning set) and forgotten
(count and % of the forgetting set) at the final epoch and at the epoch with most learned; when an
``ft`` run on the same sets is among them, every other run's forgetting reduction against it. Writes
``report.md``, ``report.json`` and ``curves.png`` (learned and forgotten per epoch, shared axes).
"""

from __future__ import annotations

from dataclasses import dataclass
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
        path=rundir.root, info=info, epochs=series.epochs, learned=series.learned, forgotten=series.forgotten
    )


def check_same_sets(runs: list[RunRecord]) -> None:
    """Refuse runs whose learning or forgetting sets differ, naming the mismatch."""
    first = runs[0]

    def key(r: RunRecord, role: str) -> tuple[str, str]:
        name = r.info[f"{role}_set"]
        return name, r.info["sets"][name]["sha256"]

    for r in runs[1:]:
        for role in ("learn", "forget"):
            a, b = key(first, role), key(r, role)
            if a[1] != b[1]:
                raise CnlError(
                    f"runs measure {'learning' if role == 'learn' else 'forgetting'} on different sets: "
                    f"{first.path} uses {a[0]} ({first.info['sets'][a[0]]['file']}), "
                    f"{r.path} uses {b[0]} ({r.info['sets'][b[0]]['file']}); report runs on the same sets"
                )


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0


def build_report(runs: list[RunRecord]) -> dict[str, Any]:
    """The paper-style comparison table as data."""
    if not runs:
        raise CnlError("no runs given")
    check_same_sets(runs)
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
            "forgetting_reduction_pct": None,
            "baseline_run": None,
        }
        if fts and not row["is_baseline"]:
            # the ft run with the same optimizer when there is one, else the first ft run
            baseline = next((f for f in fts if f.info["optimizer"] == r.info["optimizer"]), fts[0])
            base = baseline.forgotten[-1]
            row["baseline_run"] = baseline.name
            row["forgetting_reduction_pct"] = 100.0 * (base - r.forgotten[-1]) / base if base else None
        rows.append(row)
    return {
        "learn_set": runs[0].info["learn_set"],
        "forget_set": runs[0].info["forget_set"],
        "baseline": ft.name if ft else None,
        "rows": rows,
    }


def render_markdown(report: dict[str, Any], figure: str | None = "curves.png") -> str:
    """Markdown with the comparison table (and the figure, when given)."""
    rows = report["rows"]
    lines = [
        "# CNL comparison",
        "",
        f"Learning measured on **{report['learn_set']}** ({rows[0]['learn_total']} questions), forgetting on "
        f"**{report['forget_set']}** ({rows[0]['forget_total']} questions).",
        "",
        "| run | method | optimizer | setting | epochs | learned (final) | forgotten (final) "
        "| best epoch | learned (best) | forgotten (best) | forgetting reduction vs ft |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        red = r["forgetting_reduction_pct"]
        if r["is_baseline"]:
            red_s = "baseline"
        elif red is None:
            red_s = "n/a" if report["baseline"] is None else "n/a (ft forgot nothing)"
        else:
            several = sum(1 for x in rows if x["is_baseline"]) > 1
            red_s = f"{red:.1f}%" + (f" (vs {r['baseline_run']})" if several else "")
        lines.append(
            f"| {r['run']} | {r['method']} | {r['optimizer']} | {r['setting']} | {r['epochs']} "
            f"| {r['final_learned']} ({r['final_learned_pct']:.1f}%) "
            f"| {r['final_forgotten']} ({r['final_forgotten_pct']:.1f}%) "
            f"| {r['best_epoch']} | {r['best_learned']} ({r['best_learned_pct']:.1f}%) "
            f"| {r['best_forgotten']} ({r['best_forgotten_pct']:.1f}%) | {red_s} |"
        )
    lines += [
        "",
        "Learned: questions of the learning set answered correctly (% of the set). Forgotten: questions of the "
        "forgetting set now answered wrongly (% of the set). Best epoch: the epoch with most learned. Forgetting "
        "reduction: (forgotten by ft − forgotten by the run) / forgotten by ft, at the final epoch.",
    ]
    if figure:
        lines += ["", f"![learned and forgotten per epoch]({figure})"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[RunRecord], path: str | Path) -> Any:
    """Learned and forgotten per epoch for every run on shared axes; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for r in runs:
        (line,) = ax_l.plot(r.epochs, r.learned, marker="o", ms=3, label=f"{r.name} ({r.label})")
        ax_f.plot(r.epochs, r.forgotten, marker="o", ms=3, color=line.get_color(), label=f"{r.name} ({r.label})")
    info = runs[0].info
    ax_l.set_title(f"learned: {info['learn_set']} answered correctly (of {info['learn_total']})")
    ax_f.set_title(f"forgotten: {info['forget_set']} answered wrongly (of {info['forget_total']})")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_l, ax_f):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_l.set_ylabel("questions")
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return fig


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Read the runs, write ``report.md``, ``report.json`` and ``curves.png`` into ``out_dir``."""
    runs = [load_run_record(d) for d in run_dirs]
    report = build_report(runs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CnlError(f"--out {out} exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    fig = plot_curves(runs, out / "curves.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report
