"""The analyses of SPEC §5: which parameters collaborate or conflict, and why questions are forgotten.

- :func:`neuron_statistics`: at given parameters, the mean gradients over M and over I and, per
  element, s = g_M · g_I; elements with s ≥ 0 collaborate, s < 0 conflict. Proportions and the share
  of the injection gradient's magnitude Σ|g_I| that each class carries, overall, per layer, per
  module kind and per layer × kind. Only the sign of g_M is kept (a quarter byte per element) while
  g_I is accumulated, so at most one full-size gradient buffer exists besides the model.
- :func:`gradient_distance`: at the base parameters, g_I' = mean gradient over the injection
  questions an ``ft`` run still got wrong at its final epoch, and for every mastered question
  d_m = ∇L_m · g_I'. Each d_m is summed parameter by parameter inside post-accumulate-grad hooks, so
  no per-question gradient is kept besides the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .params import MODULE_KINDS, classify_parameter
from .reference import accumulate_mean_gradient, reference_sign
from .scoring import Encoded, batch_losses, mc_batches, spec_loss

__all__ = [
    "MODULE_KINDS",
    "classify_parameter",
    "ClassCounts",
    "neuron_statistics",
    "gradient_distance",
    "distance_table",
    "thirds_follow_up",
]


@dataclass
class ClassCounts:
    """Collaborative/conflicting element counts and injection-gradient magnitudes of a group."""

    elements: int = 0
    conflicting: int = 0
    abs_total: float = 0.0
    abs_conflicting: float = 0.0

    def add(self, other: ClassCounts) -> None:
        self.elements += other.elements
        self.conflicting += other.conflicting
        self.abs_total += other.abs_total
        self.abs_conflicting += other.abs_conflicting

    def as_row(self) -> dict[str, Any]:
        collab = self.elements - self.conflicting
        abs_collab = self.abs_total - self.abs_conflicting
        return {
            "elements": self.elements,
            "collaborative": collab,
            "conflicting": self.conflicting,
            "collaborative_fraction": collab / self.elements if self.elements else 0.0,
            "conflicting_fraction": self.conflicting / self.elements if self.elements else 0.0,
            "collaborative_grad_share": abs_collab / self.abs_total if self.abs_total > 0 else 0.0,
            "conflicting_grad_share": self.abs_conflicting / self.abs_total if self.abs_total > 0 else 0.0,
        }


@dataclass
class NeuronStatistics:
    """Result of :func:`neuron_statistics`: counts per parameter and their groupings."""

    per_parameter: dict[str, ClassCounts]
    mastered_loss: float = 0.0
    injection_loss: float = 0.0

    def overall(self) -> ClassCounts:
        total = ClassCounts()
        for c in self.per_parameter.values():
            total.add(c)
        return total

    def grouped(self) -> dict[str, Any]:
        """Rows per layer, per kind and per layer × kind (layer ``None`` = outside the blocks)."""
        per_layer: dict[Any, ClassCounts] = {}
        per_kind: dict[str, ClassCounts] = {}
        per_cell: dict[tuple[Any, str], ClassCounts] = {}
        for name, c in self.per_parameter.items():
            layer, kind = classify_parameter(name)
            for table, key in ((per_layer, layer), (per_kind, kind), (per_cell, (layer, kind))):
                table.setdefault(key, ClassCounts()).add(c)
        layer_order = sorted(per_layer, key=lambda x: (x is None, x if x is not None else 0))
        return {
            "overall": self.overall().as_row(),
            "per_layer": [{"layer": k, **per_layer[k].as_row()} for k in layer_order],
            "per_kind": [{"kind": k, **per_kind[k].as_row()} for k in MODULE_KINDS if k in per_kind],
            "per_layer_kind": [
                {"layer": layer, "kind": kind, **per_cell[(layer, kind)].as_row()}
                for layer in layer_order
                for kind in MODULE_KINDS
                if (layer, kind) in per_cell
            ],
        }


def neuron_statistics(
    model: torch.nn.Module,
    mastered: Sequence[Encoded],
    injection: Sequence[Encoded],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
) -> NeuronStatistics:
    """Collaborative vs conflicting elements at the model's current parameters (SPEC §5)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameter that requires grad")
    params = [p for _, p in named]
    loss_fn = spec_loss(pad_id)
    sign_m, loss_m = reference_sign(
        model, mc_batches(mastered, batch_size), loss_fn, params, n=len(mastered), progress=progress
    )
    for p in params:
        p.grad = None
    loss_i = accumulate_mean_gradient(
        model, mc_batches(injection, batch_size), loss_fn, n=len(injection), desc="injection", progress=progress
    )
    stats: dict[str, ClassCounts] = {}
    with torch.no_grad():
        for name, p in named:  # stream: one parameter's comparison at a time
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            conflict = sign_m.conflict(p, g)
            a = g.abs()
            stats[name] = ClassCounts(
                elements=p.numel(),
                conflicting=int(conflict.sum()),
                abs_total=float(a.sum(dtype=torch.float64)),
                abs_conflicting=float((a * conflict).sum(dtype=torch.float64)),
            )
            p.grad = None
    return NeuronStatistics(per_parameter=stats, mastered_loss=loss_m, injection_loss=loss_i)


