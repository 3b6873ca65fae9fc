"""Square Attack (Andriushchenko et al., 2020): black-box random search on the anomaly score, through torchattacks.

Square needs only scores, no gradients, so it is the sanity check against gradient masking (Carlini et al., 2019):
if it beats white-box PGD, the gradients PGD followed were not informative. torchattacks' ``Square`` runs unchanged on
the two-logit view of the score (:mod:`anomalib_robust.attacks.logits`) with its margin loss. Its random search stops
improving a sample once the threshold decision flips; this attack returns that best point for every sample
(``attack_single_run``) rather than only the flipped ones, and keeps the worst case per sample over restarts.

Example:
    >>> from anomalib_robust.attacks import Square
    >>> adversarial = Square(model, eps=2 / 255, n_queries=500)(batch.image, batch.gt_label)  # doctest: +SKIP
"""

from collections.abc import Callable, Mapping

import torch
import torchattacks
from torch import nn

from anomalib_robust.attacks.base import Attack, check_count, check_positive
from anomalib_robust.attacks.logits import two_logit_score


class Square(Attack):
    """Score-based Square attack, L_inf or L_2.

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball.
        n_queries: score queries per sample and restart.
        norm: ``"Linf"`` or ``"L2"``.
        restarts: independent runs; the worst case per sample is kept.
        p_init: initial fraction of pixels changed per query (torchattacks' default 0.8).
        threshold, scale: centre and temperature of the logits (see
            :func:`~anomalib_robust.attacks.logits.two_logit_score`); ``None`` for label-free defaults.
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "Square"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        n_queries: int = 1000,
        norm: str = "Linf",
        restarts: int = 1,
        p_init: float = 0.8,
        threshold: float | None = None,
        scale: float | None = None,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.n_queries = check_count("n_queries", n_queries)
        self.restarts = check_count("restarts", restarts)
        self.p_init = check_positive("p_init", p_init)
        self.threshold = threshold
        self.scale = scale

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Lowest-margin point per sample of each random-search run; worst case over runs."""
        square = torchattacks.Square(
            two_logit_score(self.detector, images, self.threshold, self.scale),
            norm=self.norm,
            eps=self.eps,
            n_queries=self.n_queries,
            p_init=self.p_init,
            loss="margin",
            seed=self.seed,
        )
        square.set_device(images.device)
        square.init_hyperparam(images)
        runs = (square.attack_single_run(images, labels)[1] for _ in range(self.restarts))
        return self.worst_case(images, labels, runs)

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "n_queries": self.n_queries}
