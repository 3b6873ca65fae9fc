"""Merge leaderboard runs: the JSON entries of several run directories (several machines, CI jobs) into one table.

Every entry is validated against :data:`~anomalib_robust.leaderboard.output.ENTRY_SCHEMA`. Entries are comparable only
if they were measured at the same threat models with the same package versions
(:data:`~anomalib_robust.evaluation.provenance.PACKAGES`); otherwise the merge fails naming the two sources, unless
``allow_mixed`` asks for the mixed table. The same cell (same configuration and code, so the same cell key) found in
several runs is kept once, a finished copy before a failed one; two different configurations of the same model,
category, seed and threat model, or one configuration run by different code (another git commit or uncommitted
changes), are a conflict, kept both only with ``allow_mixed``.

Example:
    >>> merged = merge_runs(["runs/machine_a", "runs/machine_b"], "runs/merged")  # doctest: +SKIP
    >>> sorted({cell["category"] for cell in merged["cells"]})  # doctest: +SKIP
    ['bag', 'trouser']
"""

import json
from pathlib import Path

from anomalib_robust.evaluation.provenance import PACKAGES
from anomalib_robust.leaderboard.output import validate_entry, write_leaderboard


class MergeError(ValueError):
    """Entries that cannot go into one leaderboard (different threat models or versions, conflicting cells)."""


def entry_files(sources: list[str | Path]) -> list[Path]:
    """The entry files of ``sources``: a run directory contributes ``entries/*.json``, a file itself."""
    if not sources:
        msg = "--merge: expected at least one run directory or entry file"
        raise ValueError(msg)
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted((source / "entries").glob("*.json"))
            if not found:
                msg = f"--merge: {str(source)!r} has no entries/*.json (is it a leaderboard run directory?)"
                raise FileNotFoundError(msg)
            files += found
        elif source.is_file():
            files.append(source)
        else:
            msg = f"--merge: no such run directory or entry file {str(source)!r}"
            raise FileNotFoundError(msg)
    return files


def load_entry(path: Path) -> dict:
    """The validated entry in ``path``."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        msg = f"{path}: not JSON ({error})"
        raise ValueError(msg) from error
    return validate_entry(entry, str(path))


def _threat_set(entry: dict) -> list[tuple[str, tuple[float, ...]]]:
    return sorted((threat["norm"], tuple(float(e) for e in threat["eps"])) for threat in entry["threat_models"])


def _versions(cell: dict) -> dict:
    return {name: cell["versions"].get(name) for name in PACKAGES}


def check_compatible(entries: list[tuple[Path, dict]]) -> None:
    """Raise :class:`MergeError` if two entries differ in their threat models or in a package version."""
    first_path, first = entries[0]
    threats = _threat_set(first)
    for path, entry in entries:
        if _threat_set(entry) != threats:
            msg = (
                f"--merge: {path} has threat models {_threat_set(entry)}, {first_path} has {threats}; merge entries "
                "measured at the same threat models, or pass --allow_mixed true for a mixed table"
            )
            raise MergeError(msg)
    cells = [(path, cell) for path, entry in entries for cell in entry["cells"]]
    for path, cell in cells:
        reference_path, reference = cells[0]
        if _versions(cell) != _versions(reference):
            msg = (
                f"--merge: {path} ({cell['model']}, {cell['category']}) was measured with {_versions(cell)}, "
                f"{reference_path} ({reference['model']}, {reference['category']}) with {_versions(reference)}; "
                "pass --allow_mixed true to merge them anyway"
            )
            raise MergeError(msg)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def merge_cells(entries: list[tuple[Path, dict]], allow_mixed: bool = False) -> list[dict]:
    """The union of the entries' cells, each cell once (a finished copy preferred), in first-seen order."""
    by_key: dict[str, tuple[Path, dict]] = {}
    by_slot: dict[tuple, tuple[Path, str]] = {}
    for path, entry in entries:
        for cell in entry["cells"]:
            key = cell.get("cell") or _json(cell)
            slot = (cell["model"], cell["data"], cell["category"], cell["seed"], _json(cell["threat_model"]))
            if key in by_key:
                if by_key[key][1]["status"] != "ok" and cell["status"] == "ok":
                    by_key[key] = (path, cell)
                continue
            if slot in by_slot and not allow_mixed:
                msg = (
                    f"--merge: {path} and {by_slot[slot][0]} both hold {slot[0]} on {slot[1]}/{slot[2]} (seed "
                    f"{slot[3]}, {slot[4]}) with different settings or code; pass --allow_mixed true to keep both"
                )
                raise MergeError(msg)
            by_slot.setdefault(slot, (path, key))
            by_key[key] = (path, cell)
    return [cell for _, cell in by_key.values()]


def merge_runs(sources: list[str | Path], output_dir: str | Path, allow_mixed: bool = False) -> dict:
    """Merge the entries of ``sources`` and write the merged leaderboard (every output) into ``output_dir``."""
    entries = [(path, load_entry(path)) for path in entry_files(list(sources))]
    if not allow_mixed:
        check_compatible(entries)
    cells = merge_cells(entries, allow_mixed)
    output_dir = Path(output_dir)
    write_leaderboard(cells, output_dir, show=True)
    return {"output_dir": str(output_dir), "cells": cells}
