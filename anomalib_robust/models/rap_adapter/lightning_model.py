"""RAPAdapter: train the RAP adapter in front of a fitted, frozen anomalib detector (the RAP paper, Alg. 3).

Paper (the RAP paper): "From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion", sec. 3.4, Alg. 3.
Every training step draws ``t ~ U{1..T}`` per image, attacks the normal training image ``x_0`` with Alg. 1 for ``t``
steps against the *defended* detector (the adapter in front of the detector, sec. 3.3) and a pseudo anomaly ``x_a`` of
it in the other score direction, and takes a gradient step on

    ||x_0 - f~(x_t, t)||_1 + identity_weight * ||x_a - f~(x^a_t, t)||_1
        + task_weight * (relu(A(f~(x_t, t)) - A(x_0)) + relu(A(x_a) - A(f~(x^a_t, t)))) / s.

Adaptations to one-class anomaly detection (the paper trains a classifier's adapter with a class label):

- **Pseudo anomalies.** An adapter trained on normal images only learns to "repair" real defects as well, and the
  detector then misses them (the AdvRAD paper, sec. 4.2). So every step also makes pseudo anomalies ``x_a`` of the
  batch with PatchGuard's foreground self-CutPaste generator (PatchGuard, Nafez et al., CVPR 2025, supplementary
  sec. B; :class:`~anomalib_robust.models.patch_guard.pseudo_anomaly.PseudoAnomalyGenerator`), pasted on the object
  (:meth:`~anomalib_robust.models.patch_guard.pseudo_anomaly.PseudoAnomalyGenerator.on_object`: dark or light
  background, or the whole image of a texture), and attacks them with Alg. 1 in the other score direction
  (``y = -1``: hide the defect), giving ``x^a_t``.
- **Task term.** The paper's ``CE(f~(x_t, t), y)`` covers every class; here it becomes two hinges on the detector's
  raw anomaly score ``A`` (:func:`~anomalib_robust.models.rap_adapter.process.score_hinge`), one per side. On normal
  images the attack raised the score (a false alarm), and the purified score must not stay above the clean image's;
  on pseudo anomalies the attack lowered it (a miss), and the purified score must not fall below the clean anomalous
  image's (the mirror hinge). Neither rewards going past the clean score: that would teach the adapter to make
  everything look normal, or everything anomalous. ``s`` (:attr:`score_scale`) is the spread (standard deviation) of
  the detector's raw scores of all the clean training images, a running estimate over one pass through the training
  data when training starts (:meth:`RAPAdapter.fit_score_scale`), so a constant shift of the detector's score changes
  nothing, ``task_weight`` means the same for detectors whose scores live on different scales, and the unit does not
  depend on the first batch (one image has no spread). A degenerate scale (fewer than two images, or no spread) is
  refused with an error. The default weight 0.1 is
  not tuned (Alg. 3 adds the cross-entropy with weight 1); sweep it with the ``task_weight`` argument
  (``benchmarks/rap_table.py --task-weights``).
- **Identity term.** The adapter returns ``x_a`` itself from ``x^a_t``, defect included. ``identity_weight = 0``
  switches it off (to measure with and without it); with both weights 0 no pseudo anomalies are made.
- **Loss norm.** Alg. 3 writes ``||x_0 - f~||`` without a subscript and eq. (8) uses L_2; L_1 (the mean absolute
  error) is used here.

Cost per training step: ``t`` forward and backward passes of (U-Net + detector) per image for each of the two attacks,
then two U-Net forward/backward and two detector forward/backward passes for the loss. The detector's weights never
change; they are saved in the checkpoint with the adapter's (so that training resumes), and the checkpoint records the
detector's name and a fingerprint of its weights, which :class:`~anomalib_robust.defenses.RAP` checks against the
detector it defends.

Validation and test score the defended detector, ``A(f~(x, T))`` (one-step RAP), so ``anomalib train`` reports the
standard AUROC of the defended pipeline. Robust AUROC: ``RobustEval(defense=RAP("rap.ckpt"))`` on the detector.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust.models import RAPAdapter
    >>> adapter = RAPAdapter(detector=fitted_padim, image_size=(32, 32), base_channels=32)  # doctest: +SKIP
    >>> Engine(max_epochs=5).fit(adapter, datamodule=datamodule)  # doctest: +SKIP

From the CLI, with the detector's checkpoint:

    anomalib train --model RAPAdapter --model.detector padim.ckpt --model.detector_model Padim --data ...
    anomalib train --config configs/model/rap_adapter_cpu.yaml --model.detector padim.ckpt --model.detector_model Padim
"""

