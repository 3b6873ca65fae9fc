"""The leaderboard's outputs: ``leaderboard.csv``, ``leaderboard.md``, one JSON entry per model, plots, a rich table.

Rows: one per cell (model, datamodule category, threat model) and configured attack run at each eps, with the standard
and robust image AUROC (and pixel AUROC where the test set has masks), each with its standard deviation over the
evaluator's repeats, the attack and its budget, the sanity-check verdict, fit and attack time and the number of test
images. A failed cell has one row with its error; an attack run that could not run (``AttackResult.status`` ``"not
attackable"``, for instance a score with no gradient) has its row with the reason, never an empty cell.

The JSON entries (``entries/<model>.json``) follow :data:`ENTRY_SCHEMA` (checked by :func:`validate_entry`), so that
entries from different machines can be merged (:mod:`anomalib_robust.leaderboard.merge`).
"""

import csv
import io
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from anomalib_robust.evaluation.report import format_auroc, format_eps, write_atomic
from anomalib_robust.leaderboard.plots import plot_auroc_vs_eps, plot_robust_vs_standard

SCHEMA_NAME = "anomalib-robust/leaderboard-entry"
SCHEMA_VERSION = 1

ENTRY_SCHEMA: dict = {
    "schema": str,
    "schema_version": int,
    "model": str,
    "created": str,
    "threat_models": [{"norm": str, "eps": [float]}],
    "cells": [
        {
            "model": str, "data": str, "category": str, "seed": int, "status": str, "error": str,
            "threat_model": {"norm": str, "eps": [float]},
            "evaluator": dict,
            "versions": dict,
            "git_commit": (str, type(None)),
            "standard_image_auroc": (float, type(None)),
            "standard_image_auroc_std": (float, type(None)),
            "eot_samples": (int, type(None)),
            "eval_repeats": (int, type(None)),
            "num_test_images": (int, type(None)),
            "sanity": (str, type(None)),
            "fit_seconds": (float, type(None)),
            "attack_seconds": (float, type(None)),
            "results": [
                {
                    "attack": str, "norm": str, "eps": float, "target": str, "role": str, "status": str,
                    "reason": str, "budget": str, "draws": int, "steps": (int, type(None)),
                    "image_auroc": (float, type(None)), "image_auroc_std": float,
                    "pixel_auroc": (float, type(None)), "pixel_auroc_std": float,
                }
            ],
        }
    ],
}  # fmt: skip
"""The fixed shape of a JSON entry: key -> type (a tuple for alternatives, a one-item list for a list of that)."""

CELL_DEFAULTS = {
    "standard_image_auroc": None, "standard_image_auroc_std": None, "eot_samples": None, "eval_repeats": None,
    "num_test_images": None, "sanity": None, "fit_seconds": None, "attack_seconds": None, "results": [],
}  # fmt: skip
"""What a failed cell, which never got to the evaluation, holds in the entry."""

CSV_COLUMNS = (
    "model", "data", "category", "norm", "eps", "attack", "target", "standard_image_auroc", "standard_image_auroc_std",
    "robust_image_auroc", "robust_image_auroc_std", "standard_pixel_auroc", "standard_pixel_auroc_std",
    "robust_pixel_auroc", "robust_pixel_auroc_std", "budget", "eot_draws", "eval_repeats", "sanity", "status",
    "reason", "fit_seconds", "attack_seconds", "num_test_images", "converged",
)  # fmt: skip

AUROC_COLUMNS = ("standard_image_auroc", "robust_image_auroc", "standard_pixel_auroc", "robust_pixel_auroc")
"""The AUROC columns of a leaderboard row, each with a ``<column>_std``."""


