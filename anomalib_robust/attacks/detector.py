"""Detector adapter: the raw anomaly score of any anomalib model as a differentiable function of [0, 1] images.

Every attack targets ``A(x) = model.model(T(x)).pred_score``, the raw score (never the post-processed one, whose
normalisation and clamping would mask gradients), where ``T`` is ``model.pre_processor.transform``: the transform
anomalib's own test loop applies (the pre-processor's ``forward`` uses the export transform, ``Resize`` without
antialiasing, which is another pipeline). :class:`DetectorScore` wraps an ``AnomalibModule`` (or any module with
``.model`` and an optional ``.pre_processor``) and provides

- ``detector(x)``: the score, averaged over ``eot_samples`` draws for randomised detectors (EOT, AdvRAD paper,
  sec. 5.6), differentiable when gradients are enabled;
- :meth:`DetectorScore.objective_and_gradient`: ``y * A(x)`` (AdvRAD paper, sec. 3), or the anomaly-map objective
  inside :meth:`DetectorScore.map_target`, and its EOT gradient;
- :meth:`DetectorScore.predict`: scores and anomaly maps of the detector as deployed (one forward pass, the model's
  own noise draws), for evaluation;
- :meth:`DetectorScore.to_input_resolution`: images resized as the pre-processor resizes them, where eps is measured
  by default;
- :meth:`DetectorScore.detect_randomness`: a detector that draws noise at inference without declaring it
  (``model.model.stochastic``) is found out and then treated as randomised.

Gradient unmasking: anomalib wraps feature extraction in ``torch.no_grad()`` (Padim, Patchcore, Cfa, the timm feature
extractor), detaches some inference outputs (Cfa's anomaly map) and freezes backbones with ``requires_grad=False``.
None of this changes the score's value, only whether autograd sees it. Without editing anomalib,
:func:`unmasked_gradients` turns ``torch.no_grad`` and ``Tensor.detach`` called from anomalib's own code into no-ops
while the score is differentiated, and :meth:`DetectorScore.prepared` puts the
model in eval mode, freezes parameters (only the input needs a gradient), replaces buffers created under
``torch.inference_mode`` by ordinary copies, and installs BPDA stages; all of it is undone on exit. A score that is
still not differentiable raises :class:`NotDifferentiableError` naming the model.

Example:
    >>> import torch
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.attacks import DetectorScore
    >>> detector = DetectorScore(Padim(pre_trained=False))
    >>> detector.name, detector.stochastic, detector.eot_samples
    ('Padim', False, 1)
"""

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.transforms import v2

from anomalib_robust.attacks.bpda import bpda_stages, check_stages, swapped_stages
from anomalib_robust.attacks.eot import (
    check_max_batch,
    expected_value,
    expected_value_and_gradient,
    resolve_eot_samples,
    tile,
)
from anomalib_robust.attacks.objective import attack_objective, map_objective
from anomalib_robust.attacks.precision import check_gradient_precision, gradient_autocast
from anomalib_robust.attacks.unmasking import unmasked_gradients

logger = logging.getLogger(__name__)

RANDOMNESS_SEEDS = tuple(range(44))
"""Seeds of the scorings that :meth:`DetectorScore.detect_randomness` compares. Noise that appears independently on a
fraction ``p`` of the calls goes unnoticed only if none of the 44 calls draws it: probability ``(1 - p)^44``, under 1 %
for ``p = 10 %`` (caught with probability 99.0 %), 10 % for ``p = 5 %``; noise on every call is caught by the second."""

RANDOMNESS_RTOL = 1e-3
"""Two scorings of the same images are equal when no image's scores differ by more than this fraction of the spread
(standard deviation) of the scores across the images, or by more than round-off (:data:`ROUND_OFF_ULPS`). The
spread, not the score's magnitude, is the scale of AUROC: a score offset by 1000 with noise of 0.02 is noisy."""

ROUND_OFF_ULPS = 32
"""Differences within this many units of the scores' floating-point precision at the largest score magnitude are
round-off, not noise (non-deterministic reductions on a GPU change a deterministic model's last bits): for float32
scores about 4e-6 of the largest magnitude."""


def scoring_tolerance(scores: torch.Tensor) -> float:
    """Largest difference between two scorings of the same images (``scores``: one of them) that is not noise:
    :data:`RANDOMNESS_RTOL` times the spread of ``scores`` across images, at least :data:`ROUND_OFF_ULPS` units of
    their precision at their largest magnitude."""
    scores = scores.detach()
    spread = float(scores.double().std(correction=0)) if scores.numel() > 1 else 0.0
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    round_off = ROUND_OFF_ULPS * torch.finfo(dtype).eps * float(scores.abs().max()) if scores.numel() else 0.0
    return max(RANDOMNESS_RTOL * spread, round_off)


