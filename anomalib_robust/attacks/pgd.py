"""Projected Gradient Descent on the anomaly score, L_inf and L_2 (seed 000, sec. 3, eq. 1-2).

With ``L(x, y) = y * A(x)`` (see :mod:`anomalib_robust.attacks.objective`), step size ``alpha`` and ``N`` steps:

    L_inf (eq. 1):  x_{n+1} = P_{x,eps}( x_n + alpha * sign(grad L(x_n, y)) )
    L_2   (eq. 2):  x_{n+1} = P_{x,eps}( x_n + alpha * grad L(x_n, y) / ||grad L(x_n, y)||_2 )

where ``P`` projects onto the ``eps``-ball around ``x`` and onto the [0, 1] image box. The paper starts from
``x_0 = x`` and returns ``x_N``; this implementation (as torchattacks' PGD) starts from a random point of the ball by
default (``random_start=False`` gives ``x_0 = x``), returns per sample the iterate with the highest objective among
``x, x_0 .. x_N`` (equal to ``x_N`` when the objective increases along the path, never worse), and keeps the worst
case per sample over ``restarts`` random starts. For a randomised detector the gradient and objective are EOT
estimates (:mod:`anomalib_robust.attacks.eot`), which makes this EOT-PGD (seed 000, sec. 5.6, Table 10).

Example:
    >>> import torch
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.attacks import PGD
    >>> attack = PGD(model, eps=2 / 255, steps=10)  # doctest: +SKIP
    >>> adversarial = attack(batch.image, batch.gt_label)  # doctest: +SKIP
"""

from collections.abc import Callable, Mapping

import torch
from torch import nn

from anomalib_robust.attacks.base import Attack, check_count, check_positive, keep_worst_case, warn_large_step


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """L_2 norm of each sample, shaped ``(N, 1, 1, 1)`` for broadcasting."""
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def project(adversarial: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``P_{x,eps}``: project onto the ``eps``-ball around ``images`` in ``norm``, then onto the [0, 1] box.

    Clipping to the box moves every pixel towards ``images`` (which lies in the box), so it never leaves the ball.
    """
    delta = adversarial - images
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (images + delta).clamp(0.0, 1.0)


def random_start(images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniformly random point of the L_inf ball, or a random point of the L_2 ball, around ``images``."""
    if norm == "Linf":
        delta = torch.empty_like(images).uniform_(-eps, eps)
    else:
        direction = torch.randn_like(images)
        radius = eps * torch.rand(images.shape[0], 1, 1, 1, device=images.device, dtype=images.dtype)
        delta = direction / _per_sample_norm(direction) * radius
    return project(images + delta, images, eps, norm)


def ascent_step(adversarial: torch.Tensor, gradient: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """One unprojected ascent step: ``alpha * sign(grad)`` (eq. 1) or ``alpha * grad / ||grad||_2`` (eq. 2)."""
    if norm == "Linf":
        return adversarial + alpha * gradient.sign()
    return adversarial + alpha * gradient / _per_sample_norm(gradient)


class PGD(Attack):
    """L_inf / L_2 PGD on the raw anomaly score (seed 000, eq. 1-2), EOT-PGD on randomised detectors.

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball; the paper uses ``2/255`` for L_inf and ``0.2`` for L_2.
        alpha: step size; ``None`` gives ``2.5 * eps / steps`` (Madry et al., 2018), at most ``eps``.
        steps: number of steps ``N``.
        norm: ``"Linf"`` (eq. 1) or ``"L2"`` (eq. 2).
        random_start: start from a random point of the ball instead of ``x``.
        restarts: independent starts; the worst case per sample is kept.
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "PGD"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "Linf",
        random_start: bool = True,
        restarts: int = 1,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.alpha = min(self.eps, 2.5 * self.eps / self.steps) if alpha is None else check_positive("alpha", alpha)
        warn_large_step(self.alpha, self.eps, self.norm)
        self.random_start = random_start

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Worst case per sample over restarts and iterates of eq. (1) / (2)."""
        best = images.clone()
        best_objective = self.detector.objective(images, labels)
        for _ in range(self.restarts):
            adversarial = random_start(images, self.eps, self.norm) if self.random_start else images.clone()
            for _ in range(self.steps):
                objective, gradient = self.detector.objective_and_gradient(adversarial, labels)
                best, best_objective = keep_worst_case(best, best_objective, adversarial, objective)
                adversarial = project(
                    ascent_step(adversarial, gradient, self.alpha, self.norm), images, self.eps, self.norm
                )
            objective = self.detector.objective(adversarial, labels)
            best, best_objective = keep_worst_case(best, best_objective, adversarial, objective)
        return best

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "steps": self.steps, "alpha": round(self.alpha, 6)}
