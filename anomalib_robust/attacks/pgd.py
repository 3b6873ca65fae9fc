"""Projected Gradient Descent on the anomaly score, L_inf and L_2 (AdvRAD paper, sec. 3, eq. 1-2).

With ``L(x, y) = y * A(x)`` (see :mod:`anomalib_robust.attacks.objective`), step size ``alpha`` and ``N`` steps:

    L_inf (eq. 1):  x_{n+1} = P_{x,eps}( x_n + alpha * sign(grad L(x_n, y)) )
    L_2   (eq. 2):  x_{n+1} = P_{x,eps}( x_n + alpha * grad L(x_n, y) / ||grad L(x_n, y)||_2 )

where ``P`` projects onto the ``eps``-ball around ``x`` and onto the [0, 1] image box. The paper starts from
``x_0 = x`` and returns ``x_N``; this implementation (as torchattacks' PGD) starts from a random point of the ball by
default (``random_start=False`` gives ``x_0 = x``) and runs ``restarts`` independent starts. What is returned is set
by ``select``:

- ``"best"``: per sample, the iterate with the highest objective among ``x, x_0 .. x_N`` of all restarts (equal to
  ``x_N`` when the objective increases along the path, never worse than the clean image). Right for deterministic
  detectors, whose objective is exact.
- ``"final"``: the paper's ``x_N`` of each restart; with several restarts, per sample the restart whose ``x_N`` scores
  highest when re-scored with ``rescore_samples`` fresh draws. For a randomised detector the objective is a noisy EOT
  estimate, and keeping the maximum of noisy estimates selects the luckiest draw (the winner's curse), often the clean
  image's own noisy value; the final iterate of the gradient ascent does not depend on such a comparison.
- ``"auto"`` (default): ``"final"`` for randomised detectors, ``"best"`` for deterministic ones.

For a randomised detector the gradient and objective are EOT estimates (:mod:`anomalib_robust.attacks.eot`), which
makes this EOT-PGD (AdvRAD paper, sec. 5.6, Table 10).

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

from anomalib_robust.attacks.base import (
    RESCORE_FACTOR,
    Attack,
    check_count,
    check_positive,
    keep_worst_case,
    warn_large_step,
)

SELECTIONS = ("auto", "best", "final")
"""Values of :class:`PGD`'s ``select`` argument."""


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


