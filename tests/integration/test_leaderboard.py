"""The robustness leaderboard end to end: ``anomalib robust_benchmark`` on a two-model, two-category grid (tiny
settings), resume without refitting, ``python -m anomalib_robust.leaderboard --merge`` of two runs, the JSON schema,
and a typo in the YAML failing before anything runs."""

import copy
import csv
import json
from pathlib import Path

import pytest
import yaml
from anomalib.engine import Engine

from anomalib_robust.evaluation import execution
from anomalib_robust.leaderboard import LeaderboardConfigError, RobustBenchmark, RobustBenchmarkJob, validate_entry
from anomalib_robust.leaderboard.__main__ import main

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "configs/benchmark/robust_tiny.yaml").read_text())


def _config(categories: list[str], models: list[str]) -> dict:
    """The shipped tiny YAML, cut down: one threat model, 8 test images, a short Square cross-check."""
    config = copy.deepcopy(TINY)
    section = config["robust_benchmark"]
    entries = {entry["class_path"]: entry for entry in section["model"]["grid"]}
    section["model"]["grid"] = [entries[name] for name in models]
    section["data"]["init_args"].update(num_train=8, num_test=16, category={"grid": categories})
    section["robust_eval"].update(threat_models=[{"norm": "Linf", "eps": [2 / 255]}], n_queries=10)
    return config


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.cuda
def test_cells_fit_and_attack_with_accelerator_cuda(tmp_path: Path) -> None:
    """``accelerator: cuda`` in the YAML: anomalib's runner hands the job the GPU, which fits and attacks there, and
    the cells finish as they do on the CPU (the grid test below)."""
    config = _config(["trouser"], ["Padim", "AdvRAD"])
    config["accelerator"] = "cuda"
    RobustBenchmark().run(config=config, output_dir=tmp_path)
    with (tmp_path / "leaderboard.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["status"]) for row in rows] == [("Padim", "ok"), ("AdvRAD", "ok")]
    assert all(0.0 <= float(row["robust_image_auroc"]) <= float(row["standard_image_auroc"]) + 1e-9 for row in rows)
    assert all(row["sanity"] and row["num_test_images"] == "8" for row in rows)


def test_grid_writes_every_output_resumes_and_merges(
    anomalib_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    typo = _config(["trouser"], ["Padim"])
    typo["robust_benchmark"]["model"]["grid"][0]["class_path"] = "Padimm"
    with pytest.raises(LeaderboardConfigError, match=r"robust_benchmark\.model\.grid\[0\]\.class_path: unknown"):
        anomalib_cli("robust_benchmark", "--config", _write(typo, tmp_path / "typo.yaml"), cwd=tmp_path)
    assert not (tmp_path / "runs").exists()  # nothing ran

    config = _write(_config(["trouser", "bag"], ["Padim", "AdvRAD"]), tmp_path / "grid.yaml")
    output = anomalib_cli("robust_benchmark", "--config", config, "--output_dir", tmp_path / "a", cwd=tmp_path)
    run = tmp_path / "a"
    assert "Robustness leaderboard: 4 of 4 cells finished" in output
    with (run / "leaderboard.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["category"]) for row in rows] == [
        ("Padim", "trouser"), ("Padim", "bag"), ("AdvRAD", "trouser"), ("AdvRAD", "bag"),
    ]  # fmt: skip
    assert all(row["status"] == "ok" and row["attack"] != "-" for row in rows)
    assert all(0.0 <= float(row["robust_image_auroc"]) <= float(row["standard_image_auroc"]) + 1e-9 for row in rows)
    assert all(row["sanity"] and row["num_test_images"] == "8" for row in rows)
    advrad = [row for row in rows if row["model"] == "AdvRAD"]
    assert all(int(row["eot_draws"]) == 2 and int(row["eval_repeats"]) == 2 for row in advrad)
    assert (run / "leaderboard.md").read_text().count("| Padim |") == 2
    for plot in ("robust_vs_standard.png", "auroc_vs_eps.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    entries = {path.name: json.loads(path.read_text()) for path in (run / "entries").glob("*.json")}
    assert sorted(entries) == ["AdvRAD.json", "Padim.json"]
    for name, entry in entries.items():
        validate_entry(entry, name)
        assert entry["threat_models"] == [{"norm": "Linf", "eps": [2 / 255]}]
        assert {cell["category"] for cell in entry["cells"]} == {"trouser", "bag"}
    broken = copy.deepcopy(entries["Padim.json"])
    del broken["cells"][0]["results"][0]["image_auroc"]
    with pytest.raises(ValueError, match=r"cells\[0\]\.results\[0\]\.image_auroc: missing"):
        validate_entry(broken)

    # resume: every cell is cached, so no model is built or fitted again, and the leaderboard is the same
    def no_refit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(RobustBenchmarkJob, "_fit", no_refit)
    before = (run / "leaderboard.csv").read_text()
    assert main(["--config", str(config), "--output_dir", str(run)]) == 0
    assert (run / "leaderboard.csv").read_text() == before
    monkeypatch.undo()

    # a job interrupted after its fit, during its attacks (its cell lost, the kept fit there): evaluated again on the
    # kept model, unfitted, and the batches it had attacked are read back, not attacked again
    assert len(list((run / "models").glob("*.ckpt"))) == 4
    cells = {path: json.loads(path.read_text()) for path in (run / "cells").glob("*.json")}
    (padim_trouser,) = [path for path, cell in cells.items()
                        if (cell["model"], cell["category"]) == ("Padim", "trouser")]
    padim_trouser.unlink()
    attack_seeds, attack_batch = [], execution.attack_batch

    def killed_after_one_batch(*args: object) -> object:  # (run, images, labels, masks, seed)
        if attack_seeds and interrupt:
            raise KeyboardInterrupt
        attack_seeds.append((args[0].result.role, args[-1]))  # the convergence run shares its paired run's seed
        return attack_batch(*args)

    monkeypatch.setattr(Engine, "fit", no_refit)
    monkeypatch.setattr(execution, "attack_batch", killed_after_one_batch)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        main(["--config", str(config), "--output_dir", str(run)])
    assert len(list((run / "partial").glob("*/batch*_run*.pt"))) == 1
    interrupt, (first_seed,) = False, attack_seeds
    assert main(["--config", str(config), "--output_dir", str(run)]) == 0
    monkeypatch.undo()
    assert first_seed not in attack_seeds[1:], "the stored batch was attacked again"
    assert not (run / "partial").exists(), "a finished cell's stored batches are removed"
    again = json.loads(padim_trouser.read_text())
    for key in ("standard_image_auroc", "results", "fit_seconds"):  # fit_seconds: the kept fit's own time
        assert again[key] == cells[padim_trouser][key], key

    # a second run (another machine) on another category, then the merge of both: the union of their cells
    other = _write(_config(["sneaker"], ["Padim"]), tmp_path / "other.yaml")
    assert main(["--config", str(other), "--output_dir", str(tmp_path / "b")]) == 0
    assert main(["--merge", str(run), str(tmp_path / "b"), "--output_dir", str(tmp_path / "merged")]) == 0
    with (tmp_path / "merged" / "leaderboard.csv").open() as file:
        merged = {(row["model"], row["category"]) for row in csv.DictReader(file)}
    assert merged == {("Padim", "trouser"), ("Padim", "bag"), ("Padim", "sneaker"), ("AdvRAD", "trouser"),
                      ("AdvRAD", "bag")}  # fmt: skip
    padim = validate_entry(json.loads((tmp_path / "merged" / "entries" / "Padim.json").read_text()))
    assert sorted(cell["category"] for cell in padim["cells"]) == ["bag", "sneaker", "trouser"]
