"""The sanity checks' budget: planned passes equal the detector's actual calls, the budget holds, the subset keeps
both classes, comparisons use the same images, the report states every budget."""

import csv
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from evaluation_toys import CountingModel, ToyDetector, ToyTestSet, loader
from rich.console import Console
from torch.utils.data import Dataset

from anomalib_robust.evaluation import RobustEvaluator, rank_auroc
from anomalib_robust.evaluation.budget import (
    MIN_SANITY_IMAGES,
    Passes,
    fit_sanity,
    gradient_check_cost,
    stratified_subset,
)
from anomalib_robust.evaluation.evaluator import GRADIENT_CHECK_DIRECTIONS, GRADIENT_CHECK_IMAGES, LARGE_EPS_STEPS

QUICK = {"eps": [0.02, 0.04], "steps": 3, "num_grid_images": 0}


def _counted(noise: float, dataset: Dataset, **settings: object) -> tuple:
    detector = ToyDetector(noise=noise)
    detector.model = CountingModel(noise)
    report, _ = RobustEvaluator(**{**QUICK, **settings}).evaluate(detector, [loader(dataset)])
    return report, detector.model


def _planned(report: object) -> tuple[Passes, Passes]:
    """Passes the report says were planned: clean scoring and every run (attack + scoring); the gradient check."""
    total = Passes(forward=report.num_samples * report.eval_repeats)
    for result in report.results:
        total += Passes(result.forward_passes + report.eval_repeats, result.backward_passes) * result.num_images
    images = min(GRADIENT_CHECK_IMAGES, report.num_samples)
    return total, Passes(images * (1 + 2 * GRADIENT_CHECK_DIRECTIONS), images)


@pytest.mark.parametrize(
    ("noise", "settings"),
    [
        (0.05, {"attacks": ["pgd"], "eot_samples": 4, "eval_repeats": 2, "n_queries": 100}),
        (0.0, {"attacks": ["pgd", "apgd"], "restarts": 2, "n_queries": 60}),
        (0.05, {"attacks": ["pgd"], "eot_samples": 3, "eval_repeats": 2, "n_queries": 30, "sanity_budget": None}),
    ],
)
def test_planned_passes_equal_the_detector_calls_and_the_budget_holds(noise: float, settings: dict) -> None:
    report, model = _counted(noise, ToyTestSet(count=60), **settings)
    runs, gradient = _planned(report)
    assert (model.forward_images, model.backward_images) == (runs.forward + gradient.forward,
                                                             runs.backward + gradient.backward)  # fmt: skip
    planned_cost = report.num_samples * report.eval_repeats + report.configured_cost + report.sanity_cost
    assert runs.cost + gradient_check_cost(gradient) == pytest.approx(planned_cost)
    if report.sanity_budget is None:  # full sanity runs: every image, well beyond the default budget
        assert report.sanity_images == 60 and report.sanity_cost > 3 * report.configured_cost
    else:
        assert report.sanity_cost <= report.sanity_budget * report.configured_cost
        assert report.sanity_images < 60


def test_budget_fits_square_and_full_runs_keep_the_configured_budget() -> None:
    settings = {"attacks": ["pgd"], "eot_samples": 2, "eval_repeats": 2, "steps": 6}
    budgeted, _ = _counted(0.05, ToyTestSet(count=40), n_queries=5000, **settings)
    full, _ = _counted(0.05, ToyTestSet(count=20), n_queries=50, sanity_budget=None, **settings)
    budgeted_square, full_square = (next(r for r in run.results if r.attack.endswith("Square")) for run in (budgeted, full))
    assert (budgeted_square.draws, full_square.draws) == (1, 2)  # EOT is the attacker's tool, not the checker's
    assert budgeted_square.queries < 5000 and full_square.queries == 50  # Square shrinks to keep 16 images
    assert budgeted_square.num_images == budgeted.sanity_images == 16 and full_square.num_images == 20
    large = [max((r for r in report.results if r.role == "sanity"), key=lambda r: r.eps) for report in (budgeted, full)]
    assert [result.steps for result in large] == [LARGE_EPS_STEPS, 6]


def test_subset_is_evenly_spaced_within_each_class_and_keeps_both() -> None:
    indices = torch.arange(100, 154)
    labels = torch.tensor([0] * 50 + [1] * 4)
    subset = stratified_subset(indices, labels, 9)
    assert subset.tolist() == [100, 107, 114, 121, 128, 135, 142, 149, 150]
    assert torch.equal(stratified_subset(indices, labels, 54), indices)
    shuffled = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert set(shuffled[stratified_subset(torch.arange(10), shuffled, 2)].tolist()) == {0, 1}


