"""AUROC by rank on raw anomaly scores, in float64: the one AUROC every report of this package uses.

Raw scores (Padim's Mahalanobis distances, AdvRAD's error sums) are unbounded. ``torchmetrics``' ``binary_auroc``
applies a sigmoid to any input outside [0, 1]; in float32 ``sigmoid(x) == 1`` for every ``x`` above about 16.6, so
large scores become ties and the AUROC drifts towards 0.5. The AUROC here is the Mann-Whitney statistic

    AUROC = P(score of an anomalous sample > score of a normal sample) + 1/2 * P(equal scores),

computed from the average ranks of the pooled scores in float64, so it depends only on their order.

A difference between two systems on the same images is paired (:func:`paired_auroc_difference`): the same images
resampled for both, and a bootstrap interval on the difference.

Example:
    >>> import torch
    >>> from anomalib_robust.evaluation.metrics import rank_auroc
    >>> rank_auroc(torch.tensor([20.0, 21.0, 22.0, 21.0]), torch.tensor([0, 0, 1, 1]))
    0.875
"""

from dataclasses import dataclass

import torch


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (float64), tied values sharing the mean of their ranks."""
    sorted_values, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, dim=0).to(torch.float64)
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def rank_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of ``scores`` (higher = more anomalous) against binary ``labels`` (1 anomalous), ties counted 1/2.

    Raises:
        ValueError: when the shapes differ, a score is not finite, a label is not 0 or 1, or one class is missing.
    """
    scores = torch.as_tensor(scores).detach().flatten().to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().flatten().to("cpu")
    if scores.shape != labels.shape:
        msg = f"scores and labels must have the same number of values, got {scores.numel()} and {labels.numel()}."
        raise ValueError(msg)
    if not torch.isfinite(scores).all():
        msg = "scores must be finite to rank them, got NaN or infinite values."
        raise ValueError(msg)
    positive = labels.to(torch.bool)
    if not torch.equal(positive.to(labels.dtype), labels):
        msg = f"labels must be 0 (normal) or 1 (anomalous), got values {labels.unique().tolist()}."
        raise ValueError(msg)
    num_positive = int(positive.sum())
    num_negative = positive.numel() - num_positive
    if num_positive == 0 or num_negative == 0:
        msg = f"AUROC needs both classes, got {num_negative} normal and {num_positive} anomalous values."
        raise ValueError(msg)
    rank_sum = float(_average_ranks(scores)[positive].sum())
    return (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)


def pixel_auroc(maps: torch.Tensor | None, masks: torch.Tensor | None) -> float | None:
    """Rank AUROC over all pixels of anomaly ``maps`` against boolean ``masks`` of the same shape.

    ``None`` without maps or masks, when their shapes differ, or when the masks hold a single kind of pixel.
    """
    if maps is None or masks is None or maps.shape != masks.shape or masks.all() or not masks.any():
        return None
    return rank_auroc(maps.flatten(), masks.flatten().long())


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; 0 for a single value) of repeated AUROC measurements."""
    if not values:
        msg = "mean_and_std needs at least one value."
        raise ValueError(msg)
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), float(tensor.std()) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class PairedDifference:
    """``second - first`` AUROC (each the mean over scoring repeats) with its bootstrap interval at ``level``."""

    difference: float
    low: float
    high: float
    level: float

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely above or below ``value``."""
        return self.low > value or self.high < value


def _pairwise_wins(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``(R, A, N)``: per scoring repeat, 1 where anomalous ``a`` outscores normal ``n``, 1/2 on a tie, else 0."""
    anomalous, normal = scores[positive].T[:, :, None], scores[~positive].T[:, None, :]
    return (anomalous > normal).double() + 0.5 * (anomalous == normal).double()


def _resample_counts(size: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """``(resamples, size)``: how often each of ``size`` items is drawn in each resample with replacement."""
    picks = torch.randint(0, size, (resamples, size), generator=generator)
    return torch.zeros(resamples, size, dtype=torch.float64).scatter_add_(1, picks, torch.ones_like(picks).double())


def paired_auroc_difference(
    first: torch.Tensor,
    second: torch.Tensor,
    labels: torch.Tensor,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """AUROC of ``second`` minus AUROC of ``first`` on the same images, with a paired bootstrap interval.

    ``first`` and ``second`` are ``(N,)`` or ``(N, R)`` scores of the same ``N`` images (``R`` scoring repeats; each
    AUROC is the mean over its repeats). Images are resampled with replacement within each class, the same draw for
    both systems (the pairing), and the interval is the percentile interval of the resampled differences (Efron &
    Tibshirani, 1993, "An Introduction to the Bootstrap", ch. 13). The AUROC of a resample is the Mann-Whitney
    statistic over its (anomalous, normal) pairs, which equals :func:`rank_auroc` of the resampled scores.

    Raises:
        ValueError: when the shapes differ, a class is missing, or ``level`` is not in (0, 1).
    """
    first, second = (torch.as_tensor(s).detach().to("cpu", torch.float64) for s in (first, second))
    first, second = (s[:, None] if s.dim() == 1 else s for s in (first, second))
    labels = torch.as_tensor(labels).detach().flatten().to("cpu")
    if first.shape[0] != second.shape[0] or first.shape[0] != labels.numel():
        msg = f"first, second and labels must hold the same images, got {first.shape[0]}, {second.shape[0]} and "
        msg += f"{labels.numel()}."
        raise ValueError(msg)
    if not 0 < level < 1:
        msg = f"level must be in (0, 1), got {level}."
        raise ValueError(msg)
    positive = labels.bool()
    anomalous, normal = int(positive.sum()), int((~positive).sum())
    if anomalous == 0 or normal == 0:
        msg = f"a paired AUROC difference needs both classes, got {normal} normal and {anomalous} anomalous images."
        raise ValueError(msg)
    wins = _pairwise_wins(second, positive).mean(dim=0) - _pairwise_wins(first, positive).mean(dim=0)
    generator = torch.Generator().manual_seed(seed)
    counts = [_resample_counts(size, resamples, generator) for size in (anomalous, normal)]
    resampled = torch.einsum("ba,an,bn->b", counts[0], wins, counts[1]) / (anomalous * normal)
    tail = (1 - level) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedDifference(float(wins.mean()), low, high, level)
