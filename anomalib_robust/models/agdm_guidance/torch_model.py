"""f_phi of the AGDM paper (Lin et al., sec. 3.1-3.2): the robust guidance network, here a per-patch
normal-vs-pseudo-anomaly classifier conditioned on the diffusion step, whose spatial features define the divergence D.

The AGDM paper guides each reverse diffusion step with a robust network f_phi: the consistency term of eq. (4) is
``grad_{x_t} D(f_phi(x'), f_phi(x_t))`` (``x'`` the input image, ``x_t`` the current sample) and the label term of
eq. (5) is ``grad_{x_t} log p_phi(y | x_t)``. An anomaly detector's normal training data has no classes, so f_phi
here tells normal patches from pseudo-anomalous ones, learnt from the normal training images and pseudo anomalies made
from them (:class:`~anomalib_robust.models.agdm_guidance.AGDMGuidance`). Three choices make its guidance move the
sample:

- **D on spatial features** (:func:`consistency_divergence`): the mean over the feature map's positions of the squared
  distance of the two feature vectors. An earlier f_phi had two logits after global pooling, so D was a KL between two
  coin flips, with a gradient that vanished wherever the network was confident: its guidance moved a reverse step by
  2.2e-8 of the step's noise. Features carry where a defect is, and a squared distance does not saturate.
- **Per-patch logits**: a 1 x 1 convolution on the same features, trained on per-patch labels; the label term
  averages ``log p(normal | x_t)`` over the patches.
- **Conditioned on the step** ``t`` (0 = the clean image): Alg. 1 evaluates f_phi on ``x_t`` at every noise level up
  to t*. A sinusoidal embedding of ``t`` (diffusers' ``Timesteps`` and ``TimestepEmbedding``, as diffusers' U-Nets)
  sets a FiLM scale and shift after each stage's second GroupNorm (diffusers' ``ResnetBlock2D`` with
  ``time_embedding_norm="scale_shift"``).

The network is a convolution and ``num_levels`` residual stages, those after the first halving the resolution by
average pooling. Every nonlinearity is SiLU: the guidance is a gradient of f_phi, and an attack through the guided
chain differentiates that gradient again; with SiLU the second derivative exists and is not zero almost everywhere.

Example:
    >>> import torch
    >>> model = GuidanceNetworkModel(in_channels=1, base_channels=8, num_levels=2)
    >>> images, steps = torch.rand(2, 1, 16, 16), torch.tensor([0, 10])
    >>> model.features(images, steps).shape, model.logits(images, steps).shape
    (torch.Size([2, 16, 8, 8]), torch.Size([2, 2, 8, 8]))
"""

import math

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

NORMAL, PSEUDO_ANOMALOUS = 0, 1
"""Class indices of the two per-patch logits."""

ARCHITECTURE = 3
"""Version of the network (its architecture and what its D was trained on), saved in every checkpoint: 1 was the
two-class classifier after global pooling, without the diffusion step; 2 is this network with D trained on same-step
pairs; 3 is this one with D trained on the pairs Alg. 1 compares (:mod:`~anomalib_robust.models.agdm_guidance.loss`)."""


def consistency_divergence(reference: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """D of the AGDM paper (eq. 4, eq. 6 and Alg. 1), per image: the positions' mean of ``||reference - features||^2``.

    The AGDM paper leaves D as "some distance measurement" (sec. 3.1); on the spatial features ``(N, C, h, w)`` of
    f_phi it is a squared distance, whose gradient does not vanish when the network is confident. The reference (the
    clean image in training, the input image ``x'`` in Alg. 1) comes first.
    """
    return (reference - features).square().sum(dim=1).flatten(1).mean(dim=1)


class GuidanceNetworkModel(nn.Module):
    """Per-patch normal-vs-pseudo-anomaly classifier of [0, 1] images of any size, conditioned on the diffusion step.

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
        embedding = 4 * base_channels
        groups = math.gcd(8, base_channels)  # divides every stage's channels
        self.time_proj = Timesteps(base_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base_channels, embedding)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.stages = nn.ModuleList(
            ResnetBlock2D(in_channels=before, out_channels=after, temb_channels=embedding, groups=groups,
                          time_embedding_norm="scale_shift", down=level > 0)  # fmt: skip
            for level, (before, after) in enumerate(zip(channels[:1] + channels[:-1], channels, strict=True))
        )
        self.head = nn.Conv2d(channels[-1], 2, 1)

    def features(self, images: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Spatial features ``(N, C, h, w)`` of ``images`` ``(N, C, H, W)`` in [0, 1] diffused to ``steps`` ``(N,)``."""
        embedding = self.time_embedding(self.time_proj(steps).to(images.dtype))
        hidden = self.stem(images * 2 - 1)
        for stage in self.stages:
            hidden = stage(hidden, embedding)
        return hidden

    def logits(self, images: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Per-patch logits ``(N, 2, h, w)`` (normal, pseudo-anomalous), arguments as :meth:`features`."""
        return self.head(self.features(images, steps))

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """The network as an anomaly detector on clean images: the per-patch log-odds of "pseudo-anomalous",
        upsampled to the image as the anomaly map, and their maximum as the image score."""
        logits = self.logits(images, torch.zeros(len(images), dtype=torch.long, device=images.device))
        log_odds = logits[:, PSEUDO_ANOMALOUS : PSEUDO_ANOMALOUS + 1] - logits[:, NORMAL : NORMAL + 1]
        anomaly_map = F.interpolate(log_odds, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=log_odds.flatten(1).amax(dim=1), anomaly_map=anomaly_map[:, 0])
