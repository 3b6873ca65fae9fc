"""Leaderboard outputs from recorded cells: rows (never an empty cell), the files, the JSON schema, the cell cache."""

import copy
import csv
import json
import logging
from pathlib import Path

import pytest

from anomalib_robust.evaluation.report import AttackResult
from anomalib_robust.leaderboard.cache import CellCache, cell_key
from anomalib_robust.leaderboard.output import entries, markdown, rows, validate_entry, write_leaderboard


def test_failed_and_unattackable_cells_get_a_row_with_the_reason(make_cell) -> None:
    unattackable = AttackResult("EOT-PGD", "Linf", 2 / 255, status="not attackable", reason="score has no gradient")
    cells = [make_cell(), make_cell(model="Draem", status="error"), make_cell(model="Cfa", results=[unattackable])]
    table = rows(cells)
    assert [(row["model"], row["status"]) for row in table] == [
        ("Padim", "ok"), ("Draem", "error"), ("Cfa", "not attackable"),
    ]  # fmt: skip
    assert table[0]["robust_image_auroc"] == 0.4 and table[0]["standard_image_auroc"] == 0.9
    assert table[1]["reason"] == "RuntimeError: out of memory" and table[1]["robust_image_auroc"] is None
    assert table[2]["reason"] == "score has no gradient"
    text = markdown(table)
    assert "| Padim | trouser | Linf 2/255 | EOT-PGD | 90.0 ± 1.0 | 40.0 ± 5.0 |" in text
    assert "error: RuntimeError: out of memory" in text
    assert "not attackable: score has no gradient" in text


def test_a_zero_spread_over_repeats_is_shown_and_one_scoring_has_none(make_cell) -> None:
    agreeing = AttackResult("EOT-PGD", "Linf", 2 / 255, steps=2, image_auroc=0.4, image_auroc_std=0.0)
    repeated = make_cell(results=[agreeing])
    deterministic = {**make_cell(model="Stfpm", results=[agreeing]), "eval_repeats": 1, "standard_image_auroc_std": 0.0}
    repeated_line, deterministic_line = markdown(rows([repeated, deterministic])).splitlines()[2:]
    assert "| 90.0 ± 1.0 | 40.0 ± 0.0 |" in repeated_line
    assert "| 90.0 | 40.0 |" in deterministic_line


def test_an_unconverged_cell_is_marked_not_ranked_as_converged(make_cell) -> None:
    unconverged = AttackResult("EOT-PGD", "Linf", 2 / 255, steps=2, image_auroc=0.4, converged=False)
    converged = AttackResult("EOT-PGD", "Linf", 2 / 255, steps=2, image_auroc=0.3, converged=True)
    table = rows([make_cell(results=[unconverged]), make_cell(model="Stfpm", results=[converged])])
    assert [row["converged"] for row in table] == [False, True]
    first, second = markdown(table).splitlines()[2:]
    assert "40.0 ± 0.0 (not converged)" in first and "not converged" not in second


def test_sanity_runs_are_not_rows(make_cell) -> None:
    sanity = AttackResult("Square", "Linf", 2 / 255, image_auroc=0.5, role="sanity")
    attack = AttackResult("EOT-PGD", "Linf", 2 / 255, image_auroc=0.3)
    assert [row["attack"] for row in rows([make_cell(results=[attack, sanity])])] == ["EOT-PGD"]


def test_write_leaderboard_writes_every_output(make_cell, tmp_path: Path) -> None:
    (tmp_path / "entries").mkdir()
    (tmp_path / "entries" / "Gone.json").write_text("{}")  # a model of an earlier YAML
    purified = make_cell(model="Purified(Padim, DiffPure p=25)", norm="L2", eps=0.2)
    cells = [make_cell(), make_cell(category="bag"), purified]
    paths = write_leaderboard(cells, tmp_path, show=True)
    with (tmp_path / "leaderboard.csv").open() as file:
        assert [row["category"] for row in csv.DictReader(file)] == ["trouser", "bag", "trouser"]
    assert sorted(path.name for path in (tmp_path / "entries").iterdir()) == [
        "Padim.json", "Purified_Padim_DiffPure_p=25.json",
    ]  # fmt: skip
    for name in ("robust_vs_standard", "auroc_vs_eps"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    entry = validate_entry(json.loads((tmp_path / "entries" / "Padim.json").read_text()))
    assert [cell["category"] for cell in entry["cells"]] == ["trouser", "bag"]
    assert entry["threat_models"] == [{"norm": "Linf", "eps": [2 / 255]}]
    assert entry["cells"][0]["versions"]["anomalib"] is not None


def test_entries_of_failed_cells_validate(make_cell) -> None:
    entry = entries([make_cell(status="error")])["Padim"]
    assert entry["cells"][0]["results"] == [] and entry["cells"][0]["standard_image_auroc"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e["cells"][0].pop("versions"), r"entry\.cells\[0\]\.versions: missing"),
        (lambda e: e["cells"][0].update(seed="0"), r"entry\.cells\[0\]\.seed: expected int, got '0'"),
        (lambda e: e["cells"][0].update(seed=True), r"entry\.cells\[0\]\.seed: expected int, got True"),
        (lambda e: e["cells"][0]["results"][0].update(image_auroc="0.4"), r"results\[0\]\.image_auroc: expected float"),
        (lambda e: e["threat_models"][0].update(eps=0.1), r"entry\.threat_models\[0\]\.eps: expected a list"),
        (lambda e: e.update(cells={}), r"entry\.cells: expected a list"),
        (lambda e: e.update(schema_version=2), r"schema 'anomalib-robust/leaderboard-entry' v2, expected"),
    ],
)  # fmt: skip
def test_invalid_entries_fail_naming_the_key(make_cell, change, message: str) -> None:
    entry = copy.deepcopy(entries([make_cell()])["Padim"])
    validate_entry(copy.deepcopy(entry))
    change(entry)
    with pytest.raises(ValueError, match=message):
        validate_entry(entry)


def test_cell_key_is_the_configuration() -> None:
    description = {"model": {"class_path": "Padim", "init_args": {"a": 1, "b": [1, 2]}}, "eps": (0.1,)}
    reordered = {"eps": [0.1], "model": {"init_args": {"b": (1, 2), "a": 1}, "class_path": "Padim"}}
    assert cell_key(description) == cell_key(reordered)
    assert cell_key(description) != cell_key({**description, "eps": [0.2]})


def test_cache_round_trip_and_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = CellCache(tmp_path / "cells")
    assert cache.get("abc") is None
    cache.put("abc", {"status": "ok", "eps": (0.1,)})
    assert cache.get("abc") == {"status": "ok", "eps": [0.1]}
    cache.path("broken").write_text('{"status": ')  # a run killed mid-write by something other than write_atomic
    cache.path("cut").write_bytes('{"sanity": "é"}'.encode()[:13])  # cut inside a character: not even UTF-8
    with caplog.at_level(logging.WARNING):
        assert cache.get("broken") is None and cache.get("cut") is None
    assert str(cache.path("broken")) in caplog.text and str(cache.path("cut")) in caplog.text
