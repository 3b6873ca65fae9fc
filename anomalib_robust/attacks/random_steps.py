"""Random sign steps with PGD's budget: the baseline a gradient attack must beat at a very large eps.

At a very large radius (half the pixel range) noise alone moves every score, and PGD keeps its best iterate per image
(or its final one), so AUROC can reach 0 without any information from the gradient: on a detector whose gradient is
useless at the attack's scale (a high-frequency term), 10 sign steps that act as noise drove AUROC to 0 while PGD at
12/255 left it at 1.000. Carlini et al. (2019, "On Evaluating Adversarial Robustness", sec. 5) ask that a very large
budget break the detector; what shows that the gradient did it is beating :class:`RandomSteps`: PGD (AdvRAD paper,
eq. 1-2) with the same ``eps``, ``steps``, ``alpha``, start and selection of the returned iterate, whose step
direction is a uniformly random sign per pixel (L_inf) or that sign vector's unit direction (L_2), independent of the
score. It needs no gradient: with ``select="best"`` one objective per iterate, with ``"final"`` none.

Example:
    >>> from anomalib_robust.attacks.random_steps import RandomSteps
    >>> baseline = RandomSteps(model, eps=0.5, steps=10, random_start=False)  # doctest: +SKIP
    >>> noisy = baseline(batch.image, batch.gt_label)  # doctest: +SKIP
"""

import torch

from anomalib_robust.attacks.pgd import PGD


class RandomSteps(PGD):
    """:class:`~anomalib_robust.attacks.PGD` whose step direction is a random sign per pixel (same arguments)."""

    name = "Random steps"

    def _ascent(
        self, adversarial: torch.Tensor, labels: torch.Tensor, with_objective: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The EOT objective at ``adversarial`` if ``with_objective`` (to keep the best iterate), and a random sign
        per pixel from torch's global RNG (seeded by the attack)."""
        objective = self.detector.objective(adversarial, labels) if with_objective else None
        signs = torch.randint(0, 2, adversarial.shape, device=adversarial.device).to(adversarial.dtype) * 2 - 1
        return objective, signs
