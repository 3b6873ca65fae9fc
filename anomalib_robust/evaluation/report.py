"""Report of a robustness evaluation: results, sanity checks, rich table, JSON and CSV.

A :class:`RobustReport` holds the standard (clean) AUROC and one :class:`AttackResult` per attack run (attack, norm,
eps, steps), plus the :class:`SanityCheck` verdicts of Carlini et al. (2019): robust AUROC must not increase with eps
or steps, a very large eps must drive a differentiable detector to near 0, and black-box Square must not beat
white-box attacks. A failed check is flagged as possible gradient masking.

Example:
    >>> from anomalib_robust.callbacks.robust_report import AttackResult, RobustReport
    >>> report = RobustReport(model="Padim", norm="Linf", eot_samples=1, num_samples=20, clean_image_auroc=0.9)
    >>> report.results.append(AttackResult("PGD", "Linf", 2 / 255, image_auroc=0.1))
    >>> report.results[0].key
    'pgd_linf_eps0.007843'
"""

import csv
import io
import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table


@dataclass
class AttackResult:
    """Robust AUROC of one attack run; ``image_auroc`` is ``None`` when the run could not be carried out."""

    attack: str
    norm: str
    eps: float
    steps: int | None = None
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    status: str = "ok"
    reason: str = ""
    role: str = "attack"
    """``"attack"`` for configured runs, ``"sanity"`` for the extra runs of the sanity checks."""

    @property
    def key(self) -> str:
        """Metric-friendly identifier, e.g. ``pgd_linf_eps0.007843``."""
        return f"{self.attack.lower()}_{self.norm.lower()}_eps{self.eps:.4g}" + (
            f"_steps{self.steps}" if self.role == "sanity" and self.steps else ""
        )


@dataclass
class SanityCheck:
    """Verdict of one check; ``passed`` is ``None`` when the check could not be evaluated."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class RobustReport:
    """Standard and robust AUROC of one detector under one norm, with sanity checks."""

    model: str
    norm: str
    eot_samples: int
    num_samples: int
    clean_image_auroc: float
    clean_pixel_auroc: float | None = None
    threshold: float | None = None
    results: list[AttackResult] = field(default_factory=list)
    checks: list[SanityCheck] = field(default_factory=list)

    @property
    def gradient_masking_suspected(self) -> bool:
        """Whether any sanity check failed."""
        return any(check.passed is False for check in self.checks)

    def to_dict(self) -> dict:
        """JSON-ready dictionary (results carry their metric key)."""
        report = asdict(self)
        for result, row in zip(self.results, report["results"], strict=True):
            row["key"] = result.key
        report["gradient_masking_suspected"] = self.gradient_masking_suspected
        return report

    def table(self) -> Table:
        """Rich table of standard vs robust image (and pixel) AUROC per attack, sanity checks in the caption."""
        show_pixel = self.clean_pixel_auroc is not None
        table = Table(
            title=f"Robust evaluation of {self.model} ({self.norm}, {self.num_samples} test images)",
            caption_justify="left",
        )
        for column in ("Attack", "eps", "Steps", "Image AUROC") + (("Pixel AUROC",) if show_pixel else ()) + ("Note",):
            table.add_column(column, justify="left" if column in {"Attack", "Note"} else "right")
        table.add_row(
            "none (standard)",
            "0",
            "-",
            _percent(self.clean_image_auroc),
            *_pixel(show_pixel, self.clean_pixel_auroc),
            "",
        )
        for result in self.results:
            note = result.reason if result.status != "ok" else ("sanity check" if result.role == "sanity" else "")
            table.add_row(
                result.attack,
                format_eps(result.eps, result.norm),
                "-" if result.steps is None else str(result.steps),
                _percent(result.image_auroc),
                *_pixel(show_pixel, result.pixel_auroc),
                note,
            )
        marks = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[yellow]n/a[/]"}
        lines = [f"{marks[check.passed]} {check.name}: {check.detail}" for check in self.checks]
        if self.gradient_masking_suspected:
            lines.append("[bold red]Possible gradient masking: robust AUROC above is likely an overestimate.[/]")
        table.caption = "\n".join(lines)
        return table

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.csv`` into ``directory`` atomically; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / "report.json", directory / "report.csv"
        write_atomic(json_path, json.dumps(self.to_dict(), indent=2, allow_nan=True))
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["model", "attack", "norm", "eps", "steps", "image_auroc", "pixel_auroc", "status", "role"])
        writer.writerow(
            [self.model, "none", self.norm, 0.0, "", self.clean_image_auroc, self.clean_pixel_auroc, "ok", "clean"]
        )
        for result in self.results:
            writer.writerow(
                [
                    self.model,
                    result.attack,
                    result.norm,
                    result.eps,
                    result.steps,
                    result.image_auroc,
                    result.pixel_auroc,
                    result.status,
                    result.role,
                ]
            )
        write_atomic(csv_path, rows.getvalue())
        return json_path, csv_path


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``content`` to a temporary file next to ``path``, then rename it over ``path`` (``os.replace``)."""
    mode = "wb" if isinstance(content, bytes) else "w"
    with tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(content)
        temporary = Path(file.name)
    os.replace(temporary, path)