import hashlib
import importlib
import inspect
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Resize

from anomalib_robust.attacks.base import check_non_negative
from anomalib_robust.attacks.detector import test_transform
from anomalib_robust.attacks.unmasking import unmasked_gradients
from anomalib_robust.models.patch_guard.pseudo_anomaly import PseudoAnomalyGenerator
from anomalib_robust.models.rap_adapter.process import (
    defended_objective,
    detector_score,
    forward_process,
    score_hinge,
)
from anomalib_robust.models.rap_adapter.torch_model import RAPAdapterModel

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "rap_detector"
"""Checkpoint entry with the name and weight fingerprint of the detector the adapter was trained against."""

ARCHITECTURE_ARGS = ("image_size", "in_channels", "base_channels", "channel_mult", "layers_per_block")
PROCESS_ARGS = ("steps", "eps", "step_size", "start_noise")

def detector_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of a detector's weights and buffers (names, shapes and values), to recognise it later."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_detector(detector: AnomalibModule | str | Path, detector_model: str | None) -> AnomalibModule:
    """The fitted detector: an ``AnomalibModule``, or a checkpoint path loaded with the class ``detector_model``.

    ``detector_model`` is an anomalib model name (``"Padim"``), a plugin model (``"AdvRAD"``) or a class path.

    Raises:
        FileNotFoundError: for a checkpoint path that does not exist.
        ValueError: for a path without ``detector_model``, or a name that is not an anomalib model.
    """
    if isinstance(detector, AnomalibModule):
        return detector
    if not isinstance(detector, str | Path):
        msg = f"detector must be a fitted AnomalibModule or the path of its checkpoint, got {type(detector).__name__}."
        raise TypeError(msg)
    path = Path(detector)
    if not path.is_file():
        msg = f"detector checkpoint {str(path)!r} does not exist (expected the fitted detector's .ckpt)."
        raise FileNotFoundError(msg)
    if not detector_model:
        msg = (
            f"detector is a checkpoint path ({str(path)!r}): also pass detector_model, the detector's class "
            "(an anomalib model name such as 'Padim', or a class path)."
        )
        raise ValueError(msg)
    return _model_class(detector_model).load_from_checkpoint(path, map_location="cpu")


def _model_class(name: str) -> type[AnomalibModule]:
    candidates = []
    if "." in name:
        module, _, attribute = name.rpartition(".")
        candidates.append((module, attribute))
    candidates += [("anomalib.models", name), ("anomalib_robust.models", name)]
    for module, attribute in candidates:
        try:
            cls = getattr(importlib.import_module(module), attribute, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, AnomalibModule):
            return cls
    msg = f"detector_model must name an anomalib model class (e.g. 'Padim', or a class path), got {name!r}."
    raise ValueError(msg)


