"""Robust evaluation of any anomalib detector: detector + test dataloaders -> :class:`RobustReport`, no Lightning.

The evaluation follows the rules that make a robust AUROC trustworthy:

- **The detector as deployed.** Clean and adversarial images are scored as the model is configured (one forward
  pass, its own ``num_noise_draws``, fresh noise), never as an EOT ensemble. The attack runs once per image; the scoring
  of the clean and the adversarial images is repeated ``eval_repeats`` times with independent noise for a randomised
  detector, and every AUROC is the mean over those repeats, reported with its standard deviation.
- **EOT is the attacker's tool.** Attacks estimate gradients (and choose among candidates) with ``eot_samples``
  draws (AdvRAD paper, sec. 5.6).
- **Attack and evaluation noise are independent.** Each batch, attack run, phase and repeat gets its own seed,
  derived from ``(seed, phase, batch, run, repeat)`` (:func:`derive_seed`).
- **AUROC by rank, on raw scores, in float64** (:mod:`anomalib_robust.evaluation.metrics`).
- **The attacked pipeline is the one anomalib tests**: ``pre_processor.transform`` then the torch model
  (:class:`~anomalib_robust.attacks.DetectorScore`). By default eps is measured at the model's input resolution
  (``resolution="model"``: the test image is resized as the pre-processor resizes it, then attacked, as the papers
  measure eps per pixel of the 256 x 256 input); ``resolution="native"`` attacks the test image before resizing.
  L_2 radii grow with the pixel count, so the same L_2 eps is a different threat at each resolution.

Attacks push the image score (``target="score"``, the AdvRAD paper's sec. 3) or the anomaly map (``target="map"``:
normal pixels up, anomalous pixels down); the pixel AUROC of a score-target run is the pixel AUROC under the image
attack, that of a map-target run the robust localisation. The sanity checks of
:mod:`anomalib_robust.evaluation.sanity` run extra attacks and two gradient checks, within a budget
(``sanity_budget``, a multiple of the configured runs' cost, :mod:`anomalib_robust.evaluation.budget`), after the
configured runs: the convergence run (more steps and draws, with the seeds of the configured run it is paired with) and
the very-large-eps run attack whole batches of the test set, Square a stratified subset, and each comparison uses the
configured runs' scores on the same images. Before attacking, the evaluator logs its plan (forward
and backward passes per image of every run) and, after the first batch, an estimate of the wall time. With
``resume_dir`` every attacked batch is kept as it is computed, and an interrupted evaluation resumes with the same
numbers (:mod:`anomalib_robust.evaluation.resume`).

Example:
    >>> from anomalib_robust.evaluation import RobustEvaluator
    >>> evaluator = RobustEvaluator(attacks=["pgd"], eps=[2 / 255], eval_repeats=4)
    >>> report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])  # doctest: +SKIP
"""

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import distributed, nn
from torch.utils.data import DataLoader

from anomalib_robust.attacks import APGD, ATTACKS, PGD, Attack, DetectorScore, NotDifferentiableError, build_attack
from anomalib_robust.attacks.base import check_count, check_norm, check_positive
from anomalib_robust.attacks.eot import check_max_batch
from anomalib_robust.attacks.pgd import check_select
from anomalib_robust.attacks.random_steps import RandomSteps
from anomalib_robust.defenses import DiffusionPurifier, Purified
from anomalib_robust.evaluation.budget import (
    DEFAULT_SANITY_BUDGET,
    EvaluationPlan,
    attack_passes,
    attack_queries,
    check_sanity_budget,
    fit_square,
    gradient_check_cost,
    gradient_check_passes,
    run_cost,
    square_passes,
    stratified_subset,
    whole_batches,
)
from anomalib_robust.evaluation.gradient_check import STEP_SCALES, check_gradient
from anomalib_robust.evaluation.metrics import mean_and_std, paired_auroc_difference, pixel_auroc, rank_auroc
from anomalib_robust.evaluation.report import (
    AttackResult,
    ImageScores,
    RobustReport,
    SanityCheck,
    format_budget,
    format_eps,
)
from anomalib_robust.evaluation.resume import (
    BatchStore,
    batch_digest,
    check_resume_dir,
    dataset_fingerprint,
    model_fingerprint,
)
from anomalib_robust.evaluation.sanity import BlackBox, Convergence, LargeEps, sanity_checks
from anomalib_robust.evaluation.sharding import (
    check_both_classes,
    cuda_devices,
    first_item,
    gather_by_index,
    images_and_labels,
    rank_shards,
    resize_masks,
    test_batches,
)

logger = logging.getLogger(__name__)

PURIFIER_GRADIENTS = ("full", "bpda")
"""How attacks differentiate through a defense's purifier: the whole chain, or BPDA with the identity backward."""

RESOLUTIONS = ("model", "native")
"""Where eps is measured: at the model's input size (default), or on the test image before the pre-processor."""

