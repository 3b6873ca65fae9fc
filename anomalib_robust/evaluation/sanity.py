"""Sanity checks against gradient masking (Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5).

Each check is a test of the attack, shown in the suite to fail on a planted masking case
(:mod:`anomalib_robust.evaluation.masking`) and to pass on healthy detectors. Run on a
:class:`~anomalib_robust.evaluation.report.RobustReport`:

- **robust AUROC does not increase with eps** (more budget never helps the defender);
- **the attack has converged**, in both directions: the convergence run (twice the steps, and twice the EOT draws for
  a randomised detector, from the same random start and with the same seeds as the configured run) must neither raise
  AUROC (a broken attack) nor lower it (the configured attack had not converged), judged by a paired bootstrap
  interval of the AUROC difference on the same images
  (:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`) widened by ``tolerance``. An unconverged
  configured run is marked in the report;
- **at a very large eps the gradient beats random sign steps**: PGD from the clean image (no random start) against
  :class:`~anomalib_robust.attacks.random_steps.RandomSteps` with the same budget (eps, steps, step size, start and
  selection of the returned iterate), on the same images. At that radius noise alone moves every score, and keeping
  the best of several noisy iterates can drive AUROC to 0 with a useless gradient, so an absolute AUROC threshold
  passes noise (and failed AdvRAD at 10 steps, 0-16 %). AUROC saturates at 0, so the comparison is per image, on the
  objective ``y * A(x)`` of the deployed scores (mean over repeats): the gradient must win on more images than a coin
  would, by a one-sided sign test at level :data:`LARGE_EPS_LEVEL`; with fewer than 5 images no result can reach it
  and the check reads inconclusive;
- **black-box Square does not beat the white-box attacks** beyond the noise; a pass with fewer queries than
  configured (a small sanity budget) is inconclusive, a Square that wins with fewer queries is a failure all the same;
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

from anomalib_robust.attacks.objective import score_direction
from anomalib_robust.evaluation.metrics import PairedDifference
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_auroc, format_eps


LARGE_EPS_LEVEL = 0.05
"""Level of the one-sided sign test by which the gradient attack must beat random sign steps at a very large eps."""


def noise_slack(tolerance: float, first_std: float, second_std: float, repeats: int) -> float:
    """``tolerance`` plus two standard errors of the difference of two means over ``repeats`` scorings."""
    return tolerance + 2 * math.sqrt(first_std**2 + second_std**2) / math.sqrt(max(repeats, 1))


@dataclass(frozen=True)
class Convergence:
    """The configured run on the convergence run's images (``fewer``), the convergence run (``more``), and the paired
    difference ``more - fewer`` with its bootstrap interval."""

    fewer: AttackResult
    more: AttackResult
    difference: PairedDifference

    def converged(self, tolerance: float) -> bool:
        """Whether more budget does not lower AUROC beyond ``tolerance`` and the interval."""
        return not self.difference.high < -tolerance

    def broken(self, tolerance: float) -> bool:
        """Whether more budget raises AUROC beyond ``tolerance`` and the interval (an attack that gets worse)."""
        return self.difference.low > tolerance


@dataclass(frozen=True)
class LargeEps:
    """PGD from the clean image at a very large eps (``gradient``) and random sign steps with its budget
    (``random``), on the same images: the gradient's objective ``y * A(x)`` is higher on ``wins`` of ``images``."""

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
        """Compare the deployed scores ``(N, R)`` of both runs on the same images (mean over the ``R`` repeats); a
        tie (both left an image where it was) is no win."""
        objectives = [score_direction(labels) * scores.double().mean(dim=1) for scores in (gradient_scores,
                                                                                          random_scores)]  # fmt: skip
        return cls(gradient, random, int((objectives[0] > objectives[1]).sum()), int(labels.numel()))

    @property
    def p_value(self) -> float:
        """One-sided sign test: the chance of ``wins`` or more of ``images`` if the gradient were a coin."""
        return sum(math.comb(self.images, wins) for wins in range(self.wins, self.images + 1)) / 2**self.images


