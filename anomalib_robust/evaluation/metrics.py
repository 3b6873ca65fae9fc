"""AUROC by rank on raw anomaly scores, in float64: the one AUROC every report of this package uses.

Raw scores (Padim's Mahalanobis distances, AdvRAD's error sums) are unbounded. ``torchmetrics``' ``binary_auroc``
applies a sigmoid to any input outside [0, 1]; in float32 ``sigmoid(x) == 1`` for every ``x`` above about 16.6, so
large scores become ties and the AUROC drifts towards 0.5. The AUROC here is the Mann-Whitney statistic

    AUROC = P(score of an anomalous sample > score of a normal sample) + 1/2 * P(equal scores),

computed from the average ranks of the pooled scores in float64, so it depends only on their order.

Example:
    >>> import torch
    >>> from anomalib_robust.evaluation.metrics import rank_auroc
    >>> rank_auroc(torch.tensor([20.0, 21.0, 22.0, 21.0]), torch.tensor([0, 0, 1, 1]))
    0.875
"""

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
