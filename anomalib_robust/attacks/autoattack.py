"""AutoAttack-style ensemble for anomaly detectors (AdvRAD paper, appendix D.3, Table 14; PatchGuard supplementary,
Nafez et al., CVPR 2025, appendix H).

AutoAttack (Croce & Hein, 2020) runs APGD-CE, APGD-DLR (targeted), FAB and Square and keeps, per sample, the first
success. Adapted to anomaly detection:

- APGD and Square run on the raw objective ``y * A(x)`` of the AdvRAD paper, sec. 3 (a detector has one score, not
  class logits), so neither saturates far from the threshold nor stops at a threshold crossing;
- DLR needs at least three class logits, so the DLR attacks are replaced by PGD on the score (PatchGuard
  supplementary, appendix H); FAB, a minimum-norm classification attack, is left out because AUROC needs
  bounded-radius attacks;
- AUROC depends on every score, so each sample keeps the adversarial example with the highest ``y * A(x)`` over the
  ensemble and the clean image (not the first threshold flip);
- a randomised detector gets the "random" version of the AdvRAD paper, appendix D.3: the gradient attacks with EOT
  and no Square (random search cannot rank candidates from noisy scores).

Example:
    >>> from anomalib_robust.attacks import AutoAttack
    >>> adversarial = AutoAttack(model, eps=2 / 255)(batch.image, batch.gt_label)  # doctest: +SKIP
"""

from collections.abc import Callable, Mapping

import torch
from torch import nn

from anomalib_robust.attacks.apgd import APGD
from anomalib_robust.attacks.base import Attack, check_count
from anomalib_robust.attacks.pgd import PGD
from anomalib_robust.attacks.square import Square


class AutoAttack(Attack):
    """Worst case per sample of APGD, PGD (for APGD-DLR) and Square (deterministic detectors only).

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball.
        norm: ``"Linf"`` or ``"L2"``.
        steps: iterations of APGD and PGD.
        n_queries: queries of Square.
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "AutoAttack"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        norm: str = "Linf",
        steps: int = 100,
        n_queries: int = 1000,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.steps = check_count("steps", steps)
        self.n_queries = check_count("n_queries", n_queries)
        common = {"eps": self.eps, "norm": self.norm, "seed": seed}
        self.attacks: list[Attack] = [
            APGD(self.detector, steps=self.steps, **common),
            PGD(self.detector, steps=self.steps, **common),
        ]
        if not self.detector.stochastic:
            self.attacks.append(Square(self.detector, n_queries=self.n_queries, **common))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per sample, the highest ``y * A(x)`` over the clean image and the ensemble's adversarial examples."""
        return self.worst_case(images, labels, (attack.forward(images, labels) for attack in self.attacks))

    def _settings(self) -> dict[str, object]:
        return {
            **super()._settings(),
            "steps": self.steps,
            "attacks": "+".join(attack.name for attack in self.attacks),
        }