def gradient_distance(
    model: torch.nn.Module,
    mastered: Sequence[Encoded],
    still_wrong: Sequence[Encoded],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
) -> list[float]:
    """d_m = ∇L_m · g_I' for every mastered question (SPEC §5), at the model's current parameters."""
    if not still_wrong:
        raise ValueError("I' is empty: the ft run learned every injection question, nothing to compare with")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    accumulate_mean_gradient(
        model,
        mc_batches(still_wrong, batch_size),
        spec_loss(pad_id),
        n=len(still_wrong),
        desc="g_I'",
        progress=progress,
    )
    mean = {p: (p.grad if p.grad is not None else torch.zeros_like(p)) for p in params}
    for p in params:
        p.grad = None

    acc: list[torch.Tensor] = []

    def hook(p: torch.Tensor) -> None:
        with torch.no_grad():
            acc.append((p.grad * mean[p]).sum(dtype=torch.float64))
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    dots: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for e in tqdm(mastered, desc="d_m", unit="q", disable=(progress is False) or None, leave=False):
            acc.clear()
            batch_losses(model, [e], pad_id)[0].backward()
            dots.append(float(torch.stack(acc).sum()) if acc else 0.0)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        mean.clear()
    return dots


def distance_table(dots: Sequence[float], forgotten: Sequence[bool]) -> list[dict[str, Any]]:
    """Rows ``dot < 0`` and ``dot >= 0``: total, forgotten, forgotten ratio."""
    rows = []
    for label, pick in (("dot < 0", lambda d: d < 0), ("dot >= 0", lambda d: d >= 0)):
        idx = [i for i, d in enumerate(dots) if pick(d)]
        n_f = sum(1 for i in idx if forgotten[i])
        rows.append(
            {"group": label, "total": len(idx), "forgotten": n_f, "forgotten_ratio": n_f / len(idx) if idx else None}
        )
    return rows


def thirds_follow_up(dots: Sequence[float], forgotten: Sequence[bool]) -> dict[str, Any]:
    """Among d < 0, sorted by |d|: forgotten ratio of the smallest-|d| third vs the largest-|d| third.

    Each third holds floor(n/3) questions; with fewer than three negative dot products there is no
    comparison and the result says so.
    """
    neg = sorted((abs(d), bool(forgotten[i])) for i, d in enumerate(dots) if d < 0)
    n = len(neg)
    if n < 3:
        return {"negatives": n, "available": False, "reason": f"only {n} question(s) with dot < 0; need at least 3"}
    k = n // 3
    small, large = neg[:k], neg[-k:]

    def ratio(part: list[tuple[float, bool]]) -> float:
        return sum(f for _, f in part) / len(part)

    return {
        "negatives": n,
        "available": True,
        "third_size": k,
        "smallest_abs_third": {
            "max_abs_dot": small[-1][0],
            "forgotten": sum(f for _, f in small),
            "forgotten_ratio": ratio(small),
        },
        "largest_abs_third": {
            "min_abs_dot": large[0][0],
            "forgotten": sum(f for _, f in large),
            "forgotten_ratio": ratio(large),
        },
    }


