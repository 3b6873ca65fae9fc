"""``Purified``: a diffusion purifier in front of any trained anomalib detector, as one anomalib model.

The composed pipeline is ``x -> resize to the purifier's size -> purifier -> detector's pre-processor -> detector``, on
[0, 1] images, so the pair is tested, predicted and attacked like any other anomalib model: ``Engine.test`` reports the
standard AUROC of the purified pipeline, and :class:`~anomalib_robust.callbacks.RobustEval` attacks it through the
purifier (full gradients with EOT, and BPDA+EOT when ``bpda={"model.purifier": None}``). ``RobustEval(defense=...)``
builds this wrapper itself.

The detector is trained on clean normal images as usual (the AdvRAD paper, sec. 5.4, puts DiffPure in front of a
trained CFA); the purifier is an inference-time stage, so ``Purified`` is not trained: fit the detector, then wrap it.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.defenses import DiffPure, Purified
    >>> detector = Padim(pre_trained=False)
    >>> Engine().fit(detector, datamodule=datamodule)  # doctest: +SKIP
    >>> purified = Purified(detector, DiffPure("adv_rad.ckpt", level=50))  # doctest: +SKIP
    >>> Engine().test(purified, datamodule=datamodule)  # doctest: +SKIP
"""

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchvision.transforms.v2 import Resize

from anomalib_robust.attacks.detector import test_transform
from anomalib_robust.defenses.purifiers import DiffusionPurifier

NOT_TRAINABLE = (
    "Purified is an inference-time defense: train the detector on its own (Engine.fit(detector, ...)), then wrap the "
    "trained detector: Purified(detector, DiffPure(...))."
)


class PurifiedModel(nn.Module):
    """Torch model of the pipeline: purifier, then the detector's pre-processor and torch model.

    Args:
        purifier: the diffusion purifier (images of its own size, [0, 1] in and out).
        detector_pre_processor: the detector's pre-processor (resize, normalisation), or ``None``.
        detector_model: the detector's torch model; its eval forward returns ``InferenceBatch``.
    """

    stochastic = True
    """The purifier draws fresh noise at every call: the pipeline is attacked and scored with EOT."""

    def __init__(
        self,
        purifier: DiffusionPurifier,
        detector_pre_processor: nn.Module | None,
        detector_model: nn.Module,
    ) -> None:
        super().__init__()
        self.stochastic = bool(getattr(purifier, "stochastic", True))
        self.purifier = purifier
        self.detector_pre_processor = detector_pre_processor
        self.detector_model = detector_model

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score of the detector on the purified images, pre-processed as anomalib tests it (eval mode only)."""
        if self.training:
            msg = "PurifiedModel is an inference pipeline; call .eval() (train the detector on its own)."
            raise RuntimeError(msg)
        return self.detector_model(test_transform(self.detector_pre_processor, self.purifier(images)))


class Purified(AnomalibModule):
    """A trained anomalib detector defended by a diffusion purifier (DiffPure, TMA).

    Args:
        detector: a trained ``AnomalibModule`` (its post-processor's thresholds are reused).
        purifier: a :class:`~anomalib_robust.defenses.purifiers.DiffusionPurifier`.
        visualizer: anomalib's visualizer for the test images (see ``AnomalibModule``).
    """

    def __init__(self, detector: AnomalibModule, purifier: DiffusionPurifier, visualizer: bool = True) -> None:
        if not isinstance(detector, AnomalibModule):
            msg = f"detector must be a trained anomalib AnomalibModule, got {type(detector).__name__}."
            raise TypeError(msg)
        if not isinstance(purifier, DiffusionPurifier):
            msg = f"purifier must be a DiffusionPurifier (DiffPure, TMA), got {type(purifier).__name__}."
            raise TypeError(msg)
        super().__init__(
            pre_processor=PreProcessor(transform=Resize(purifier.image_size, antialias=True)),
            post_processor=detector.post_processor or False,
            visualizer=visualizer,
        )
        self.detector_name = detector.name
        purifier.attach(detector)
        self.model = PurifiedModel(purifier, detector.pre_processor, detector.model)
        self._detector_trainer_arguments = detector.trainer_arguments
        self._detector_learning_type = detector.learning_type

    def save_hyperparameters(self, *args: Any, ignore: Sequence[str] | str | None = None, **kwargs: Any) -> None:
        """As Lightning's, without the detector and purifier modules (their weights are in the state dict)."""
        ignore = [ignore] if isinstance(ignore, str) else list(ignore or [])
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, ignore=[*ignore, "detector", "purifier"], **kwargs)

    @property
    def name(self) -> str:
        """``<purifier>+<detector>``, e.g. ``DiffPure(level=50)+Padim``."""
        return f"{type(self.model.purifier).__name__}({self.model.purifier.extra_repr()})+{self.detector_name}"

    def configure_optimizers(self) -> None:
        """Not trainable: the purifier is pre-trained and the detector is trained on its own."""
        raise RuntimeError(NOT_TRAINABLE)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Not trainable, see :meth:`configure_optimizers`."""
        del batch, args, kwargs
        raise RuntimeError(NOT_TRAINABLE)

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Scores and anomaly maps of the purified pipeline."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The detector's trainer arguments."""
        return self._detector_trainer_arguments

    @property
    def learning_type(self) -> LearningType:
        """The detector's learning type."""
        return self._detector_learning_type
