"""Auto-PGD (Croce & Hein, 2020, APGD, Alg. 1) on the raw margin ``y * A(x)``, L_inf and L_2.

Croce & Hein, 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", sec. 3: gradient ascent with momentum whose step size needs no tuning. Here it maximises the objective of
the AdvRAD paper, sec. 3, ``f(x) = y * A(x)`` itself (:meth:`DetectorScore.objective_and_gradient`, an EOT estimate
for randomised detectors), not a cross-entropy on logits: the raw score has no saturating region, so the gradient is
informative however far the score lies from any threshold. With ``P`` the projection onto the ``eps``-ball and the
[0, 1] box, ``s(g) = sign(g)`` for L_inf and ``g / ||g||_2`` for L_2:

    x(1)   = P(x(0) + eta s(grad f(x(0))))
    z(k+1) = P(x(k) + eta(k) s(grad f(x(k))))
    x(k+1) = P(x(k) + alpha (z(k+1) - x(k)) + (1 - alpha) (x(k) - x(k-1))),   alpha = 0.75

starting from ``eta(0) = 2 eps`` and a random point ``x(0)`` of the ball. At the checkpoints ``w_j = ceil(p_j N)``,
``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, the step size of a sample is halved
and its iterate restarted from its best point ``x_max`` (momentum reset) when

    1. fewer than ``rho = 0.75`` of the steps since ``w_{j-1}`` increased ``f``, or
    2. the step size was not halved at ``w_{j-1}`` and ``f_max`` has not improved since.

Each run returns its best point ``x_max``; ``restarts`` runs from new random starts are combined with the clean image
by the worst case per sample (:meth:`Attack.worst_case`), so the result is never worse than the clean image for a
deterministic detector. Per run: ``steps`` gradient evaluations and one score.

Example:
    >>> from anomalib_robust.attacks import APGD
    >>> adversarial = APGD(model, eps=2 / 255, steps=20)(batch.image, batch.gt_label)  # doctest: +SKIP
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from anomalib_robust.attacks.base import Attack, check_count
from anomalib_robust.attacks.pgd import ascent_step, project, random_start

MOMENTUM = 0.75
"""``alpha`` of Alg. 1: weight of the new gradient step against the previous update."""
RHO = 0.75
"""Condition 1: minimum fraction of steps since the last checkpoint that must have increased the objective."""


def checkpoints(steps: int) -> list[int]:
    """Iterations ``w_j = ceil(p_j * steps)``, ``0 < w_j < steps``, at which APGD may halve its step size."""
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(p * steps, 9)) for p in fractions} & set(range(1, steps)))  # round: 0.57 * 100


def _where(condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between two batches (``condition`` of shape ``(N,)``)."""
    return torch.where(condition.view(-1, *([1] * (a.ndim - 1))), a, b)


class APGD(Attack):
    """Auto-PGD on ``y * A(x)`` (L_inf or L_2), with EOT gradients on randomised detectors.

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball.
        steps: iterations ``N_iter`` per run (gradient evaluations).
        norm: ``"Linf"`` or ``"L2"``.
        restarts: runs from independent random starts; the worst case per sample is kept.
        eot_samples, bpda, seed: see :class:`~anomalib_robust.attacks.base.Attack`.
    """

    name = "APGD"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 2 / 255,
        steps: int = 10,
        norm: str = "Linf",
        restarts: int = 1,
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, eot_samples=eot_samples, bpda=bpda, seed=seed)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Best point of each run; worst case per sample over the clean image and the runs."""
        return self.worst_case(images, labels, (self.run(images, labels) for _ in range(self.restarts)))

    def _step(self, x: torch.Tensor, images: torch.Tensor, gradient: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        return project(ascent_step(x, gradient, eta.view(-1, 1, 1, 1), self.norm), images, self.eps, self.norm)

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One run of Alg. 1 from a random start: the point with the highest objective seen, per sample."""
        checks = set(checkpoints(self.steps))
        x_previous = random_start(images, self.eps, self.norm)
        objective, gradient = self.detector.objective_and_gradient(x_previous, labels)
        x_max, f_max, gradient_max = x_previous, objective, gradient
        eta = torch.full_like(objective, 2 * self.eps)
        x = self._step(x_previous, images, gradient, eta)
        increases = torch.zeros_like(objective)
        f_max_at_check = f_max.clone()
        halved_at_check = torch.zeros_like(objective, dtype=torch.bool)
        last_check = 0
        for k in range(1, self.steps):
            new_objective, gradient = self.detector.objective_and_gradient(x, labels)
            increases += (new_objective > objective).to(increases)
            objective = new_objective
            improved = objective > f_max
            x_max, f_max = _where(improved, x, x_max), torch.where(improved, objective, f_max)
            gradient_max = _where(improved, gradient, gradient_max)
            if k in checks:
                too_few_increases = increases < RHO * (k - last_check)
                stalled = ~halved_at_check & (f_max <= f_max_at_check)
                halve = too_few_increases | stalled
                eta = torch.where(halve, eta / 2, eta)
                x, x_previous = _where(halve, x_max, x), _where(halve, x_max, x_previous)
                gradient, objective = _where(halve, gradient_max, gradient), torch.where(halve, f_max, objective)
                halved_at_check, f_max_at_check, last_check = halve, f_max.clone(), k
                increases.zero_()
            z = self._step(x, images, gradient, eta)
            momentum_step = x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_previous)
            x_previous, x = x, project(momentum_step, images, self.eps, self.norm)
        objective = self.detector.objective(x, labels)
        return _where(objective > f_max, x, x_max)

    def _settings(self) -> dict[str, object]:
        return {**super()._settings(), "steps": self.steps, "restarts": self.restarts}
