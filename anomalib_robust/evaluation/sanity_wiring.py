"""The sanity checks wired into an evaluation: what each check is given, and where its verdict goes.

Before attacking, the first :data:`RANDOMNESS_CHECK_IMAGES` test images are scored repeatedly, so that undeclared
noise is evaluated as randomness (EOT and repeats). After the attacks, the gradient checks
(:mod:`~anomalib_robust.evaluation.gradient_check`) run at the configured attack's random starts, and each sanity run
is compared with the configured runs on its own images (:func:`~anomalib_robust.evaluation.sanity.sanity_checks`,
Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5): the convergence run by a paired bootstrap of the
AUROC difference with the configured run whose seeds it shares, Square with the strongest white-box run on Square's
images the same way, and the very-large-eps PGD with random sign steps with its budget, image by image.

Example:
    >>> from anomalib_robust.evaluation.sanity_wiring import GRADIENT_CHECKS
    >>> GRADIENT_CHECKS[0]
    'autograd matches finite differences'
"""

import dataclasses

import torch
from torch.utils.data import DataLoader

from anomalib_robust.attacks import DetectorScore, NotDifferentiableError
from anomalib_robust.evaluation.assembly import Gathered, image_auroc
from anomalib_robust.evaluation.convergence import Convergence
from anomalib_robust.evaluation.execution import selected_images
from anomalib_robust.evaluation.gradient_check import check_gradient
from anomalib_robust.evaluation.metrics import paired_auroc_difference
from anomalib_robust.evaluation.planning import (
    GRADIENT_CHECK_DIRECTIONS,
    GRADIENT_CHECK_STEPS,
    Run,
    SanityGroup,
)
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_budget
from anomalib_robust.evaluation.sanity import BlackBox, LargeEps, sanity_checks

RANDOMNESS_CHECK_IMAGES = 8
"""Test images scored repeatedly to find undeclared noise (the first ones, the same on every rank)."""

GRADIENT_CHECKS = ("autograd matches finite differences", "the gradient predicts the change at the attack's step")
"""The names of the two gradient checks' verdicts."""


def detect_randomness(
    detector: DetectorScore, loaders: list[DataLoader], device: torch.device, resolution: str
) -> None:
    """Score the first :data:`RANDOMNESS_CHECK_IMAGES` test images under each seed of
    :data:`~anomalib_robust.attacks.detector.RANDOMNESS_SEEDS`: a detector whose scores differ is evaluated as
    randomised (EOT, ``eval_repeats``) even if undeclared (:meth:`DetectorScore.detect_randomness`).

    Without test images there is nothing to score; the single-class check names that error.
    """
    total = sum(len(loader.dataset) for loader in loaders)
    if total:
        first = torch.arange(min(RANDOMNESS_CHECK_IMAGES, total))
        detector.detect_randomness(selected_images(detector, loaders, first, device, resolution)[0])


def gradient_checks(
    detector: DetectorScore,
    loaders: list[DataLoader],
    checked: torch.Tensor,
    device: torch.device,
    resolution: str,
    *,
    eps: float,
    norm: str,
    steps: int,
    alpha: float | None,
    seed: int,
) -> list[SanityCheck]:
    """The finite-difference and attack-step checks (:mod:`~anomalib_robust.evaluation.gradient_check`) at the
    configured attack's random starts at the largest ``eps`` (its ``steps`` and ``alpha``, ``None`` for the default),
    on the test images ``checked``."""
    images, labels = selected_images(detector, loaders, checked, device, resolution)
    alpha = alpha or min(eps, 2.5 * eps / steps)
    budgets = (f"{checked.numel()} images x {GRADIENT_CHECK_DIRECTIONS + 1} directions",
               f"{checked.numel()} images x {GRADIENT_CHECK_STEPS + 1} steps")  # fmt: skip
    try:
        check = check_gradient(detector, images, labels, eps, alpha, norm, GRADIENT_CHECK_DIRECTIONS,
                               GRADIENT_CHECK_STEPS, seed=seed)  # fmt: skip
    except NotDifferentiableError:
        detail = "the score is not differentiable (see the attack rows)"
        return [SanityCheck(name, None, detail, budget) for name, budget in zip(GRADIENT_CHECKS, budgets, strict=True)]
    verdicts = (check.finite_difference, check.attack_step)
    return [
        SanityCheck(name, verdict.passed, verdict.detail, budget)
        for name, verdict, budget in zip(GRADIENT_CHECKS, verdicts, budgets, strict=True)
    ]


