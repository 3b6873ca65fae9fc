"""Anomaly score of AdvRAD: multi-scale reconstruction error and its deviation from normal data (AdvRAD paper, Alg. 4).

Example:
    >>> import torch
    >>> x, reconstruction = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    >>> error = multiscale_error_map(x, reconstruction)
    >>> anomaly_map, score = deviation_from_normal(error, normal_error_map=error.mean(0))
    >>> anomaly_map.shape, score.shape
    (torch.Size([2, 1, 32, 32]), torch.Size([2]))
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from kornia.filters import box_blur

DEFAULT_SCALES = (1.0, 0.5, 0.25, 0.125)


def check_scales(scales: Sequence[float], image_size: Sequence[int]) -> None:
    """Each scale must be 1/2^j with the image size divisible by 2^j, so that down- and up-sampling are exact."""
    for scale in scales:
        factor = round(1 / scale) if scale > 0 else 0
        if scale <= 0 or scale > 1 or abs(1 / factor - scale) > 1e-9 or factor & (factor - 1):
            msg = f"scales must be powers of 1/2 in (0, 1], got {tuple(scales)}"
            raise ValueError(msg)
        if any(size % factor for size in image_size):
            msg = f"image_size {tuple(image_size)} must be divisible by {factor} for scale {scale}"
            raise ValueError(msg)


def multiscale_error_map(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    scales: Sequence[float] = DEFAULT_SCALES,
    mean_filter_size: int = 3,
) -> torch.Tensor:
    """Err_ms of Alg. 4 lines 3-8: channel-mean squared error at each scale, upsampled, averaged, mean-filtered.

    Downsampling by 1/l is area averaging over l x l blocks, upsampling is bilinear; the mean filter f_{s x s} uses
    reflected borders so that the map keeps its size.

    Args:
        x (torch.Tensor): Input images, ``(B, C, H, W)``.
        reconstruction (torch.Tensor): Their reconstructions, same shape.
        scales (Sequence[float]): Scale schedule L. Defaults to ``(1, 1/2, 1/4, 1/8)``.
        mean_filter_size (int): Size s of the mean filter (odd). Defaults to ``3``.

    Returns:
        torch.Tensor: Error maps, ``(B, 1, H, W)``.
    """
    height, width = x.shape[-2:]
    errors = []
    for scale in scales:
        factor = round(1 / scale)
        x_scaled = F.avg_pool2d(x, factor) if factor > 1 else x
        reconstruction_scaled = F.avg_pool2d(reconstruction, factor) if factor > 1 else reconstruction
        error = ((x_scaled - reconstruction_scaled) ** 2).mean(dim=1, keepdim=True)
        if factor > 1:
            error = F.interpolate(error, size=(height, width), mode="bilinear", align_corners=False)
        errors.append(error)
    error_map = torch.stack(errors).mean(0)
    return box_blur(error_map, (mean_filter_size, mean_filter_size), border_type="reflect")


def deviation_from_normal(
    error_map: torch.Tensor,
    normal_error_map: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 4 line 9: |Err_ms - mean Err_ms of normal training images|, and its pixel-wise maximum as the score.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: The deviation map ``(B, 1, H, W)`` (AdvRAD's anomaly map) and the image
        scores ``(B,)``.
    """
    anomaly_map = (error_map - normal_error_map).abs()
    return anomaly_map, anomaly_map.flatten(1).amax(dim=1)
