"""The convergence check: a verdict that states the drop it excludes, or says it cannot tell.

A robust AUROC comes with evidence that the attack converged: more budget no longer lowers it (Carlini et al., 2019,
"On Evaluating Adversarial Robustness", sec. 5). The convergence run (twice the steps, and twice the EOT draws for a
randomised detector, from the same random start and with the same seeds as the configured run) is compared with the
configured run on the same images by the paired bootstrap interval ``[low, high]`` of ``AUROC(more) - AUROC(fewer)``
(:func:`~anomalib_robust.evaluation.metrics.paired_auroc_difference`). With ``tolerance`` ``t``:

- **converged** (pass): ``low >= -t``. A drop of more than ``X = max(0, -low)`` (at most ``t``) is excluded;
- **not converged** (fail): ``high < -t``. More budget lowers AUROC by more than ``t``: the robust AUROC is an
  overestimate;
- **broken** (fail): ``low > t``. More budget raises AUROC;
- **inconclusive**: otherwise. The interval is wider than the tolerance allows: a drop of up to ``X > t`` is possible
  and neither excluded nor shown, so the check does not read "converged".

Its power (``benchmarks/convergence_power.py``, docs/benchmarks.md) rests on the convergence run attacking every
configured image.

Example:
    >>> from anomalib_robust.evaluation.convergence import Convergence
    >>> from anomalib_robust.evaluation.metrics import PairedDifference
    >>> from anomalib_robust.evaluation.report import AttackResult
    >>> fewer, more = AttackResult("PGD", "Linf", 0.01, steps=10), AttackResult("PGD", "Linf", 0.01, steps=20)
    >>> [Convergence(fewer, more, PairedDifference(-0.01, low, high, 0.95)).verdict(0.02)
    ...  for low, high in ((-0.015, 0.0), (-0.08, -0.03), (-0.05, 0.01))]
    [True, False, None]
"""

from dataclasses import dataclass

from anomalib_robust.evaluation.metrics import PairedDifference
from anomalib_robust.evaluation.report import AttackResult, SanityCheck, format_auroc, format_eps

NAME = "converged: more steps and draws change nothing"
"""The name of the convergence check's verdict."""


@dataclass(frozen=True)
class Convergence:
    """The configured run on the convergence run's images (``fewer``), the convergence run (``more``), and the paired
    difference ``more - fewer`` with its bootstrap interval."""

    fewer: AttackResult
    more: AttackResult
    difference: PairedDifference

    @property
    def excluded_drop(self) -> float:
        """The AUROC drop beyond which the interval excludes more budget lowering AUROC: ``max(0, -low)``."""
        return max(0.0, -self.difference.low)

    def converged(self, tolerance: float) -> bool:
        """Whether a drop of more than ``tolerance`` is excluded (the interval's low end is above ``-tolerance``)."""
        return self.difference.low >= -tolerance

    def not_converged(self, tolerance: float) -> bool:
        """Whether more budget lowers AUROC by more than ``tolerance`` (the whole interval lies below it)."""
        return self.difference.high < -tolerance

    def broken(self, tolerance: float) -> bool:
        """Whether more budget raises AUROC beyond ``tolerance`` and the interval (an attack that gets worse)."""
        return self.difference.low > tolerance

    def verdict(self, tolerance: float) -> bool | None:
        """``True``: converged; ``False``: not converged, or broken; ``None``: inconclusive (module docstring)."""
        if self.not_converged(tolerance) or self.broken(tolerance):
            return False
        return True if self.converged(tolerance) else None


def convergence_check(convergence: Convergence, tolerance: float) -> SanityCheck:
    """The convergence verdict with what it compared, its interval, and the drop it excludes (or could not)."""
    fewer, more, difference = convergence.fewer, convergence.more, convergence.difference
    images, excluded = fewer.num_images, 100 * convergence.excluded_drop
    detail = (
        f"{fewer.attack} at eps {format_eps(fewer.eps, fewer.norm)} on the same images and seeds: "
        f"{format_auroc(fewer.image_auroc, fewer.image_auroc_std)} with {fewer.steps} steps x {fewer.draws} draws, "
        f"{format_auroc(more.image_auroc, more.image_auroc_std)} with {more.steps} x {more.draws}; paired difference "
        f"{100 * difference.difference:+.1f} points, {100 * difference.level:.0f}% interval "
        f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] (slack {100 * tolerance:.0f})"
    )
    verdict = convergence.verdict(tolerance)
    if convergence.broken(tolerance):
        detail += "; more budget raises AUROC: the attack is broken"
    elif verdict is False:
        detail += f"; not converged: the robust AUROC is an overestimate, rerun with steps >= {more.steps}" + (
            f" and eot_samples >= {more.draws}" if more.draws > 1 else ""
        )
    elif verdict:
        detail += f"; a drop of more than {excluded:.1f} points is excluded on {images} images"
    else:
        detail += (
            f"; inconclusive: a drop of up to {excluded:.1f} points is not excluded on {images} images, more than the "
            f"slack of {100 * tolerance:.0f} (more test images narrow the interval)"
        )
    return SanityCheck(NAME, verdict, detail, f"{fewer.budget} vs {more.budget}")
