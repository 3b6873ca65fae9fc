"""Planned cost of a robust evaluation, in forward and backward passes per image, and the sanity checks' budget.

Robust evaluation of a randomised detector costs steps x EOT draws forward and backward passes per image (AdvRAD
paper, sec. 5.6), and the sanity checks of Carlini et al. (2019, "On Evaluating Adversarial Robustness", sec. 5) add
more attacks; Square at 500 queries x 8 draws costs more than the attack it checks. Counting, per attacked image (a
chunk of ``k`` batched EOT draws counts ``k`` passes, :mod:`anomalib_robust.attacks.eot`):

- an objective ``y * A(x)`` without gradient: ``eot_samples`` forward passes; with its gradient: as many forward and
  backward passes; re-scoring with ``s`` fresh draws: ``ceil(s / eot_samples) * eot_samples`` forward passes
  (:meth:`~anomalib_robust.attacks.base.Attack.rescored_objective`);
- PGD (AdvRAD paper, eq. 1-2): ``restarts x steps`` gradients, plus the clean and each final objective with
  ``select="best"``, or the re-scoring of each restart's final iterate with ``select="final"`` and ``restarts > 1``;
  its random-sign baseline (:class:`~anomalib_robust.attacks.random_steps.RandomSteps`) the same with an objective
  instead of each gradient (``"best"``) or nothing (``"final"``);
- APGD (Croce & Hein, 2020, Alg. 1): ``steps`` gradients and one objective per restart, plus the worst case over the
  clean image and the restarts (:meth:`~anomalib_robust.attacks.base.Attack.worst_case`, one re-scoring each);
- Square (Andriushchenko et al., 2020, Alg. 1): ``n_queries`` objectives per restart, plus the worst case;
- AutoAttack: its members, plus the worst case over the clean image and them;
- the deployed scoring of an image: one forward pass per repeat; the gradient checks
  (:mod:`~anomalib_robust.evaluation.gradient_check`, float64): one forward and backward pass, two forward passes per
  direction, and at each of three scales of the attack's step one plus two per random sign step per checked
  image.

A backward pass is counted as :data:`BACKWARD_COST` forward passes, and a float64 pass of the gradient check as
:data:`FLOAT64_COST` float32 ones; "cost" below is forward-pass equivalents.

The sanity budget: the sanity runs but the convergence run (their attacks, their scoring and the gradient checks) may
cost ``sanity_budget`` times the configured runs (attacks and scoring) on the whole test set. The convergence run
(more steps and draws) attacks every image on top of it: its verdict backs the robust AUROC, and on a subset it could
not see a drop of a few points (:mod:`~anomalib_robust.evaluation.convergence`). What is left after the gradient checks
goes half to the very-large-eps runs, half to Square (Square keeps its half when one batch of the very-large-eps runs
costs more than their half):

- the very-large-eps runs (PGD and its random-sign baseline) attack whole batches of the configured runs
  (:func:`whole_batches`); at least one batch, over budget if need be;
- Square attacks a stratified subset (:func:`stratified_subset`) with its configured queries and the attacker's EOT
  draws, always: only its images shrink, to no fewer than :data:`SQUARE_IMAGES` (:func:`fit_square`), so that its
  verdict concludes at the default budget, over the budget if need be.

Example:
    >>> from anomalib_robust.evaluation.budget import Passes, fit_square
    >>> (Passes(forward=10, backward=10) * 3).cost
    90.0
    >>> fit_square(allowance=6000.0, total_images=60, per_image=503.0)
    11
    >>> fit_square(allowance=1000.0, total_images=60, per_image=503.0)
    8
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from anomalib_robust.attacks import APGD, PGD, Attack, AutoAttack, DetectorScore, Square
from anomalib_robust.attacks.base import RESCORE_FACTOR
from anomalib_robust.attacks.random_steps import RandomSteps
from anomalib_robust.evaluation.gradient_check import STEP_SCALES
from anomalib_robust.evaluation.report import AttackResult, format_eps
from anomalib_robust.evaluation.sharding import evenly_spaced

logger = logging.getLogger(__name__)

BACKWARD_COST = 2.0
"""Forward-pass equivalents of one backward pass (the usual estimate: a backward pass costs about two forwards)."""

FLOAT64_COST = 8.0
"""Float32 passes per float64 pass of the gradient check: CPUs run float64 convolutions several times slower (measured
4x on AdvRAD's CPU preset and 14x on Padim with a ResNet-18 at 32 x 32, with the model's cast, 2026-12-02)."""

DEFAULT_SANITY_BUDGET = 1.5
"""The sanity runs but the convergence run may cost this multiple of the configured runs; the convergence run adds
about twice the cost of the configured run it is paired with (four times for a randomised detector, whose EOT draws
double too), on every image (``benchmarks/sanity_budget.py``)."""

SQUARE_IMAGES = 8
"""Fewest images of the Square sanity run (or the whole test set, if smaller), stratified. Square always has its
configured queries, so that a pass concludes and says on how many images and queries it was earned: at the default
500 queries, 8 images cost about 4,000 forward passes (x the EOT draws), about a PGD-10 run on 120 test images, i.e.
the configured runs again on a typical MVTec AD category."""


@dataclass(frozen=True)
class Passes:
    """Forward and backward passes (per image, or in total)."""

    forward: int = 0
    backward: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, count: int) -> "Passes":
        return Passes(self.forward * count, self.backward * count)

    __rmul__ = __mul__

    @property
    def cost(self) -> float:
        """Forward-pass equivalents: ``forward + BACKWARD_COST * backward``."""
        return self.forward + BACKWARD_COST * self.backward


def _objective(detector: DetectorScore) -> Passes:
    return Passes(forward=detector.eot_samples)


def _gradient(detector: DetectorScore) -> Passes:
    return Passes(forward=detector.eot_samples, backward=detector.eot_samples)


def _rescored(detector: DetectorScore, samples: int) -> Passes:
    return Passes(forward=math.ceil(samples / detector.eot_samples) * detector.eot_samples)


def _worst_case(detector: DetectorScore, candidates: int) -> Passes:
    """:meth:`Attack.worst_case`: the clean image and ``candidates`` points, each re-scored."""
    samples = RESCORE_FACTOR * detector.eot_samples if detector.stochastic else 1
    return (1 + candidates) * _rescored(detector, samples)


def square_passes(detector: DetectorScore, queries: int, restarts: int = 1) -> Passes:
    """Passes per image of a Square run with ``queries`` queries per restart."""
    return restarts * queries * _objective(detector) + _worst_case(detector, restarts)


def attack_passes(attack: Attack) -> Passes:
    """Planned forward and backward passes per image of one call of ``attack`` (module docstring).

    Raises:
        TypeError: for an attack whose cost is not modelled here.
    """
    detector = attack.detector
    if isinstance(attack, AutoAttack):
        members = sum((attack_passes(member) for member in attack.attacks), Passes())
        return members + _worst_case(detector, len(attack.attacks))
    if isinstance(attack, PGD):
        step = _gradient(detector)
        if isinstance(attack, RandomSteps):  # no gradient; an objective per iterate only to keep the best one
            step = _objective(detector) if attack.selection == "best" else Passes()
        steps = attack.restarts * attack.steps * step
        if attack.selection == "best":
            return steps + (1 + attack.restarts) * _objective(detector)
        rescoring = attack.restarts * _rescored(detector, attack.rescore_samples) if attack.restarts > 1 else Passes()
        return steps + rescoring
    if isinstance(attack, APGD):
        run = attack.steps * _gradient(detector) + _objective(detector)
        return attack.restarts * run + _worst_case(detector, attack.restarts)
    if isinstance(attack, Square):
        return square_passes(detector, attack.n_queries, attack.restarts)
    msg = f"attack_passes has no cost model for {type(attack).__name__}; expected PGD, APGD, Square or AutoAttack."
    raise TypeError(msg)


def attack_queries(attack: Attack) -> int | None:
    """Score queries per restart of ``attack``'s Square (Square itself, or AutoAttack's), ``None`` without one."""
    if isinstance(attack, Square):
        return attack.n_queries
    if isinstance(attack, AutoAttack):
        return next((member.n_queries for member in attack.attacks if isinstance(member, Square)), None)
    return None


def gradient_check_passes(images: int, directions: int, steps: int) -> Passes:
    """Passes of the gradient checks (:mod:`~anomalib_robust.evaluation.gradient_check`) on ``images`` images:
    the gradient, two differences per direction (plus the gradient's), the base point, and at each of the
    :data:`~anomalib_robust.evaluation.gradient_check.STEP_SCALES` the attack's step and two evaluations per random
    sign step."""
    per_scale = 1 + 2 * steps
    return Passes(forward=images * (1 + 2 * (directions + 1) + 1 + len(STEP_SCALES) * per_scale), backward=images)


def gradient_check_cost(passes: Passes) -> float:
    """Cost of the gradient check's (float64) ``passes`` in float32 forward-pass equivalents."""
    return FLOAT64_COST * passes.cost


def check_sanity_budget(sanity_budget: float | None) -> float | None:
    """``sanity_budget`` as a float, if ``None`` or a finite number > 0.

    Raises:
        ValueError: naming the argument otherwise.
    """
    if sanity_budget is None:
        return None
    if (
        isinstance(sanity_budget, bool)
        or not isinstance(sanity_budget, int | float)
        or not math.isfinite(sanity_budget)
        or sanity_budget <= 0
    ):
        msg = (
            "sanity_budget must be a finite number > 0 (the sanity runs' cost as a multiple of the configured "
            f"attacks') or None (full sanity runs on every image), got {sanity_budget!r}."
        )
        raise ValueError(msg)
    return float(sanity_budget)


def whole_batches(batches: list[list[int]], labels: torch.Tensor, size: int) -> torch.Tensor:
    """Test-set indices of evenly spaced whole ``batches`` holding about ``size`` images (at least one batch), and for
    a class they lack, the first batch that has it (``labels`` by test-set index; sorted indices)."""
    count = min(len(batches), max(1, round(size / (sum(map(len, batches)) / len(batches)))))
    chosen = evenly_spaced(len(batches), count)
    for label in (0, 1):
        if not any((labels[batches[number]] == label).any() for number in chosen):
            chosen.append(next(n for n, batch in enumerate(batches) if (labels[batch] == label).any()))
    return torch.tensor(sorted(index for number in chosen for index in batches[number]), dtype=torch.long)


def fit_square(allowance: float, total_images: int, per_image: float) -> int:
    """Images of the Square sanity run: as many as ``allowance`` forward-pass equivalents pay for at ``per_image``
    (its configured queries and draws, and the scoring), at least :data:`SQUARE_IMAGES`, at most ``total_images``."""
    return min(total_images, max(SQUARE_IMAGES, math.floor(max(allowance, 0.0) / per_image)))


def stratified_subset(indices: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` of the test images ``indices`` (sorted), evenly spaced within each class, both classes kept in their
    proportion with at least one image each; all of them when ``size`` is not smaller."""
    if size >= indices.numel():
        return indices
    normal, anomalous = indices[labels == 0], indices[labels == 1]
    count = round(size * anomalous.numel() / indices.numel())
    count = min(max(count, 1, size - normal.numel()), anomalous.numel(), size - 1)
    picks = [members[evenly_spaced(members.numel(), share)] for members, share in ((normal, size - count),
                                                                                   (anomalous, count))]  # fmt: skip
    return torch.cat(picks).sort().values


def run_cost(result: AttackResult, repeats: int, images: int | None = None) -> float:
    """Planned cost of a run: its attack and the deployed scoring of its adversarial images (``repeats`` forward
    passes each), on its ``num_images`` images (or ``images``)."""
    per_image = Passes(result.forward_passes + repeats, result.backward_passes).cost
    return per_image * (result.num_images if images is None else images)


def format_duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 10 s`` or ``2 h 05 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds) // 60
    if minutes < 60:
        return f"{minutes} min {round(seconds) % 60:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class EvaluationPlan:
    """What an evaluation will cost before it runs: every run's passes per image, the scoring, the gradient check.

    ``runs`` are the configured and the sanity runs (:class:`AttackResult` with their planned passes and images),
    ``repeats`` the deployed scorings per image, ``gradient`` the gradient check's passes (``None`` without it),
    ``convergence`` the convergence run among ``runs`` (on top of ``sanity_budget``; ``None`` without it).
    """

    model: str
    runs: list[AttackResult]
    repeats: int
    total_images: int
    gradient: Passes | None = None
    sanity_budget: float | None = None
    convergence: AttackResult | None = None

    def _runs(self, role: str) -> list[AttackResult]:
        return [run for run in self.runs if run.role == role]

    @property
    def clean(self) -> float:
        """Cost of scoring the clean images."""
        return float(self.repeats * self.total_images)

    @property
    def configured(self) -> float:
        """Cost of the configured runs (attacks and scoring)."""
        return sum(run_cost(run, self.repeats) for run in self._runs("attack"))

    @property
    def sanity(self) -> float:
        """Cost of the sanity runs (attacks and scoring) and the gradient check."""
        runs = sum(run_cost(run, self.repeats) for run in self._runs("sanity"))
        return runs + (gradient_check_cost(self.gradient) if self.gradient else 0.0)

    @property
    def total(self) -> float:
        """Cost of the whole evaluation, in forward-pass equivalents."""
        return self.clean + self.configured + self.sanity

    def passes(self) -> Passes:
        """Forward and backward passes of the whole evaluation."""
        total = Passes(forward=self.repeats * self.total_images) + (self.gradient or Passes())
        for run in self.runs:
            total += Passes(run.forward_passes + self.repeats, run.backward_passes) * run.num_images
        return total

    def summary(self) -> str:
        """One line: the totals, and the sanity runs against the configured ones."""
        passes = self.passes()
        line = (
            f"RobustEval plan for {self.model}: {passes.forward:,} forward and {passes.backward:,} backward passes "
            f"({self.total:,.0f} forward-pass equivalents) on {self.total_images} test images"
        )
        if self.sanity:
            limit = "full sanity runs" if self.sanity_budget is None else f"budget {self.sanity_budget:g}x"
            if self.convergence is not None:
                convergence = run_cost(self.convergence, self.repeats) / self.configured
                limit += f" plus the convergence run on every image, {convergence:.2f}x"
            line += f"; sanity checks {self.sanity / self.configured:.2f}x the configured runs ({limit})"
        return line

    def table(self) -> Table:
        """Rich table of the passes per image of every run (attack plus deployed scoring) and their cost."""
        table = Table(title=f"Planned cost of the robust evaluation of {self.model}", caption_justify="left")
        for column in ("Run", "Role", "eps", "Budget", "Images", "Forward / image", "Backward / image", "Cost"):
            table.add_column(column, justify="left" if column in {"Run", "Role", "Budget"} else "right")
        table.add_row("clean scoring", "-", "-", f"{self.repeats} scorings", str(self.total_images),
                      str(self.repeats), "0", f"{self.clean:,.0f}")  # fmt: skip
        for run in self.runs:
            table.add_row(run.attack, run.role, format_eps(run.eps, run.norm), run.budget, str(run.num_images),
                          str(run.forward_passes + self.repeats), str(run.backward_passes),
                          f"{run_cost(run, self.repeats):,.0f}")  # fmt: skip
        if self.gradient is not None:
            table.add_row("gradient check", "sanity", "-", "float64", "-", str(self.gradient.forward),
                          str(self.gradient.backward), f"{gradient_check_cost(self.gradient):,.0f}")  # fmt: skip
        table.caption = (
            f"{self.summary()}. Forward / image includes the {self.repeats} deployed scorings of each adversarial "
            f"image; the gradient check's row is in total passes. Cost in forward-pass equivalents, a backward pass "
            f"counting {BACKWARD_COST:g}, a float64 pass {FLOAT64_COST:g}."
        )
        return table

    def log(self, show: bool) -> None:
        """Log the summary (module logger); print the table too when ``show``."""
        logger.info(self.summary())
        if show:
            Console().print(self.table())

    def estimator(self, world_size: int, progress: Progress | None) -> Callable[[float, int], None]:
        """``estimate(seconds, images)``: after the first batch of the configured runs (clean scoring and every
        configured run on ``images`` images) took ``seconds``, log the estimated wall time of this rank's share."""
        per_image = self.repeats + sum(run_cost(run, self.repeats, images=1) for run in self._runs("attack"))

        def estimate(seconds: float, images: int) -> None:
            expected = seconds / (images * per_image) * self.total / world_size
            message = (
                f"RobustEval: the first batch ({images} images) took {format_duration(seconds)}; estimated wall time "
                f"{format_duration(expected)} for {self.total / world_size:,.0f} forward-pass equivalents"
            )
            logger.info(message)
            if progress is not None:
                progress.console.print(message)

        return estimate
