"""``cnl report`` on ``cnl continual`` directories: the accuracy matrix, the continual-learning measures, the
retention figure and a ledger heatmap per run, read only from the directories (ledger, run directories).

- ``retention.png``: one panel per set (set 0: the original M; set k: round k's injection set), its accuracy
  at every evaluation (before training, then after every epoch of every round), one line per run: what
  survives of each round, round after round.
- ``ledger_<run>.png``: items (grouped by set) × evaluations at round ends, each cell *learned* (answered
  correctly, not at the evaluation before), *kept* (correctly at both), *forgotten* (wrongly, after having
  been answered correctly at some earlier evaluation) or *not known*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .continual import accuracy_matrix, definition_state, ledger, metrics
from .errors import CnlError
from .io import atomic_save, atomic_write_json, atomic_write_text

__all__ = ["ContinualRecord", "load_continual", "build_continual_report", "write_continual_report", "LEDGER_STATES"]

#: Ledger heatmap cell states, in colour-map order.
LEDGER_STATES = ("not known", "forgotten", "known, kept", "learned")


@dataclass
class ContinualRecord:
    """What a report needs from one continual directory."""

    path: Path
    label: str  # method/optimizer (joined with → when rounds differ)
    status: str
    sets: list[str]
    sizes: dict[str, int]
    columns: list[str]  # evaluation points: before, r1e1, ...
    rows: list[dict[str, Any]]  # the ledger
    matrix: list[list[float | None]]
    measures: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def round_ends(self) -> list[str]:
        """The evaluation points that close a round (``before`` first)."""
        ends: dict[str, str] = {}
        for c in self.columns:
            if c != "before":
                ends[c.split("e")[0]] = c  # r{k}e{epoch}: the last epoch of round k wins
        return ["before", *ends.values()]


def load_continual(path: str | Path) -> ContinualRecord:
    """Read a continual directory (a clear error when it is not one, or no round has finished an epoch)."""
    path = Path(path)
    state = definition_state(path)
    trains = state["definition"].get("train") or []
    labels = list(dict.fromkeys(f"{t.get('method')}/{t.get('optimizer')}" for t in trains))
    columns, rows = ledger(path)
    sets, matrix = accuracy_matrix(path)
    sizes = {s: sum(1 for r in rows if r["set"] == s) for s in sets}
    return ContinualRecord(
        path=path,
        label=" → ".join(labels) or "?",
        status=str(state.get("status", "?")),
        sets=sets,
        sizes=sizes,
        columns=[c for c in columns if c not in ("set", "item", "question")],
        rows=rows,
        matrix=matrix,
        measures=metrics(matrix),
    )


def build_continual_report(runs: list[ContinualRecord]) -> dict[str, Any]:
    """Per run: its matrix, the measures, and the final accuracy (count and %) on every set."""
    out = []
    for r in runs:
        final_point = r.round_ends()[-1]
        final = {s: sum(int(x[final_point]) for x in r.rows if x["set"] == s and x[final_point] != "") for s in r.sets}
        before = {s: sum(int(x["before"]) for x in r.rows if x["set"] == s and x["before"] != "") for s in r.sets}
        out.append(
            {
                "run": r.name,
                "method": r.label,
                "status": r.status,
                "rounds": r.measures["rounds"],
                "sets": r.sets,
                "sizes": r.sizes,
                "before": before,
                "final": final,
                "matrix": r.matrix,
                **{k: v for k, v in r.measures.items() if k != "rounds"},
            }
        )
    return {"kind": "continual", "rows": out}


def render_continual_markdown(report: dict[str, Any]) -> str:
    """Markdown: the summary table, each run's accuracy matrix, the formulas' meaning and the figures."""
    rows = report["rows"]
    sets = rows[0]["sets"] if len({tuple(r["sets"]) for r in rows}) == 1 else None
    lines = ["# Continual injection", ""]
    if sets:
        sizes = ", ".join(f"{s} ({rows[0]['sizes'][s]})" for s in sets)
        lines += [f"Sets: {sizes}. Set 0 is the original M; set k is round k's injection set.", ""]
    head = ["run", "method", "status", *(sets or ["final accuracy"]), "average accuracy", "BWT", "forgetting"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * 3 + " ---: |" * (len(head) - 3)]
    for r in rows:
        cells = [
            f"{r['final'][s]}/{r['sizes'][s]} ({r['final'][s] / r['sizes'][s]:.0%})" if r["sizes"][s] else "-"
            for s in r["sets"]
        ]
        if not sets:
            cells = [", ".join(f"{s} {c}" for s, c in zip(r["sets"], cells, strict=True))]
        lines.append(
            f"| {r['run']} | {r['method']} | {r['status']} | "
            + " | ".join(cells)
            + f" | {r['average_accuracy'][-1]:.1%} | {r['bwt']:+.1%} | {r['forgetting'][-1]:.1%} |"
        )
    lines += [
        "",
        "Final accuracy: answered correctly after the last round. Average accuracy A_T: mean accuracy over every "
        "set after the last round. BWT: mean over earlier sets of (accuracy after the last round − accuracy "
        "right after the set's own round); negative is forgetting. Forgetting F_T: mean over earlier sets of "
        "(best accuracy before the last round − accuracy after it). docs/continual.md gives the formulas.",
    ]
    for r in rows:
        lines += [
            "",
            f"## {r['run']} ({r['method']})",
            "",
            "Accuracy on each set (columns) after each round (rows):",
            "",
        ]
        lines += ["| after | " + " | ".join(r["sets"]) + " |", "| --- |" + " ---: |" * len(r["sets"])]
        for i, line in enumerate(r["matrix"]):
            label = "before training" if i == 0 else f"round {i}"
            lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1%}" for v in line) + " |")
        lines += ["", f"![ledger of {r['run']}](ledger_{r['run']}.png)"]
    lines += ["", "![accuracy on every set at every evaluation](retention.png)"]
    return "\n".join(lines) + "\n"


def ledger_states(record: ContinualRecord) -> tuple[list[str], list[str], list[list[int]]]:
    """``(points, sets of the items, cells)``: each item's state (index into :data:`LEDGER_STATES`) at every
    round end; an item is *learned* when answered correctly and not at the point before, *known, kept* when at
    both (or before training), *forgotten* when answered wrongly after having been answered correctly at an
    earlier point."""
    points = record.round_ends()
    cells, sets = [], []
    for row in record.rows:
        seen, prev, line = False, False, []
        for p in points:
            ok = row[p] == 1
            if ok:  # before training, what the model answers is what it knows
                state = "known, kept" if prev or p == "before" else "learned"
            else:
                state = "forgotten" if seen else "not known"
            line.append(LEDGER_STATES.index(state))
            seen, prev = seen or ok, ok
        cells.append(line)
        sets.append(row["set"])
    return points, sets, cells


def plot_ledger(record: ContinualRecord, path: str | Path) -> Any:
    """The ledger heatmap of one run (items × round ends); returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    points, sets, cells = ledger_states(record)
    colours = ["#eeeeee", "#d62728", "#1f77b4", "#2ca02c"]
    height = min(12.0, 2.0 + 0.02 * len(cells))
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(points), height))
    ax.imshow(cells, aspect="auto", interpolation="nearest", cmap=ListedColormap(colours), vmin=0, vmax=3)
    ax.set_xticks(range(len(points)), ["before", *(f"after round {i}" for i in range(1, len(points)))])
    starts = [i for i, s in enumerate(sets) if i == 0 or sets[i - 1] != s]
    for i in starts[1:]:
        ax.axhline(i - 0.5, color="black", lw=0.8)
    ax.set_yticks([(a + b) / 2 - 0.5 for a, b in zip(starts, [*starts[1:], len(sets)], strict=True)])
    ax.set_yticklabels([f"{sets[i]} ({n})" for i, n in zip(starts, _sizes(starts, len(sets)), strict=True)])
    ax.set_title(f"{record.name} ({record.label}): every item at every round end")
    ax.legend(
        handles=[Patch(color=c, label=s) for c, s in zip(colours, LEDGER_STATES, strict=True)],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return fig


def _sizes(starts: list[int], total: int) -> list[int]:
    return [b - a for a, b in zip(starts, [*starts[1:], total], strict=True)]


def plot_retention(runs: list[ContinualRecord], path: str | Path) -> Any:
    """One panel per set: its accuracy at every evaluation, one line per run, rounds marked; the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(s for r in runs for s in r.sets))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.8), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sets, strict=True):
        for r in runs:
            if s not in r.sets:
                continue
            xs, ys = [], []
            for x, p in enumerate(r.columns):
                vals = [int(row[p]) for row in r.rows if row["set"] == s and row[p] != ""]
                if vals:
                    xs.append(x)
                    ys.append(100.0 * sum(vals) / len(vals))
            ax.plot(xs, ys, marker="o", ms=2.5, label=f"{r.name} ({r.label})")
        ref = max(runs, key=lambda r: len(r.columns))
        ends = [ref.columns.index(p) for p in ref.round_ends()]
        for x in ends[:-1]:  # a line where each round begins
            ax.axvline(x + 0.5, color="grey", lw=0.6, ls=":")
        ax.set_xticks(ends, ["before", *(f"R{i}" for i in range(1, len(ends)))])
        ax.set_xticks(range(len(ref.columns)), minor=True)
        title = "set_0: the original M" if s == "set_0" else f"{s}: round {s.split('_')[1]}'s injection set"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("every epoch; Rk: the end of round k")
        ax.grid(alpha=0.3)
        ax.set_ylim(-2, 102)
    axes[0][0].set_ylabel("% answered correctly")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return fig


def write_continual_report(dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Read the continual directories; write ``report.md``, ``report.json``, ``retention.png`` and one
    ``ledger_<run>.png`` per run into ``out_dir``."""
    runs = [load_continual(d) for d in dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise CnlError(f"two continual directories share a name ({names}): the report names runs by folder")
    report = build_continual_report(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    plt.close(plot_retention(runs, out / "retention.png"))
    for r in runs:
        plt.close(plot_ledger(r, out / f"ledger_{r.name}.png"))
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_continual_markdown(report))
    return report
