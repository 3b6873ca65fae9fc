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
- **a very large eps drives AUROC to near 0**, with PGD from the clean image (no random start): at that radius uniform
  noise alone would push every normal score above every anomalous one, so with a random start the check could not
  fail on a detector whose gradient is zero;
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
    >>> [check.passed for check in sanity_checks(report, near_zero=0.1, tolerance=0.02)]
    [False]
"""

import itertools
import math
from collections.abc import Sequence

from anomalib_robust.evaluation.convergence import Convergence, convergence_check
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_auroc, format_eps


def noise_slack(tolerance: float, first_std: float, second_std: float, repeats: int) -> float:
    """``tolerance`` plus two standard errors of the difference of two means over ``repeats`` scorings."""
    return tolerance + 2 * math.sqrt(first_std**2 + second_std**2) / math.sqrt(max(repeats, 1))


def sanity_checks(
    report: RobustReport,
    near_zero: float,
    tolerance: float,
    large_eps: AttackResult | None = None,
    convergence: Convergence | None = None,
    square: AttackResult | None = None,
    white_box: list[AttackResult] | None = None,
    square_conclusive: bool = True,
    gradient: Sequence[SanityCheck] = (),
) -> list[SanityCheck]:
    """Carlini et al. (2019) checks on a report's results.

    Args:
        report: the report with the configured attack runs.
        near_zero: AUROC that a very large eps must reach (or go below).
        tolerance: AUROC slack on top of the noise (of the repeats, or the paired interval).
        large_eps: the run at a very large eps, if it was made.
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
        checks.append(convergence_check(convergence, tolerance))
    if large_eps is not None and large_eps.image_auroc is not None:
        checks.append(
            SanityCheck(
                "very large eps drives AUROC to near 0",
                large_eps.image_auroc <= near_zero,
                f"{large_eps.attack} from the clean image at eps {format_eps(large_eps.eps, large_eps.norm)}: "
                f"{format_auroc(large_eps.image_auroc, large_eps.image_auroc_std)} "
                f"(expected <= {format_auroc(near_zero)})",
                large_eps.budget,
            )
        )
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
