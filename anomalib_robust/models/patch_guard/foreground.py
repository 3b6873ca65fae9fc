"""Foreground masks for PatchGuard's foreground-aware pseudo anomalies.

PatchGuard paper (Nafez et al., CVPR 2025), supplementary sec. B and K.

The paper estimates the foreground with Grad-CAM of a pretrained classifier, averaged over softly augmented views
(sec. B: soft augmentations keep the semantics and stabilise the estimate); the official code used masks precomputed
offline and dilated them (3 x 3 kernel, 10 iterations at 224 x 224). Offline, with no weights to download, three
estimators are available:

- ``"all"``: an all-ones mask, for texture categories (as the official code);
- ``"heuristic"``: background-difference threshold for objects: the background colour is the median of the image
  border, a pixel is foreground when its largest channel difference from it exceeds Otsu's threshold; then dilation.
  An empty or degenerate estimate falls back to all ones, so training never fails on a missing foreground;
- ``"gradcam"``: Grad-CAM (the maintained ``grad-cam`` package, ``pip install anomalib-robust[gradcam]``) of a
  user-supplied classifier, averaged over soft augmentations, thresholded at ``cam_threshold`` and dilated.

Example:
    >>> import torch
    >>> from anomalib_robust.models.patch_guard.foreground import ForegroundEstimator
    >>> images = torch.zeros(2, 3, 32, 32)
    >>> images[:, :, 8:24, 8:24] = 1.0
    >>> mask = ForegroundEstimator("heuristic", dilation_iterations=0)(images)
    >>> mask.shape, bool(mask[0, 16, 16]), bool(mask[0, 0, 0])
    (torch.Size([2, 32, 32]), True, False)
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FOREGROUND_MODES = ("all", "heuristic", "gradcam")


def dilate(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """Binary dilation with a 3 x 3 square kernel, ``iterations`` times; ``mask`` is ``(B, H, W)`` bool."""
    result = mask.float().unsqueeze(1)
    for _ in range(iterations):
        result = F.max_pool2d(result, kernel_size=3, stride=1, padding=1)
    return result.squeeze(1) > 0.5


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` ``(B, P)`` (maximal between-class variance), ``(B,)``."""
    low = values.min(dim=1, keepdim=True).values
    high = values.max(dim=1, keepdim=True).values
    scaled = ((values - low) / (high - low).clamp_min(1e-12) * (bins - 1)).round().long()
    histogram = torch.zeros(values.shape[0], bins, device=values.device).scatter_add_(
        1, scaled, torch.ones_like(values)
    )
    probability = histogram / histogram.sum(dim=1, keepdim=True)
    levels = torch.arange(bins, device=values.device, dtype=values.dtype)
    weight = probability.cumsum(dim=1)
    cumulative_mean = (probability * levels).cumsum(dim=1)
    total_mean = cumulative_mean[:, -1:]
    between = (total_mean * weight - cumulative_mean) ** 2 / (weight * (1 - weight)).clamp_min(1e-12)
    best = between.argmax(dim=1, keepdim=True).to(values.dtype)
    return (low + (best + 0.5) / (bins - 1) * (high - low)).squeeze(1)


