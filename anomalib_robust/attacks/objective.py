"""Unified score-direction objective for attacks on anomaly detectors.

AdvRAD paper (Chen et al.), sec. 3: for a test sample ``x`` with label ``y`` (``+1`` normal, ``-1`` anomalous) and a
detector whose raw anomaly score is ``A(x)``, every attack maximises

    L(x, y) = y * A(x),

so it raises the score of normal samples (false alarms) and lowers the score of anomalous ones (misses). anomalib labels
are ``gt_label = 0`` for normal and ``1`` for anomalous samples; :func:`score_direction` maps them to ``y``.

Example:
    >>> import torch
    >>> from anomalib_robust.attacks.objective import attack_objective, score_direction
    >>> score_direction(torch.tensor([0, 1]))
    tensor([ 1., -1.])
    >>> attack_objective(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))
    tensor([ 0.2000, -0.9000])
"""

import torch


def check_labels(labels: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """Validate anomalib image labels (``0`` normal, ``1`` anomalous) for a batch of ``batch_size`` images.

    Raises:
        ValueError: when ``labels`` is missing, has the wrong shape or holds values other than 0 and 1.
    """
    if labels is None:
        msg = (
            "labels are required: the attack pushes normal samples (gt_label 0) up and anomalous samples (gt_label 1) "
            "down, so it needs the batch's gt_label; got None."
        )
        raise ValueError(msg)
    labels = torch.as_tensor(labels)
    if labels.numel() != batch_size:
        msg = f"labels must hold one label per image: expected shape ({batch_size},), got {tuple(labels.shape)}."
        raise ValueError(msg)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        msg = f"labels must be 0 (normal) or 1 (anomalous), got values {labels.unique().tolist()}."
        raise ValueError(msg)
    labels = labels.reshape(-1).long()
    if ((labels != 0) & (labels != 1)).any():
        msg = f"labels must be 0 (normal) or 1 (anomalous), got values {labels.unique().tolist()}."
        raise ValueError(msg)
    return labels


def score_direction(labels: torch.Tensor) -> torch.Tensor:
    """Direction ``y`` of AdvRAD paper, sec. 3: ``+1`` for normal (``gt_label`` 0), ``-1`` for anomalous (1)."""
    return 1.0 - 2.0 * labels.float()


def attack_objective(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample objective ``L(x, y) = y * A(x)`` (AdvRAD paper, sec. 3) that every attack maximises."""
    return score_direction(labels).to(scores) * scores


def map_objective(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample objective of an attack on localisation: the mean map value over the image's normal pixels minus
    the mean over its anomalous pixels (``masks``), so maximising it raises normal pixels and lowers anomalous ones.

    The two classes of pixels weigh equally, so a small defect is pushed down as hard as the background is pushed up;
    an image without anomalous pixels only pushes its map up. The pixel-level counterpart of the AdvRAD paper's
    sec. 3 objective; its pixel AUROC is robust localisation.
    """
    anomalous = masks.reshape(anomaly_maps.shape).to(anomaly_maps).flatten(1)
    values = anomaly_maps.flatten(1)
    normal = 1.0 - anomalous
    normal_mean = (values * normal).sum(dim=1) / normal.sum(dim=1).clamp_min(1.0)
    anomalous_mean = (values * anomalous).sum(dim=1) / anomalous.sum(dim=1).clamp_min(1.0)
    return normal_mean - anomalous_mean