TARGETS = ("score", "map")
"""What an attack pushes: the image score, or the anomaly map pixel by pixel."""

DEFAULT_EVAL_REPEATS = 4
"""Independent scorings of a randomised detector behind every reported AUROC."""

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

RANDOMNESS_CHECK_IMAGES = 8
"""Test images scored repeatedly to find undeclared noise (the first ones, the same on every rank)."""


def derive_seed(seed: int, *parts: object) -> int:
    """A seed for one phase of the evaluation, independent of every other ``(phase, batch, run, repeat)``."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        msg = f"{name} must be one of {tuple(choices)}, got {value!r}."
        raise ValueError(msg)
    return value


@dataclass
class _Run:
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
class _Scored:
    """Per-batch outputs of the clean pass on this rank."""

    indices: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _SanityGroup:
    """Sanity runs that attack the same test images ``subset``; filled in as the evaluation goes: this rank's
    ``shards``, what its pass ``seen``, and the gathered ``indices``, ``labels`` and per-run ``scores``."""

    runs: list[_Run]
    subset: torch.Tensor
    shards: list[DataLoader] = field(default_factory=list)
    seen: _Scored = field(default_factory=_Scored)
    indices: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    scores: list[torch.Tensor | None] = field(default_factory=list)


@dataclass
class _Gathered:
    """The configured runs' scores ``(N, R)`` on every test image (``None`` for a run that could not be carried out),
    with the images' test-set ``indices`` and ``labels``."""

    indices: torch.Tensor
    labels: torch.Tensor
    scores: list[torch.Tensor | None]