def format_eps(eps: float, norm: str) -> str:
    """``2/255`` for L_inf radii that are whole multiples of 1/255 below 1, ``0.2`` style otherwise."""
    steps_of_255 = eps * 255
    if norm == "Linf" and eps < 1 and abs(steps_of_255 - round(steps_of_255)) < 1e-6:
        return f"{round(steps_of_255)}/255"
    return f"{eps:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _pixel(show: bool, value: float | None) -> tuple[str, ...]:
    return (_percent(value),) if show else ()


def sanity_checks(
    report: RobustReport,
    near_zero: float,
    tolerance: float,
    large_eps: AttackResult | None,
    more_steps: tuple[AttackResult, AttackResult] | None,
    square: AttackResult | None,
) -> list[SanityCheck]:
    """Carlini et al. (2019) checks on a report's results.

    Args:
        report: the report with the configured attack runs.
        near_zero: AUROC that a very large eps must reach (or go below).
        tolerance: slack for statistical noise when comparing AUROC values.
        large_eps: the run at a very large eps, if it was made.
        more_steps: (run with the configured steps, run with more steps) at the same eps, if made.
        square: a Square run at the largest configured eps, if made.
    """
    attacks = [result for result in report.results if result.role == "attack" and result.image_auroc is not None]
    checks = [_monotone_in_eps(report.clean_image_auroc, attacks, tolerance)]
    if more_steps is not None and None not in (more_steps[0].image_auroc, more_steps[1].image_auroc):
        fewer, more = more_steps
        checks.append(
            SanityCheck(
                "AUROC does not increase with steps",
                more.image_auroc <= fewer.image_auroc + tolerance,
                f"{fewer.attack} at eps {format_eps(fewer.eps, fewer.norm)}: {_percent(fewer.image_auroc)} with "
                f"{fewer.steps} steps, {_percent(more.image_auroc)} with {more.steps}",
            )
        )
    if large_eps is not None and large_eps.image_auroc is not None:
        checks.append(
            SanityCheck(
                "very large eps drives AUROC to near 0",
                large_eps.image_auroc <= near_zero,
                f"{large_eps.attack} at eps {format_eps(large_eps.eps, large_eps.norm)}: "
                f"{_percent(large_eps.image_auroc)} (expected <= {_percent(near_zero)})",
            )
        )
    white_box = [r for r in attacks if not r.attack.endswith("Square") and r.eps == square.eps] if square else []
    if square is not None and square.image_auroc is not None and white_box:
        best = min(white_box, key=lambda result: result.image_auroc)
        checks.append(
            SanityCheck(
                "black-box Square does not beat white-box attacks",
                square.image_auroc >= best.image_auroc - tolerance,
                f"Square {_percent(square.image_auroc)} vs {best.attack} {_percent(best.image_auroc)} "
                f"at eps {format_eps(square.eps, square.norm)}",
            )
        )
    return checks


def _monotone_in_eps(clean_auroc: float, attacks: list[AttackResult], tolerance: float) -> SanityCheck:
    violations = []
    for name in dict.fromkeys(result.attack for result in attacks):
        curve = [(0.0, clean_auroc), *sorted((r.eps, r.image_auroc) for r in attacks if r.attack == name)]
        violations += [
            f"{name}: {_percent(low)} at {eps_low:.4g} < {_percent(high)} at {eps_high:.4g}"
            for (eps_low, low), (eps_high, high) in itertools.pairwise(curve)
            if high > low + tolerance
        ]
    return SanityCheck(
        "AUROC does not increase with eps",
        not violations if attacks else None,
        "; ".join(violations) or ("holds for every attack" if attacks else "no successful attack run"),
    )