def _check(value: object, schema: object, path: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {type(value).__name__}")
        for key, expected in schema.items():
            if key not in value:
                raise ValueError(f"{path}.{key}: missing")
            _check(value[key], expected, f"{path}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {type(value).__name__}")
        for index, item in enumerate(value):
            _check(item, schema[0], f"{path}[{index}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if float in types:
            types = (*types, int)  # JSON writes 1.0 as 1.0, but a user's eps may be an int
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{path}: expected {' or '.join(t.__name__ for t in types)}, got {value!r}")


def validate_entry(entry: dict, source: str = "entry") -> dict:
    """Check ``entry`` against :data:`ENTRY_SCHEMA`; the error names the key (``entry.cells[0].status: missing``)."""
    _check(entry, ENTRY_SCHEMA, source)
    if entry["schema"] != SCHEMA_NAME or entry["schema_version"] != SCHEMA_VERSION:
        found = f"{entry['schema']!r} v{entry['schema_version']}"
        msg = f"{source}: schema {found}, expected {SCHEMA_NAME!r} v{SCHEMA_VERSION}"
        raise ValueError(msg)
    return entry


def _entry_cell(cell: dict) -> dict:
    keys = set(ENTRY_SCHEMA["cells"][0]) | {"cell", "model_config", "data_config", "trainer", "checks", "notes",
                                            "standard_pixel_auroc", "standard_pixel_auroc_std", "git_dirty",
                                            "git_diff", "source"}  # fmt: skip
    merged = {**CELL_DEFAULTS, **cell}
    return {key: merged[key] for key in sorted(keys) if key in merged}


def entries(cells: list[dict]) -> dict[str, dict]:
    """One JSON entry per model (in first-seen order) holding its cells."""
    by_model: dict[str, list[dict]] = {}
    for cell in cells:
        by_model.setdefault(cell["model"], []).append(_entry_cell(cell))
    created = datetime.now(UTC).isoformat(timespec="seconds")
    result = {}
    for model, model_cells in by_model.items():
        threats = list({json.dumps(c["threat_model"], sort_keys=True): c["threat_model"] for c in model_cells}.values())
        result[model] = validate_entry({
            "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "model": model, "created": created,
            "threat_models": threats, "cells": model_cells,
        }, f"entry of {model}")  # fmt: skip
    return result


def rows(cells: list[dict]) -> list[dict]:
    """The leaderboard's rows (:data:`CSV_COLUMNS`): every configured attack run of every cell, one row for a failed
    cell (with its error) or a cell without attack runs."""
    table = []
    for cell in cells:
        base = {
            "model": cell["model"], "data": cell["data"], "category": cell["category"],
            "norm": cell["threat_model"]["norm"], "standard_image_auroc": cell.get("standard_image_auroc"),
            "standard_image_auroc_std": cell.get("standard_image_auroc_std"),
            "standard_pixel_auroc": cell.get("standard_pixel_auroc"),
            "standard_pixel_auroc_std": cell.get("standard_pixel_auroc_std"), "sanity": cell.get("sanity"),
            "eval_repeats": cell.get("eval_repeats"), "fit_seconds": cell.get("fit_seconds"),
            "attack_seconds": cell.get("attack_seconds"), "num_test_images": cell.get("num_test_images"),
            "status": cell["status"], "reason": cell.get("error", ""),
        }  # fmt: skip
        runs = [result for result in cell.get("results", []) if result["role"] == "attack"]
        if cell["status"] != "ok" or not runs:
            table.append({**base, "eps": ",".join(f"{e:.6g}" for e in cell["threat_model"]["eps"]), "attack": "-"})
            continue
        for result in runs:
            table.append({
                **base, "eps": result["eps"], "attack": result["attack"], "target": result["target"],
                "robust_image_auroc": result["image_auroc"], "robust_image_auroc_std": result["image_auroc_std"],
                "robust_pixel_auroc": result["pixel_auroc"], "robust_pixel_auroc_std": result["pixel_auroc_std"],
                "budget": result["budget"], "eot_draws": result["draws"], "status": result["status"],
                "reason": result["reason"], "converged": result.get("converged"),
            })  # fmt: skip
    return [{column: row.get(column) for column in CSV_COLUMNS} for row in table]


def _eps(row: dict) -> str:
    eps = row["eps"]
    return format_eps(eps, row["norm"]) if isinstance(eps, float) else str(eps)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(table_rows: list[dict]) -> str:
    """``leaderboard.md``: AUROCs in %, mean ± std over the evaluator's repeats."""
    header = ("model", "category", "threat", "attack", "standard", "robust", "standard pixel", "robust pixel",
              "budget", "sanity", "fit s", "attack s", "images", "status")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows:
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}".replace("|", "/")
        cells = (
            row["model"], row["category"], f"{row['norm']} {_eps(row)}", row["attack"],
            *(_auroc_cell(row, column) for column in AUROC_COLUMNS),
            row["budget"] or "-", row["sanity"] or "-", _seconds(row["fit_seconds"]),
            _seconds(row["attack_seconds"]), row["num_test_images"] or "-", status,
        )  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _auroc_cell(row: dict, column: str) -> str:
    """An AUROC of a row in %, the robust one marked when the convergence check found the attack unconverged."""
    text = format_auroc(row[column], row[f"{column}_std"] or 0.0, row["eval_repeats"])
    return f"{text} (not converged)" if column == "robust_image_auroc" and row.get("converged") is False else text


def _short_sanity(verdict: str | None) -> str:
    if verdict and verdict.startswith("FAIL"):
        return f"FAIL ({len(verdict.split(','))})"
    return verdict or "-"


def rich_table(table_rows: list[dict], title: str) -> Table:
    """The leaderboard in the terminal: one line per row, sanity failures counted (named in ``leaderboard.md``)."""
    table = Table(title=title)
    for column in ("model", "category", "threat", "attack", "standard", "robust", "sanity", "status"):
        table.add_column(
            column,
            justify="right" if column in {"standard", "robust"} else "left",
            no_wrap=column != "status",
            overflow="ellipsis",
        )
    for row in table_rows:
        table.add_row(
            row["model"], row["category"], f"{row['norm']} {_eps(row)}", row["attack"],
            format_auroc(row["standard_image_auroc"], row["standard_image_auroc_std"] or 0.0),
            format_auroc(row["robust_image_auroc"], row["robust_image_auroc_std"] or 0.0),
            _short_sanity(row["sanity"]),
            row["status"] if row["status"] == "ok" else f"{row['status']}: {row['reason']}",
        )  # fmt: skip
    return table


def _file_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", model).strip("_") + ".json"


def write_leaderboard(cells: list[dict], directory: Path, show: bool = False) -> dict[str, Path]:
    """Write every output of the leaderboard of ``cells`` into ``directory``; returns the paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    table_rows = rows(cells)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in table_rows)
    paths = {"csv": directory / "leaderboard.csv", "md": directory / "leaderboard.md"}
    write_atomic(paths["csv"], buffer.getvalue())
    write_atomic(paths["md"], markdown(table_rows))
    (directory / "entries").mkdir(exist_ok=True)
    for model, entry in entries(cells).items():
        path = directory / "entries" / _file_name(model)
        write_atomic(path, json.dumps(entry, indent=2, allow_nan=True))
        paths[f"entry:{model}"] = path
    for stale in (directory / "entries").glob("*.json"):  # a model no longer in the YAML: not in this leaderboard
        if stale not in paths.values():
            stale.unlink()
    paths["robust_vs_standard"] = plot_robust_vs_standard(table_rows, directory / "robust_vs_standard.png")
    paths["auroc_vs_eps"] = plot_auroc_vs_eps(table_rows, directory / "auroc_vs_eps.png")
    if show:
        finished = sum(cell["status"] == "ok" for cell in cells)
        title = f"Robustness leaderboard: {finished} of {len(cells)} cells finished ({directory})"
        console = Console()
        console = console if console.is_terminal else Console(width=160)  # a log file: the table without wrapping
        console.print(rich_table(table_rows, title))
    return paths