def heuristic_foreground(images: torch.Tensor, min_fraction: float = 0.01) -> torch.Tensor:
    """Background-difference + Otsu foreground ``(B, H, W)`` bool; all ones where the estimate is degenerate."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]],
        dim=-1,
    )
    background = border.median(dim=-1).values[..., None, None]
    difference = (images - background).abs().amax(dim=1)
    flat = difference.flatten(1)
    threshold = otsu_threshold(flat)
    mask = difference > threshold[:, None, None]
    fraction = mask.flatten(1).float().mean(dim=1)
    contrast = flat.max(dim=1).values - flat.min(dim=1).values
    degenerate = (fraction < min_fraction) | (contrast < 1e-3)
    return mask | degenerate[:, None, None]


class ForegroundEstimator:
    """Foreground masks ``(B, H, W)`` (bool) of images ``(B, 3, H, W)`` in [0, 1].

    A plain callable, not an ``nn.Module``: a Grad-CAM classifier is a tool of the training data pipeline, so it
    stays out of PatchGuard's ``state_dict`` and checkpoints (keep it on the images' device yourself).

    Args:
        mode (str): ``"all"`` (textures), ``"heuristic"`` (objects, offline) or ``"gradcam"``.
        dilation_iterations (int): 3 x 3 dilations applied to the estimate (official: 10 at 224 x 224).
        classifier (nn.Module | None): Pretrained classifier for ``"gradcam"`` (taking the images as given, so any
            normalisation must be part of it).
        target_layers (Sequence[nn.Module] | None): Layers of ``classifier`` for Grad-CAM (e.g. the last conv block).
        cam_threshold (float): Fraction of the per-image CAM maximum above which a pixel is foreground.
        num_views (int): Softly augmented views averaged into the CAM (sec. B); 1 uses the image only.
    """

    def __init__(
        self,
        mode: str = "all",
        dilation_iterations: int = 0,
        classifier: nn.Module | None = None,
        target_layers: Sequence[nn.Module] | None = None,
        cam_threshold: float = 0.3,
        num_views: int = 4,
    ) -> None:
        if mode not in FOREGROUND_MODES:
            msg = f"foreground mode must be one of {FOREGROUND_MODES}, got {mode!r}"
            raise ValueError(msg)
        if dilation_iterations < 0:
            msg = f"dilation_iterations must be >= 0, got {dilation_iterations}"
            raise ValueError(msg)
        if mode == "gradcam" and (classifier is None or not target_layers):
            msg = "foreground mode 'gradcam' needs a classifier and its target_layers"
            raise ValueError(msg)
        if not 0 < cam_threshold < 1 or num_views < 1:
            msg = f"cam_threshold must be in (0, 1) and num_views >= 1, got {cam_threshold} and {num_views}"
            raise ValueError(msg)
        self.mode = mode
        self.dilation_iterations = dilation_iterations
        self.classifier = classifier
        self.target_layers = list(target_layers or [])
        self.cam_threshold = cam_threshold
        self.num_views = num_views

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Boolean foreground masks ``(B, H, W)``."""
        if images.dim() != 4:
            msg = f"images must be (B, C, H, W), got shape {tuple(images.shape)}"
            raise ValueError(msg)
        if self.mode == "all":
            return torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        mask = heuristic_foreground(images) if self.mode == "heuristic" else self._gradcam(images)
        return dilate(mask, self.dilation_iterations)

    def _gradcam(self, images: torch.Tensor) -> torch.Tensor:
        try:
            from pytorch_grad_cam import GradCAM
        except ImportError as error:
            msg = "foreground mode 'gradcam' needs the grad-cam package: pip install 'anomalib-robust[gradcam]'"
            raise ImportError(msg) from error
        was_training = self.classifier.training
        self.classifier.eval()
        generator = torch.Generator(device=images.device).manual_seed(0)
        cams = []
        with torch.enable_grad(), GradCAM(model=self.classifier, target_layers=self.target_layers) as cam:
            for view in range(self.num_views):
                augmented = images if view == 0 else soft_augment(images, generator)
                cams.append(torch.as_tensor(cam(input_tensor=augmented, targets=None), device=images.device))
        self.classifier.train(was_training)
        heat = torch.stack(cams).mean(dim=0)
        peak = heat.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        return heat / peak > self.cam_threshold


def soft_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Soft augmentation of sec. B: brightness/contrast jitter, a colour tint and slight Gaussian noise, drawn by
    ``generator`` on its device (that of ``images``)."""
    batch = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        draw = torch.rand(batch, *shape, generator=generator, device=generator.device, dtype=images.dtype)
        return low + (high - low) * draw

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean * uniform(0.8, 1.2, 1, 1, 1)
    out = out * uniform(0.9, 1.1, images.shape[1], 1, 1)
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype) * 0.02
    return (out + noise).clamp(0.0, 1.0)
