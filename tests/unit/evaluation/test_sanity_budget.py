"""The sanity checks' budget and pairing: planned passes equal the detector's actual calls, the budget holds, the paired
runs attack whole batches with the configured run's seeds (so a sanity run with the configured settings reproduces the
configured run), Square keeps its queries and draws on fewer images, the report states every budget."""

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

from anomalib_robust.attacks.detector import RANDOMNESS_SEEDS
from anomalib_robust.evaluation import RobustEvaluator, RobustReport, planning
from anomalib_robust.evaluation.budget import (
    SQUARE_IMAGES,
    Passes,
    fit_square,
    gradient_check_cost,
    gradient_check_passes,
    run_cost,
    stratified_subset,
    whole_batches,
)
from anomalib_robust.evaluation.metrics import PairedDifference
from anomalib_robust.evaluation.planning import (
    GRADIENT_CHECK_DIRECTIONS,
    GRADIENT_CHECK_IMAGES,
    GRADIENT_CHECK_STEPS,
    LARGE_EPS_STEPS,
)
from anomalib_robust.evaluation.report import AttackResult
from anomalib_robust.evaluation.sanity import Convergence, sanity_checks
from anomalib_robust.evaluation.sanity_wiring import RANDOMNESS_CHECK_IMAGES

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
        if result.role == "worst_case":  # computed from the other runs' scores: no pass of its own
            continue
        total += Passes(result.forward_passes + report.eval_repeats, result.backward_passes) * result.num_images
    images = min(GRADIENT_CHECK_IMAGES, report.num_samples)
    return total, gradient_check_passes(images, GRADIENT_CHECK_DIRECTIONS, GRADIENT_CHECK_STEPS)


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
    scorings = len(RANDOMNESS_SEEDS) * min(RANDOMNESS_CHECK_IMAGES, report.num_samples)
    randomness_check = 0 if noise else scorings  # undeclared noise?
    assert (model.forward_images, model.backward_images) == (randomness_check + runs.forward + gradient.forward,
                                                             runs.backward + gradient.backward)  # fmt: skip
    planned_cost = report.num_samples * report.eval_repeats + report.configured_cost + report.sanity_cost
    assert runs.cost + gradient_check_cost(gradient) == pytest.approx(planned_cost)
    if report.sanity_budget is None:  # full sanity runs: every image, well beyond the default budget
        assert report.sanity_images == 60 and report.sanity_cost > 3 * report.configured_cost
    else:
        # within the budget, but for what one batch of the very-large-eps runs costs beyond their half of it, Square on
        # its fewest images beyond the rest, and the convergence run on every image on top
        limit = report.sanity_budget * report.configured_cost
        sanity = [r for r in report.results if r.role == "sanity" and not r.attack.endswith("Square")]
        convergence = next(r for r in sanity if r.eps < 0.1)
        large = [r for r in sanity if r.eps > 0.1]
        square = next(r for r in report.results if r.role == "sanity" and r.attack.endswith("Square"))
        half = (limit - gradient_check_cost(gradient)) / 2
        large_cost = sum(run_cost(r, report.eval_repeats) for r in large)
        square_cost = run_cost(square, report.eval_repeats)
        overflow = max(0.0, large_cost - half)
        if square.num_images == SQUARE_IMAGES:
            overflow += max(0.0, square_cost - (2 * half - min(large_cost, half)))
        on_top = run_cost(convergence, report.eval_repeats)
        assert report.sanity_cost <= (limit + overflow + on_top) * 1.0001
        assert len(large) == 2 and convergence.num_images == report.sanity_images == 60
        assert all(r.num_images < 60 for r in large)


def test_square_keeps_its_queries_and_draws_and_concludes_on_fewer_images() -> None:
    settings = {"attacks": ["pgd"], "eot_samples": 2, "eval_repeats": 2, "steps": 6}
    roomy, _ = _counted(0.05, ToyTestSet(count=60), n_queries=50, sanity_budget=2.0, **settings)
    tight, _ = _counted(0.05, ToyTestSet(count=40), n_queries=300, **settings)
    full, _ = _counted(0.05, ToyTestSet(count=20), n_queries=50, sanity_budget=None, **settings)
    squares = [next(r for r in report.results if r.attack.endswith("Square")) for report in (roomy, tight, full)]
    assert [square.draws for square in squares] == [2, 2, 2]  # a randomised detector keeps the attacker's draws
    assert [square.queries for square in squares] == [50, 300, 50]  # the configured queries, always
    assert SQUARE_IMAGES < squares[0].num_images < 60  # the images shrink to the budget
    assert squares[1].num_images == SQUARE_IMAGES and squares[2].num_images == 20  # to no fewer than 8
    check = next(check for check in tight.checks if check.name.startswith("black-box Square"))
    assert check.passed is True, check.detail  # concludes: a pass, and what it was earned on
    assert f"on the same {SQUARE_IMAGES} images, Square with 300 queries x 2 draws" in check.detail
    assert "points is excluded" in check.detail
    large = [next(r for r in report.results if r.role == "sanity" and r.eps > 0.1) for report in (tight, full)]
    assert [result.steps for result in large] == [LARGE_EPS_STEPS, max(6, LARGE_EPS_STEPS)]
    assert fit_square(allowance=1e6, total_images=60, per_image=503.0) == 60
    assert fit_square(allowance=-100.0, total_images=60, per_image=503.0) == SQUARE_IMAGES
    assert fit_square(allowance=-100.0, total_images=5, per_image=503.0) == 5


