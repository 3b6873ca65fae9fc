"""Robust evaluation of any anomalib detector: detector + test dataloaders -> :class:`RobustReport`, no Lightning.

The evaluation follows the rules that make a robust AUROC trustworthy:

- **The detector as deployed.** Clean and adversarial images are scored as the model is configured (one forward
  pass, its own ``num_noise_draws``, fresh noise), never as an EOT ensemble. The attack runs once per image; the scoring
  of the clean and the adversarial images is repeated ``eval_repeats`` times with independent noise for a randomised
  detector, and every AUROC is the mean over those repeats, reported with its standard deviation.
- **EOT is the attacker's tool.** Attacks estimate gradients (and choose among candidates) with ``eot_samples``
  draws (AdvRAD paper, sec. 5.6).
- **Attack and evaluation noise are independent.** Each batch, attack run, phase and repeat gets its own seed,
  derived from ``(seed, phase, batch, run, repeat)`` (:func:`~anomalib_robust.evaluation.planning.derive_seed`).
- **AUROC by rank, on raw scores, in float64** (:mod:`anomalib_robust.evaluation.metrics`).
- **The attacked pipeline is the one anomalib tests**: ``pre_processor.transform`` then the torch model
  (:class:`~anomalib_robust.attacks.DetectorScore`). By default eps is measured at the model's input resolution
  (``resolution="model"``: the test image is resized as the pre-processor resizes it, then attacked, as the papers
  measure eps per pixel of the 256 x 256 input); ``resolution="native"`` attacks the test image before resizing.
  L_2 radii grow with the pixel count, so the same L_2 eps is a different threat at each resolution.

Attacks push the image score (``target="score"``, the AdvRAD paper's sec. 3) or the anomaly map (``target="map"``:
normal pixels up, anomalous pixels down); the pixel AUROC of a score-target run is the pixel AUROC under the image
attack, that of a map-target run the robust localisation.

:class:`RobustEvaluator` is the one entry; the flow of :meth:`RobustEvaluator.evaluate` goes through four rooms:

1. **planning** (:mod:`~anomalib_robust.evaluation.planning`): the configured runs, the sanity runs within
   ``sanity_budget`` (a multiple of the configured runs' cost, :mod:`~anomalib_robust.evaluation.budget`), the
   planned cost (logged before attacking, with an estimate of the wall time after the first batch) and the seeds;
2. **execution** (:mod:`~anomalib_robust.evaluation.execution`): the attack passes over this rank's batches and the
   deployed scoring; with ``resume_dir`` every attacked batch is kept as it is computed, and an interrupted evaluation
   resumes with the same numbers (:mod:`~anomalib_robust.evaluation.resume`); with ``processes`` a single-process
   caller on a CPU shards the batches over that many spawned processes as DDP shards them over ranks
   (:mod:`~anomalib_robust.evaluation.processes`);
3. **the report** (:mod:`~anomalib_robust.evaluation.assembly`): every rank's scores gathered, every AUROC computed;
4. **the checks** (:mod:`~anomalib_robust.evaluation.sanity_wiring`): the randomness check before the attacks, the
   gradient checks after them, and the verdicts of :mod:`~anomalib_robust.evaluation.sanity`: the convergence run
   (more steps and draws, with the seeds of the configured run it is paired with) attacks every image, the
   very-large-eps run and its random-sign baseline whole batches of the test set, Square a stratified subset, and
   each comparison is paired on the same images.

Example:
    >>> from anomalib_robust.evaluation import RobustEvaluator
    >>> evaluator = RobustEvaluator(attacks=["pgd"], eps=[2 / 255], eval_repeats=4)
    >>> report, _ = evaluator.evaluate(model, [datamodule.test_dataloader()])  # doctest: +SKIP
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import distributed, nn
from torch.utils.data import DataLoader

from anomalib_robust.attacks import ATTACKS, DetectorScore
from anomalib_robust.attacks.base import check_count, check_norm, check_positive
from anomalib_robust.attacks.eot import check_max_batch
from anomalib_robust.attacks.pgd import check_select
from anomalib_robust.attacks.precision import check_gradient_precision
from anomalib_robust.defenses import DiffusionPurifier, Purified, RespacedPurifier
from anomalib_robust.evaluation.assembly import assemble_report
from anomalib_robust.evaluation.budget import DEFAULT_SANITY_BUDGET, check_sanity_budget, stratified_subset
from anomalib_robust.evaluation.execution import AttackPasses, gathered_test_set, open_store, synchronise_status
from anomalib_robust.evaluation.planning import GRADIENT_CHECK_IMAGES, RunPlanner
from anomalib_robust.evaluation.processes import evaluate_in_processes
from anomalib_robust.evaluation.report import RobustReport
from anomalib_robust.evaluation.resume import BatchStore, check_resume_dir
from anomalib_robust.evaluation.sanity_wiring import detect_randomness, gradient_checks, judge
from anomalib_robust.evaluation.sharding import check_both_classes, cuda_devices, rank_shards, test_batches

logger = logging.getLogger(__name__)

PURIFIER_GRADIENT_MODES = ("full", "bpda", "surrogate")
"""Every mode of ``purifier_gradients``: ``"surrogate"`` differentiates the purifier's chain respaced to
``surrogate_steps`` U-Net calls (the surrogate process of Lee & Kim, ICCV 2023;
:class:`~anomalib_robust.defenses.purifiers.RespacedPurifier`), while the system is scored with its real chain."""

DEFAULT_SURROGATE_STEPS = 5
"""U-Net calls of the surrogate chain (``purifier_gradients`` with ``"surrogate"``), at most the purifier's own."""

