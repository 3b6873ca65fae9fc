"""Sanity checks against gradient masking (Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5).

Each check is a test of the attack, shown in the suite to fail on a planted masking case
(:mod:`anomalib_robust.evaluation.masking`) and to pass on healthy detectors. Run on a
:class:`~anomalib_robust.evaluation.report.RobustReport`:

- **robust AUROC does not increase with eps** (more budget never helps the defender);
- **the attack has converged**, in both directions: the convergence run (twice the steps, and twice the EOT draws for
  a randomised detector, from the same random start and with the same seeds as the configured run) must neither raise
  AUROC (a broken attack) nor lower it (the configured attack had not converged), judged by a paired bootstrap
  interval of the AUROC difference on the same images
  (:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`) widened by ``tolerance``, inconclusive when
  the interval is too wide to exclude a drop beyond it (:mod:`~anomalib_robust.evaluation.convergence`). The
  configured run is marked in the report;
- **at a very large eps the gradient beats random sign steps**: PGD from the clean image (no random start), stepping
  by twice the attack's step size (the largest scale the attack-step check verifies; at a step of 0.125 healthy
  detectors' gradients moved no anomalous score), against
  :class:`~anomalib_robust.attacks.random_steps.RandomSteps` with the same budget (eps, steps, step size, start and
  selection of the returned iterate), on the same images. At that radius noise alone moves every score, and keeping
  the best of several noisy iterates can drive AUROC to 0 with a useless gradient, so an absolute AUROC threshold
  passes noise (and risks false alarms: AdvRAD measured 0-16 % at 10 steps). AUROC saturates at 0, so the comparison
  is per image, on the deployed scores (mean over repeats), and on the anomalous images only: noise raises any anomaly
  score, so on a normal image random steps are a strong attack without a gradient (with both classes counted, healthy
  Padim, Patchcore and Fastflow beat them on about half of the images, at a step of 0.125); lowering an anomalous
  image's score is what noise cannot do.
  The gradient must lower more anomalous scores below random steps' than a coin would, by a one-sided sign test at
  level :data:`LARGE_EPS_LEVEL`; with fewer than 5 anomalous images no result can reach it and the check reads
  inconclusive;
- **black-box Square does not beat the white-box attacks**: Square with its configured queries and the attacker's
  draws (on a stratified subset of at least 8 images within the sanity budget) against the strongest gradient run at
  its eps on the same images, by a paired bootstrap interval of the AUROC difference; it fails when the whole interval
  lies below ``-tolerance``, and a pass states the Square advantage it excludes, on how many images and queries;
- **the gradient describes the score** (:mod:`anomalib_robust.evaluation.gradient_check`): autograd matches finite
  differences at a tiny step, and predicts the change at the attack's step.

AUROC values are means over repeated scorings with independent noise, so two of them from independent runs are
compared with a slack of ``tolerance`` plus two standard errors of their difference: a gap inside the noise is not a
violation. Two runs are only compared on the same test images, and each check states its budget (runs, steps or
queries, draws, images).

Example:
    >>> from anomalib_robust.evaluation.report import AttackResult, RobustReport
    >>> from anomalib_robust.evaluation.sanity import sanity_checks
    >>> report = RobustReport("Padim", "Linf", 1, 20, clean_image_auroc=0.9)
    >>> report.results.append(AttackResult("PGD", "Linf", 2 / 255, image_auroc=0.95))
    >>> [check.passed for check in sanity_checks(report, tolerance=0.02)]
    [False]
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anomalib_robust.evaluation.convergence import Convergence, convergence_check
from anomalib_robust.evaluation.metrics import PairedDifference, paired_auroc_difference
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_auroc, format_eps


LARGE_EPS_LEVEL = 0.05
"""Level of the one-sided sign test by which the gradient attack must beat random sign steps at a very large eps."""


def noise_slack(tolerance: float, first_std: float, second_std: float, repeats: int) -> float:
    """``tolerance`` plus two standard errors of the difference of two means over ``repeats`` scorings."""
    return tolerance + 2 * math.sqrt(first_std**2 + second_std**2) / math.sqrt(max(repeats, 1))


@dataclass(frozen=True)
class LargeEps:
    """PGD from the clean image at a very large eps (``gradient``) and random sign steps with its budget
    (``random``), on the same images: the gradient leaves a lower score on ``wins`` of the ``images`` anomalous
    ones."""

    gradient: AttackResult
    random: AttackResult
    wins: int
    images: int

    @classmethod
    def paired(
        cls,
        gradient: AttackResult,
        random: AttackResult,
        gradient_scores: torch.Tensor,
        random_scores: torch.Tensor,
        labels: torch.Tensor,
    ) -> "LargeEps":
        """Compare the deployed scores ``(N, R)`` of both runs on the same anomalous images (mean over the ``R``
        repeats); a tie (both left an image where it was) is no win."""
        anomalous = labels.bool()
        lowered, noisy = (scores[anomalous].double().mean(dim=1) for scores in (gradient_scores, random_scores))
        return cls(gradient, random, int((lowered < noisy).sum()), int(anomalous.sum()))

    @property
    def p_value(self) -> float:
        """One-sided sign test: the chance of ``wins`` or more of ``images`` if the gradient were a coin."""
        return sum(math.comb(self.images, wins) for wins in range(self.wins, self.images + 1)) / 2**self.images


def _large_eps_check(large_eps: LargeEps) -> SanityCheck:
    gradient, random = large_eps.gradient, large_eps.random
    detail = (
        f"{gradient.attack} from the clean image at eps {format_eps(gradient.eps, gradient.norm)}: "
        f"{format_auroc(gradient.image_auroc, gradient.image_auroc_std)}; random sign steps with the same budget: "
        f"{format_auroc(random.image_auroc, random.image_auroc_std)}; the gradient leaves the lower score on "
        f"{large_eps.wins} of {large_eps.images} anomalous images (sign test p = {large_eps.p_value:.2g}, pass <= "
        f"{LARGE_EPS_LEVEL:g})"
    )
    if 0.5**large_eps.images > LARGE_EPS_LEVEL:
        passed, detail = None, detail + f"; inconclusive: {large_eps.images} anomalous images cannot reach that level"
    else:
        passed = large_eps.p_value <= LARGE_EPS_LEVEL
        if not passed:
            detail += "; the gradient does no better than noise at this radius (useless or masked)"
    budget = f"{gradient.budget} vs {random.budget}"
    return SanityCheck("very large eps: the gradient beats random sign steps", passed, detail, budget)


@dataclass(frozen=True)
class BlackBox:
    """Square against the strongest white-box run at its eps (``white_box``, the lowest AUROC) on the same images, and
    the paired difference ``square - white_box`` with its bootstrap interval."""

    square: AttackResult
    white_box: AttackResult
    difference: PairedDifference

    @classmethod
    def paired(
        cls,
        square: AttackResult,
        square_scores: torch.Tensor,
        white_box: Sequence[tuple[AttackResult, torch.Tensor]],
        labels: torch.Tensor,
        seed: int = 0,
    ) -> "BlackBox | None":
        """From the deployed scores ``(N, R)`` of Square and of the gradient runs (measured on Square's images);
        ``None`` without a gradient run."""
        candidates = [(result, scores) for result, scores in white_box
                      if not result.attack.endswith("Square") and result.image_auroc is not None]  # fmt: skip
        if not candidates or square.image_auroc is None:
            return None
        best, best_scores = min(candidates, key=lambda candidate: candidate[0].image_auroc)
        return cls(square, best, paired_auroc_difference(best_scores, square_scores, labels, seed=seed))


def _black_box_check(black_box: BlackBox, tolerance: float) -> SanityCheck:
    square, best, difference = black_box.square, black_box.white_box, black_box.difference
    passed = not difference.high < -tolerance
    detail = (
        f"{square.attack} {format_auroc(square.image_auroc, square.image_auroc_std)} vs {best.attack} "
        f"{format_auroc(best.image_auroc, best.image_auroc_std)} at eps {format_eps(square.eps, square.norm)} on the "
        f"same {square.num_images} images, Square with {square.queries} queries x {square.draws} draws: paired "
        f"difference {100 * difference.difference:+.1f} points, {100 * difference.level:.0f}% interval "
        f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] (slack {100 * tolerance:.0f})"
    )
    if passed:
        detail += f"; a Square advantage of more than {100 * max(0.0, -difference.low):.1f} points is excluded"
    else:
        detail += "; Square finds lower AUROC than the gradient attacks: their gradients are masked"
    return SanityCheck("black-box Square does not beat white-box attacks", passed, detail,
                       f"{square.budget} vs {best.budget}")  # fmt: skip


def sanity_checks(
    report: RobustReport,
    tolerance: float,
    large_eps: LargeEps | None = None,
    convergence: Convergence | None = None,
    square: BlackBox | None = None,
    gradient: Sequence[SanityCheck] = (),
) -> list[SanityCheck]:
    """Carlini et al. (2019) checks on a report's results.

    Args:
        report: the report with the configured attack runs.
        tolerance: AUROC slack on top of the noise (of the repeats, or the paired interval).
        large_eps: the run at a very large eps against random sign steps with its budget, if made.
        convergence: the convergence run against the configured run on the same images, if made.
        square: Square at the largest configured eps against the gradient runs on its images, if made.
        gradient: the verdicts of the gradient checks, if made.
    """
    repeats = report.eval_repeats
    attacks = [
        result
        for result in report.results
        if result.role == "attack" and result.target == "score" and result.image_auroc is not None
    ]
    checks = [_monotone_in_eps(report, attacks, tolerance)]
    if convergence is not None and None not in (convergence.fewer.image_auroc, convergence.more.image_auroc):
        checks.append(convergence_check(convergence, tolerance))
    if large_eps is not None and None not in (large_eps.gradient.image_auroc, large_eps.random.image_auroc):
        checks.append(_large_eps_check(large_eps))
    if square is not None:
        checks.append(_black_box_check(square, tolerance))
    checks += gradient
    return checks


def _monotone_in_eps(report: RobustReport, attacks: list[AttackResult], tolerance: float) -> SanityCheck:
    violations = []
    clean = (0.0, report.clean_image_auroc, report.clean_image_auroc_std)
    for name in dict.fromkeys(result.attack for result in attacks):
        curve = [clean, *sorted((r.eps, r.image_auroc, r.image_auroc_std) for r in attacks if r.attack == name)]
        violations += [
            f"{name}: {format_auroc(low)} at {eps_low:.4g} < {format_auroc(high)} at {eps_high:.4g}"
            for (eps_low, low, low_std), (eps_high, high, high_std) in itertools.pairwise(curve)
            if high > low + noise_slack(tolerance, low_std, high_std, report.eval_repeats)
        ]
    return SanityCheck(
        "AUROC does not increase with eps",
        not violations if attacks else None,
        "; ".join(violations) or ("holds for every attack" if attacks else "no successful attack run"),
        f"configured runs on all {report.num_samples} images",
    )
