"""Sanity checks against gradient masking (Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5).

Run on a :class:`~anomalib_robust.evaluation.report.RobustReport`:

- robust AUROC does not increase with eps, nor with the number of attack steps (more budget never helps the defender);
- a very large eps drives a differentiable detector's AUROC to near 0;
- black-box Square does not beat the white-box attacks;
- autograd's directional derivative of the attacked score matches finite differences
  (:mod:`anomalib_robust.evaluation.gradient_check`), which catches a masked branch that ``requires_grad`` cannot see.

AUROC values are means over repeated scorings with independent noise, so two of them are compared with a slack of
``tolerance`` plus two standard errors of their difference: a gap inside the noise is not a violation. Two runs are
only compared on the same test images: a sanity run made on a subset of them (the sanity budget,
:mod:`anomalib_robust.evaluation.budget`) is compared with the configured run's AUROC on that subset, and each check
states its budget (runs, steps or queries, draws, images).

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

from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_auroc, format_eps


def noise_slack(tolerance: float, first_std: float, second_std: float, repeats: int) -> float:
    """``tolerance`` plus two standard errors of the difference of two means over ``repeats`` scorings."""
    return tolerance + 2 * math.sqrt(first_std**2 + second_std**2) / math.sqrt(max(repeats, 1))


def sanity_checks(
    report: RobustReport,
    near_zero: float,
    tolerance: float,
    large_eps: AttackResult | None = None,
    more_steps: tuple[AttackResult, AttackResult] | None = None,
    square: AttackResult | None = None,
    white_box: list[AttackResult] | None = None,
    gradient: SanityCheck | None = None,
) -> list[SanityCheck]:
    """Carlini et al. (2019) checks on a report's results.

    Args:
        report: the report with the configured attack runs.
        near_zero: AUROC that a very large eps must reach (or go below).
        tolerance: AUROC slack on top of the noise of the repeats when comparing two AUROC values.
        large_eps: the run at a very large eps, if it was made.
        more_steps: (run with the configured steps, run with more steps) at the same eps and on the same images, if
            made.
        square: a Square run at the largest configured eps, if made.
        white_box: the gradient runs Square is compared with, on Square's images; ``None`` for the report's
            configured gradient runs at Square's eps (right when Square ran on every test image).
        gradient: the verdict of the finite-difference gradient check, if it was made.
    """
    repeats = report.eval_repeats
    attacks = [
        result
        for result in report.results
        if result.role == "attack" and result.target == "score" and result.image_auroc is not None
    ]
    checks = [_monotone_in_eps(report, attacks, tolerance)]
    if more_steps is not None and None not in (more_steps[0].image_auroc, more_steps[1].image_auroc):
        fewer, more = more_steps
        slack = noise_slack(tolerance, fewer.image_auroc_std, more.image_auroc_std, repeats)
        checks.append(
            SanityCheck(
                "AUROC does not increase with steps",
                more.image_auroc <= fewer.image_auroc + slack,
                f"{fewer.attack} at eps {format_eps(fewer.eps, fewer.norm)}: "
                f"{format_auroc(fewer.image_auroc, fewer.image_auroc_std)} with {fewer.steps} steps, "
                f"{format_auroc(more.image_auroc, more.image_auroc_std)} with {more.steps}",
                f"{fewer.budget} vs {more.budget}",
            )
        )
    if large_eps is not None and large_eps.image_auroc is not None:
        checks.append(
            SanityCheck(
                "very large eps drives AUROC to near 0",
                large_eps.image_auroc <= near_zero,
                f"{large_eps.attack} at eps {format_eps(large_eps.eps, large_eps.norm)}: "
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
        checks.append(
            SanityCheck(
                "black-box Square does not beat white-box attacks",
                square.image_auroc >= best.image_auroc - slack,
                f"{square.attack} {format_auroc(square.image_auroc, square.image_auroc_std)} vs "
                f"{best.attack} {format_auroc(best.image_auroc, best.image_auroc_std)} "
                f"at eps {format_eps(square.eps, square.norm)}",
                f"{square.budget} vs {best.budget}",
            )
        )
    if gradient is not None:
        checks.append(gradient)
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