RESOLUTIONS = ("model", "native")
"""Where eps is measured: at the model's input size (default), or on the test image before the pre-processor."""

TARGETS = ("score", "map")
"""What an attack pushes: the image score, or the anomaly map pixel by pixel."""

DEFAULT_EVAL_REPEATS = 4
"""Independent scorings of a randomised detector behind every reported AUROC."""


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        msg = f"{name} must be one of {tuple(choices)}, got {value!r}."
        raise ValueError(msg)
    return value


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
            (:data:`~anomalib_robust.evaluation.planning.CONVERGENCE_FACTOR` times the steps, and the draws of a
            randomised detector, on every image), PGD at a very large eps from the clean image against random sign
            steps with its budget, Square at the largest eps unless configured, and the gradient checks.
        sanity_budget: the sanity checks other than the convergence run may cost this multiple of the configured runs
            (attacks and scoring, in forward-pass equivalents; default 1.5): the very-large-eps runs then attack whole
            batches (at least one) with 10 steps, and Square fewer images (at least 8) with its configured queries
            and draws, always. The convergence run attacks
            every image on top of it: its verdict backs the robust AUROC, so its power is not traded for budget.
            ``None``: full sanity runs (every image, the configured steps and queries).
        large_eps: radius of the "very large eps" check; ``None`` for 0.5 (L_inf) or ``0.5 * sqrt(C * H * W)`` (L_2).
        tolerance: AUROC slack of the comparisons, on top of the noise of the repeats.
        max_samples: evaluate only ``max_samples`` evenly spaced images of each test dataloader.
        num_grid_images: images in the grid of clean vs adversarial examples (0 for none).
        seed: root of every seed of the evaluation; the global RNG is restored afterwards.
        defense: a diffusion purifier (DiffPure, TMA) put in front of the detector; ``None`` evaluates the detector.
        purifier_gradients: with a defense, attack through the purifier with ``"full"`` gradients, ``"bpda"``, the
            ``"surrogate"`` chain, or several (:data:`PURIFIER_GRADIENT_MODES`); each is a configured run. ``None``
            (default): the defense's ``attack_gradients``, the modes measured strongest for it (the surrogate for
            DiffPure and TMA, full gradients and BPDA for the others).
        surrogate_steps: U-Net calls of the surrogate chain, capped at the purifier's own.
        gradient_precision: ``"fp32"`` (default), ``"bf16"`` or ``"auto"`` (bf16 where the hardware has it): the
            autocast of the attacks' gradient passes (:mod:`~anomalib_robust.attacks.precision`); scores stay fp32.
        resume_dir: keep every attacked batch's scores in this directory as soon as they are computed, so that an
            interrupted evaluation run again with the same settings and model resumes, with the same numbers
            (:mod:`~anomalib_robust.evaluation.resume`); removed once the report is built. ``None``: nothing is kept.
        processes: shard the test batches of a single-process evaluation of a CPU model over this many spawned
            processes, each with its share of the threads (:mod:`~anomalib_robust.evaluation.processes`); the numbers
            equal one process's. Ignored, with a warning, inside a distributed run (its ranks shard already) and for
            a model on an accelerator.
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
        purifier_gradients: str | Sequence[str] | None = None,
        surrogate_steps: int = DEFAULT_SURROGATE_STEPS,
        gradient_precision: str = "fp32",
        resume_dir: str | Path | None = None,
        processes: int = 1,
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
        if purifier_gradients is None:
            purifier_gradients = list(defense.attack_gradients) if defense is not None else ["full"]
        self.purifier_gradients = [purifier_gradients] if isinstance(purifier_gradients, str) else purifier_gradients
        modes = PURIFIER_GRADIENT_MODES
        if not self.purifier_gradients or any(mode not in modes for mode in self.purifier_gradients):
            msg = f"purifier_gradients must be a non-empty subset of {modes}, got {purifier_gradients!r}."
            raise ValueError(msg)
        self.surrogate_steps = check_count("surrogate_steps", surrogate_steps)
        self.gradient_precision = check_gradient_precision(gradient_precision)
        self.resume_dir = check_resume_dir(resume_dir)
        self.processes = check_count("processes", processes)

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
        without batches, or when there is no grid). With ``processes > 1`` a single-process call on a CPU model runs
        as that many ranks in spawned processes and returns rank 0's.
        """
        if self.processes > 1:
            device = next(model.parameters(), torch.empty(0)).device
            distributed_run = world_size > 1 or (distributed.is_available() and distributed.is_initialized())
            if not distributed_run and device.type == "cpu":
                return evaluate_in_processes(self._evaluate, model, loaders, self.processes, show_progress)
            where = "in a distributed run (its ranks shard the batches)" if distributed_run else f"on {device}"
            logger.warning("RobustEval: processes=%d is ignored %s: evaluating in this process", self.processes, where)
        return self._evaluate(model, loaders, rank, world_size, show_progress)

    def _evaluate(
        self,
        model: nn.Module,
        loaders: Sequence[DataLoader],
        rank: int,
        world_size: int,
        show_progress: bool,
    ) -> tuple[RobustReport, dict | None]:
        """This rank's part of :meth:`evaluate`."""
        if self.defense is not None:
            model = Purified(model, self.defense, visualizer=False).to(model.device)
        detector = DetectorScore(model, eot_samples=self.eot_samples, max_batch=self.max_batch,
                                 gradient_precision=self.gradient_precision)  # fmt: skip
        loaders = list(loaders)
        device = next(model.parameters(), torch.empty(0)).device
        detect_randomness(detector, loaders, device, self.resolution)
        if detector.stochastic and detector.eot_samples < 2:
            msg = (
                f"RobustEval: {detector.name} is randomised (declared or detected), so its robust AUROC "
                f"needs EOT: eot_samples must be >= 2 or None (default 8), got {self.eot_samples}."
            )
            raise ValueError(msg)
        shards = rank_shards(loaders, rank, world_size, self.max_samples)
        indices, labels = gathered_test_set(shards)
        check_both_classes(labels)  # before any attack: a single-class test set is an error at once
        repeats = self.eval_repeats if detector.stochastic else 1
        store = self._store(model, loaders)
        with torch.inference_mode(False), detector.prepared(), torch.random.fork_rng(devices=cuda_devices(device)):
            planner = RunPlanner(self.attacks, self.eps, self.norm, self.settings, self.targets, self.sanity_budget,
                                 self.large_eps, self.resolution)  # fmt: skip
            configured = planner.configured_runs(self._attacked_detectors(detector), indices.numel())
            groups = []
            if self.sanity_checks:
                batches = test_batches(loaders, self.max_samples)
                groups = planner.sanity_runs(detector, loaders, configured, repeats, indices, labels, batches)
            plan = planner.cost(detector.name, configured, groups, repeats, indices.numel(), self.sanity_checks)
            plan.log(show_progress)
            passes = AttackPasses(detector, repeats, device, self.seed, self.resolution, store,
                                  grid=(self.num_grid_images, len(self.eps) - 1))  # fmt: skip
            clean, grid = passes.run(loaders, shards, configured, groups, rank, world_size, plan, show_progress)
            gradient = []
            if self.sanity_checks:
                checked = stratified_subset(indices, labels, GRADIENT_CHECK_IMAGES)
                gradient = gradient_checks(detector, loaders, checked, device, self.resolution, eps=self.eps[-1],
                                           norm=self.norm, steps=self.settings["steps"], alpha=self.settings["alpha"],
                                           seed=self.seed)  # fmt: skip
        synchronise_status(configured + [run for group in groups for run in group.runs])
        report, gathered = assemble_report(detector, self.norm, self.resolution, repeats, clean, configured, groups)
        report.configured_cost, report.sanity_cost = plan.configured, plan.sanity
        if self.sanity_checks:
            judge(report, configured, gathered, groups, gradient, tolerance=self.tolerance,
                  sanity_budget=self.sanity_budget, largest=self.eps[-1], seed=self.seed)  # fmt: skip
        if store is not None and rank == 0:  # every rank is past its attacks: the report's gather waited for them
            store.remove()
        return report, grid

    def _store(self, model: nn.Module, loaders: list[DataLoader]) -> BatchStore | None:
        """The stored batches of this evaluation (``resume_dir``), under a fingerprint of every setting that changes
        an attack or a score (:func:`~anomalib_robust.evaluation.execution.open_store`); ``None`` without
        ``resume_dir``."""
        if self.resume_dir is None:
            return None
        attack_settings = {
            "attacks": self.attacks, "eps": self.eps, "norm": self.norm, "settings": self.settings,
            "eot_samples": self.eot_samples, "max_batch": self.max_batch, "eval_repeats": self.eval_repeats,
            "targets": self.targets, "resolution": self.resolution, "sanity_checks": self.sanity_checks,
            "sanity_budget": self.sanity_budget, "large_eps": self.large_eps, "max_samples": self.max_samples,
            "seed": self.seed, "purifier_gradients": self.purifier_gradients,
            "surrogate_steps": self.surrogate_steps, "gradient_precision": self.gradient_precision,
        }  # fmt: skip
        return open_store(self.resume_dir, attack_settings, model, loaders)

    def _attacked_detectors(self, detector: DetectorScore) -> list[DetectorScore]:
        """The scores the attacks differentiate: the detector, or one per purifier-gradient mode with a defense."""
        if self.defense is None:
            return [detector]
        return purifier_gradient_detectors(detector, self.defense, self.purifier_gradients, self.surrogate_steps)


