"""Planning a robust evaluation: the runs, the sanity runs within their budget, their cost, and the seeds.

The configured runs are every attack, target and eps, per attacked detector, on every selected test image. The sanity
runs (Carlini et al., 2019, "On Evaluating Adversarial Robustness", sec. 5; :mod:`~anomalib_robust.evaluation.sanity`)
come after them, all but the convergence run fitted into ``sanity_budget`` (:mod:`~anomalib_robust.evaluation.budget`):

- the convergence run (the configured PGD or APGD run at the largest eps with :data:`CONVERGENCE_FACTOR` times its
  steps, and its EOT draws for a randomised detector, with that run's seeds) attacks every image, on top of the
  budget: its verdict backs the robust AUROC, and it needs every image to see a drop of a few points
  (:mod:`~anomalib_robust.evaluation.convergence`);
- PGD at a very large eps from the clean image, and random sign steps with its budget (the baseline it must beat),
  attack whole batches of the configured runs;
- Square at the largest eps, unless it is configured, attacks a stratified subset with its configured queries.

Every batch, run, phase and scoring repeat gets its own seed, derived from the evaluation's seed (:func:`derive_seed`),
so attack and evaluation noise are independent, and a run's numbers do not depend on the other runs or the ranks.

Example:
    >>> from anomalib_robust.evaluation.planning import derive_seed
    >>> derive_seed(0, "attack", 0, 1) == derive_seed(0, "attack", 0, 1) != derive_seed(0, "attack", 0, 2)
    True
"""

import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from anomalib_robust.attacks import APGD, PGD, Attack, DetectorScore, build_attack
from anomalib_robust.attacks.random_steps import RandomSteps
from anomalib_robust.evaluation.budget import (
    EvaluationPlan,
    Passes,
    attack_passes,
    attack_queries,
    fit_square,
    gradient_check_cost,
    gradient_check_passes,
    run_cost,
    square_passes,
    stratified_subset,
    whole_batches,
)
from anomalib_robust.evaluation.gradient_check import STEP_SCALES
from anomalib_robust.evaluation.report import AttackResult, format_budget
from anomalib_robust.evaluation.sharding import first_item

logger = logging.getLogger(__name__)

LARGE_EPS = 0.5
"""Default very large radius of the sanity check: half the pixel range, per pixel (L_inf) or in RMS terms (L_2,
multiplied by the square root of the number of pixel values)."""

LARGE_EPS_STEPS = 10
"""Steps of the very-large-eps sanity run within a sanity budget (and fewest without one). Without a random start a
few coarse steps do not reach the corner of the ball that fools the detector: on the tiny AdvRAD of
``configs/benchmark/robust_tiny.yaml`` PGD at eps 0.5 left AUROC at 31-34 % with 2 steps, 19-38 % with 5 and reached
0-16 % with 10."""

GRADIENT_CHECK_IMAGES = 8
"""Test images of the gradient checks: evenly spaced within each class, both classes in proportion."""

GRADIENT_CHECK_DIRECTIONS = 4
"""Random directions per image of the finite-difference check (plus the gradient's own)."""

GRADIENT_CHECK_STEPS = 4
"""Random sign steps per image of the attack-step check, at each of its three scales (healthy detectors' cosines are
0.95 to 1.0 in every direction, so four give the median; eight per scale made the float64 check cost 5x a PGD-10
run on 24 test images, beyond the whole sanity budget)."""

CONVERGENCE_FACTOR = 2
"""The convergence run has this many times the configured steps (and EOT draws, for a randomised detector)."""


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one phase of the evaluation, independent of every other ``(phase, batch, run, repeat)``."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


@dataclass
class Run:
    """One attack run and its per-batch outputs on this rank: scores ``(N, R)``, maps ``(N, R, H, W)``."""

    attack: Attack
    result: AttackResult
    scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    check: str = ""
    """For a sanity run, the comparison it serves: ``"convergence"``, ``"large_eps"`` (with ``"random_steps"``, its
    baseline) or ``"square"``."""
    pairs_with: int | None = None
    """For the convergence run, the number of the configured run whose seeds (random start, draws, scoring) it uses."""


