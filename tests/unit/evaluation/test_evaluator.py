"""The evaluator on toy detectors: deployed scoring with repeats, independent noise, resolution, map target, DDP."""

import logging

import pytest
import torch
from anomalib.pre_processing import PreProcessor
from evaluation_toys import SIZE, PrivateNoiseModel, ToyDetector, ToyTestSet, loader
from torchvision.transforms.v2 import Resize

from anomalib_robust.evaluation import RobustEvaluator, derive_seed, rank_auroc

QUICK = {"attacks": ["pgd"], "eps": 2 / 255, "steps": 2, "sanity_checks": False, "num_grid_images": 0}


def _single_and_ensemble_auroc(detector: ToyDetector, dataset: ToyTestSet, draws: int) -> tuple[float, float]:
    """Mean AUROC of one noisy draw per image (over 40 draws), and AUROC of the mean score over ``draws`` draws."""
    images = torch.stack([item.image for item in dataset.items])
    labels = torch.stack([item.gt_label for item in dataset.items])
    torch.manual_seed(123)
    with torch.no_grad():
        scores = torch.stack([detector.model(images).pred_score for _ in range(40)])
    single = sum(rank_auroc(draw, labels) for draw in scores) / len(scores)
    return single, rank_auroc(scores[:draws].mean(dim=0), labels)


def test_randomised_detector_is_scored_as_deployed_with_repeats() -> None:
    dataset = ToyTestSet(count=60)
    detector = ToyDetector(noise=0.3)
    single, ensemble = _single_and_ensemble_auroc(detector, dataset, draws=8)
    assert ensemble > single + 0.1  # the 8-draw ensemble is a better detector than the deployed one
    report, _ = RobustEvaluator(eot_samples=8, eval_repeats=4, **QUICK).evaluate(detector, [loader(dataset)])
    assert report.eval_repeats == 4
    assert report.clean_image_auroc_std > 0
    assert report.clean_image_auroc == pytest.approx(single, abs=0.05)
    assert report.clean_image_auroc < ensemble - 0.05
    (pgd,) = report.results
    assert pgd.image_auroc_std > 0 and pgd.attack == "EOT-PGD"
    scores = report.image_scores  # per image and scoring, for paired comparisons; not in the JSON report
    assert scores.clean.shape == scores.attacked[pgd.key].shape == (60, 4)
    per_repeat = [rank_auroc(scores.attacked[pgd.key][:, r], scores.labels) for r in range(4)]
    assert sum(per_repeat) / 4 == pytest.approx(pgd.image_auroc)
    assert "image_scores" not in report.to_dict()


def test_deterministic_detector_is_scored_once(test_set: ToyTestSet) -> None:
    report, _ = RobustEvaluator(eval_repeats=4, **{**QUICK, "eps": 0.05}).evaluate(ToyDetector(), [loader(test_set)])
    assert report.eval_repeats == 1 and report.clean_image_auroc_std == 0.0
    images = torch.stack([item.image for item in test_set.items])
    labels = torch.stack([item.gt_label for item in test_set.items])
    assert report.clean_image_auroc == rank_auroc(images.mean(dim=(1, 2, 3)), labels)
    assert report.results[0].image_auroc < report.clean_image_auroc


def test_undeclared_noise_is_evaluated_as_randomised(test_set: ToyTestSet, caplog: pytest.LogCaptureFixture) -> None:
    detector = ToyDetector(noise=0.3)
    detector.model.stochastic = False  # draws noise at inference but says it does not
    with caplog.at_level(logging.WARNING, logger="anomalib_robust.attacks.detector"):
        report, _ = RobustEvaluator(eval_repeats=3, **QUICK).evaluate(detector, [loader(test_set)])
    assert "ToyDetector draws noise at inference" in caplog.text
    assert (report.eot_samples, report.eval_repeats) == (8, 3)
    assert report.clean_image_auroc_std > 0 and report.results[0].attack == "EOT-PGD"