def random_offset(images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """An offset to a uniformly random point of the L_inf ball, or a random point of the L_2 ball, around ``images``
    (torch's global RNG; not yet projected onto the [0, 1] box)."""
    if norm == "Linf":
        return torch.empty_like(images).uniform_(-eps, eps)
    direction = torch.randn_like(images)
    radius = eps * torch.rand(images.shape[0], 1, 1, 1, device=images.device, dtype=images.dtype)
    return direction / _per_sample_norm(direction) * radius


def random_start(images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A uniformly random point of the L_inf ball, or a random point of the L_2 ball, around ``images``."""
    return project(images + random_offset(images, eps, norm), images, eps, norm)


def ascent_step(
    adversarial: torch.Tensor,
    gradient: torch.Tensor,
    alpha: float | torch.Tensor,
    norm: str,
) -> torch.Tensor:
    """One unprojected ascent step: ``alpha * sign(grad)`` (eq. 1) or ``alpha * grad / ||grad||_2`` (eq. 2).

    ``alpha`` is a number or a per-sample tensor shaped ``(N, 1, 1, 1)``.
    """
    if norm == "Linf":
        return adversarial + alpha * gradient.sign()
    return adversarial + alpha * gradient / _per_sample_norm(gradient)


def check_select(select: str) -> str:
    """``select`` if it is one of :data:`SELECTIONS`.

    Raises:
        ValueError: naming the argument otherwise.
    """
    if select not in SELECTIONS:
        msg = f"select must be one of {SELECTIONS}, got {select!r}."
        raise ValueError(msg)
    return select


class PGD(Attack):
    """L_inf / L_2 PGD on the raw anomaly score (AdvRAD paper, eq. 1-2), EOT-PGD on randomised detectors.

    Args:
        model: the anomalib detector (or a :class:`~anomalib_robust.attacks.DetectorScore`).
        eps: radius of the ball; the paper uses ``2/255`` for L_inf and ``0.2`` for L_2.
        alpha: step size; ``None`` gives ``2.5 * eps / steps`` (Madry et al., 2018), at most ``eps``.
        steps: number of steps ``N``.
        norm: ``"Linf"`` (eq. 1) or ``"L2"`` (eq. 2).
        random_start: start from a random point of the ball instead of ``x``.
        restarts: independent starts.
        select: which point is returned (see the module docstring): ``"best"`` iterate on the objective (also over
            restarts and the clean image), the ``"final"`` iterate (restarts compared by re-scoring), or
            ``"auto"``: ``"final"`` for randomised detectors, ``"best"`` for deterministic ones.
        rescore_samples: fresh draws per re-scoring of the restarts' final iterates (``select="final"``,
            ``restarts > 1``), rounded up to a multiple of ``eot_samples``; ``None`` gives ``4 * eot_samples`` for
            randomised detectors and 1 for deterministic ones (whose draws are identical).
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
        select: str = "auto",
        rescore_samples: int | None = None,
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
        self.select = check_select(select)
        if rescore_samples is None:
            rescore_samples = RESCORE_FACTOR * self.detector.eot_samples if self.detector.stochastic else 1
        self.rescore_samples = check_count("rescore_samples", rescore_samples)

    @property
    def selection(self) -> str:
        """The effective ``select`` mode: ``"best"`` or ``"final"`` (``"auto"`` resolved for this detector)."""
        if self.select == "auto":
            return "final" if self.detector.stochastic else "best"
        return self.select

    def _start(self, images: torch.Tensor) -> torch.Tensor:
        return random_start(images, self.eps, self.norm) if self.random_start else images.clone()

    def _step(self, adversarial: torch.Tensor, images: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        return project(ascent_step(adversarial, gradient, self.alpha, self.norm), images, self.eps, self.norm)

    def _ascent(
        self, adversarial: torch.Tensor, labels: torch.Tensor, with_objective: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The EOT objective at ``adversarial`` and the direction of the step: its EOT gradient (the objective comes
        with the gradient, whether or not ``with_objective`` asks for it)."""
        return self.detector.objective_and_gradient(adversarial, labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Iterates of eq. (1) / (2) from each start; the point returned is chosen by ``select``."""
        if self.selection == "final":
            return self._final_iterate(images, labels)
        return self._best_iterate(images, labels)

    def _best_iterate(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per sample, the highest-objective point among the clean image and every iterate of every restart."""
        best = images.clone()
        best_objective = self.detector.objective(images, labels)
        for _ in range(self.restarts):
            adversarial = self._start(images)
            for _ in range(self.steps):
                objective, gradient = self._ascent(adversarial, labels)
                best, best_objective = keep_worst_case(best, best_objective, adversarial, objective)
                adversarial = self._step(adversarial, images, gradient)
            objective = self.detector.objective(adversarial, labels)
            best, best_objective = keep_worst_case(best, best_objective, adversarial, objective)
        return best

    def _final_iterate(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``x_N`` of each restart; per sample, the restart whose ``x_N`` re-scores highest."""
        finals = []
        for _ in range(self.restarts):
            adversarial = self._start(images)
            for _ in range(self.steps):
                _, gradient = self._ascent(adversarial, labels, with_objective=False)
                adversarial = self._step(adversarial, images, gradient)
            finals.append(adversarial)
        if len(finals) == 1:
            return finals[0]
        best, best_objective = finals[0], self.rescored_objective(finals[0], labels, self.rescore_samples)
        for final in finals[1:]:
            objective = self.rescored_objective(final, labels, self.rescore_samples)
            best, best_objective = keep_worst_case(best, best_objective, final, objective)
        return best

    def _settings(self) -> dict[str, object]:
        return {
            **super()._settings(),
            "steps": self.steps,
            "alpha": round(self.alpha, 6),
            "select": self.selection,
        }
