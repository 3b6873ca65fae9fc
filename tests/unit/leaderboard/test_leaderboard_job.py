"""The leaderboard's job and pipeline: anomalib's runners, one job per (model, category), a failing cell recorded with
its error while the run goes on (and not cached, so a resume retries it)."""

import copy
import csv
import logging
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner

from anomalib_robust.evaluation.provenance import code_identity, code_key
from anomalib_robust.evaluation.report import RobustReport, SanityCheck
from anomalib_robust.leaderboard import RobustBenchmark, RobustBenchmarkJob, RobustBenchmarkJobGenerator
from anomalib_robust.leaderboard.config import model_label
from anomalib_robust.leaderboard.job import sanity_verdict

REPO = Path(__file__).resolve().parents[3]
TINY = yaml.safe_load((REPO / "configs/benchmark/robust_tiny.yaml").read_text())


def test_runners_are_anomalibs(monkeypatch: pytest.MonkeyPatch) -> None:
    runners = RobustBenchmark._setup_runners({"accelerator": ["cpu", "cuda"]})
    assert [type(runner) for runner in runners] == [SerialRunner, SerialRunner]  # one or no GPU: serial
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    runners = RobustBenchmark._setup_runners({"accelerator": ["cpu", "cuda"]})
    assert [type(runner) for runner in runners] == [SerialRunner, ParallelRunner]
    assert runners[1].n_jobs == 2 and runners[1].generator.job_class is RobustBenchmarkJob


def test_generator_yields_one_picklable_job_per_model_and_category() -> None:
    jobs = list(RobustBenchmarkJobGenerator("cpu")(TINY["robust_benchmark"]))
    assert len(jobs) == 4
    assert all(len(job.threat_models) == 2 for job in jobs)
    clone = pickle.loads(pickle.dumps(jobs[3]))  # the ParallelRunner sends jobs to spawned processes
    assert clone.group.data["init_args"]["category"] == "bag" and clone.group.model == jobs[3].group.model


def test_sanity_verdict() -> None:
    report = RobustReport(model="m", norm="Linf", eot_samples=1, num_samples=4, clean_image_auroc=0.9)
    assert sanity_verdict(report, enabled=False) == "off"
    assert sanity_verdict(report, enabled=True) == "n/a"
    report.checks = [SanityCheck("more steps", True, ""), SanityCheck("large eps", None, "")]
    assert sanity_verdict(report, enabled=True) == "pass"
    report.checks.append(SanityCheck("square", False, ""))
    assert sanity_verdict(report, enabled=True) == "FAIL: square"


def test_a_failing_cell_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    config = copy.deepcopy(TINY)
    section = config["robust_benchmark"]
    broken = {**section["model"]["grid"][0], "init_args": {"backbone": "no_such_backbone", "pre_trained": False}}
    section["model"]["grid"] = [broken, section["model"]["grid"][0]]
    section["data"]["init_args"].update(category="trouser", num_train=8, num_test=8)
    section["robust_eval"] = {
        "threat_models": [{"norm": "Linf", "eps": 2 / 255}], "steps": 1, "sanity_checks": False, "num_grid_images": 0,
    }  # fmt: skip
    results = RobustBenchmark().run(config=config, output_dir=tmp_path)
    assert [cell["status"] for cell in results["cells"]] == ["error", "ok"]
    assert "no_such_backbone" in results["cells"][0]["error"] and results["cells"][0]["traceback"]
    with (tmp_path / "leaderboard.csv").open() as file:
        table = list(csv.DictReader(file))
    assert [row["status"] for row in table] == ["error", "ok"] and "no_such_backbone" in table[0]["reason"]
    assert float(table[1]["robust_image_auroc"]) <= float(table[1]["standard_image_auroc"])
    assert len(list((tmp_path / "cells").glob("*.json"))) == 1  # only the finished cell is cached


