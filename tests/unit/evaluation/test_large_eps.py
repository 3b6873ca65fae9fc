"""The very-large-eps check compares PGD with random sign steps of the same budget, per image: a gradient that is
useless fails it even where random steps alone drive AUROC to 0, and a useful one passes."""

import pytest
import torch
from evaluation_toys import HighFrequencyModel, ToyDetector, ToyTestSet, loader

from anomalib_robust.attacks.random_steps import RandomSteps
from anomalib_robust.evaluation import RobustEvaluator
from anomalib_robust.evaluation.report import AttackResult
from anomalib_robust.evaluation.sanity import LargeEps, _large_eps_check

LARGE_EPS = "very large eps: the gradient beats random sign steps"
SETTINGS = {
    "attacks": ["pgd"], "eps": 2 / 255, "steps": 3, "n_queries": 20, "num_grid_images": 0, "sanity_budget": None,
}  # fmt: skip


def _large_eps_runs(detector: torch.nn.Module) -> tuple[object, AttackResult, AttackResult]:
    report, _ = RobustEvaluator(**SETTINGS).evaluate(detector, [loader(ToyTestSet(count=32), batch_size=8)])
    check = next(check for check in report.checks if check.name == LARGE_EPS)
    pgd, random = (next(r for r in report.results if r.role == "sanity" and r.eps == 0.5 and r.attack == name)
                   for name in ("PGD", RandomSteps.name))  # fmt: skip
    return check, pgd, random


def test_a_useful_gradient_beats_random_steps() -> None:
    check, pgd, random = _large_eps_runs(ToyDetector())
    assert check.passed is True, check.detail
    assert pgd.image_auroc < random.image_auroc
    assert f"lower score on {pgd.num_images // 2} of {pgd.num_images // 2} anomalous images" in check.detail


def test_a_useless_gradient_fails_even_where_random_steps_reach_zero() -> None:
    """A high-frequency term (w = 1e4) drowns the brightness signal: keeping the best of 11 noisy iterates takes AUROC
    to 0 with random steps alone, so an absolute threshold (AUROC <= 0.1) would pass noise; the gradient does no
    better. (For a separable term this depends on the phase of the step, sin(w alpha): at w = 3e3 the sign steps
    happen to lower it coherently. The attack-step check flags every phase.)"""
    detector = ToyDetector()
    detector.model = HighFrequencyModel(frequency=1e4)
    check, _, random = _large_eps_runs(detector)
    assert random.image_auroc <= 0.1
    assert check.passed is False, check.detail
    assert "no better than noise" in check.detail


def test_the_sign_test_and_its_floor() -> None:
    result = AttackResult("PGD", "Linf", 0.5, image_auroc=0.0)
    assert LargeEps(result, result, 8, 8).p_value == pytest.approx(1 / 256)
    assert LargeEps(result, result, 6, 8).p_value == pytest.approx(37 / 256)
    assert _large_eps_check(LargeEps(result, result, 4, 4)).passed is None  # 1/16 > 0.05: cannot pass
    labels = torch.tensor([0, 1, 0, 1, 1])
    tied = LargeEps.paired(result, result, torch.ones(5, 2), torch.ones(5, 2), labels)
    assert (tied.wins, tied.images) == (0, 3)  # anomalous images only; a tie is no win