def _large_eps_check(large_eps: LargeEps) -> SanityCheck:
    gradient, random = large_eps.gradient, large_eps.random
    detail = (
        f"{gradient.attack} from the clean image at eps {format_eps(gradient.eps, gradient.norm)}: "
        f"{format_auroc(gradient.image_auroc, gradient.image_auroc_std)}; random sign steps with the same budget: "
        f"{format_auroc(random.image_auroc, random.image_auroc_std)}; the gradient's y A(x) is higher on "
        f"{large_eps.wins} of {large_eps.images} images (sign test p = {large_eps.p_value:.2g}, pass <= "
        f"{LARGE_EPS_LEVEL:g})"
    )
    if 0.5**large_eps.images > LARGE_EPS_LEVEL:
        passed, detail = None, detail + f"; inconclusive: {large_eps.images} images cannot reach that level"
    else:
        passed = large_eps.p_value <= LARGE_EPS_LEVEL
        if not passed:
            detail += "; the gradient does no better than noise at this radius (useless or masked)"
    budget = f"{gradient.budget} vs {random.budget}"
    return SanityCheck("very large eps: the gradient beats random sign steps", passed, detail, budget)


def _convergence_check(convergence: Convergence, tolerance: float) -> SanityCheck:
    fewer, more, difference = convergence.fewer, convergence.more, convergence.difference
    detail = (
        f"{fewer.attack} at eps {format_eps(fewer.eps, fewer.norm)} on the same images and seeds: "
        f"{format_auroc(fewer.image_auroc, fewer.image_auroc_std)} with {fewer.steps} steps x {fewer.draws} draws, "
        f"{format_auroc(more.image_auroc, more.image_auroc_std)} with {more.steps} x {more.draws}; paired difference "
        f"{100 * difference.difference:+.1f} points, {100 * difference.level:.0f}% interval "
        f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] (slack {100 * tolerance:.0f})"
    )
    if convergence.broken(tolerance):
        detail += "; more budget raises AUROC: the attack is broken"
    elif not convergence.converged(tolerance):
        detail += (
            f"; not converged: the robust AUROC is an overestimate, rerun with steps >= {more.steps}"
            + (f" and eot_samples >= {more.draws}" if more.draws > 1 else "")
        )
    passed = convergence.converged(tolerance) and not convergence.broken(tolerance)
    budget = f"{fewer.budget} vs {more.budget}"
    return SanityCheck("converged: more steps and draws change nothing", passed, detail, budget)


def sanity_checks(
    report: RobustReport,
    tolerance: float,
    large_eps: LargeEps | None = None,
    convergence: Convergence | None = None,
    square: AttackResult | None = None,
    white_box: list[AttackResult] | None = None,
    square_conclusive: bool = True,
    gradient: Sequence[SanityCheck] = (),
) -> list[SanityCheck]:
    """Carlini et al. (2019) checks on a report's results.

    Args:
        report: the report with the configured attack runs.
        tolerance: AUROC slack on top of the noise (of the repeats, or the paired interval).
        large_eps: the run at a very large eps against random sign steps with its budget, if made.
        convergence: the convergence run against the configured run on the same images, if made.
        square: a Square run at the largest configured eps, if made.
        white_box: the gradient runs Square is compared with, on Square's images; ``None`` for the report's
            configured gradient runs at Square's eps (right when Square ran on every test image).
        square_conclusive: whether Square had its configured queries; without them a pass is inconclusive.
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
        checks.append(_convergence_check(convergence, tolerance))
    if large_eps is not None and None not in (large_eps.gradient.image_auroc, large_eps.random.image_auroc):
        checks.append(_large_eps_check(large_eps))
    white_box = [
        r
        for r in (attacks if white_box is None else white_box)
        if square and not r.attack.endswith("Square") and r.eps == square.eps and r.image_auroc is not None
    ]
    if square is not None and square.image_auroc is not None and white_box:
        best = min(white_box, key=lambda result: result.image_auroc)
        slack = noise_slack(tolerance, square.image_auroc_std, best.image_auroc_std, repeats)
        passed = square.image_auroc >= best.image_auroc - slack
        detail = (
            f"{square.attack} {format_auroc(square.image_auroc, square.image_auroc_std)} vs "
            f"{best.attack} {format_auroc(best.image_auroc, best.image_auroc_std)} "
            f"at eps {format_eps(square.eps, square.norm)}"
        )
        if passed and not square_conclusive:
            passed = None
            detail += f"; inconclusive: the sanity budget left Square {square.queries} queries (raise sanity_budget)"
        checks.append(
            SanityCheck("black-box Square does not beat white-box attacks", passed, detail,
                        f"{square.budget} vs {best.budget}")  # fmt: skip
        )
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