def judge(
    report: RobustReport,
    configured: list[Run],
    gathered: Gathered,
    groups: list[SanityGroup],
    gradient: list[SanityCheck],
    *,
    tolerance: float,
    sanity_budget: float | None,
    largest: float,
    seed: int,
) -> None:
    """Write the sanity checks' verdicts into ``report`` (``tolerance`` of
    :func:`~anomalib_robust.evaluation.sanity.sanity_checks`), with the ``sanity_budget`` and images they had and the
    baselines they compared with, and mark whether the configured run that the convergence run is paired with
    converged. ``largest`` is the largest eps, ``seed`` that of the paired bootstrap."""
    report.sanity_budget = sanity_budget
    report.sanity_images = max(int(group.subset.numel()) for group in groups)
    comparisons = _comparisons(configured, gathered, groups, largest, seed)
    report.baselines = comparisons.pop("baselines")
    report.checks = sanity_checks(report, tolerance, gradient=gradient, **comparisons)
    convergence = comparisons["convergence"]
    if convergence is not None:
        run = next(run for group in groups for run in group.runs if run.check == "convergence")
        paired = configured[run.pairs_with].result
        paired.converged, paired.excluded_drop = convergence.verdict(tolerance), convergence.excluded_drop


def _on_images(result: AttackResult, scores: torch.Tensor, labels: torch.Tensor, total: int) -> AttackResult:
    """A copy of the configured run ``result`` measured on the images of ``scores`` and ``labels`` only."""
    on_images = dataclasses.replace(result, num_images=int(labels.numel()), pixel_auroc=None)
    on_images.image_auroc, on_images.image_auroc_std = image_auroc(scores, labels)
    on_images.budget = format_budget(on_images, total)
    return on_images


def _comparisons(
    configured: list[Run], gathered: Gathered, groups: list[SanityGroup], largest: float, seed: int
) -> dict[str, object]:
    """The runs each sanity check compares, by the keyword names of :func:`sanity_checks`, and the configured
    image-score runs measured on each sanity group's images (``"baselines"``, what those runs are compared with).

    The convergence run is compared with the configured run it is paired with on the same images by a paired
    bootstrap of the AUROC difference; Square with the strongest configured gradient run on Square's images (or, when
    Square is configured, on every image), paired the same way; the very-large-eps run with random sign steps."""
    total = int(gathered.labels.numel())
    baselines, comparisons = [], {"convergence": None, "large_eps": None, "square": None}
    for group in groups:
        in_group = torch.isin(gathered.indices, group.subset)
        on_group = [
            (number, _on_images(run.result, scores[in_group], gathered.labels[in_group], total))
            for number, (run, scores) in enumerate(zip(configured, gathered.scores, strict=True))
            if run.result.status == "ok" and run.result.target == "score" and scores is not None
        ]
        baselines += [result for _, result in on_group]
        for run, scores in zip(group.runs, group.scores, strict=True):
            if scores is None:
                continue
            if run.check == "convergence":
                fewer = dict(on_group).get(run.pairs_with)
                if fewer is not None:
                    paired = gathered.scores[run.pairs_with][in_group]
                    difference = paired_auroc_difference(paired, scores, group.labels, seed=seed)
                    comparisons["convergence"] = Convergence(fewer, run.result, difference)
            elif run.check == "square":
                white_box = [(result, gathered.scores[number][in_group]) for number, result in on_group
                             if result.eps == largest]  # fmt: skip
                comparisons["square"] = BlackBox.paired(run.result, scores, white_box, group.labels, seed)
        large = {run.check: (run.result, scores) for run, scores in zip(group.runs, group.scores, strict=True)
                 if run.check in ("large_eps", "random_steps") and scores is not None}  # fmt: skip
        if len(large) == 2:
            (gradient, gradient_scores), (random, random_scores) = large["large_eps"], large["random_steps"]
            comparisons["large_eps"] = LargeEps.paired(gradient, random, gradient_scores, random_scores, group.labels)
    if comparisons["square"] is None:  # Square configured: compared with the configured runs on every image
        at_largest = [(run.result, scores) for run, scores in zip(configured, gathered.scores, strict=True)
                      if run.result.status == "ok" and run.result.target == "score" and scores is not None
                      and run.result.eps == largest]  # fmt: skip
        square = next(((result, scores) for result, scores in at_largest if result.attack.endswith("Square")), None)
        if square is not None:
            comparisons["square"] = BlackBox.paired(*square, at_largest, gathered.labels, seed)
    comparisons["baselines"] = baselines
    return comparisons
