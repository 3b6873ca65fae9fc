"""Plots of a robustness evaluation: robust AUROC vs eps, and clean vs adversarial images with their anomaly maps.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display needed) and written
atomically.

Example:
    >>> from pathlib import Path
    >>> from anomalib_robust.evaluation.plots import plot_auroc_vs_eps
    >>> plot_auroc_vs_eps(report, Path("auroc_vs_eps.png"))  # doctest: +SKIP
"""

import io
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anomalib_robust.evaluation.report import RobustReport, write_atomic


def save_figure(figure: Figure, path: Path) -> Path:
    """Render ``figure`` to PNG and write it atomically to ``path``."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    return path


def plot_auroc_vs_eps(report: RobustReport, path: Path) -> Path:
    """Robust image AUROC against eps, one line per attack from the standard AUROC at eps 0; bars: std over repeats."""
    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    runs = [result for result in report.results if result.role == "attack" and result.image_auroc is not None]
    for name in dict.fromkeys(result.attack for result in runs):
        points = sorted(
            (result.eps, result.image_auroc, result.image_auroc_std) for result in runs if result.attack == name
        )
        eps, auroc, std = zip((0.0, report.clean_image_auroc, report.clean_image_auroc_std), *points, strict=True)
        axes.errorbar(eps, auroc, yerr=std, marker="o", capsize=3, label=name)
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    axes.set(xlabel=f"eps ({report.norm})", ylabel="image AUROC", ylim=(-0.02, 1.02), title=report.model)
    axes.legend(loc="best", fontsize="small")
    return save_figure(figure, path)


def plot_adversarial_grid(
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    clean_maps: torch.Tensor | None,
    adversarial_maps: torch.Tensor | None,
    labels: torch.Tensor,
    title: str,
    path: Path,
) -> Path:
    """One column per image: clean image, its anomaly map, adversarial image, its map, amplified perturbation."""
    rows = ["clean", "clean map", "adversarial", "adversarial map", "perturbation (x10)"]
    if clean_maps is None or adversarial_maps is None:
        rows = [row for row in rows if "map" not in row]
    count = clean.shape[0]
    figure = Figure(figsize=(1.8 * count, 1.8 * len(rows)))
    axes = figure.subplots(len(rows), count, squeeze=False)
    low, high = (None, None)
    if clean_maps is not None and adversarial_maps is not None:
        both = torch.cat([clean_maps, adversarial_maps])
        low, high = float(both.min()), float(both.max())
    panels = {
        "clean": lambda i: clean[i],
        "clean map": lambda i: clean_maps[i],
        "adversarial": lambda i: adversarial[i],
        "adversarial map": lambda i: adversarial_maps[i],
        "perturbation (x10)": lambda i: (0.5 + 10 * (adversarial[i] - clean[i])).clamp(0, 1),
    }
    for row, name in enumerate(rows):
        for column in range(count):
            axis = axes[row][column]
            panel = panels[name](column).detach().float().cpu()
            if "map" in name:
                axis.imshow(panel.numpy(), cmap="jet", vmin=low, vmax=high)
            else:
                axis.imshow(panel.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if panel.shape[0] == 1 else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(name, fontsize="small")
            if row == 0:
                axis.set_title("anomalous" if int(labels[column]) else "normal", fontsize="small")
    figure.suptitle(title, fontsize="small")
    return save_figure(figure, path)