def test_a_private_generator_is_randomised_and_its_gradient_checks_are_not_evaluated(test_set: ToyTestSet) -> None:
    """A healthy detector drawing from its own generator: found randomised, and since reseeding cannot reproduce its
    score, both gradient checks read "not evaluated" with the reason (they failed it, error 1.0, before)."""
    detector = ToyDetector()
    detector.model = PrivateNoiseModel()
    settings = {**QUICK, "sanity_checks": True, "eot_samples": 2, "eval_repeats": 2, "n_queries": 10}
    report, _ = RobustEvaluator(**settings).evaluate(detector, [loader(test_set)])
    assert report.eval_repeats == 2  # detected as randomised
    gradient = [check for check in report.checks if check.name.startswith(("autograd", "the gradient predicts"))]
    assert [check.passed for check in gradient] == [None, None]
    assert all("does not reproduce" in check.detail for check in gradient)


def test_evaluation_noise_never_equals_attack_noise(test_set: ToyTestSet) -> None:
    detector = ToyDetector(noise=0.1)
    RobustEvaluator(eot_samples=2, eval_repeats=3, **QUICK).evaluate(detector, [loader(test_set)])
    attack = {value for grad, value in detector.model.draws if grad}
    evaluation = {value for grad, value in detector.model.draws if not grad}
    assert attack and evaluation
    assert not attack & evaluation
    seeds = {derive_seed(0, phase, batch, run, repeat) for phase in ("attack", "evaluate") for batch in range(5)
             for run in ("clean", 0, 1) for repeat in range(4)}  # fmt: skip
    assert len(seeds) == 2 * 5 * 3 * 4


def test_eps_is_measured_at_the_model_input_by_default(test_set: ToyTestSet) -> None:
    detector = ToyDetector(pre_processor=PreProcessor(transform=Resize((SIZE // 2, SIZE // 2), antialias=True)))
    settings = {**QUICK, "num_grid_images": 2}
    (report, model_grid), (_, native_grid) = (
        RobustEvaluator(resolution=resolution, **settings).evaluate(detector, [loader(test_set)])
        for resolution in ("model", "native")
    )
    assert model_grid["adversarial"].shape[-1] == SIZE // 2 and native_grid["adversarial"].shape[-1] == SIZE
    assert report.resolution == "model"
    with pytest.raises(ValueError, match="resolution must be one of"):
        RobustEvaluator(resolution="input")


def test_map_target_lowers_pixel_auroc_more_than_the_score_attack(test_set: ToyTestSet) -> None:
    settings = {**QUICK, "eps": 0.05, "steps": 5}
    report, _ = RobustEvaluator(targets=["score", "map"], **settings).evaluate(ToyDetector(), [loader(test_set)])
    score_run, map_run = report.results
    assert (score_run.target, map_run.target) == ("score", "map")
    assert map_run.pixel_auroc < report.clean_pixel_auroc
    assert map_run.pixel_auroc < score_run.pixel_auroc
    assert map_run.key.endswith("_map")


def test_seeded_evaluation_reproduces_and_the_seed_matters(test_set: ToyTestSet) -> None:
    settings = {**QUICK, "eot_samples": 2, "eval_repeats": 2}
    first, second, other = (
        RobustEvaluator(seed=seed, **settings).evaluate(ToyDetector(noise=0.1), [loader(test_set)])[0].to_dict()
        for seed in (0, 0, 1)
    )
    assert first == second
    assert first["clean_image_auroc"] != other["clean_image_auroc"]


def test_bad_arguments_are_named() -> None:
    for kwargs, message in [
        ({"eval_repeats": 0}, "eval_repeats must be an integer >= 1"),
        ({"targets": ["pixels"]}, "targets must be one of"),
        ({"eot_samples": 0}, "eot_samples must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            RobustEvaluator(**kwargs)
