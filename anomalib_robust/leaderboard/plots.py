"""Leaderboard plots: robust vs standard image AUROC per model, and AUROC-vs-eps curves per model and norm.

Each point is the mean over the leaderboard's categories of a cell's worst-case robust AUROC over its attacks (the
standard AUROC at eps 0); rows without a robust AUROC (failed cells, runs that could not attack) are left out.
Figures are written with :func:`anomalib_robust.evaluation.plots.save_figure`.
"""

from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from anomalib_robust.evaluation.plots import save_figure
from anomalib_robust.evaluation.report import format_eps


def _worst_case(rows: list[dict]) -> dict[tuple, tuple[float, float]]:
    """``(model, norm, eps) -> (mean standard AUROC, mean worst-case robust AUROC)`` over categories."""
    worst: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    for row in rows:
        if row["robust_image_auroc"] is None or row["standard_image_auroc"] is None:
            continue
        key = (row["model"], row["norm"], float(row["eps"]))
        cell = f"{row['data']}/{row['category']}"
        standard, robust = row["standard_image_auroc"], row["robust_image_auroc"]
        previous = worst[key].get(cell, (standard, robust))
        worst[key][cell] = (standard, min(robust, previous[1]))
    return {
        key: (sum(s for s, _ in cells.values()) / len(cells), sum(r for _, r in cells.values()) / len(cells))
        for key, cells in worst.items()
    }


def plot_robust_vs_standard(rows: list[dict], path: Path) -> Path:
    """Robust (worst attack) against standard image AUROC, one marker per model and threat model."""
    figure = Figure(figsize=(5.5, 4.5))
    axes = figure.add_subplot()
    points = _worst_case(rows)
    markers = dict(zip(sorted({(norm, eps) for _, norm, eps in points}), "osD^v<>", strict=False))
    colours = {model: f"C{index % 10}" for index, model in enumerate(sorted({model for model, _, _ in points}))}
    for (model, norm, eps), (standard, robust) in sorted(points.items()):
        axes.scatter(
            standard, robust, marker=markers.get((norm, eps), "o"), color=colours[model],
            label=f"{model} ({norm} {format_eps(eps, norm)})",
        )  # fmt: skip
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="standard image AUROC", ylabel="robust image AUROC", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    axes.set_title("Robust vs standard AUROC (mean over categories)")
    if points:
        axes.legend(loc="upper left", fontsize="x-small")
    return save_figure(figure, path)


def plot_auroc_vs_eps(rows: list[dict], path: Path) -> Path:
    """Worst-case robust image AUROC against eps, one panel per norm, one line per model from eps 0 (standard)."""
    points = _worst_case(rows)
    norms = sorted({norm for _, norm, _ in points}) or ["-"]
    figure = Figure(figsize=(4.5 * len(norms), 3.5))
    for index, norm in enumerate(norms):
        axes = figure.add_subplot(1, len(norms), index + 1)
        for model in sorted({model for model, n, _ in points if n == norm}):
            curve = sorted((eps, value) for (m, n, eps), value in points.items() if m == model and n == norm)
            standard = sum(value[0] for _, value in curve) / len(curve)
            axes.plot([0.0, *(eps for eps, _ in curve)], [standard, *(v[1] for _, v in curve)], marker="o", label=model)
        axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel=f"eps ({norm})", ylabel="image AUROC", ylim=(-0.02, 1.02))
        if points:
            axes.legend(loc="best", fontsize="x-small")
    return save_figure(figure, path)
