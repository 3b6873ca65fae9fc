"""Two-logit view of an anomaly score, so classification attacks (torchattacks) run on a detector unchanged.

A detector outputs one scalar ``A(x)`` and is read against a threshold ``t``. Classification attacks expect class
logits, so the score is presented as two logits, normal and anomalous, centred on the threshold:

    logits(x) = [-(A(x) - t), A(x) - t] / scale.

The predicted class is "anomalous" exactly when ``A(x) > t``; cross-entropy on these logits is a monotone function of
``y * A(x)`` (label 0 pushes the score up, label 1 down), so APGD-CE and Square's margin loss pursue the unified
objective of seed 000, sec. 3. ``scale`` keeps the logits in a range where cross-entropy is not saturated.

AutoAttack's DLR loss normalises by the gap between the largest and third-largest logits, so it needs at least three
classes; with two logits it is undefined. As in seed 001, appendix H, DLR-based attacks are replaced by PGD.

Example:
    >>> import torch
    >>> from anomalib_robust.attacks.logits import TwoLogitScore
    >>> TwoLogitScore(lambda x: x.sum(dim=(1, 2, 3)), threshold=1.0, scale=2.0)(torch.ones(1, 1, 2, 2))
    tensor([[-1.5000,  1.5000]])
"""

from collections.abc import Callable

import torch
from torch import nn

from anomalib_robust.attacks.detector import DetectorScore


class TwoLogitScore(nn.Module):
    """Logits ``[-(A(x) - t), A(x) - t] / scale`` of a score function ``A`` (normal, anomalous)."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], threshold: float, scale: float) -> None:
        super().__init__()
        self.score = score
        self.threshold = threshold
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2)``: column 0 normal, column 1 anomalous."""
        margin = (self.score(images) - self.threshold) / self.scale
        return torch.stack([-margin, margin], dim=1)


def two_logit_score(
    detector: DetectorScore,
    images: torch.Tensor,
    threshold: float | None = None,
    scale: float | None = None,
) -> TwoLogitScore:
    """:class:`TwoLogitScore` of ``detector``, centred on ``threshold``.

    Args:
        detector: the wrapped anomalib detector.
        images: the clean batch, used only for label-free defaults.
        threshold: raw-score threshold; ``None`` takes the detector's image threshold (anomalib's post-processor),
            else the median clean score of ``images``.
        scale: logit temperature; ``None`` takes the standard deviation of the clean scores of ``images``.
    """
    if threshold is None or scale is None:
        with torch.no_grad():
            clean = detector(images)
        threshold = threshold if threshold is not None else detector.threshold
        threshold = float(clean.median()) if threshold is None else threshold
        scale = scale if scale is not None else max(float(clean.std()) if clean.numel() > 1 else 0.0, 1e-6)
    return TwoLogitScore(detector, threshold, scale)
