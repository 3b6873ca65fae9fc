"""Model-agnostic defenses around any anomalib detector: purifiers (DiffPure, TMA, AGDM, RAP) and robust training.

Example:
    >>> from anomalib_robust.defenses import DiffPure, Purified
    >>> purified = Purified(trained_padim, DiffPure("adv_rad.ckpt", level=50))  # doctest: +SKIP

    $ anomalib train --model Fastflow --data anomalib_robust.data.FashionMNIST --callbacks adversarial_training
"""

from anomalib_robust.defenses.agdm import AGDM
from anomalib_robust.defenses.purified import Purified, PurifiedModel
from anomalib_robust.defenses.purifiers import (
    TMA,
    DiffPure,
    DiffusionChainPurifier,
    DiffusionPurifier,
    RespacedPurifier,
)
from anomalib_robust.defenses.rap import RAP, DetectorMismatchWarning
from anomalib_robust.defenses.training import AdversarialTraining, GaussianNoiseTraining, NotGradientTrainedError
from anomalib_robust.registry import register_callback

register_callback("adversarial_training", "anomalib_robust.defenses.AdversarialTraining")
register_callback("gaussian_noise_training", "anomalib_robust.defenses.GaussianNoiseTraining")

__all__ = [
    "AGDM",
    "RAP",
    "TMA",
    "AdversarialTraining",
    "DetectorMismatchWarning",
    "DiffPure",
    "DiffusionChainPurifier",
    "DiffusionPurifier",
    "GaussianNoiseTraining",
    "NotGradientTrainedError",
    "Purified",
    "PurifiedModel",
    "RespacedPurifier",
]