def quantile_bins(dots: Sequence[float], forgotten: Sequence[bool], bins: int = 10) -> list[dict[str, Any]]:
    """Questions grouped into equal-count bins of d: mean d and forgotten ratio per bin (for the figure)."""
    order = sorted(range(len(dots)), key=lambda i: dots[i])
    n = len(order)
    if n == 0:
        return []
    bins = max(1, min(bins, n))
    out = []
    for b in range(bins):
        part = order[math.floor(b * n / bins) : math.floor((b + 1) * n / bins)]
        if not part:
            continue
        out.append(
            {
                "mean_dot": sum(dots[i] for i in part) / len(part),
                "count": len(part),
                "forgotten_ratio": sum(forgotten[i] for i in part) / len(part),
            }
        )
    return out


# ---------------------------------------------------------------------------------------- outputs
_NEURON_COLUMNS = (
    "scope",
    "layer",
    "kind",
    "elements",
    "collaborative",
    "conflicting",
    "collaborative_fraction",
    "conflicting_fraction",
    "collaborative_grad_share",
    "conflicting_grad_share",
)


def write_neuron_outputs(stats: NeuronStatistics, out_dir: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``neurons.json``, ``neurons.csv`` and ``neurons_heatmap.png``; return the JSON content."""
    from pathlib import Path

    from .io import atomic_write_csv, atomic_write_json

    out = Path(out_dir)
    grouped = stats.grouped()
    content = {**meta, "mastered_loss": stats.mastered_loss, "injection_loss": stats.injection_loss, **grouped}
    atomic_write_json(out / "neurons.json", content)
    rows = [["overall", "", "", *[grouped["overall"][c] for c in _NEURON_COLUMNS[3:]]]]
    for r in grouped["per_layer"]:
        rows.append(["layer", _layer_name(r["layer"]), "", *[r[c] for c in _NEURON_COLUMNS[3:]]])
    for r in grouped["per_kind"]:
        rows.append(["kind", "", r["kind"], *[r[c] for c in _NEURON_COLUMNS[3:]]])
    for r in grouped["per_layer_kind"]:
        rows.append(["layer_kind", _layer_name(r["layer"]), r["kind"], *[r[c] for c in _NEURON_COLUMNS[3:]]])
    atomic_write_csv(out / "neurons.csv", _NEURON_COLUMNS, rows)
    plot_conflict_heatmap(grouped, out / "neurons_heatmap.png")
    return content


def _layer_name(layer: int | None) -> str:
    return "outside" if layer is None else str(layer)


def plot_conflict_heatmap(grouped: dict[str, Any], path: Any) -> Any:
    """Heatmap of the conflicting proportion per layer (rows) × module kind (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .io import atomic_save

    cells = grouped["per_layer_kind"]
    layers = list(dict.fromkeys(_layer_name(c["layer"]) for c in cells))
    kinds = [k for k in MODULE_KINDS if any(c["kind"] == k for c in cells)]
    grid = np.full((len(layers), len(kinds)), np.nan)
    for c in cells:
        grid[layers.index(_layer_name(c["layer"])), kinds.index(c["kind"])] = c["conflicting_fraction"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(kinds), 1.5 + 0.22 * len(layers)))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    overall = grouped["overall"]["conflicting_fraction"]
    ax.set_title(f"conflicting proportion (g_M·g_I < 0); overall {overall:.1%}")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return fig


def plot_distance(bins: list[dict[str, Any]], table: list[dict[str, Any]], path: Any) -> Any:
    """Forgotten ratio against the dot product d_m (equal-count bins), with the sign split marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_save

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [b["mean_dot"] for b in bins]
    ys = [b["forgotten_ratio"] for b in bins]
    ax.plot(xs, ys, marker="o", label="equal-count bins of d_m")
    ax.axvline(0.0, color="grey", ls="--", lw=1)
    for row, color in zip(table, ("tab:red", "tab:green"), strict=True):
        if row["forgotten_ratio"] is not None:
            ax.axhline(
                row["forgotten_ratio"],
                color=color,
                ls=":",
                lw=1.5,
                label=f"{row['group']}: {row['forgotten']}/{row['total']} forgotten",
            )
    ax.set_xscale("symlog", linthresh=max(1e-12, min((abs(x) for x in xs if x != 0), default=1.0)))
    ax.set_xlabel("d_m = ∇L_m · g_I'  (mean of the bin)")
    ax.set_ylabel("forgotten ratio")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return fig


# ---------------------------------------------------------------------------------------- workflows
@dataclass
class DistanceInputs:
    """What ``cnl analyze distance`` reads from an ft run directory, checked before any model loads.

    Attributes:
        run: the run directory; ``info`` its run.json; ``final_epoch`` its last finished epoch.
        learn / forget: the run's learning and forgetting set names (I and M in the in-set setting).
        learn_rows / forget_rows: their questions; ``forget_letters`` the final-epoch predictions on M.
        still_wrong: indices into ``learn_rows`` still answered wrongly at the final epoch (I').
        forgotten: per mastered question, whether the final epoch answered it wrongly.
        notes: remarks for the user (not an ft run, another setting, an unfinished run).
    """

    run: Any
    info: dict[str, Any]
    final_epoch: int
    learn: str
    forget: str
    learn_rows: list[Any]
    forget_rows: list[Any]
    forget_letters: list[str]
    still_wrong: list[int]
    forgotten: list[bool]
    notes: list[str]

    @property
    def base_model(self) -> str | None:
        """The run's own base model (its resolved path when it was a local one)."""
        return self.info.get("model_source", self.info["config"]["model"]["model"])


def distance_inputs(ft_run: Any) -> DistanceInputs:
    """Read and check an ft run for the gradient-distance analysis (SPEC §5); no model work."""
    from .data import read_mc_jsonl
    from .errors import CnlError
    from .rundir import RunDir

    run = RunDir(ft_run)
    info = run.read_info()
    series = run.series(info)
    if not series.epochs:
        raise CnlError(f"{ft_run}: summary.csv has no finished epoch yet")
    notes = []
    from .methods import is_baseline

    if not is_baseline(info["method"]):
        notes.append(f"{ft_run} is a {info['method']} run; SPEC §5 uses an ft run")
    if info.get("setting", "in-set") != "in-set":
        notes.append(
            f"{ft_run} uses the {info['setting']} setting: I' comes from its learning set ({info['learn_set']}) "
            f"and the mastered questions are its forgetting set ({info['forget_set']})"
        )
    if info.get("status") != "finished":
        notes.append(f"{ft_run} is {info.get('status')}; using its last finished epoch")
    final = series.epochs[-1]
    learn, forget = info["learn_set"], info["forget_set"]
    files = run.verify_sets(info, (learn, forget))  # the sets the run was trained and evaluated on
    learn_rows = read_mc_jsonl(files[learn], allow_empty=True)
    forget_rows = read_mc_jsonl(files[forget], allow_empty=True)
    _, learn_correct = run.read_predictions(final, learn)
    forget_letters, forget_correct = run.read_predictions(final, forget)
    if len(learn_correct) != len(learn_rows) or len(forget_correct) != len(forget_rows):
        raise CnlError(f"{ft_run}: final-epoch predictions do not match the run's sets")
    still_wrong = [i for i, ok in enumerate(learn_correct) if not ok]
    if not still_wrong:
        raise CnlError(f"{ft_run}: every {learn} question was learned by the final epoch; I' is empty")
    forgotten = [not ok for ok in forget_correct]
    return DistanceInputs(
        run, info, final, learn, forget, learn_rows, forget_rows, forget_letters, still_wrong, forgotten, notes
    )


def run_distance(
    inputs: DistanceInputs,
    model: torch.nn.Module,
    encoded: dict[str, list[Encoded]],
    out_dir: Any,
    *,
    model_tag: str,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Compute d_m for every mastered question at the model's parameters and write ``distance.jsonl``,
    ``distance_table.csv``, ``distance.json`` and ``distance.png``; return the ``distance.json`` content.

    ``encoded`` holds the run's learning and forgetting sets encoded for the model, in file order."""
    import time
    from pathlib import Path

    from .io import atomic_write_csv, atomic_write_json, atomic_write_jsonl

    for p in model.parameters():
        p.requires_grad_(True)
    still_wrong = [encoded[inputs.learn][i] for i in inputs.still_wrong]
    t0 = time.perf_counter()
    dots = gradient_distance(
        model, encoded[inputs.forget], still_wrong, batch_size=batch_size, pad_id=pad_id, progress=progress
    )
    forgotten = inputs.forgotten
    table = distance_table(dots, forgotten)
    bins = quantile_bins(dots, forgotten)
    out = Path(out_dir)
    atomic_write_jsonl(
        out / "distance.jsonl",
        (
            {"question": r.question, "label": r.label, "predict_label": x, "forgotten": f, "dot": d}
            for r, x, f, d in zip(inputs.forget_rows, inputs.forget_letters, forgotten, dots, strict=True)
        ),
    )
    atomic_write_csv(
        out / "distance_table.csv",
        ["group", "total", "forgotten", "forgotten_ratio"],
        [[r["group"], r["total"], r["forgotten"], r["forgotten_ratio"]] for r in table],
    )
    summary = {
        "ft_run": str(inputs.run.root),
        "final_epoch": inputs.final_epoch,
        "model": model_tag,
        "still_wrong": len(still_wrong),
        "learn_set": inputs.learn,
        "forget_set": inputs.forget,
        "table": table,
        "thirds": thirds_follow_up(dots, forgotten),
        "bins": bins,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    atomic_write_json(out / "distance.json", summary)
    plot_distance(bins, table, out / "distance.png")
    return summary


def neuron_inputs(data: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The files and validated rows of M and I for ``cnl analyze neurons`` (``data`` a DataConfig)."""
    from .data import read_jsonl
    from .errors import CnlError
    from .sets import resolve_set_files, roles_for

    files = resolve_set_files(data, roles_for("in-set", uses_reference=True))  # needs M and I
    rows = {}
    for name in ("mastered", "injection"):
        rows[name] = read_jsonl(files[name], fmt=data.format, allow_empty=True)  # validated before the model loads
        if not rows[name]:
            raise CnlError(f"{files[name]}: the {name} set is empty")
    return files, rows


def run_neurons(
    model: torch.nn.Module,
    encoded: dict[str, list[Encoded]],
    files: dict[str, Any],
    out_dir: Any,
    *,
    meta: dict[str, Any],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Neuron statistics at the model's parameters over the encoded ``mastered`` and ``injection`` sets,
    written to ``out_dir``; return the ``neurons.json`` content."""
    import time

    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    stats = neuron_statistics(
        model, encoded["mastered"], encoded["injection"], batch_size=batch_size, pad_id=pad_id, progress=progress
    )
    meta = {
        **meta,
        "mastered": {"file": str(files["mastered"]), "count": len(encoded["mastered"])},
        "injection": {"file": str(files["injection"]), "count": len(encoded["injection"])},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return write_neuron_outputs(stats, out_dir, meta)