def purifier_gradient_detectors(
    detector: DetectorScore,
    defense: DiffusionPurifier,
    modes: Sequence[str],
    surrogate_steps: int = DEFAULT_SURROGATE_STEPS,
) -> list[DetectorScore]:
    """One score per mode of :data:`PURIFIER_GRADIENT_MODES` for ``detector`` (a ``Purified`` system around
    ``defense``): itself for ``"full"``, BPDA through the purifier, or the surrogate chain of ``surrogate_steps``
    (at most the purifier's own) U-Net calls; a chain of no calls (DiffPure at level 0, the identity) has nothing to
    respace, so its surrogate is its exact gradient."""
    detectors = []
    for mode in modes:
        if mode == "full" or (mode == "surrogate" and defense.unet_evaluations == 0):
            detectors.append(detector)
            continue
        if mode == "bpda":
            path = {"bpda": {"model.purifier": None}}
        else:
            surrogate = RespacedPurifier(defense, min(surrogate_steps, defense.unet_evaluations))
            path = {"surrogates": {"model.purifier": surrogate}}
        detectors.append(DetectorScore(detector.detector, detector.eot_samples, max_batch=detector.max_batch,
                                       stochastic=detector.stochastic, gradient_precision=detector.gradient_precision,
                                       **path))  # fmt: skip
    return detectors