@dataclass
class Scored:
    """Per-batch outputs of the clean pass on this rank."""

    indices: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SanityGroup:
    """Sanity runs that attack the same test images ``subset``; filled in as the evaluation goes: this rank's
    ``shards``, what its pass ``seen``, and the gathered ``indices``, ``labels`` and per-run ``scores``."""

    runs: list[Run]
    subset: torch.Tensor
    shards: list[DataLoader] = field(default_factory=list)
    seen: Scored = field(default_factory=Scored)
    indices: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    scores: list[torch.Tensor | None] = field(default_factory=list)


def gradient_check_plan(images: int) -> Passes:
    """Passes of the gradient checks on :data:`GRADIENT_CHECK_IMAGES` of ``images`` test images (all, if fewer)."""
    return gradient_check_passes(min(GRADIENT_CHECK_IMAGES, images), GRADIENT_CHECK_DIRECTIONS, GRADIENT_CHECK_STEPS)


@dataclass(frozen=True)
class RunPlanner:
    """The runs of one evaluation, from the evaluator's threat model and attack settings (see
    :class:`~anomalib_robust.evaluation.RobustEvaluator` for each argument)."""

    attacks: list[str]
    eps: list[float]
    norm: str
    settings: dict
    targets: list[str]
    sanity_budget: float | None
    large_eps: float | None
    resolution: str

    def configured_runs(self, detectors: list[DetectorScore], images: int) -> list[Run]:
        """The configured runs: every attack, target and eps, per attacked detector, on all ``images``."""
        return [
            self._make_run(name, eps, detector, images, images, target)
            for detector in detectors
            for target in self.targets
            for name in self.attacks
            for eps in self.eps
        ]

    def sanity_runs(
        self,
        detector: DetectorScore,
        loaders: list[DataLoader],
        configured: list[Run],
        repeats: int,
        indices: torch.Tensor,
        labels: torch.Tensor,
        batches: list[list[int]],
    ) -> list[SanityGroup]:
        """The sanity runs and the test images they attack: the convergence run, paired with the configured PGD or
        APGD run at the largest eps, on every image; within ``sanity_budget`` (module
        :mod:`~anomalib_robust.evaluation.budget`) the very-large-eps PGD without a random start with its random-sign
        baseline on whole batches, and Square at the largest eps, unless it is configured, on its own images."""
        largest, total = self.eps[-1], indices.numel()
        large_eps = self._large_eps_runs(detector, loaders, total)
        with_square = all(attack.lower() != "square" for attack in self.attacks)
        queries, restarts = self.settings["n_queries"], self.settings["restarts"]  # Square's, never reduced
        square_images, large_eps_subset = total, indices
        if self.sanity_budget is not None:
            by_index = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
            by_index[indices] = labels
            allowance = self.sanity_budget * sum(run_cost(run.result, repeats) for run in configured)
            allowance -= gradient_check_cost(gradient_check_plan(total))
            per_image = sum(run_cost(run.result, repeats, images=1) for run in large_eps)
            share = allowance / 2 if with_square else allowance
            large_eps_subset = whole_batches(batches, by_index, math.floor(max(share, 0.0) / per_image))
            if per_image * large_eps_subset.numel() > share:
                logger.warning(
                    "sanity_budget leaves %.0f forward-pass equivalents for the very-large-eps runs, less than one "
                    "batch of it (%d images, about %.0f per image); it runs on that batch and exceeds the budget",
                    max(share, 0.0), large_eps_subset.numel(), per_image,
                )  # fmt: skip
            if with_square:
                rest = allowance - min(per_image * large_eps_subset.numel(), share)  # Square keeps at least its half
                square_images = fit_square(rest, total, square_passes(detector, queries, restarts).cost + repeats)
        convergence = self._convergence_run(detector, configured, largest, total)
        groups = [] if convergence is None else [SanityGroup([convergence], indices)]
        groups.append(SanityGroup(large_eps, large_eps_subset))
        if with_square:
            square = self._make_run("square", largest, detector, total, total, n_queries=queries)
            square.check = "square"
            groups.append(SanityGroup([square], stratified_subset(indices, labels, square_images)))
        for group in groups:
            for run in group.runs:
                run.result.role, run.result.num_images = "sanity", int(group.subset.numel())
                run.result.budget = format_budget(run.result, total)
        return groups

    def cost(
        self, name: str, configured: list[Run], groups: list[SanityGroup], repeats: int, total: int, sanity: bool
    ) -> EvaluationPlan:
        """The planned cost of the configured runs, and with ``sanity`` of the sanity runs and gradient checks."""
        sanity_runs = [run for group in groups for run in group.runs]
        runs = [run.result for run in configured + sanity_runs]
        gradient = gradient_check_plan(total) if sanity else None
        convergence = next((run.result for run in sanity_runs if run.check == "convergence"), None)
        return EvaluationPlan(name, runs, repeats, total, gradient, self.sanity_budget if sanity else None, convergence)

    def _convergence_run(
        self, detector: DetectorScore, configured: list[Run], largest: float, total: int
    ) -> Run | None:
        """The configured PGD (or APGD) run at the largest eps with :data:`CONVERGENCE_FACTOR` times the steps (and
        the EOT draws, for a randomised detector), seeded as that run; ``None`` without such a run."""
        pairs_with = next(
            (
                number
                for number, run in enumerate(configured)
                if run.attack.detector is detector and isinstance(run.attack, PGD | APGD)
                and run.result.target == "score" and run.result.eps == largest
            ),
            None,
        )  # fmt: skip
        if pairs_with is None:
            return None
        paired = configured[pairs_with].attack
        more = detector
        if detector.stochastic:
            more = DetectorScore(detector.detector, CONVERGENCE_FACTOR * detector.eot_samples, bpda=detector.bpda,
                                 max_batch=detector.max_batch, stochastic=True, surrogates=detector.surrogates,
                                 gradient_precision=detector.gradient_precision)  # fmt: skip
        name = "apgd" if isinstance(paired, APGD) else "pgd"
        run = self._make_run(name, largest, more, total, total, steps=CONVERGENCE_FACTOR * paired.steps)
        run.check, run.pairs_with = "convergence", pairs_with
        return run

    def _large_eps_runs(self, detector: DetectorScore, loaders: list[DataLoader], total: int) -> list[Run]:
        """PGD at a very large eps from the clean image, with :data:`LARGE_EPS_STEPS` steps within a budget (at least
        as many without one), and random sign steps with the same budget (:class:`RandomSteps`), which it must beat.

        Both step by the largest scale of the attack's step that the attack-step check verifies (2 alpha at the
        largest eps): at PGD's default for the large eps (2.5 eps / steps, 0.125) healthy Padim and Fastflow left
        every anomalous image where it was, no better than noise, while at 0.002 to 0.03 they lowered all of them."""
        steps = self.settings["steps"]
        steps = LARGE_EPS_STEPS if self.sanity_budget is not None else max(steps, LARGE_EPS_STEPS)
        eps, largest = self._large_eps(detector, loaders), self.eps[-1]
        alpha = max(STEP_SCALES) * (self.settings["alpha"] or min(largest, 2.5 * largest / self.settings["steps"]))
        runs = [self._make_run(attack, eps, detector, total, total, steps=steps, alpha=alpha, random_start=False)
                for attack in ("pgd", RandomSteps)]  # fmt: skip
        runs[0].check, runs[1].check = "large_eps", "random_steps"
        return runs

    def _make_run(
        self,
        name: str | type[Attack],
        eps: float,
        detector: DetectorScore,
        images: int,
        total: int,
        target: str = "score",
        **override: int,
    ) -> Run:
        """One run on ``images`` of the ``total`` test images, with its planned passes per image."""
        attack = build_attack(name, detector, eps=eps, norm=self.norm, **{**self.settings, **override})
        passes = attack_passes(attack)
        result = AttackResult(
            attack.label,
            self.norm,
            eps,
            steps=getattr(attack, "steps", None),
            target=target,
            queries=attack_queries(attack),
            restarts=getattr(attack, "restarts", 1),
            draws=attack.detector.eot_samples,
            num_images=images,
            forward_passes=passes.forward,
            backward_passes=passes.backward,
        )
        result.budget = format_budget(result, total)
        return Run(attack, result)

    def _large_eps(self, detector: DetectorScore, loaders: list[DataLoader]) -> float:
        """Radius of the "very large eps" check: ``large_eps``, or half the pixel range (RMS per value for L_2)."""
        if self.large_eps is not None:
            return self.large_eps
        if self.norm == "Linf":
            return LARGE_EPS
        image = getattr(first_item(loaders), "image", None)
        if not isinstance(image, torch.Tensor):
            msg = "RobustEval needs labelled test items with an `image` tensor to size the L_2 sanity check."
            raise TypeError(msg)
        if self.resolution == "model":
            image = detector.to_input_resolution(image.unsqueeze(0))
        return LARGE_EPS * math.sqrt(image.numel())
