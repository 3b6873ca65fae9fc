"""Report of a robustness evaluation: standard and robust AUROC with their spread over repeats, table, JSON, CSV.

A :class:`RobustReport` holds the standard (clean) AUROC of the detector as deployed and one :class:`AttackResult` per
attack run (attack, target, norm, eps, steps), each AUROC the mean over ``eval_repeats`` scorings with independent
noise, with its standard deviation, plus the :class:`SanityCheck` verdicts of :mod:`anomalib_robust.evaluation.sanity`.

Example:
    >>> from anomalib_robust.evaluation.report import AttackResult, RobustReport
    >>> report = RobustReport(model="Padim", norm="Linf", eot_samples=1, num_samples=20, clean_image_auroc=0.9)
    >>> report.results.append(AttackResult("PGD", "Linf", 2 / 255, image_auroc=0.1))
    >>> report.results[0].key
    'pgd_linf_eps0.007843'
"""

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rich.markup import escape
from rich.table import Table

TARGETS = {"score": "image score", "map": "anomaly map"}
"""What an attack pushes: the image score (AdvRAD paper, sec. 3), or every pixel of the anomaly map."""


_NOTES = {"sanity": "sanity check", "worst_case": "per image, worst of the rows above"}
"""The report's note on a row by its role."""


@dataclass
class AttackResult:
    """Robust AUROC of one attack run (mean and standard deviation over repeats); ``None`` when it could not run."""

    attack: str
    norm: str
    eps: float
    steps: int | None = None
    target: str = "score"
    """``"score"``: the attack pushes the image score; ``"map"``: it pushes the anomaly map pixel by pixel."""
    image_auroc: float | None = None
    image_auroc_std: float = 0.0
    pixel_auroc: float | None = None
    pixel_auroc_std: float = 0.0
    status: str = "ok"
    reason: str = ""
    role: str = "attack"
    """``"attack"`` for configured runs, ``"sanity"`` for the extra runs of the sanity checks, ``"worst_case"`` for the
    per-image worst case over the configured runs at one eps."""
    budget: str = ""
    """The attack's budget (steps, queries, EOT draws, images), as the report prints it (:func:`format_budget`)."""
    queries: int | None = None
    """Score queries per restart (Square, AutoAttack's Square)."""
    restarts: int = 1
    draws: int = 1
    """The attacker's draws of a randomised detector per gradient or query (EOT); 1 for deterministic detectors."""
    num_images: int | None = None
    """Test images attacked: all of them for configured runs, the sanity subset for sanity runs."""
    forward_passes: int = 0
    """Planned forward passes per attacked image (:mod:`anomalib_robust.evaluation.budget`), scoring excluded."""
    backward_passes: int = 0
    """Planned backward passes per attacked image."""
    converged: bool | None = None
    """For the configured run the convergence check is paired with: whether more steps (and draws) no longer lower
    its AUROC by more than the tolerance; ``None`` when inconclusive or not checked
    (:mod:`~anomalib_robust.evaluation.convergence`)."""
    excluded_drop: float | None = None
    """For that run: the AUROC drop that more steps and draws are shown not to exceed (the paired interval's low end,
    negated, at least 0): a pass excludes a drop of more than this; ``None`` when not checked."""

    @property
    def key(self) -> str:
        """Metric-friendly identifier, e.g. ``pgd_linf_eps0.007843`` (``..._map`` for a map-target run)."""
        key = f"{self.attack.lower().replace(' ', '_')}_{self.norm.lower()}_eps{self.eps:.4g}"
        if self.target == "map":
            key += "_map"
        if self.role == "sanity":
            key += f"_steps{self.steps}" if self.steps else "_sanity"
        return key


@dataclass
class SanityCheck:
    """Verdict of one check; ``passed`` is ``None`` when the check could not be evaluated."""

    name: str
    passed: bool | None
    detail: str
    budget: str = ""
    """What the check had: the runs it compares and the images they were measured on."""


@dataclass
class ImageScores:
    """Every test image's raw image scores, ``(N, R)`` over ``R`` deployed scorings, in the order of ``labels``: what a
    paired comparison of two runs or two systems on the same images needs
    (:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`)."""

    labels: torch.Tensor
    clean: torch.Tensor
    attacked: dict[str, torch.Tensor] = field(default_factory=dict)
    """By :attr:`AttackResult.key`, the configured image-score runs that could be carried out, and the per-image
    worst case over them at each eps (its ``"Worst case"`` row)."""


