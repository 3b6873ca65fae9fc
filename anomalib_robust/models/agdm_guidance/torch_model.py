"""f_phi of the AGDM paper (Lin et al., sec. 3.1-3.2): the robust guidance network, here a normal-vs-pseudo-anomaly
classifier.

The AGDM paper guides each reverse diffusion step with a robust classifier f_phi that outputs class logits; its
consistency term compares ``f_phi(x')`` (the input image) with ``f_phi(x_t)`` (the current sample), and its label
term is ``log p_phi(y | x_t)``. An anomaly detector's normal training data has no classes, so f_phi here has two
logits, "normal" and "pseudo-anomalous", learnt from the normal training images and pseudo anomalies made from
them (:class:`~anomalib_robust.models.agdm_guidance.AGDMGuidance`).

A small convolutional network (``num_levels`` stages of two 3 x 3 convolutions, GroupNorm and SiLU, the stages after
the first halving the resolution; global average pooling; a linear head). SiLU rather than ReLU because the guidance
is a gradient of f_phi and an attack through the guided chain differentiates that gradient again: with SiLU the
second derivative exists and is not zero almost everywhere.

Example:
    >>> import torch
    >>> model = GuidanceNetworkModel(in_channels=1, base_channels=8, num_levels=2)
    >>> model.logits(torch.rand(2, 1, 16, 16)).shape
    torch.Size([2, 2])
"""

import torch
from anomalib.data import InferenceBatch
from torch import nn

NORMAL, PSEUDO_ANOMALOUS = 0, 1
"""Class indices of the two logits."""


def consistency_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """D of the AGDM paper (eq. 6 and Alg. 1), per image: KL(softmax(reference) || softmax(logits)).

    The AGDM paper leaves D as "some distance measurement" in sec. 3.1 and uses the KL divergence between the
    network's outputs in its loss (appendix B, eq. 21), as TRADES (Zhang et al., 2019) does; so D is that KL here,
    with the reference (the clean image in training, the input image ``x'`` in Alg. 1) first.
    """
    reference = reference_logits.log_softmax(dim=1)
    return (reference.exp() * (reference - logits.log_softmax(dim=1))).sum(dim=1)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    groups = max(1, min(8, out_channels // 4))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.SiLU(),
    )


class GuidanceNetworkModel(nn.Module):
    """Normal-vs-pseudo-anomaly classifier on [0, 1] images of any size.

    Args:
        in_channels: image channels.
        base_channels: channels of the first stage; stage ``i`` has ``base_channels * 2**i``.
        num_levels: stages (the resolution halves after each but the first).
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 32, num_levels: int = 3) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels), ("num_levels", num_levels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be an integer >= 1, got {value!r}."
                raise ValueError(msg)
        self.in_channels = in_channels
        channels = [base_channels * 2**level for level in range(num_levels)]
        stages = [_stage(in_channels, channels[0], 1)]
        stages += [_stage(before, after, 2) for before, after in zip(channels, channels[1:], strict=False)]
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels[-1], 2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2)`` (normal, pseudo-anomalous) of ``images`` ``(N, C, H, W)`` in [0, 1]."""
        return self.head(self.features(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """The network as an anomaly detector: the log-odds of "pseudo-anomalous" as the image score."""
        logits = self.logits(images)
        return InferenceBatch(pred_score=logits[:, PSEUDO_ANOMALOUS] - logits[:, NORMAL])
