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
:mod:`anomalib_robust.evaluation.sanity` run extra attacks and a finite-difference gradient check, within a budget
(``sanity_budget``, a multiple of the configured runs' cost, :mod:`anomalib_robust.evaluation.budget`): the sanity
runs attack an evenly spaced subset of the test images that keeps both classes, after the configured runs, and each
comparison uses the configured run's AUROC on the same subset. Before attacking, the evaluator logs its plan (forward
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

from anomalib_robust.attacks import ATTACKS, Attack, DetectorScore, NotDifferentiableError, build_attack
from anomalib_robust.attacks.base import check_count, check_norm, check_positive
from anomalib_robust.attacks.eot import check_max_batch
from anomalib_robust.attacks.pgd import check_select
from anomalib_robust.defenses import DiffusionPurifier, Purified
from anomalib_robust.evaluation.budget import (
    DEFAULT_SANITY_BUDGET,
    EvaluationPlan,
    attack_passes,
    attack_queries,
    check_sanity_budget,
    fit_sanity,
    gradient_check_cost,
    gradient_check_passes,
    run_cost,
    square_passes,
    stratified_subset,
)
from anomalib_robust.evaluation.gradient_check import check_gradient
from anomalib_robust.evaluation.metrics import mean_and_std, pixel_auroc, rank_auroc
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck, format_budget, format_eps
from anomalib_robust.evaluation.resume import (
    BatchStore,
    batch_digest,
    check_resume_dir,
    dataset_fingerprint,
    model_fingerprint,
)
from anomalib_robust.evaluation.sanity import sanity_checks
from anomalib_robust.evaluation.sharding import (
    check_both_classes,
    cuda_devices,
    first_item,
    gather_by_index,
    images_and_labels,
    rank_shards,
    resize_masks,
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

LARGE_EPS_STEPS = 5
"""Most steps of the very-large-eps sanity run within a sanity budget: at that radius the attack saturates fast."""

GRADIENT_CHECK_IMAGES = 4
"""Test images of the finite-difference gradient check (the first ones, the same on every rank)."""

GRADIENT_CHECK_DIRECTIONS = 2
"""Random directions per image of the gradient check."""


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
    """For a sanity run, the comparison it serves: ``"more_steps"``, ``"large_eps"`` or ``"square"``."""


@dataclass
class _Scored:
    """Per-batch outputs of the clean pass on this rank."""

    indices: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)


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
        sanity_checks: also run the sanity checks (twice the steps and a very large eps with the first gradient
            attack, Square at the largest eps unless configured, the finite-difference gradient check).
        sanity_budget: the sanity checks may cost this multiple of the configured runs (attacks and scoring, in
            forward-pass equivalents; default 1.5); they then run on an evenly spaced subset of the test images with
            both classes, Square with one draw per query (the evaluator re-scores its result as deployed), the very
            large eps with at most 5 steps, and Square's queries shrink only to keep 16 images. ``None``: full sanity
            runs (every image, the attacker's EOT draws, the configured steps and queries).
        large_eps: radius of the "very large eps" check; ``None`` for 0.5 (L_inf) or ``0.5 * sqrt(C * H * W)`` (L_2).
        near_zero: AUROC the very large eps must reach for the check to pass.
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
        near_zero: float = 0.1,
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
        self.near_zero = near_zero
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
        if detector.stochastic and detector.eot_samples < 2:
            msg = (
                f"RobustEval: {detector.name} is randomised (model.model.stochastic is True), so its robust AUROC "
                f"needs EOT: eot_samples must be >= 2 or None (default 8), got {self.eot_samples}."
            )
            raise ValueError(msg)
        loaders = list(loaders)
        shards = rank_shards(loaders, rank, world_size, self.max_samples)
        indices, labels = _test_set(shards)
        check_both_classes(labels)  # before any attack: a single-class test set is an error at once
        device = next(model.parameters(), torch.empty(0)).device
        repeats = self.eval_repeats if detector.stochastic else 1
        store = self._store(model, loaders)
        with torch.inference_mode(False), detector.prepared(), torch.random.fork_rng(devices=cuda_devices(device)):
            detectors = self._attacked_detectors(detector)
            configured = self._runs(detectors, indices.numel())
            sanity, subset = [], indices
            if self.sanity_checks:
                sanity, subset = self._sanity_runs(detectors[0], loaders, configured, repeats, indices, labels)
            gradient = gradient_check_passes(_gradient_check_count(loaders), GRADIENT_CHECK_DIRECTIONS)
            plan = EvaluationPlan(
                detector.name, [run.result for run in configured + sanity], repeats, indices.numel(),
                gradient if self.sanity_checks else None, self.sanity_budget if self.sanity_checks else None,
            )  # fmt: skip
            plan.log(show_progress)
            sanity_shards = []
            if sanity:
                sanity_shards = rank_shards(loaders, rank, world_size, selections=_selections(loaders, subset))
            with Progress(
                TextColumn("[bold]RobustEval[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not show_progress,
            ) as progress:
                batches = len(configured) * sum(map(len, shards)) + len(sanity) * sum(map(len, sanity_shards))
                bar = (progress, progress.add_task(detector.name, total=batches))
                estimate = plan.estimator(world_size, progress if show_progress else None)
                clean, grid = self._attack_pass(detector, shards, configured, repeats, device, bar, store, 0, estimate)
                attacked, _ = self._attack_pass(
                    detector, sanity_shards, sanity, repeats, device, bar, store, len(configured)
                )
            gradient = self._gradient_check(detector, loaders, device) if self.sanity_checks else None
        synchronise_status(configured + sanity)
        report, on_subset = self._report(detector, repeats, clean, configured, attacked, sanity, subset)
        report.configured_cost, report.sanity_cost = plan.configured, plan.sanity
        if self.sanity_checks:
            report.sanity_budget, report.sanity_images = self.sanity_budget, int(subset.numel())
            report.baselines = on_subset
            comparisons = _comparisons([run.result for run in configured], on_subset, sanity, self.eps[-1])
            report.checks = sanity_checks(report, self.near_zero, self.tolerance, gradient=gradient, **comparisons)
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
        attacked: "_Scored",
        sanity: list[_Run],
        subset: torch.Tensor,
    ) -> tuple[RobustReport, list[AttackResult]]:
        """Gather every rank's scores and compute each AUROC: configured runs on every image, sanity runs on theirs.

        Also returns the configured image-score runs measured on the sanity runs' images (``subset``), which the
        sanity checks compare them with.
        """
        indices, labels, scores, maps, masks, *per_run = gather_by_index(
            clean.indices,
            clean.indices,
            clean.labels,
            clean.scores,
            clean.maps,
            clean.masks,
            *(values for run in configured for values in (run.scores, run.maps)),
        )
        subset_labels, *sanity_scores = (
            gather_by_index(attacked.indices, attacked.labels, *(run.scores for run in sanity)) if sanity else [None]
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
        in_subset, on_subset = torch.isin(indices, subset), []
        for run, run_scores, run_maps in zip(configured, per_run[::2], per_run[1::2], strict=True):
            if run.result.status == "ok":
                run.result.image_auroc, run.result.image_auroc_std = _image_auroc(run_scores, labels)
                run.result.pixel_auroc, run.result.pixel_auroc_std = _pixel_auroc(run_maps, masks)
                if sanity and run.result.target == "score":
                    subset_result = dataclasses.replace(run.result, num_images=int(subset.numel()), pixel_auroc=None)
                    subset_result.image_auroc, subset_result.image_auroc_std = _image_auroc(
                        run_scores[in_subset], labels[in_subset]
                    )
                    subset_result.budget = format_budget(subset_result, int(labels.numel()))
                    on_subset.append(subset_result)
            report.results.append(run.result)
        for run, run_scores in zip(sanity, sanity_scores, strict=True):
            if run.result.status == "ok":
                run.result.image_auroc, run.result.image_auroc_std = _image_auroc(run_scores, subset_labels)
            report.results.append(run.result)
        return report, on_subset

    def _attacked_detectors(self, detector: DetectorScore) -> list[DetectorScore]:
        """The scores the attacks differentiate: the detector, or one per purifier-gradient mode with a defense."""
        if self.defense is None:
            return [detector]
        bpda = DetectorScore(
            detector.detector, detector.eot_samples, bpda={"model.purifier": None}, max_batch=detector.max_batch
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
    ) -> tuple[list[_Run], torch.Tensor]:
        """The sanity runs and the test images they attack, fitted into ``sanity_budget`` (module
        :mod:`~anomalib_robust.evaluation.budget`): twice the steps and a very large eps with the first gradient
        attack, Square at the largest eps unless it is configured."""
        name = next((name for name in self.attacks if name.lower() != "square"), "pgd")
        largest, steps, total = self.eps[-1], self.settings["steps"], indices.numel()
        budgeted = self.sanity_budget is not None
        large_steps = min(steps, LARGE_EPS_STEPS) if budgeted else steps
        runs = [
            self._make_run(name, largest, detector, total, total, steps=2 * steps),
            self._make_run(name, self._large_eps(detector, loaders), detector, total, total, steps=large_steps),
        ]
        for run, check in zip(runs, ("more_steps", "large_eps"), strict=True):
            run.check = check
        images, queries = total, self.settings["n_queries"]
        with_square = all(attack.lower() != "square" for attack in self.attacks)
        square_detector = detector
        if budgeted and detector.eot_samples > 1:  # EOT is the attacker's tool; the result is scored as deployed
            square_detector = DetectorScore(detector.detector, 1, bpda=detector.bpda, max_batch=detector.max_batch)
        if budgeted:
            square = None
            if with_square:
                fixed = square_passes(square_detector, 0, self.settings["restarts"])
                per_query = square_passes(square_detector, 1, self.settings["restarts"]).cost - fixed.cost
                square = (per_query, fixed.cost + repeats)
            gradient = gradient_check_passes(_gradient_check_count(loaders), GRADIENT_CHECK_DIRECTIONS)
            configured_cost = sum(run_cost(run.result, repeats) for run in configured)
            allowance = self.sanity_budget * configured_cost - gradient_check_cost(gradient)
            per_image = sum(run_cost(run.result, repeats, images=1) for run in runs)
            images, queries = fit_sanity(allowance, total, per_image, square, queries)
        if with_square:
            runs.append(self._make_run("square", largest, square_detector, total, total, n_queries=queries))
            runs[-1].check = "square"
        for run in runs:
            run.result.role, run.result.num_images = "sanity", images
            run.result.budget = format_budget(run.result, total)
        return runs, stratified_subset(indices, labels, images)

    def _make_run(
        self,
        name: str,
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

        The configured pass (``first_run == 0``) also scores the clean images and keeps the grid; the sanity pass
        numbers its runs from ``first_run``, so that every run has its own seeds. A (batch, run) found in ``store``
        is read instead of attacked, and one attacked now is written to it. ``on_first_batch(seconds, images)`` is
        called once, after the first batch, if that batch was attacked now.
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
                        adversarial = self._attack_batch(
                            run, images, labels, masks, derive_seed(self.seed, "attack", first, number)
                        )
                        if adversarial is None:
                            continue
                        run_scores, run_maps = self._score(detector, adversarial, repeats, first, number)
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

    def _gradient_check(self, detector: DetectorScore, loaders: list[DataLoader], device: torch.device) -> SanityCheck:
        """Autograd vs finite differences on the first test images (the same images on every rank)."""
        loader = next(loader for loader in loaders if len(loader.dataset))
        count = _gradient_check_count(loaders)
        batch = (loader.collate_fn or torch.utils.data.default_collate)([loader.dataset[i] for i in range(count)])
        images, labels = images_and_labels(batch, device)
        if self.resolution == "model":
            images = detector.to_input_resolution(images)
        name, budget = "autograd matches finite differences", f"{count} images x {GRADIENT_CHECK_DIRECTIONS} directions"
        try:
            check = check_gradient(detector, images, labels, count, GRADIENT_CHECK_DIRECTIONS, seed=self.seed)
        except NotDifferentiableError:
            return SanityCheck(name, None, "the score is not differentiable (see the attack rows)", budget)
        return SanityCheck(name, check.passed, check.detail, budget)


def _gradient_check_count(loaders: list[DataLoader]) -> int:
    """Images of the gradient check: the first :data:`GRADIENT_CHECK_IMAGES` of the first non-empty test loader."""
    return min(GRADIENT_CHECK_IMAGES, next(len(loader.dataset) for loader in loaders if len(loader.dataset)))


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


def _comparisons(
    configured: list[AttackResult], on_subset: list[AttackResult], sanity: list[_Run], largest: float
) -> dict[str, object]:
    """The runs each sanity check compares, by the keyword names of :func:`sanity_checks`: a sanity run against the
    configured runs measured on its images (``on_subset``), a configured Square against the configured runs."""
    by_check = {run.check: run.result for run in sanity}
    more_steps = by_check.get("more_steps")
    fewer_steps = next(
        (r for r in on_subset if more_steps and r.attack == more_steps.attack and r.eps == largest), None
    )
    configured_square = next(
        (r for r in configured if r.attack.endswith("Square") and r.eps == largest and r.target == "score"), None
    )
    return {
        "large_eps": by_check.get("large_eps"),
        "more_steps": (fewer_steps, more_steps) if fewer_steps and more_steps else None,
        "square": by_check.get("square", configured_square),
        "white_box": on_subset if "square" in by_check else None,
    }


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