@dataclass
class RobustReport:
    """Standard and robust AUROC of one detector under one norm, with sanity checks.

    ``eval_repeats`` is the number of independent scorings behind every AUROC (1 for a deterministic detector);
    ``resolution`` says where eps is measured: ``"model"`` (the model's input size) or ``"native"`` (the test image).
    ``sanity_budget`` is the limit of the cost of the sanity runs but the convergence run as a multiple of the
    configured runs' (``None``: full sanity runs), ``sanity_images`` the most images a sanity run attacked (the
    convergence run attacks every one; each run's images are in its row), and
    ``configured_cost`` / ``sanity_cost`` the planned
    cost of each part in forward-pass equivalents (:mod:`anomalib_robust.evaluation.budget`). ``baselines`` are the
    configured image-score runs measured on the sanity runs' images, what the sanity checks compare them with.
    """

    model: str
    norm: str
    eot_samples: int
    num_samples: int
    clean_image_auroc: float
    clean_image_auroc_std: float = 0.0
    clean_pixel_auroc: float | None = None
    clean_pixel_auroc_std: float = 0.0
    eval_repeats: int = 1
    resolution: str = "model"
    sanity_budget: float | None = None
    sanity_images: int | None = None
    configured_cost: float = 0.0
    sanity_cost: float = 0.0
    results: list[AttackResult] = field(default_factory=list)
    checks: list[SanityCheck] = field(default_factory=list)
    baselines: list[AttackResult] = field(default_factory=list)
    image_scores: ImageScores | None = field(default=None, repr=False, compare=False)
    """The configured runs' per-image scores (not written by :meth:`to_dict`)."""

    @property
    def gradient_masking_suspected(self) -> bool:
        """Whether any sanity check failed."""
        return any(check.passed is False for check in self.checks)

    def to_dict(self) -> dict:
        """JSON-ready dictionary (results carry their metric key)."""
        report = asdict(replace(self, image_scores=None))
        del report["image_scores"]
        for result, row in zip(self.results, report["results"], strict=True):
            row["key"] = result.key
        report["gradient_masking_suspected"] = self.gradient_masking_suspected
        return report

    def table(self) -> Table:
        """Rich table of standard vs robust image (and pixel) AUROC per attack, sanity checks in the caption."""
        show_pixel = self.clean_pixel_auroc is not None or any(r.pixel_auroc is not None for r in self.results)
        spread = f", mean ± std over {self.eval_repeats} scorings" if self.eval_repeats > 1 else ""
        table = Table(
            title=f"Robust evaluation of {self.model} ({self.norm} at {self.resolution} resolution, "
            f"{self.num_samples} test images{spread})",
            caption_justify="left",
        )
        columns = (
            "Attack",
            "Target",
            "eps",
            "Budget",
            "Image AUROC",
            *(("Pixel AUROC",) if show_pixel else ()),
            "Note",
        )
        for column in columns:
            table.add_column(column, justify="left" if column in {"Attack", "Target", "Budget", "Note"} else "right")
        repeats = self.eval_repeats
        clean_pixel = (format_auroc(self.clean_pixel_auroc, self.clean_pixel_auroc_std, repeats),) if show_pixel else ()
        table.add_row(
            "none (standard)", "-", "0", "-", format_auroc(self.clean_image_auroc, self.clean_image_auroc_std, repeats),
            *clean_pixel, "",
        )  # fmt: skip
        for result in self.results:
            note = result.reason if result.status != "ok" else _NOTES.get(result.role, "")
            if result.converged is False:
                note = "not converged (see the sanity checks): an overestimate"
            elif result.excluded_drop is not None:
                verdict = "converged" if result.converged else "convergence inconclusive"
                note = f"{verdict}: a drop of more than {100 * result.excluded_drop:.1f} points excluded"
            pixel = (format_auroc(result.pixel_auroc, result.pixel_auroc_std, repeats),) if show_pixel else ()
            table.add_row(
                result.attack,
                TARGETS[result.target],
                format_eps(result.eps, result.norm),
                result.budget or ("-" if result.steps is None else f"{result.steps} steps"),
                format_auroc(result.image_auroc, result.image_auroc_std, repeats),
                *pixel,
                note,
            )
        marks = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]n/a[/]"}
        lines = [
            f"{marks[check.passed]} {check.name}{escape(f' [{check.budget}]') if check.budget else ''}: {check.detail}"
            for check in self.checks
        ]
        if self.sanity_images is not None:
            lines.append(self.sanity_summary())
        if show_pixel:
            lines.append(
                "Pixel AUROC of an 'image score' row is the pixel AUROC under the image attack, not a worst case for "
                "localisation; 'anomaly map' rows attack the map itself (robust localisation)."
            )
        if self.gradient_masking_suspected:
            lines.append("[bold red]Possible gradient masking: robust AUROC above is likely an overestimate.[/]")
        table.caption = "\n".join(lines)
        return table

    def sanity_summary(self) -> str:
        """One line on the sanity runs' budget: their images and their planned cost against the configured runs'."""
        ratio = self.sanity_cost / self.configured_cost if self.configured_cost else math.nan
        limit = "full sanity runs" if self.sanity_budget is None else f"budget {self.sanity_budget:g}x"
        return (
            f"Sanity runs on up to {self.sanity_images} of {self.num_samples} test images (each run's in its row): "
            f"planned cost {ratio:.2f}x the configured runs ({limit}, the convergence run on every image on top; "
            "forward-pass equivalents, a backward pass counting 2)"
        )

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.csv`` into ``directory`` atomically; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / "report.json", directory / "report.csv"
        write_atomic(json_path, json.dumps(self.to_dict(), indent=2, allow_nan=True))
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(
            ["model", "attack", "target", "norm", "eps", "steps", "image_auroc", "image_auroc_std", "pixel_auroc",
             "pixel_auroc_std", "eval_repeats", "status", "role", "budget", "queries", "restarts", "draws", "images",
             "forward_passes", "backward_passes"]
        )  # fmt: skip
        writer.writerow(
            _csv_row(self.model, "none", "-", self.norm, 0.0, None, self.clean_image_auroc, self.clean_image_auroc_std,
                     self.clean_pixel_auroc, self.clean_pixel_auroc_std, self.eval_repeats, "ok", "clean", "", None,
                     None, None, self.num_samples, None, None)
        )  # fmt: skip
        for result in self.results:
            writer.writerow(
                _csv_row(self.model, result.attack, result.target, result.norm, result.eps, result.steps,
                         result.image_auroc, result.image_auroc_std, result.pixel_auroc, result.pixel_auroc_std,
                         self.eval_repeats, result.status, result.role, result.budget, result.queries,
                         result.restarts, result.draws, result.num_images, result.forward_passes,
                         result.backward_passes)
            )  # fmt: skip
        write_atomic(csv_path, rows.getvalue())
        return json_path, csv_path