class RobustEvaluator:
    """Standard vs robust AUROC of an anomalib detector under score-direction attacks.

    Args:
        attacks: attack names from :data:`anomalib_robust.attacks.ATTACKS` (``pgd``, ``apgd``, ``square``,
            ``autoattack``).
        eps: one radius or a list (the AUROC-vs-eps curve); the AdvRAD paper uses ``2/255`` (L_inf) and ``0.2`` (L_2).
        norm: ``"Linf"`` or ``"L2"``.
        steps: iterations of the gradient attacks.
        alpha: PGD step size; ``None`` for ``2.5 * eps / steps`` (at most ``eps``).
        restarts: random restarts per attack.
        n_queries: score queries of Square.
        select: which PGD iterate is the adversarial example (:class:`~anomalib_robust.attacks.PGD`): ``"auto"``
            (the final iterate for randomised detectors, the best one for deterministic ones), ``"best"``, ``"final"``.
        eot_samples: the attacker's draws per gradient and objective for randomised detectors; ``None`` for 8.
        max_batch: most images per forward call of the batched EOT draws; ``None`` picks it from the image size.
        eval_repeats: independent scorings of a randomised detector per reported AUROC (mean and std).
        targets: ``"score"`` (the image score), ``"map"`` (the anomaly map; needs masks), or both.
        resolution: ``"model"`` (eps at the model's input size) or ``"native"`` (the test image's size).
        sanity_checks: also run the sanity checks (:mod:`~anomalib_robust.evaluation.sanity`): the convergence run
            (:data:`CONVERGENCE_FACTOR` times the steps, and the draws of a randomised detector), PGD at a very large
            eps from the clean image against random sign steps with its budget, Square at the largest eps unless
            configured, and the gradient checks.
        sanity_budget: the sanity checks may cost this multiple of the configured runs (attacks and scoring, in
            forward-pass equivalents; default 1.5): the paired runs then attack whole batches (at least one), the
            very large eps with 10 steps, and Square fewer images (at least 8) with its configured queries and
            draws, always. ``None``: full sanity runs (every image, the configured steps and queries).
        large_eps: radius of the "very large eps" check; ``None`` for 0.5 (L_inf) or ``0.5 * sqrt(C * H * W)`` (L_2).
        tolerance: AUROC slack of the comparisons, on top of the noise of the repeats.
        max_samples: evaluate only ``max_samples`` evenly spaced images of each test dataloader.
        num_grid_images: images in the grid of clean vs adversarial examples (0 for none).
        seed: root of every seed of the evaluation; the global RNG is restored afterwards.
        defense: a diffusion purifier (DiffPure, TMA) put in front of the detector; ``None`` evaluates the detector.
        purifier_gradients: with a defense, attack through the purifier with ``"full"`` gradients, ``"bpda"``, or both.
        resume_dir: keep every attacked batch's scores in this directory as soon as they are computed, so that an
            interrupted evaluation run again with the same settings and model resumes, with the same numbers
            (:mod:`~anomalib_robust.evaluation.resume`); removed once the report is built. ``None``: nothing is kept.
    """

    def __init__(
        self,
        attacks: Sequence[str] = ("pgd",),
        eps: float | Sequence[float] = 2 / 255,
        norm: str = "Linf",
        steps: int = 10,
        alpha: float | None = None,
        restarts: int = 1,
        n_queries: int = 500,
        select: str = "auto",
        eot_samples: int | None = None,
        max_batch: int | None = None,
        eval_repeats: int = DEFAULT_EVAL_REPEATS,
        targets: str | Sequence[str] = ("score",),
        resolution: str = "model",
        sanity_checks: bool = True,
        sanity_budget: float | None = DEFAULT_SANITY_BUDGET,
        large_eps: float | None = None,
        tolerance: float = 0.02,
        max_samples: int | None = None,
        num_grid_images: int = 4,
        seed: int = 0,
        defense: DiffusionPurifier | None = None,
        purifier_gradients: str | Sequence[str] = PURIFIER_GRADIENTS,
        resume_dir: str | Path | None = None,
    ) -> None:
        self.attacks = [attacks] if isinstance(attacks, str) else list(attacks)
        if not self.attacks:
            msg = f"attacks must name at least one attack from {sorted(ATTACKS)}, got an empty list."
            raise ValueError(msg)
        for name in self.attacks:
            if name.lower().replace("-", "").replace("_", "") not in ATTACKS:
                msg = f"Unknown attack {name!r} in attacks: expected names from {sorted(ATTACKS)}."
                raise ValueError(msg)
        values = [eps] if isinstance(eps, int | float) else list(eps)
        self.eps = sorted(check_positive("eps", value) for value in values)
        if not self.eps:
            msg = "eps must hold at least one radius, got an empty list."
            raise ValueError(msg)
        self.norm = check_norm(norm)
        self.settings = {
            "steps": check_count("steps", steps),
            "alpha": None if alpha is None else check_positive("alpha", alpha),
            "restarts": check_count("restarts", restarts),
            "n_queries": check_count("n_queries", n_queries),
            "select": check_select(select),
        }
        self.eot_samples = None if eot_samples is None else check_count("eot_samples", eot_samples)
        self.max_batch = check_max_batch(max_batch)
        self.eval_repeats = check_count("eval_repeats", eval_repeats)
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            msg = f"targets must hold at least one of {TARGETS}, got an empty list."
            raise ValueError(msg)
        for target in self.targets:
            _check_choice("targets", target, TARGETS)
        self.resolution = _check_choice("resolution", resolution, RESOLUTIONS)
        self.sanity_checks = sanity_checks
        self.sanity_budget = check_sanity_budget(sanity_budget)
        self.large_eps = None if large_eps is None else check_positive("large_eps", large_eps)
        self.tolerance = tolerance
        self.max_samples = None if max_samples is None else check_count("max_samples", max_samples)
        self.num_grid_images = num_grid_images
        self.seed = seed
        if defense is not None and not isinstance(defense, DiffusionPurifier):
            msg = f"defense must be a DiffusionPurifier (DiffPure, TMA) or None, got {type(defense).__name__}."
            raise TypeError(msg)
        self.defense = defense
        self.purifier_gradients = [purifier_gradients] if isinstance(purifier_gradients, str) else purifier_gradients
        if not self.purifier_gradients or any(mode not in PURIFIER_GRADIENTS for mode in self.purifier_gradients):
            msg = f"purifier_gradients must be a non-empty subset of {PURIFIER_GRADIENTS}, got {purifier_gradients!r}."
            raise ValueError(msg)
        self.resume_dir = check_resume_dir(resume_dir)

    def evaluate(
        self,
        model: nn.Module,
        loaders: Sequence[DataLoader],
        rank: int = 0,
        world_size: int = 1,
        show_progress: bool = False,
    ) -> tuple[RobustReport, dict | None]:
        """Attack and score this rank's share of ``loaders``, gather across ranks, and build the report.

        The configured runs attack every selected test image, then the sanity runs attack their subset. Returns the
        report (identical on every rank) and the arguments of
        :func:`~anomalib_robust.evaluation.plots.plot_adversarial_grid` for the first batch (``None`` on ranks
        without batches, or when there is no grid).
        """
        if self.defense is not None:
            model = Purified(model, self.defense, visualizer=False).to(model.device)
        detector = DetectorScore(model, eot_samples=self.eot_samples, max_batch=self.max_batch)
        loaders = list(loaders)
        device = next(model.parameters(), torch.empty(0)).device
        self._detect_randomness(detector, loaders, device)
        if detector.stochastic and detector.eot_samples < 2:
            msg = (
                f"RobustEval: {detector.name} is randomised (declared or detected), so its robust AUROC "
                f"needs EOT: eot_samples must be >= 2 or None (default 8), got {self.eot_samples}."
            )
            raise ValueError(msg)
        shards = rank_shards(loaders, rank, world_size, self.max_samples)
        indices, labels = _test_set(shards)
        check_both_classes(labels)  # before any attack: a single-class test set is an error at once
        repeats = self.eval_repeats if detector.stochastic else 1
        store = self._store(model, loaders)
        with torch.inference_mode(False), detector.prepared(), torch.random.fork_rng(devices=cuda_devices(device)):
            detectors = self._attacked_detectors(detector)
            configured = self._runs(detectors, indices.numel())
            groups: list[_SanityGroup] = []
            if self.sanity_checks:
                batches = test_batches(loaders, self.max_samples)
                groups = self._sanity_runs(detectors[0], loaders, configured, repeats, indices, labels, batches)
            sanity = [run for group in groups for run in group.runs]
            checked = stratified_subset(indices, labels, GRADIENT_CHECK_IMAGES)
            gradient = gradient_check_passes(checked.numel(), GRADIENT_CHECK_DIRECTIONS, GRADIENT_CHECK_STEPS)
            plan = EvaluationPlan(
                detector.name, [run.result for run in configured + sanity], repeats, indices.numel(),
                gradient if self.sanity_checks else None, self.sanity_budget if self.sanity_checks else None,
            )  # fmt: skip
            plan.log(show_progress)
            for group in groups:
                group.shards = rank_shards(loaders, rank, world_size, selections=_selections(loaders, group.subset))
            with Progress(
                TextColumn("[bold]RobustEval[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not show_progress,
            ) as progress:
                steps = len(configured) * sum(map(len, shards))
                steps += sum(len(group.runs) * sum(map(len, group.shards)) for group in groups)
                bar = (progress, progress.add_task(detector.name, total=steps))
                estimate = plan.estimator(world_size, progress if show_progress else None)
                clean, grid = self._attack_pass(detector, shards, configured, repeats, device, bar, store, 0, estimate)
                number = len(configured)
                for group in groups:
                    group.seen, _ = self._attack_pass(
                        detector, group.shards, group.runs, repeats, device, bar, store, number
                    )
                    number += len(group.runs)
            gradient_checks = self._gradient_check(detector, loaders, checked, device) if self.sanity_checks else []
        synchronise_status(configured + sanity)
        report, configured_scores = self._report(detector, repeats, clean, configured, groups)
        report.configured_cost, report.sanity_cost = plan.configured, plan.sanity
        if self.sanity_checks:
            report.sanity_budget = self.sanity_budget
            report.sanity_images = max(int(group.subset.numel()) for group in groups)
            comparisons = _comparisons(configured, configured_scores, groups, self.eps[-1], self.seed)
            report.baselines = comparisons.pop("baselines")
            report.checks = sanity_checks(report, self.tolerance, gradient=gradient_checks, **comparisons)
            convergence = comparisons["convergence"]
            if convergence is not None:
                paired = next(run for run in groups[0].runs if run.check == "convergence").pairs_with
                configured[paired].result.converged = convergence.converged(self.tolerance)
        if store is not None and rank == 0:  # every rank is past its attacks: the report's gather waited for them
            store.remove()
        return report, grid

    def _store(self, model: nn.Module, loaders: list[DataLoader]) -> BatchStore | None:
        """The stored batches of this evaluation (``resume_dir``), under a fingerprint of every setting that changes
        an attack or a score, of the model, of the test set and of the code (which the store adds); ``None`` without
        ``resume_dir``."""
        if self.resume_dir is None:
            return None
        attack_settings = {
            "attacks": self.attacks, "eps": self.eps, "norm": self.norm, "settings": self.settings,
            "eot_samples": self.eot_samples, "max_batch": self.max_batch, "eval_repeats": self.eval_repeats,
            "targets": self.targets, "resolution": self.resolution, "sanity_checks": self.sanity_checks,
            "sanity_budget": self.sanity_budget, "large_eps": self.large_eps, "max_samples": self.max_samples,
            "seed": self.seed, "purifier_gradients": self.purifier_gradients,
        }  # fmt: skip
        fingerprint = {**attack_settings, "model": model_fingerprint(model), "test_set": dataset_fingerprint(loaders)}
        store = BatchStore(self.resume_dir, fingerprint)
        stored = store.stored_runs()
        if stored:
            logger.info("RobustEval: resuming from %s (%d attacked batches stored)", store.directory, stored)
        return store

    def _report(
        self,
        detector: DetectorScore,
        repeats: int,
        clean: "_Scored",
        configured: list[_Run],
        groups: list["_SanityGroup"],
    ) -> tuple[RobustReport, "_Gathered"]:
        """Gather every rank's scores and compute each AUROC: configured runs on every image, with the worst case
        over them per eps, and sanity runs on their images. Also returns the configured runs' gathered scores."""
        indices, labels, scores, maps, masks, *per_run = gather_by_index(
            clean.indices,
            clean.indices,
            clean.labels,
            clean.scores,
            clean.maps,
            clean.masks,
            *(values for run in configured for values in (run.scores, run.maps)),
        )
        report = RobustReport(
            model=detector.name,
            norm=self.norm,
            eot_samples=detector.eot_samples,
            num_samples=int(labels.numel()),
            clean_image_auroc=0.0,
            eval_repeats=repeats,
            resolution=self.resolution,
        )
        report.clean_image_auroc, report.clean_image_auroc_std = _image_auroc(scores, labels)
        report.clean_pixel_auroc, report.clean_pixel_auroc_std = _pixel_auroc(maps, masks)
        for run, run_scores, run_maps in zip(configured, per_run[::2], per_run[1::2], strict=True):
            if run.result.status == "ok":
                run.result.image_auroc, run.result.image_auroc_std = _image_auroc(run_scores, labels)
                run.result.pixel_auroc, run.result.pixel_auroc_std = _pixel_auroc(run_maps, masks)
            report.results.append(run.result)
        worst_cases = _worst_cases(configured, per_run[::2], labels)
        report.results += [result for result, _ in worst_cases]
        report.image_scores = ImageScores(labels, scores, {
            run.result.key: run_scores for run, run_scores in zip(configured, per_run[::2], strict=True)
            if run.result.status == "ok" and run.result.target == "score"
        } | {result.key: worst for result, worst in worst_cases})  # fmt: skip
        for group in groups:
            group.indices, group.labels, *group_scores = gather_by_index(
                group.seen.indices, group.seen.indices, group.seen.labels, *(run.scores for run in group.runs)
            )
            for run, run_scores in zip(group.runs, group_scores, strict=True):
                if run.result.status == "ok":
                    run.result.image_auroc, run.result.image_auroc_std = _image_auroc(run_scores, group.labels)
                    group.scores.append(run_scores)
                else:
                    group.scores.append(None)
                report.results.append(run.result)
        return report, _Gathered(indices, labels, per_run[::2])

    def _attacked_detectors(self, detector: DetectorScore) -> list[DetectorScore]:
        """The scores the attacks differentiate: the detector, or one per purifier-gradient mode with a defense."""
        if self.defense is None:
            return [detector]
        bpda = DetectorScore(
            detector.detector,
            detector.eot_samples,
            bpda={"model.purifier": None},
            max_batch=detector.max_batch,
            stochastic=detector.stochastic,
        )
        return [detector if mode == "full" else bpda for mode in self.purifier_gradients]

    def _runs(self, detectors: list[DetectorScore], images: int) -> list[_Run]:
        """The configured runs: every attack, target and eps, per attacked detector, on all ``images``."""
        return [
            self._make_run(name, eps, detector, images, images, target)
            for detector in detectors
            for target in self.targets
            for name in self.attacks
            for eps in self.eps
        ]

    def _sanity_runs(
        self,
        detector: DetectorScore,
        loaders: list[DataLoader],
        configured: list[_Run],
        repeats: int,
        indices: torch.Tensor,
        labels: torch.Tensor,
        batches: list[list[int]],
    ) -> list["_SanityGroup"]:
        """The sanity runs and the test images they attack, fitted into ``sanity_budget`` (module
        :mod:`~anomalib_robust.evaluation.budget`): the paired runs (the convergence run, paired with the configured
        PGD or APGD run at the largest eps, and the very-large-eps PGD without a random start with its random-sign
        baseline) on whole batches, and Square at the largest eps, unless it is configured, on its own images."""
        largest, total = self.eps[-1], indices.numel()
        paired = self._large_eps_runs(detector, loaders, total)
        convergence = self._convergence_run(detector, configured, largest, total)
        if convergence is not None:
            paired.insert(0, convergence)
        with_square = all(attack.lower() != "square" for attack in self.attacks)
        queries, restarts = self.settings["n_queries"], self.settings["restarts"]  # Square's, never reduced
        square_images, paired_subset = total, indices
        if self.sanity_budget is not None:
            by_index = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
            by_index[indices] = labels
            gradient = gradient_check_passes(min(GRADIENT_CHECK_IMAGES, total), GRADIENT_CHECK_DIRECTIONS,
                                             GRADIENT_CHECK_STEPS)  # fmt: skip
            allowance = self.sanity_budget * sum(run_cost(run.result, repeats) for run in configured)
            allowance -= gradient_check_cost(gradient)
            per_image = sum(run_cost(run.result, repeats, images=1) for run in paired)
            share = allowance / 2 if with_square else allowance
            paired_subset = whole_batches(batches, by_index, math.floor(max(share, 0.0) / per_image))
            if per_image * paired_subset.numel() > share:
                logger.warning(
                    "sanity_budget leaves %.0f forward-pass equivalents for the paired sanity runs, less than one "
                    "batch of them (%d images, about %.0f per image); they run on that batch and exceed the budget",
                    max(share, 0.0), paired_subset.numel(), per_image,
                )  # fmt: skip
            if with_square:
                rest = allowance - min(per_image * paired_subset.numel(), share)  # Square keeps at least its half
                square_images = fit_square(rest, total, square_passes(detector, queries, restarts).cost + repeats)
        groups = [_SanityGroup(paired, paired_subset)]
        if with_square:
            square = self._make_run("square", largest, detector, total, total, n_queries=queries)
            square.check = "square"
            groups.append(_SanityGroup([square], stratified_subset(indices, labels, square_images)))
        for group in groups:
            for run in group.runs:
                run.result.role, run.result.num_images = "sanity", int(group.subset.numel())
                run.result.budget = format_budget(run.result, total)
        return groups

    def _convergence_run(
        self, detector: DetectorScore, configured: list[_Run], largest: float, total: int
    ) -> _Run | None:
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
                                 max_batch=detector.max_batch, stochastic=True)  # fmt: skip
        name = "apgd" if isinstance(paired, APGD) else "pgd"
        run = self._make_run(name, largest, more, total, total, steps=CONVERGENCE_FACTOR * paired.steps)
        run.check, run.pairs_with = "convergence", pairs_with
        return run

    def _large_eps_runs(self, detector: DetectorScore, loaders: list[DataLoader], total: int) -> list[_Run]:
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
    ) -> _Run:
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
        return _Run(attack, result)

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

    def _attack_pass(
        self,
        detector: DetectorScore,
        shards: list[DataLoader],
        runs: list[_Run],
        repeats: int,
        device: torch.device,
        progress: tuple[Progress, int],
        store: BatchStore | None,
        first_run: int = 0,
        on_first_batch: Callable[[float, int], None] | None = None,
    ) -> tuple[_Scored, dict | None]:
        """Attack every batch of ``shards`` with every run and score the adversarial images.

        The configured pass (``first_run == 0``) also scores the clean images and keeps the grid; the sanity passes
        number their runs from ``first_run``, so that every run has its own seeds, except the convergence run, which
        takes those of the configured run it is paired with (the same random start, draws and scoring noise). A
        (batch, run) found in ``store`` is read instead of attacked, and one attacked now is written to it.
        ``on_first_batch(seconds, images)`` is called once, after the first batch, if that batch was attacked now.
        """
        seen, grid, configured = _Scored(), None, first_run == 0
        started = time.perf_counter()
        for shard in shards:
            for index, batch in shard:
                first = int(index[0])
                images, labels = images_and_labels(batch, device)
                if self.resolution == "model":
                    images = detector.to_input_resolution(images)
                seen.indices.append(index)
                seen.labels.append(labels.cpu())
                digest = None if store is None else batch_digest(images, labels, getattr(batch, "gt_mask", None))
                restored = False
                maps = masks = None
                if configured:
                    scores, maps = self._score(detector, images, repeats, first, "clean")
                    gt_masks = getattr(batch, "gt_mask", None)
                    masks = None if maps is None or gt_masks is None else resize_masks(gt_masks, maps.shape[-2:])
                    seen.scores.append(scores)
                    if masks is not None:
                        seen.maps.append(maps)
                        seen.masks.append(masks)
                for number, run in enumerate(runs, start=first_run):
                    progress[0].update(
                        progress[1],
                        advance=1,
                        description=f"{detector.name}: {run.result.attack} eps={format_eps(run.result.eps, self.norm)}",
                    )
                    keep_maps = masks is not None and run.result.role == "attack"
                    for_grid = configured and grid is None and self.num_grid_images and number == len(self.eps) - 1
                    stored = None if store is None else store.get(first, number, digest)
                    if stored is not None and not (for_grid and stored["adversarial"] is None):
                        restored = True
                        adversarial, run_scores, run_maps = stored["adversarial"], stored["scores"], stored["maps"]
                    else:
                        seeds = number if run.pairs_with is None else run.pairs_with
                        adversarial = self._attack_batch(
                            run, images, labels, masks, derive_seed(self.seed, "attack", first, seeds)
                        )
                        if adversarial is None:
                            continue
                        run_scores, run_maps = self._score(detector, adversarial, repeats, first, seeds)
                        if store is not None:
                            store.put(first, number, digest, scores=run_scores, maps=run_maps if keep_maps else None,
                                      adversarial=adversarial if for_grid else None)  # fmt: skip
                    run.scores.append(run_scores)
                    if keep_maps:
                        run.maps.append(run_maps)
                    if for_grid:
                        adversarial_maps = run_maps if masks is not None else None
                        grid = _grid(images, adversarial.to(images.device), maps, adversarial_maps, labels, run,
                                     self.num_grid_images)  # fmt: skip
                if on_first_batch is not None:
                    if not restored:
                        on_first_batch(time.perf_counter() - started, len(index))
                    on_first_batch = None
        return seen, grid

    def _score(
        self, detector: DetectorScore, images: torch.Tensor, repeats: int, first: int, phase: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deployed scores ``(N, repeats)`` and maps ``(N, repeats, H, W)``, each repeat with its own noise seed."""
        scores, maps = [], []
        for repeat in range(repeats):
            torch.manual_seed(derive_seed(self.seed, "evaluate", first, phase, repeat))
            score, anomaly_map = detector.predict(images)
            scores.append(score.cpu())
            maps.append(None if anomaly_map is None else anomaly_map.cpu())
        stacked_maps = None if maps[0] is None else torch.stack(maps, dim=1)
        return torch.stack(scores, dim=1), stacked_maps

    @staticmethod
    def _attack_batch(
        run: _Run, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None, seed: int
    ) -> torch.Tensor | None:
        """Attack one batch; a non-differentiable score (or a map target without masks) marks the run not attackable."""
        if run.result.status != "ok":
            return None
        target = contextlib.nullcontext()
        if run.result.target == "map":
            if masks is None:
                run.result.status = "not attackable"
                run.result.reason = "target='map' needs anomaly maps and ground-truth masks in the test set"
                return None
            target = run.attack.detector.map_target(masks.to(images.device))
        run.attack.seed = seed
        try:
            with target:
                return run.attack(images, labels)
        except NotDifferentiableError as error:
            run.result.status, run.result.reason = "not attackable", str(error)
            return None

    def _images(
        self, detector: DetectorScore, loaders: list[DataLoader], test_indices: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The test images ``test_indices`` (indices in the whole test set) and their labels, at the attacked
        resolution: the same images on every rank, whatever its shard."""
        items = [
            (loader.collate_fn or torch.utils.data.default_collate, loader.dataset[index])
            for loader, selection in zip(loaders, _selections(loaders, test_indices), strict=True)
            for index in selection
        ]
        images, labels = images_and_labels(items[0][0]([item for _, item in items]), device)
        if self.resolution == "model":
            images = detector.to_input_resolution(images)
        return images, labels

    def _detect_randomness(self, detector: DetectorScore, loaders: list[DataLoader], device: torch.device) -> None:
        """Score the first :data:`RANDOMNESS_CHECK_IMAGES` test images under each seed of
        :data:`~anomalib_robust.attacks.detector.RANDOMNESS_SEEDS`: a detector whose scores differ is evaluated as
        randomised (EOT, ``eval_repeats``) even if undeclared (:meth:`DetectorScore.detect_randomness`).

        Without test images there is nothing to score; the single-class check names that error.
        """
        total = sum(len(loader.dataset) for loader in loaders)
        if total:
            first = torch.arange(min(RANDOMNESS_CHECK_IMAGES, total))
            detector.detect_randomness(self._images(detector, loaders, first, device)[0])

    def _gradient_check(
        self, detector: DetectorScore, loaders: list[DataLoader], checked: torch.Tensor, device: torch.device
    ) -> list[SanityCheck]:
        """The finite-difference and attack-step checks (:mod:`~anomalib_robust.evaluation.gradient_check`) at the
        configured attack's random starts at the largest eps, on the test images ``checked``."""
        images, labels = self._images(detector, loaders, checked, device)
        eps, steps = self.eps[-1], self.settings["steps"]
        alpha = self.settings["alpha"] or min(eps, 2.5 * eps / steps)
        names = ("autograd matches finite differences", "the gradient predicts the change at the attack's step")
        budgets = (f"{checked.numel()} images x {GRADIENT_CHECK_DIRECTIONS + 1} directions",
                   f"{checked.numel()} images x {GRADIENT_CHECK_STEPS + 1} steps")  # fmt: skip
        try:
            check = check_gradient(detector, images, labels, eps, alpha, self.norm, GRADIENT_CHECK_DIRECTIONS,
                                   GRADIENT_CHECK_STEPS, seed=self.seed)  # fmt: skip
        except NotDifferentiableError:
            detail = "the score is not differentiable (see the attack rows)"
            return [SanityCheck(name, None, detail, budget) for name, budget in zip(names, budgets, strict=True)]
        verdicts = (check.finite_difference, check.attack_step)
        return [
            SanityCheck(name, verdict.passed, verdict.detail, budget)
            for name, verdict, budget in zip(names, verdicts, budgets, strict=True)
        ]


def _test_set(shards: list[DataLoader]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and labels of the whole (selected) test set, gathered from every rank's shard, in test-set order."""
    indices, labels = [], []
    for shard in shards:
        for index, batch in shard:
            indices.append(index)
            labels.append(images_and_labels(batch, torch.device("cpu"))[1])
    return gather_by_index(indices, indices, labels)


def _selections(loaders: list[DataLoader], subset: torch.Tensor) -> list[list[int]]:
    """Per loader, the dataset indices of the test-set indices ``subset`` (loaders are numbered one after another)."""
    selections, offset = [], 0
    for loader in loaders:
        size = len(loader.dataset)
        selections.append([index - offset for index in subset.tolist() if offset <= index < offset + size])
        offset += size
    return selections


def synchronise_status(runs: list[_Run]) -> None:
    """A run that could not be carried out on some rank (or some batch) is reported as such everywhere."""
    local = [(run.result.status, run.result.reason) for run in runs]
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        parts = [None] * distributed.get_world_size()
        distributed.all_gather_object(parts, local)
    else:
        parts = [local]
    for number, run in enumerate(runs):
        failed = next((part[number] for part in parts if part[number][0] != "ok"), None)
        if failed is not None:
            run.result.status, run.result.reason = failed
            run.scores.clear()
            run.maps.clear()


def _image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean and std over repeats (columns of ``scores``) of the rank AUROC."""
    return mean_and_std([rank_auroc(scores[:, repeat], labels) for repeat in range(scores.shape[1])])


def _pixel_auroc(maps: torch.Tensor | None, masks: torch.Tensor | None) -> tuple[float | None, float]:
    """Mean and std over repeats of the pixel AUROC; ``None`` without maps, masks or both kinds of pixels."""
    if maps is None or masks is None:
        return None, 0.0
    values = [pixel_auroc(maps[:, repeat], masks) for repeat in range(maps.shape[1])]
    if any(value is None for value in values):
        return None, 0.0
    return mean_and_std(values)


def _on_images(result: AttackResult, scores: torch.Tensor, labels: torch.Tensor, total: int) -> AttackResult:
    """A copy of the configured run ``result`` measured on the images of ``scores`` and ``labels`` only."""
    on_images = dataclasses.replace(result, num_images=int(labels.numel()), pixel_auroc=None)
    on_images.image_auroc, on_images.image_auroc_std = _image_auroc(scores, labels)
    on_images.budget = format_budget(on_images, total)
    return on_images


def _comparisons(
    configured: list[_Run], gathered: _Gathered, groups: list[_SanityGroup], largest: float, seed: int
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


def _worst_cases(
    configured: list[_Run], scores: list[torch.Tensor | None], labels: torch.Tensor
) -> list[tuple[AttackResult, torch.Tensor]]:
    """Per eps with two or more configured image-score runs, the worst case over them (as AutoAttack reports robust
    accuracy, Croce & Hein, ICML 2020): per image and scoring repeat the highest score of a normal image and the lowest
    of an anomalous one; its AUROC, with those scores ``(N, repeats)``.

    For a randomised detector each repeat takes the worst of that repeat's independent scorings, which also picks the
    luckier draw for the attacker: a lower bound of the detector as deployed, not a mean."""
    by_eps: dict[float, list[tuple[_Run, torch.Tensor]]] = {}
    for run, run_scores in zip(configured, scores, strict=True):
        if run.result.status == "ok" and run.result.target == "score" and run_scores is not None:
            by_eps.setdefault(run.result.eps, []).append((run, run_scores))
    results = []
    for eps, members in by_eps.items():
        if len(members) < 2:
            continue
        stacked = torch.stack([run_scores for _, run_scores in members])
        worst = torch.where(labels.bool()[:, None], stacked.min(dim=0).values, stacked.max(dim=0).values)
        first = members[0][0].result
        budget = "per image, the worst of " + ", ".join(run.result.attack for run, _ in members)
        result = AttackResult("Worst case", first.norm, eps, role="worst_case", num_images=int(labels.numel()),
                              budget=budget)  # fmt: skip
        result.image_auroc, result.image_auroc_std = _image_auroc(worst, labels)
        results.append((result, worst))
    return results


def _grid(
    images: torch.Tensor,
    adversarial: torch.Tensor,
    clean_maps: torch.Tensor | None,
    adversarial_maps: torch.Tensor | None,
    labels: torch.Tensor,
    run: _Run,
    count: int,
) -> dict:
    """Arguments of :func:`plot_adversarial_grid` for ``count`` images of a batch (first scoring repeat), normal and
    anomalous alternating where the batch has both."""
    normal, anomalous = ((labels == label).nonzero().flatten().tolist() for label in (0, 1))
    alternating = [index for pair in itertools.zip_longest(normal, anomalous) for index in pair if index is not None]
    pick = torch.tensor(alternating[:count])
    with_maps = clean_maps is not None and adversarial_maps is not None
    return {
        "clean": images[pick.to(images.device)].cpu(),
        "adversarial": adversarial[pick.to(images.device)].cpu(),
        "clean_maps": clean_maps[pick, 0] if with_maps else None,
        "adversarial_maps": adversarial_maps[pick, 0] if with_maps else None,
        "labels": labels[pick.to(labels.device)].cpu(),
        "title": f"{run.attack.detector.name}: {run.result.attack} {run.result.norm} "
        f"eps={format_eps(run.result.eps, run.result.norm)}",
    }
