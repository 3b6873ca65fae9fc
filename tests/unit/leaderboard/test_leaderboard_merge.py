"""Merging runs: the union of their cells, each once, and an error for entries that are not comparable."""

import json
from pathlib import Path

import pytest

from anomalib_robust.evaluation.provenance import package_versions
from anomalib_robust.leaderboard import MergeError, RobustBenchmark, merge_runs, write_leaderboard


def _run(directory: Path, cells: list[dict]) -> Path:
    write_leaderboard(cells, directory)
    return directory


def test_merge_is_the_union_of_the_runs(make_cell, tmp_path: Path) -> None:
    shared_failed = make_cell(category="bag", status="error")
    first = _run(tmp_path / "a", [make_cell(), shared_failed])
    second = _run(tmp_path / "b", [make_cell(category="bag"), make_cell(model="Stfpm")])
    merged = merge_runs([first, second], tmp_path / "merged")
    assert [(cell["model"], cell["category"], cell["status"]) for cell in merged["cells"]] == [
        ("Padim", "trouser", "ok"), ("Padim", "bag", "ok"), ("Stfpm", "trouser", "ok"),
    ]  # the failed bag cell of the first run is replaced by the finished one of the second  # fmt: skip
    padim = json.loads((tmp_path / "merged" / "entries" / "Padim.json").read_text())
    assert [cell["category"] for cell in padim["cells"]] == ["trouser", "bag"]
    assert (tmp_path / "merged" / "entries" / "Stfpm.json").is_file()
    assert (tmp_path / "merged" / "leaderboard.md").read_text().count("| Padim |") == 2


def test_merge_takes_entry_files_and_keeps_a_cell_once(make_cell, tmp_path: Path) -> None:
    run = _run(tmp_path / "a", [make_cell()])
    merged = merge_runs([run, run / "entries" / "Padim.json"], tmp_path / "merged")
    assert len(merged["cells"]) == 1


def test_different_threat_models_are_refused_unless_asked(make_cell, tmp_path: Path) -> None:
    first = _run(tmp_path / "a", [make_cell()])
    second = _run(tmp_path / "b", [make_cell(category="bag", norm="L2", eps=0.2)])
    with pytest.raises(MergeError, match=r"threat models \[\('L2', \(0\.2,\)\)\].*--allow_mixed"):
        merge_runs([first, second], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert len(merge_runs([first, second], tmp_path / "merged", allow_mixed=True)["cells"]) == 2


def test_different_versions_are_refused_unless_asked(make_cell, tmp_path: Path) -> None:
    old = {**package_versions(), "anomalib": "1.0.0"}
    first = _run(tmp_path / "a", [make_cell()])
    second = _run(tmp_path / "b", [make_cell(category="bag", versions=old)])
    with pytest.raises(MergeError, match=r"'anomalib': '1\.0\.0'"):
        merge_runs([first, second], tmp_path / "merged")
    assert len(merge_runs([first, second], tmp_path / "merged", allow_mixed=True)["cells"]) == 2


def test_two_settings_of_one_cell_are_a_conflict(make_cell, tmp_path: Path) -> None:
    first = _run(tmp_path / "a", [make_cell()])
    second = _run(tmp_path / "b", [make_cell(settings={"steps": 100})])
    with pytest.raises(MergeError, match=r"both hold Padim on FashionMNIST/trouser .* different settings"):
        merge_runs([first, second], tmp_path / "merged")


def test_entries_keep_the_code_identity_and_merge_with_older_ones(make_cell, tmp_path: Path) -> None:
    dirty = {**make_cell(), "git_dirty": True, "git_diff": "0123456789abcdef"}
    first = _run(tmp_path / "a", [dirty])
    second = _run(tmp_path / "b", [make_cell(category="bag")])  # recorded before git_dirty and git_diff were
    merge_runs([first, second], tmp_path / "merged")
    padim = json.loads((tmp_path / "merged" / "entries" / "Padim.json").read_text())
    assert [(cell["category"], cell.get("git_dirty"), cell.get("git_diff")) for cell in padim["cells"]] == [
        ("trouser", True, "0123456789abcdef"), ("bag", None, None),
    ]  # fmt: skip


def test_bad_sources_are_named(make_cell, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--merge: .*empty' has no entries/\*\.json"):
        merge_runs([tmp_path / "empty"], tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="no such run directory or entry file"):
        merge_runs([tmp_path / "missing"], tmp_path / "merged")
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "anomalib-robust/leaderboard-entry"}))
    with pytest.raises(ValueError, match=r"bad\.json\.schema_version: missing"):
        merge_runs([tmp_path / "bad.json"], tmp_path / "merged")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--merge", "a"], "--output_dir: required with --merge"),
        (["--merge", "a", "--config", "x.yaml", "--output_dir", "m"], "--merge and --config: give one"),
        ([], "--config: required"),
    ],
)
def test_command_arguments_are_checked(argv: list[str], message: str) -> None:
    args = RobustBenchmark.get_parser().parse_args(argv)
    with pytest.raises(ValueError, match=message):
        RobustBenchmark().run(args)
