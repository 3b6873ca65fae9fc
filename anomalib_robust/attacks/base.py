"""Base class of the score-direction attacks: argument checks, model state and RNG kept as found.

An attack follows torchattacks' shape: a small object with explicit ``eps`` and ``norm`` whose call
``attack(images, labels)`` returns adversarial images in the valid box, with no side effects on the model: its
train/eval mode, ``requires_grad`` flags, buffers and the global RNG state are restored, and no ``.grad`` is
accumulated. Images are [0, 1] tensors ``(N, C, H, W)`` and labels anomalib's ``gt_label`` (0 normal, 1 anomalous).

Example:
    >>> from anomalib.models import Padim
    >>> from anomalib_robust.attacks import PGD
    >>> PGD(Padim(pre_trained=False), eps=2 / 255)
    PGD(model=Padim, norm=Linf, eps=0.007843, steps=10, alpha=0.001961, select=best, eot_samples=1)
"""

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from anomalib_robust.attacks.detector import DetectorScore
from anomalib_robust.attacks.objective import check_labels

NORMS = ("Linf", "L2")

RESCORE_FACTOR = 4
"""Draws, in multiples of ``eot_samples``, with which a randomised detector's candidates are re-scored before one is
chosen."""


def check_norm(norm: str) -> str:
    """Canonical norm name (``"Linf"`` or ``"L2"``, case-insensitive).

    Raises:
        ValueError: for any other norm.
    """
    for name in NORMS:
        if str(norm).lower() == name.lower():
            return name
    msg = f"norm must be one of {NORMS}, got {norm!r}."
    raise ValueError(msg)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, if finite and > 0.

    Raises:
        ValueError: naming the argument otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        msg = f"{name} must be a finite number > 0, got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float, if finite and >= 0 (a weight or a scale that 0 switches off).

    Raises:
        ValueError: naming the argument otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        msg = f"{name} must be a finite number >= 0, got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_count(name: str, value: int) -> int:
    """``value`` if it is an integer >= 1.

    Raises:
        ValueError: naming the argument otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be an integer >= 1, got {value!r}."
        raise ValueError(msg)
    return value


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate a batch of [0, 1] images ``(N, C, H, W)``.

    Raises:
        ValueError: for another shape, a non-float dtype, or values outside [0, 1].
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else images
        msg = f"images must be a float tensor (N, C, H, W) in [0, 1], got {got}."
        raise ValueError(msg)
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        msg = (
            f"images must lie in [0, 1] (attacks perturb pixels before the model's pre-processor), "
            f"got values in [{low:.3f}, {high:.3f}]."
        )
        raise ValueError(msg)
    return images


class Attack(ABC):
    """Score-direction attack on an anomalib detector: maximise ``y * A(x)`` in an ``eps``-ball (AdvRAD paper, sec. 3).

    Args:
        model: the anomalib detector, or a :class:`DetectorScore` already wrapping it.
        eps: radius of the perturbation ball (in [0, 1] pixel units).
        norm: ``"Linf"`` or ``"L2"``.
        eot_samples: draws per score and gradient for randomised detectors (EOT); ``None``: 1 for deterministic,
            8 for randomised detectors. Ignored when ``model`` is a :class:`DetectorScore`.
        bpda: non-differentiable stages to pass through a surrogate on the backward pass, ``{path: surrogate}``.
            Ignored when ``model`` is a :class:`DetectorScore`.
        seed: seeds the attack's randomness (random starts, the detector's draws); the global RNG is restored after.
    """

    name = "attack"

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        norm: str = "Linf",
        eot_samples: int | None = None,
        bpda: Mapping[str, Callable | None] | None = None,
        seed: int = 0,
    ) -> None:
        self.detector = model if isinstance(model, DetectorScore) else DetectorScore(model, eot_samples, bpda)
        self.eps = check_positive("eps", eps)
        self.norm = check_norm(norm)
        self.seed = seed

    @property
    def label(self) -> str:
        """Display name, ``EOT-`` prefixed when the detector is scored with more than one draw, ``BPDA+`` or
        ``Surrogate-<m>+`` when stages of it are differentiated through a surrogate
        (:attr:`DetectorScore.gradient_label`)."""
        label = f"EOT-{self.name}" if self.detector.eot_samples > 1 else self.name
        prefix = self.detector.gradient_label
        return f"{prefix}+{label}" if prefix else label

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial version of ``images`` for anomalib ``labels``, with the model and global RNG left as found."""
        images = check_images(images)
        labels = check_labels(labels, images.shape[0]).to(images.device)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.inference_mode(False), self.detector.prepared(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            adversarial = self.forward(images.clone(), labels)
        return adversarial.detach()

    @abstractmethod
    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images inside the ``eps``-ball around ``images`` and inside [0, 1]; called by ``__call__``."""

    def _settings(self) -> dict[str, object]:
        return {"norm": self.norm, "eps": round(self.eps, 6)}

    def worst_case(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        candidates: Iterable[torch.Tensor],
    ) -> torch.Tensor:
        """Per sample, whichever of ``images`` and the ``candidates`` has the highest objective ``y * A(x)``.

        On a randomised detector each point is re-scored with :data:`RESCORE_FACTOR` x ``eot_samples`` fresh draws
        (:meth:`rescored_objective`): comparing single noisy estimates would favour the luckiest draw, often the
        clean image's own (the winner's curse).
        """
        samples = RESCORE_FACTOR * self.detector.eot_samples if self.detector.stochastic else 1
        best, best_objective = images, self.rescored_objective(images, labels, samples)
        for candidate in candidates:
            objective = self.rescored_objective(candidate, labels, samples)
            best, best_objective = keep_worst_case(best, best_objective, candidate, objective)
        return best

    def rescored_objective(self, images: torch.Tensor, labels: torch.Tensor, samples: int) -> torch.Tensor:
        """The (EOT) objective per sample, averaged over at least ``samples`` fresh draws of the detector's randomness
        (``ceil(samples / eot_samples)`` calls of :meth:`DetectorScore.objective`).

        Compares candidates on draws independent of those the attack selected them with.
        """
        calls = max(1, math.ceil(samples / self.detector.eot_samples))
        return torch.stack([self.detector.objective(images, labels) for _ in range(calls)]).mean(dim=0)

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value}" for key, value in self._settings().items())
        return f"{type(self).__name__}(model={self.detector.name}, {settings}, eot_samples={self.detector.eot_samples})"


def warn_large_step(alpha: float, eps: float, norm: str) -> None:
    """Warn when an L_inf step size exceeds ``eps``: every step then jumps to a corner of the ball."""
    if norm == "Linf" and alpha > eps:
        warnings.warn(
            f"alpha={alpha:.4g} is larger than eps={eps:.4g} for an L_inf attack: each step overshoots the eps-ball "
            "and is projected back to its corner; use alpha <= eps.",
            stacklevel=3,
        )


def keep_worst_case(
    best: torch.Tensor,
    best_objective: torch.Tensor,
    candidate: torch.Tensor,
    objective: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, whichever of ``best`` and ``candidate`` has the higher objective ``y * A(x)``."""
    better = objective > best_objective
    return torch.where(better.view(-1, 1, 1, 1), candidate, best), torch.where(better, objective, best_objective)