class NotDifferentiableError(RuntimeError):
    """The anomaly score of a detector has no gradient w.r.t. its input image."""


class DetectorScore(nn.Module):
    """Raw anomaly score ``A(x)`` of an anomalib detector on [0, 1] images.

    Args:
        model: an ``AnomalibModule`` (anything with a ``.model`` whose eval forward returns an object with
            ``pred_score``, and an optional ``.pre_processor``).
        eot_samples: draws per score for randomised detectors (``model.model.stochastic = True``); ``None`` picks
            1 for deterministic and 8 for randomised detectors.
        bpda: non-differentiable stages to differentiate through a surrogate, as ``{path: surrogate}`` with paths
            relative to ``model`` and ``None`` for the identity (see :mod:`anomalib_robust.attacks.bpda`).
        max_batch: most images per forward call when EOT draws run batched (:mod:`anomalib_robust.attacks.eot`);
            ``None`` picks it from the image size. Changes speed and memory, never the estimate's distribution.
        stochastic: whether the detector is randomised; ``None`` reads the torch model's declaration
            (``model.model.stochastic``). A detector built from another one (other BPDA stages, another EOT budget)
            passes the other's, which :meth:`detect_randomness` may have set.
        surrogates: stages that the attack's gradient steps run and differentiate in place of the real ones, as
            ``{path: module}`` (the surrogate process of Lee & Kim, ICCV 2023: a purifier's chain respaced to fewer
            U-Net calls, :class:`~anomalib_robust.defenses.purifiers.RespacedPurifier`). Only
            :meth:`objective_and_gradient` sees them, so its objective is the surrogate's; scoring, re-scoring and
            :meth:`objective` use the real stages.
        gradient_precision: ``"fp32"``, ``"bf16"`` or ``"auto"``: the autocast of :meth:`objective_and_gradient`
            (:mod:`~anomalib_robust.attacks.precision`); scores are always fp32.
    """

    def __init__(
        self,
        model: nn.Module,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        max_batch: int | None = None,
        stochastic: bool | None = None,
        surrogates: Mapping[str, nn.Module] | None = None,
        gradient_precision: str = "fp32",
    ) -> None:
        super().__init__()
        if not isinstance(getattr(model, "model", None), nn.Module):
            msg = (
                "model must be an anomalib AnomalibModule (with a torch model in `.model`), "
                f"got {type(model).__name__} without a `.model` module."
            )
            raise TypeError(msg)
        self.detector = model
        self.stochastic = bool(getattr(model.model, "stochastic", False) if stochastic is None else stochastic)
        self._requested_eot_samples = eot_samples
        self.eot_samples = resolve_eot_samples(eot_samples, self.stochastic)
        self.max_batch = check_max_batch(max_batch)
        self.bpda = check_stages(model, bpda or {})
        self.surrogates = check_stages(model, surrogates or {}, argument="surrogates")
        self.gradient_precision = check_gradient_precision(gradient_precision)
        self._is_prepared = False
        self._pixel_masks: torch.Tensor | None = None

    @property
    def name(self) -> str:
        """Name of the wrapped detector (an ``AnomalibModule``'s ``name``, else its class name), for reports."""
        name = getattr(self.detector, "name", None)
        return name if isinstance(name, str) else type(self.detector).__name__

    @property
    def gradient_label(self) -> str:
        """How the attack differentiates the detector, for reports: ``""`` (its own gradient), ``"BPDA"``, or
        ``"Surrogate-<m>"`` (a stage respaced to ``m`` U-Net calls)."""
        if self.surrogates:
            steps = [str(stage.denoising_steps) for stage in self.surrogates.values() if hasattr(stage, "denoising_steps")]
            return "-".join(["Surrogate", *steps])
        return "BPDA" if self.bpda else ""

    @property
    def threshold(self) -> float | None:
        """The detector's image threshold on the raw score (anomalib's post-processor), or ``None`` if not set."""
        threshold = getattr(getattr(self.detector, "post_processor", None), "image_threshold", None)
        if threshold is None or not torch.isfinite(torch.as_tensor(threshold)):
            return None
        return float(threshold)

    def pre_process(self, images: torch.Tensor) -> torch.Tensor:
        """The detector's pre-processing as anomalib's test loop applies it (:func:`test_transform`)."""
        return test_transform(getattr(self.detector, "pre_processor", None), images)

    def to_input_resolution(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` resized by the first ``Resize`` of the pre-processor's transform (as it), else unchanged.

        Attacks then perturb the pixels the model sees, as the papers measure eps (per pixel of the 256 x 256
        input); resizing again to the same size is the identity, so the detector's score is unchanged.
        """
        resize = input_resize(getattr(getattr(self.detector, "pre_processor", None), "transform", None))
        return images if resize is None else resize(images).clamp(0.0, 1.0)

    def single_draw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Score ``(N,)`` and anomaly map ``(N, H, W)`` (or ``None``) of one forward pass, one draw of randomness."""
        output = self.detector.model(self.pre_process(images))
        pred_score = getattr(output, "pred_score", None)
        if not isinstance(pred_score, torch.Tensor):
            msg = (
                f"{self.name}: the torch model's eval forward must return an anomalib InferenceBatch with a "
                f"`pred_score` tensor, got {type(output).__name__} without it."
            )
            raise TypeError(msg)
        anomaly_map = getattr(output, "anomaly_map", None)
        if isinstance(anomaly_map, torch.Tensor):
            anomaly_map = anomaly_map.reshape(images.shape[0], *anomaly_map.shape[-2:])
        else:
            anomaly_map = None
        return pred_score.reshape(images.shape[0], -1)[:, 0], anomaly_map

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return self.single_draw(images)[0]

    def draw_objective(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One draw of the attack objective: ``y * A(x)``, or the map objective inside :meth:`map_target`.

        ``images`` may hold stacked copies of the batch of ``labels`` (batched EOT draws); labels and masks follow.
        """
        copies = images.shape[0] // labels.shape[0]
        if self._pixel_masks is None:
            return attack_objective(self._score(images), tile(labels, copies))
        anomaly_map = self.single_draw(images)[1]
        if anomaly_map is None:
            msg = f"{self.name} returns no anomaly map, so it cannot be attacked with target='map'."
            raise ValueError(msg)
        return map_objective(anomaly_map, tile(self._pixel_masks, copies))

    @contextmanager
    def map_target(self, masks: torch.Tensor) -> Iterator[None]:
        """Inside the context, attacks push the anomaly map: normal pixels up, anomalous pixels (``masks``) down.

        ``masks`` are the batch's boolean ground-truth masks at the anomaly map's resolution, ``(N, H, W)``.
        """
        self._pixel_masks = masks
        try:
            yield
        finally:
            self._pixel_masks = None

    def _differentiable(self, function: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        with unmasked_gradients():
            scores = function(*args)
        if not scores.requires_grad:
            msg = (
                f"The anomaly score of {self.name} is not differentiable w.r.t. the input image, even with "
                "anomalib's torch.no_grad() blocks and detach() calls lifted. Attack it with BPDA (bpda="
                "{'<submodule path>': None} for the non-differentiable stage) or with the black-box Square attack."
            )
            raise NotDifferentiableError(msg)
        return scores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Score ``(N,)`` averaged over ``eot_samples`` draws; differentiable when ``images`` requires a gradient."""
        if not (torch.is_grad_enabled() and images.requires_grad):
            return expected_value(self._score, images, self.eot_samples, self.max_batch)
        return torch.stack([self._differentiable(self._score, images) for _ in range(self.eot_samples)]).mean(dim=0)

    def differentiable_objective(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One draw of the attack objective per sample, with anomalib's gradient masking lifted.

        Raises:
            NotDifferentiableError: when the objective has no gradient w.r.t. ``images``.
        """
        return self._differentiable(self.draw_objective, images, labels)

    def objective_and_gradient(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """EOT estimate of the objective per sample and of its gradient w.r.t. ``images`` (AdvRAD paper, eq. 1-2),
        through the ``surrogates`` where there are any, under the autocast of ``gradient_precision``; both are
        returned in the images' dtype."""
        replacements = {path: lambda _, stage=stage: stage for path, stage in self.surrogates.items()}
        with swapped_stages(self.detector, replacements), gradient_autocast(self.gradient_precision, images.device):
            objective, gradient = expected_value_and_gradient(
                lambda x: self.differentiable_objective(x, labels),
                images,
                self.eot_samples,
                self.max_batch,
            )
        return objective.to(images.dtype), gradient.to(images.dtype)

    def objective(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """EOT estimate of the objective (``y * A(x)``, or the map objective) per sample, without gradients."""
        return expected_value(lambda x: self.draw_objective(x, labels), images, self.eot_samples, self.max_batch)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores and anomaly maps of the detector as deployed: one forward pass, the model's own noise draws.

        EOT is the attacker's tool: averaging the reported score over draws would evaluate an ensemble, a detector
        with less noise than the deployed one.
        """
        return self.single_draw(images)

    def detect_randomness(self, images: torch.Tensor) -> bool:
        """Whether the detector is randomised: declared (``model.model.stochastic``), or found on ``images``.

        A model that draws noise at inference without declaring it would be attacked without EOT, scored once, and
        have its best PGD iterate chosen on noisy scores. An undeclared model scores ``images`` as deployed
        (:meth:`predict`) once per seed of :data:`RANDOMNESS_SEEDS` (44 scorings, so that noise on one call in ten is
        caught with probability 99 %), inside :meth:`prepared` (eval mode) and :func:`torch.random.fork_rng` (the
        CPU's and the images' CUDA device's generators), so the caller's random state is untouched. Each scoring is
        compared with the first, with a tolerance relative to the spread of the scores across the images
        (:func:`scoring_tolerance`), so that neither a large offset hides noise nor round-off raises an alarm. A
        detector drawing from its own ``torch.Generator`` differs between scorings whatever the seed, and is found
        too. When some scoring differs, a warning names the detector, ``stochastic`` becomes ``True`` and
        ``eot_samples`` is resolved again (8, unless it was given). Keep ``images`` few: a small batch shows the noise
        as well as the test set would.
        """
        if self.stochastic:
            return True
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.inference_mode(False), self.prepared(), torch.random.fork_rng(devices=devices):
            first = self._seeded_scores(images, RANDOMNESS_SEEDS[0])
            tolerance = scoring_tolerance(first)
            for scorings, seed in enumerate(RANDOMNESS_SEEDS[1:], start=2):
                difference = float((self._seeded_scores(images, seed) - first).abs().max())
                if difference > tolerance:
                    break
            else:
                return False
        self.stochastic = True
        self.eot_samples = resolve_eot_samples(self._requested_eot_samples, self.stochastic)
        logger.warning(
            "%s draws noise at inference (scoring %d of the same %d images differs from the first by up to %.3g, "
            "tolerance %.3g for a spread of scores of %.3g) but its torch model does not declare `stochastic = True`: "
            "it is treated as randomised from now on (EOT with %d draws, repeated scorings). Declare it on the torch "
            "model to silence this warning.",
            self.name, scorings, images.shape[0], difference, tolerance, float(first.double().std(correction=0)),
            self.eot_samples,
        )  # fmt: skip
        return True

    def _seeded_scores(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return self.predict(images)[0]

    @contextmanager
    def prepared(self) -> Iterator["DetectorScore"]:
        """Put the detector in attack state (eval mode, frozen parameters, BPDA stages), then restore it exactly.

        Re-entrant: a nested call (an ensemble running its members) finds the state prepared and changes nothing.
        """
        if self._is_prepared:
            yield self
            return
        model = self.detector
        modes = {module: module.training for module in model.modules()}
        flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
        inference_buffers = [
            (module, name, buffer)
            for module in model.modules()
            for name, buffer in module.named_buffers(recurse=False)
            if buffer.is_inference()
        ]
        try:
            model.eval()
            for parameter in flags:
                parameter.requires_grad_(False)
            with torch.inference_mode(False):
                for module, name, buffer in inference_buffers:
                    setattr(module, name, buffer.clone())
            with bpda_stages(model, self.bpda):
                self._is_prepared = True
                yield self
        finally:
            self._is_prepared = False
            for module, name, buffer in inference_buffers:
                setattr(module, name, buffer)
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
            for module, training in modes.items():
                module.training = training


def input_resize(transform: object) -> v2.Resize | None:
    """The first ``Resize`` of a torchvision transform (searched through ``Compose``), or ``None``."""
    if isinstance(transform, v2.Resize):
        return transform
    for inner in getattr(transform, "transforms", ()):
        found = input_resize(inner)
        if found is not None:
            return found
    return None


def test_transform(pre_processor: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
    """``images`` pre-processed as in anomalib's test loop: an anomalib ``PreProcessor``'s ``transform``.

    anomalib applies ``pre_processor.transform`` to test batches (``on_test_batch_start``); the pre-processor's
    ``forward`` applies the export transform instead (``Resize`` without antialiasing). A plain module is called.
    """
    if not isinstance(pre_processor, nn.Module):
        return images
    if hasattr(pre_processor, "transform"):
        return images if pre_processor.transform is None else pre_processor.transform(images)
    return pre_processor(images)