def test_the_purified_padims_denoiser_reuses_the_advrad_rows_fit() -> None:
    """In the shipped ten-class grid, DiffPure's denoiser is the AdvRAD row's entry, so per class AdvRAD is fitted once
    (the fit takes most of the grid's time); another class or seed is another fit."""
    config = yaml.safe_load((REPO / "configs/benchmark/robust_fashion_mnist.yaml").read_text())
    jobs = list(RobustBenchmarkJobGenerator("cpu")(config["robust_benchmark"]))
    by_model = {}
    for job in jobs:
        by_model.setdefault(model_label(job.group.model), []).append(job)
    advrad, purified = by_model["AdvRAD"], by_model["Purified(Padim, DiffPure p=25)"]
    denoiser = purified[0].group.model["defense"]["denoiser"]
    assert purified[0]._fitted_path(denoiser) == advrad[0]._fitted_path(advrad[0].group.model)
    assert purified[1]._fitted_path(denoiser) != advrad[0]._fitted_path(advrad[0].group.model)  # another class
    assert purified[0]._fitted_path(purified[0].group.model) != advrad[0]._fitted_path(advrad[0].group.model)


def test_other_code_is_another_cell_and_another_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fix to an attack or a sanity check (other source or configs, another anomalib or torch), a rerun
    computes its cells and fits again instead of returning the old ones; the commit is recorded, not keyed on."""
    tiny = next(iter(RobustBenchmarkJobGenerator("cpu")(TINY["robust_benchmark"])))
    threat, entry = tiny.threat_models[0], tiny.group.model
    key, fitted = tiny._key(threat), tiny._fitted_path(entry)
    assert (tiny._key(threat), tiny._fitted_path(entry)) == (key, fitted)
    identity = code_identity()
    monkeypatch.setattr("anomalib_robust.leaderboard.job.loaded_code_identity", lambda: {**identity, "git_commit": "1"})
    assert (tiny._key(threat), tiny._fitted_path(entry)) == (key, fitted), "a docs-only commit keeps them"
    assert tiny._base_record(threat, key)["git_commit"] == "1"
    for other in (
        {**code_key(), "source": "0123456789abcdef"},
        {**code_key(), "versions": {**identity["versions"], "anomalib": "0.0.1"}},
    ):
        monkeypatch.setattr("anomalib_robust.leaderboard.job.loaded_code_key", lambda other=other: other)
        assert tiny._key(threat) != key and tiny._fitted_path(entry) != fitted, other


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_unreadable_cached_cells_and_fits_are_computed_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = copy.deepcopy(TINY)
    section = config["robust_benchmark"]
    section["model"]["grid"] = section["model"]["grid"][:1]
    section["data"]["init_args"].update(category="trouser", num_train=8, num_test=8)
    section["robust_eval"] = {
        "threat_models": [{"norm": "Linf", "eps": 2 / 255}], "steps": 1, "sanity_checks": False, "num_grid_images": 0,
    }  # fmt: skip
    (first,) = RobustBenchmark().run(config=config, output_dir=tmp_path)["cells"]
    (cell,) = (tmp_path / "cells").glob("*.json")
    (fit,) = (tmp_path / "models").glob("*.ckpt")
    for damage in ({cell: _halve, fit: _halve}, {cell: _halve, fit.with_suffix(".json"): Path.unlink}):
        for path, action in damage.items():
            action(path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            (again,) = RobustBenchmark().run(config=config, output_dir=tmp_path)["cells"]
        assert again["status"] == "ok" and not again["cached"], again["error"]
        assert again["results"] == first["results"], "fitted again from the same seed, evaluated again"
        warnings = {record.name: record.getMessage() for record in caplog.records}
        assert str(cell) in warnings["anomalib_robust.leaderboard.cache"]
        assert str(fit) in warnings["anomalib_robust.leaderboard.job"]
    assert RobustBenchmark().run(config=config, output_dir=tmp_path)["cells"][0]["cached"], "both rewritten"