def _csv_row(*values: object) -> list:
    """One CSV row of :meth:`RobustReport.write` (``None`` written as an empty cell)."""
    return ["" if value is None else value for value in values]


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` to a temporary file next to ``path``, then rename it over ``path`` (``os.replace``)."""
    mode = "wb" if isinstance(content, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(content)
        temporary = Path(file.name)
    os.replace(temporary, path)


def format_budget(result: AttackResult, total_images: int) -> str:
    """``20 steps x 8 draws, 26 of 60 images``-style summary of a run's budget (images only for a subset)."""
    parts = [f"{result.steps} steps" if result.steps else f"{result.queries} queries"]
    if result.steps and result.queries:
        parts[0] += f" + {result.queries} queries"
    parts[0] += f" x {result.draws} draw{'s' if result.draws > 1 else ''}"
    if result.restarts > 1:
        parts.append(f"{result.restarts} restarts")
    if result.num_images is not None and result.num_images < total_images:
        parts.append(f"{result.num_images} of {total_images} images")
    return ", ".join(parts)


def format_eps(eps: float, norm: str) -> str:
    """``2/255`` for L_inf radii that are whole multiples of 1/255 below 1, ``0.2`` style otherwise."""
    steps_of_255 = eps * 255
    if norm == "Linf" and eps < 1 and abs(steps_of_255 - round(steps_of_255)) < 1e-6:
        return f"{round(steps_of_255)}/255"
    return f"{eps:.4g}"


def format_auroc(value: float | None, std: float = 0.0, repeats: int | None = 1) -> str:
    """AUROC in percent: ``80.6 ± 1.2`` (the std over ``repeats`` scorings) when it was scored more than once or has a
    spread, so that repeats that agree read ``± 0.0`` and not as one deterministic scoring; ``-`` when missing."""
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * value:.1f} ± {100 * std:.1f}" if std > 0 or (repeats or 1) > 1 else f"{100 * value:.1f}"
