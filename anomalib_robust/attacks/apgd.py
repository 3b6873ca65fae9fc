"""APGD with cross-entropy loss (Croce & Hein, 2020) on the anomaly score, through torchattacks.

torchattacks' ``APGD`` runs unchanged on the two-logit view of the score (:mod:`anomalib_robust.attacks.logits`).
Its default output keeps an adversarial example only where the threshold decision flips; AUROC depends on every
score, so this attack takes, per sample, the iterate with the highest loss (``perturb(best_loss=True)``), i.e. the one
that moved the score furthest in the direction of seed 000, sec. 3.

Example:
    >>> from anomalib_robust.attacks import APGD
    >>> adversarial = APGD(model, eps=2 / 255, steps=20)(batch.image, batch.gt_label)  # doctest: +SKIP
"""

from collections.abc import Callable, Mapping

import torch
import torchattacks
from torch import nn

from anomalib_robust.attacks.base import Attack, check_count
from anomalib_robust.attacks.logits import two_logit_score


class APGD(Attack):
    """Auto-PGD with cross-entropy on ``[-(A(x) - t), A(x) - t] / scale`` (L_inf or L_2).

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball.
        steps: APGD iterations.
        norm: ``"Linf"`` or ``"L2"``.
        restarts: random restarts; torchattacks keeps the highest-loss point per sample.
        threshold, scale: centre and temperature of the logits (see
            :func:`~anomalib_robust.attacks.logits.two_logit_score`); ``None`` for label-free defaults.
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "APGD-CE"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        steps: int = 10,
        norm: str = "Linf",
        restarts: int = 1,
        threshold: float | None = None,
        scale: float | None = None,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.threshold = threshold
        self.scale = scale

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Highest cross-entropy point per sample over APGD iterates and restarts."""
        logits = two_logit_score(self.detector, images, self.threshold, self.scale)
        apgd = torchattacks.APGD(
            logits,
            norm=self.norm,
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.seed,
            loss="ce",
        )
        apgd.set_device(images.device)
        _, adversarial = apgd.perturb(images, labels, best_loss=True)
        return adversarial

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "steps": self.steps}