class _Rare(Dataset):
    """40 toy images of which only 3 are anomalous, all at the end."""

    def __init__(self) -> None:
        items = ToyTestSet(count=80).items
        self.items = [item for item in items if not item.gt_label][:37] + [item for item in items if item.gt_label][:3]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> object:
        return self.items[index]


def test_sanity_runs_on_a_rare_class_still_measure_auroc() -> None:
    report, _ = RobustEvaluator(attacks=["pgd"], eps=0.02, steps=3, n_queries=200, num_grid_images=0).evaluate(
        ToyDetector(), [loader(_Rare())]
    )
    sanity = [result for result in report.results if result.role == "sanity"]
    assert report.sanity_images < 40 and all(result.image_auroc is not None for result in sanity)


def test_the_steps_comparison_uses_the_configured_run_on_the_same_images() -> None:
    """Deterministic brightness score: 3 L_inf PGD steps reach the corner x + eps (normal) / x - eps (anomalous)
    exactly, so the configured run's AUROC on the sanity subset is known."""
    dataset, eps = ToyTestSet(count=60), 0.02
    report, _ = RobustEvaluator(attacks=["pgd"], eps=eps, steps=3, n_queries=200, num_grid_images=0).evaluate(
        ToyDetector(), [loader(dataset)]
    )
    images = torch.stack([item.image for item in dataset.items])
    labels = torch.stack([item.gt_label for item in dataset.items])
    adversarial_scores = (images + eps * (1 - 2 * labels.float()).view(-1, 1, 1, 1)).mean(dim=(1, 2, 3))
    subset = stratified_subset(torch.arange(60), labels, report.sanity_images)
    (baseline,) = report.baselines
    configured = report.results[0]
    assert baseline.num_images == report.sanity_images == len(subset) < 60
    assert baseline.image_auroc == pytest.approx(rank_auroc(adversarial_scores[subset], labels[subset]))
    assert configured.image_auroc == pytest.approx(rank_auroc(adversarial_scores, labels))
    assert abs(baseline.image_auroc - configured.image_auroc) > 0.01  # the subset's AUROC is another number
    steps_check = next(check for check in report.checks if check.name == "AUROC does not increase with steps")
    assert f"{100 * baseline.image_auroc:.1f} with 3 steps" in steps_check.detail


def test_report_states_every_budget(tmp_path: Path) -> None:
    report, _ = _counted(0.05, ToyTestSet(count=40), attacks=["pgd"], eot_samples=4, eval_repeats=2, n_queries=5000)
    console = Console(record=True, width=250)
    console.print(report.table())
    text = console.export_text()
    square = next(result for result in report.results if result.attack == "Square")
    assert f"{square.queries} queries x 1 draw, 16 of 40 images" in text
    assert "3 steps x 4 draws" in text and "Sanity runs on 16 of 40 test images" in text and "budget 1.5x" in text
    assert all(check.budget for check in report.checks)
    report.write(tmp_path)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["sanity_budget"] == 1.5 and written["sanity_images"] == 16
    sanity_rows = [row for row in written["results"] if row["role"] == "sanity"]
    assert {(row["num_images"], row["draws"]) for row in sanity_rows} == {(16, 4), (16, 1)}
    rows = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    square_row = next(row for row in rows if row["attack"] == "Square")
    assert (square_row["images"], square_row["draws"], square_row["queries"]) == ("16", "1", str(square.queries))
    assert int(square_row["forward_passes"]) == square.forward_passes > 0


def test_bad_sanity_budgets_are_named() -> None:
    for value in (0, -1.0, math.nan, math.inf, "2", True):
        with pytest.raises(ValueError, match="sanity_budget must be a finite number > 0"):
            RobustEvaluator(sanity_budget=value)
    assert fit_sanity(allowance=1e6, total_images=60, per_image=80.0, square=(1.0, 3.0), queries=500) == (60, 500)


def test_a_budget_too_small_runs_the_smallest_sanity_runs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The gradient check alone can exceed a small evaluation's allowance: the checks still run, over budget."""
    with caplog.at_level(logging.WARNING, logger="anomalib_robust.evaluation.budget"):
        report, _ = RobustEvaluator(sanity_budget=1e-3, **QUICK).evaluate(ToyDetector(), [loader(ToyTestSet())])
    assert "exceed the budget" in caplog.text
    assert report.sanity_images == min(MIN_SANITY_IMAGES, report.num_samples)
    assert report.sanity_cost / report.configured_cost > 1e-3
    assert all(check.passed is not None for check in report.checks)
    assert fit_sanity(allowance=-100.0, total_images=8, per_image=24.0, square=(1.0, 3.0), queries=500) == (8, 10)