def test_paired_runs_attack_whole_batches_of_both_classes() -> None:
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]
    labels = torch.tensor([0] * 9 + [1] * 2)
    assert whole_batches(batches, labels, 3).tolist() == [0, 1, 2, 9, 10]  # the anomalous batch is added
    assert whole_batches(batches, labels, 0).numel() == 5  # at least one batch
    assert whole_batches(batches, labels, 11).tolist() == list(range(11))


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_a_sanity_run_with_the_configured_settings_reproduces_the_configured_run(
    noise: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the convergence factor at 1 the convergence run has the configured run's settings, images, random start,
    draws and scoring noise: its AUROC equals the configured run's on those images, and the difference is exactly 0.
    This is what makes the convergence check paired."""
    monkeypatch.setattr(planning, "CONVERGENCE_FACTOR", 1)
    dataset = ToyTestSet(count=40)
    settings = {"attacks": ["pgd"], "eps": 0.02, "steps": 3, "eot_samples": 2, "n_queries": 20, "num_grid_images": 0}
    report, _ = RobustEvaluator(**settings).evaluate(ToyDetector(noise=noise), [loader(dataset, batch_size=8)])
    convergence = next(r for r in report.results if r.role == "sanity" and r.eps == 0.02 and r.steps)
    baseline = next(r for r in report.baselines if r.num_images == convergence.num_images and r.eps == 0.02)
    assert convergence.num_images == 40  # every image, in the configured run's batches
    assert convergence.image_auroc == baseline.image_auroc
    assert convergence.image_auroc_std == baseline.image_auroc_std
    check = next(check for check in report.checks if check.name.startswith("converged"))
    assert check.passed is True and "paired difference +0.0 points" in check.detail


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
    assert min(result.num_images for result in sanity) < 40 and all(result.image_auroc is not None for result in sanity)


def test_report_states_every_budget(tmp_path: Path) -> None:
    report, _ = _counted(0.05, ToyTestSet(count=40), attacks=["pgd"], eot_samples=4, eval_repeats=2, n_queries=5000)
    console = Console(record=True, width=250)
    console.print(report.table())
    text = console.export_text()
    square = next(result for result in report.results if result.attack.endswith("Square"))
    assert f"{square.queries} queries x 4 draws, {square.num_images} of 40 images" in text
    assert "3 steps x 4 draws" in text and "6 steps x 8 draws" in text and "budget 1.5x" in text
    assert all(check.budget for check in report.checks)
    report.write(tmp_path)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["sanity_budget"] == 1.5 and written["sanity_images"] == report.sanity_images
    sanity_rows = [row for row in written["results"] if row["role"] == "sanity"]
    assert {row["draws"] for row in sanity_rows} == {4, 8}
    rows = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    square_row = next(row for row in rows if row["attack"].endswith("Square"))
    assert (square_row["images"], square_row["draws"], square_row["queries"]) == (str(square.num_images), "4",
                                                                                    str(square.queries))  # fmt: skip
    assert int(square_row["forward_passes"]) == square.forward_passes > 0


def test_bad_sanity_budgets_are_named() -> None:
    for value in (0, -1.0, math.nan, math.inf, "2", True):
        with pytest.raises(ValueError, match="sanity_budget must be a finite number > 0"):
            RobustEvaluator(sanity_budget=value)


def test_a_budget_too_small_runs_the_smallest_sanity_runs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    """The gradient checks alone can exceed a small evaluation's allowance: the checks still run, over budget, the
    very-large-eps runs on one batch and Square on its fewest images with its queries."""
    with caplog.at_level(logging.WARNING, logger="anomalib_robust.evaluation.planning"):
        report, _ = RobustEvaluator(sanity_budget=1e-3, **QUICK).evaluate(ToyDetector(), [loader(ToyTestSet())])
    assert "exceeds the budget" in caplog.text
    square = next(result for result in report.results if result.attack.endswith("Square"))
    assert square.num_images == min(SQUARE_IMAGES, report.num_samples)
    assert report.sanity_cost / report.configured_cost > 1e-3
    large_eps = next(check for check in report.checks if check.name.startswith("very large eps"))
    assert large_eps.passed is not None or "anomalous images cannot reach that level" in large_eps.detail  # one batch
    assert all(check.passed is not None for check in report.checks if check is not large_eps)


def test_an_attack_that_has_not_converged_is_reported_as_such() -> None:
    """A step size fixed at a quarter of eps: one step leaves the brightness score's AUROC at 100 %, two steps (the
    convergence run) lower it by about 37 points, far beyond the paired interval. The check fails, the configured run
    is marked unconverged, and the report says so next to its number."""
    dataset = ToyTestSet(count=40)
    evaluator = RobustEvaluator(attacks=["pgd"], eps=0.04, steps=1, alpha=0.01, n_queries=20, num_grid_images=0,
                                sanity_budget=None)  # fmt: skip
    report, _ = evaluator.evaluate(ToyDetector(), [loader(dataset, batch_size=8)])
    check = next(check for check in report.checks if check.name.startswith("converged"))
    configured = report.results[0]
    assert check.passed is False and "not converged" in check.detail and "steps >= 2" in check.detail
    assert configured.converged is False and report.gradient_masking_suspected
    console = Console(record=True, width=250)
    console.print(report.table())
    assert "not converged (see the sanity checks)" in console.export_text()


def test_more_steps_that_raise_auroc_are_a_broken_attack() -> None:
    report = RobustReport("Toy", "Linf", 1, 20, clean_image_auroc=0.9)
    fewer = AttackResult("PGD", "Linf", 0.01, steps=10, image_auroc=0.3, num_images=20)
    more = AttackResult("PGD", "Linf", 0.01, steps=20, image_auroc=0.5, num_images=20, role="sanity")
    raised = Convergence(fewer, more, PairedDifference(0.2, 0.1, 0.3, 0.95))
    inside = Convergence(fewer, more, PairedDifference(0.01, -0.015, 0.04, 0.95))
    (_, broken), (_, fine) = (sanity_checks(report, 0.02, convergence=c) for c in (raised, inside))
    assert broken.passed is False and "broken" in broken.detail
    assert fine.passed is True and raised.converged(0.02) and raised.broken(0.02)


@pytest.mark.parametrize(
    ("low", "high", "verdict", "says"),
    [
        (-0.015, 0.01, True, "a drop of more than 1.5 points is excluded on 20 images"),
        (0.001, 0.01, True, "a drop of more than 0.0 points is excluded on 20 images"),
        (-0.05, 0.01, None, "inconclusive: a drop of up to 5.0 points is not excluded on 20 images"),
        (-0.05, -0.019, None, "inconclusive: a drop of up to 5.0 points"),  # a drop, not shown beyond the slack
        (-0.08, -0.03, False, "not converged"),
    ],
)
def test_convergence_passes_only_when_it_excludes_a_drop_beyond_the_tolerance(
    low: float, high: float, verdict: bool | None, says: str
) -> None:
    """A pass states the drop it excludes; an interval too wide to exclude a drop beyond the slack is inconclusive,
    never a pass; a drop beyond the slack all over the interval fails."""
    report = RobustReport("Toy", "Linf", 1, 20, clean_image_auroc=0.9)
    fewer = AttackResult("PGD", "Linf", 0.01, steps=10, image_auroc=0.3, num_images=20)
    more = AttackResult("PGD", "Linf", 0.01, steps=20, image_auroc=0.28, num_images=20, role="sanity")
    convergence = Convergence(fewer, more, PairedDifference((low + high) / 2, low, high, 0.95))
    check = next(check for check in sanity_checks(report, 0.02, convergence=convergence)
                 if check.name.startswith("converged"))  # fmt: skip
    assert check.passed is verdict and says in check.detail
    assert convergence.excluded_drop == max(0.0, -low)


def test_the_report_states_the_drop_the_convergence_check_excludes(tmp_path: Path) -> None:
    """The configured run paired with the convergence run carries the verdict and the drop it excludes, in the table
    and in report.json."""
    report, _ = RobustEvaluator(attacks=["pgd"], eps=0.02, steps=3, n_queries=20, num_grid_images=0).evaluate(
        ToyDetector(), [loader(ToyTestSet(count=24))]
    )
    configured = report.results[0]
    check = next(check for check in report.checks if check.name.startswith("converged"))
    assert configured.converged is check.passed is True and configured.excluded_drop is not None
    excluded = f"a drop of more than {100 * configured.excluded_drop:.1f} points"
    assert f"{excluded} is excluded on 24 images" in check.detail
    console = Console(record=True, width=250)
    console.print(report.table())
    assert f"converged: {excluded} excluded" in console.export_text()
    report.write(tmp_path)
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["results"][0]["excluded_drop"] == configured.excluded_drop
    assert excluded in next(c["detail"] for c in written["checks"] if c["name"].startswith("converged"))