class RAPAdapter(AnomalibModule):
    """Trains the RAP adapter f~ (the RAP paper, Alg. 3) for a fitted, frozen anomalib detector.

    Defaults: T = 20 attack steps (the RAP paper, sec. 4.5), an L_inf ball of 8/255 (its CIFAR-10 radius), lambda =
    2/255, c = 8/255 (uniform start noise over the whole ball, as Madry et al.; the paper does not give c), Adam with lr
    1e-4, a 3-level 64-channel U-Net at 256 x 256. ``configs/model/rap_adapter_cpu.yaml`` is a 32 x 32 preset.

    Args:
        detector: the fitted detector: an ``AnomalibModule`` or the path of its checkpoint (with ``detector_model``).
        detector_model: the detector's class when ``detector`` is a path (``"Padim"``, a class path).
        image_size: the adapter's input size (the pre-processor resizes to it; the detector's own pre-processor runs
            on the adapter's output).
        in_channels: image channels.
        base_channels, channel_mult, layers_per_block: the U-Net (:class:`RAPAdapterModel`).
        steps: T of Alg. 1 and Alg. 3.
        eps: L_inf radius of Alg. 1's ``Clamp``.
        step_size: lambda of Alg. 1.
        start_noise: c of Alg. 1, in ``[0, eps]``.
        task_weight: weight of the task term (the two score hinges, in units of the clean scores' spread; see the
            module docstring).
        identity_weight: weight of the identity term on pseudo anomalies (0: off).
        pseudo_anomaly_size: smallest side of a pseudo-anomalous patch in pixels; ``None``: an eighth of the image.
        learning_rate: Adam learning rate.
        seed: seed of the pseudo anomalies.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True`` for the defaults).
    """

    def __init__(
        self,
        detector: AnomalibModule | str | Path | None = None,
        detector_model: str | None = None,
        image_size: Sequence[int] = (256, 256),
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        layers_per_block: int = 1,
        steps: int = 20,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        start_noise: float = 8 / 255,
        task_weight: float = 0.1,
        identity_weight: float = 1.0,
        pseudo_anomaly_size: int | None = None,
        learning_rate: float = 1e-4,
        seed: int = 0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if detector is None:
            msg = (
                "RAPAdapter needs the fitted detector it defends: detector=<AnomalibModule> or detector=<checkpoint "
                "path> with detector_model=<class name>, e.g. --model.detector padim.ckpt --model.detector_model Padim."
            )
            raise ValueError(msg)
        check_non_negative("task_weight", task_weight)
        check_non_negative("identity_weight", identity_weight)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor(tuple(image_size))
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        if not isinstance(detector, AnomalibModule):  # a module's weights are in the state dict; pass it to load
            self.hparams["detector"] = str(detector)
        fitted = load_detector(detector, detector_model)
        self.detector_name = fitted.name
        self.detector_pre_processor = fitted.pre_processor
        self.detector_model = fitted.model
        self.detector_model.requires_grad_(False).eval()
        self.detector_fingerprint = detector_fingerprint(self.detector_model)
        self.model = RAPAdapterModel(image_size, in_channels, base_channels, channel_mult, layers_per_block, steps,
                                     eps, step_size, start_noise)  # fmt: skip
        self.task_weight, self.identity_weight = float(task_weight), float(identity_weight)
        self.learning_rate = learning_rate
        size = pseudo_anomaly_size or max(2, min(self.model.image_size) // 8)
        self.pseudo_anomalies = PseudoAnomalyGenerator(patch_size=size, seed=seed)
        self.register_buffer("score_scale", torch.zeros(()))
        """Standard deviation of the detector's raw scores of the clean training images (the task term's unit; 0
        until :meth:`fit_score_scale` sets it)."""

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None, **kwargs: Any) -> None:
        """As Lightning's, without the detector (a checkpoint path is added back by ``__init__``)."""
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, ignore=[*ignore, "detector"], **kwargs)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to the adapter's input size; no normalisation (the detector's own pre-processor comes after)."""
        return PreProcessor(transform=Resize(image_size or (256, 256), antialias=True))

    def train(self, mode: bool = True) -> "RAPAdapter":
        """The detector stays in eval mode: it is fitted and frozen; only the adapter trains."""
        super().train(mode)
        self.detector_model.eval()
        return self

    def _score(self, images: torch.Tensor) -> torch.Tensor:
        return detector_score(self.detector_pre_processor, self.detector_model, images)

    def _attack(self, images: torch.Tensor, t: torch.Tensor, direction: float) -> torch.Tensor:
        """Alg. 1 against the defended detector with the current adapter (eval mode, no parameter gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            directions = torch.full_like(t, direction, dtype=images.dtype)
            objective = defended_objective(
                self.model, self.model.steps, self.detector_pre_processor, self.detector_model, directions
            )
            return forward_process(objective, images, t, self.model.eps, self.model.step_size, self.model.start_noise)
        finally:
            self.model.train(was_training)

    def fit_score_scale(self, batches: Iterable[torch.Tensor]) -> float:
        """Set :attr:`score_scale` to the standard deviation of the detector's raw scores of the clean images in
        ``batches`` (normal images in [0, 1] at the adapter's input size), a running estimate over the batches
        (Chan et al.'s pairwise update of the mean and the sum of squares, in float64); return it.

        Raises:
            ValueError: when fewer than two images were scored, or their scores have no spread (a single image,
                identical images, a constant detector): the task term would have no unit.
        """
        count, mean, squares = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for images in batches:
                scores = self._score(images.to(self.device)).double().flatten().cpu()
                batch_mean, total = scores.mean(), count + scores.numel()
                delta = batch_mean - mean
                squares += (scores - batch_mean).square().sum() + delta.square() * count * scores.numel() / total
                mean += delta * scores.numel() / total
                count = total
        spread = float((squares / (count - 1)).sqrt()) if count > 1 else 0.0
        if not spread > 0 or not math.isfinite(spread):
            msg = (
                "RAPAdapter: the task term is in units of the spread of the detector's raw scores of the clean "
                f"training images, but {count} training image(s) gave a spread of {spread:.3g}: train on at least two "
                "images that the detector scores differently (one image, or identical ones, give no scale)."
            )
            raise ValueError(msg)
        self.score_scale.fill_(spread)
        return spread

    def on_train_start(self) -> None:
        """Measure the task term's unit over all the training images (one pass), unless a checkpoint restored it."""
        if self.score_scale > 0:
            return
        transform = getattr(self.pre_processor, "transform", None)
        batches = (transform(batch.image) if transform else batch.image for batch in self.trainer.train_dataloader)
        spread = self.fit_score_scale(batches)
        logger.info("RAPAdapter: the detector's raw scores of the clean training images spread by %.4g", spread)

    def losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of Alg. 3's loss on a batch of normal images ``x_0`` in [0, 1] (see the module docstring).

        Raises:
            RuntimeError: before the task term's unit is measured (:meth:`fit_score_scale`; ``Engine.fit`` does it).
        """
        if not self.score_scale > 0:
            msg = (
                "RAPAdapter.losses needs the task term's unit: train with Engine.fit (which measures it over the "
                "training images first) or call fit_score_scale(<batches of training images>)."
            )
            raise RuntimeError(msg)
        t = torch.randint(1, self.model.steps + 1, (images.shape[0],), device=images.device)
        with torch.no_grad():
            clean_scores = self._score(images)
        estimate = self.model(self._attack(images, t, 1.0), t)
        losses = {"reconstruction": (estimate - images).abs().mean()}
        with unmasked_gradients():
            scores = self._score(estimate.clamp(0.0, 1.0))
        losses["task_normal"] = score_hinge(scores, clean_scores, 1.0, self.score_scale).mean()
        task = losses["task_normal"]
        if self.identity_weight > 0 or self.task_weight > 0:
            anomalous = self.pseudo_anomalies.on_object(images)
            recovered = self.model(self._attack(anomalous, t, -1.0), t)
            with torch.no_grad():
                clean_anomalous_scores = self._score(anomalous)
            with unmasked_gradients():
                anomalous_scores = self._score(recovered.clamp(0.0, 1.0))
            losses["task_anomalous"] = score_hinge(
                anomalous_scores, clean_anomalous_scores, -1.0, self.score_scale
            ).mean()
            losses["identity"] = (recovered - anomalous).abs().mean()
            task = task + losses["task_anomalous"]
        identity = losses.get("identity", 0.0)
        losses["loss"] = losses["reconstruction"] + self.task_weight * task + self.identity_weight * identity
        return losses

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of Alg. 3."""
        del args, kwargs
        losses = self.losses(batch.image)
        self.model.trained_steps += 1
        size = batch.image.shape[0]
        self.log("train_loss", losses["loss"], on_epoch=True, prog_bar=True, logger=True, batch_size=size)
        self.log_dict({f"train_loss_{name}": value for name, value in losses.items() if name != "loss"},
                      on_epoch=True, batch_size=size)  # fmt: skip
        return {"loss": losses["loss"]}

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Scores of the defended detector (one-step RAP) on the validation images."""
        del args, kwargs
        purified = self.model(batch.image, self.model.steps).clamp(0.0, 1.0)
        output = self.detector_model(test_transform(self.detector_pre_processor, purified))
        return batch.update(**output._asdict())

    def test_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Scores of the defended detector (one-step RAP) on the test images."""
        return self.validation_step(batch, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the detector the adapter was trained against (its name and weight fingerprint)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"name": self.detector_name, "fingerprint": self.detector_fingerprint}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Warn when training resumes against another detector than the checkpoint's."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved and saved["fingerprint"] != self.detector_fingerprint:
            logger.warning(
                "RAPAdapter: the checkpoint was trained against %s (weights %s); this run's detector is %s (weights "
                "%s). Its detector weights in the checkpoint replace this run's.",
                saved["name"], saved["fingerprint"], self.detector_name, self.detector_fingerprint,
            )  # fmt: skip

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the adapter only (the detector is frozen)."""
        return torch.optim.Adam(self.model.parameters(), lr=self.learning_rate)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (scores of an untrained adapter mean nothing)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """The adapter learns from normal images (and their pseudo anomalies) only."""
        return LearningType.ONE_CLASS
