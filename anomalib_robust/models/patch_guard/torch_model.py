"""PyTorch model of PatchGuard: a randomly initialised ViT, an attention discriminator and top-k patch scoring.

Paper (the PatchGuard paper): Nafez et al., "PatchGuard: Adversarially Robust Anomaly Detection and Localization
through Vision Transformers and Pseudo Anomalies", CVPR 2025 (supplementary, sections G and I; the architecture facts
follow the official code).

Pipeline (eval mode, images in [0, 1] at ``image_size``):

1. ImageNet normalisation inside the model, so that attacks act on [0, 1] pixels (as the official code);
2. a timm ``VisionTransformer`` (architecture only, random init by default; ViT-S/14 shape at 224 x 224 gives
   16 x 16 = 256 patch tokens); patch tokens of the last block after the final LayerNorm, CLS token dropped;
3. the attention discriminator (sec. I): one post-norm transformer block on ``tokens + P`` (learnable positional
   table) and a linear head, one logit per patch;
4. image score = mean of the top-k patch logits (sec. G; ``k`` is 3 in the official code, 5 in the paper); anomaly map
   = patch logits upsampled bilinearly to the image size and smoothed by a Gaussian (sigma 6, 15 x 15 at 224 x 224).

The self-attention maps of chosen backbone blocks are captured for the attention regulariser (sec. 4-5 and C.6).
timm's fused ``scaled_dot_product_attention`` never materialises the attention weights, so the captured blocks run
timm's explicit path (``fused_attn = False``) and a forward hook on their attention dropout records the softmax
probabilities, which stay in the autograd graph. A forward that should have captured maps but did not raises
``RuntimeError`` instead of silently returning no regulariser.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from anomalib.models.components import GaussianBlur2d
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_ATTENTION_LAYERS = (6, 9, 12)
"""Regularised blocks of the official 12-block ViT-S (1-based)."""


class PatchGuardOutput(NamedTuple):
    """Training-mode output: one logit per patch ``(B, N)`` and the captured attention maps ``(B, heads, N, N)``."""

    patch_logits: torch.Tensor
    attentions: list[torch.Tensor]


def scaled_attention_layers(depth: int) -> tuple[int, ...]:
    """The official regularised blocks 6/9/12 of a 12-block ViT, scaled to ``depth`` blocks (1-based, deduplicated).

    >>> scaled_attention_layers(12), scaled_attention_layers(4), scaled_attention_layers(1)
    ((6, 9, 12), (2, 3, 4), (1,))
    """
    if depth < 1:
        msg = f"depth must be a positive integer, got {depth}"
        raise ValueError(msg)
    layers = [max(1, min(depth, math.floor(layer * depth / 12 + 0.5))) for layer in OFFICIAL_ATTENTION_LAYERS]
    return tuple(dict.fromkeys(layers))


def patch_labels_from_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch labels ``(B, N)``: 1 where any mask pixel of the ``patch_size`` x ``patch_size`` patch is set.

    ``mask`` is ``(B, H, W)`` or ``(B, 1, H, W)``; ``H`` and ``W`` must be multiples of ``patch_size``. Patches are in
    row-major order, as the ViT's tokens.
    """
    if mask.dim() == 4:
        mask = mask[:, 0]
    if mask.dim() != 3:
        msg = f"mask must be (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}"
        raise ValueError(msg)
    height, width = mask.shape[-2:]
    if height % patch_size or width % patch_size:
        msg = f"mask size must be a multiple of patch_size={patch_size}, got {height}x{width}"
        raise ValueError(msg)
    pooled = F.max_pool2d((mask > 0).float().unsqueeze(1), kernel_size=patch_size)
    return pooled.flatten(1)


class AttentionDiscriminator(nn.Module):
    """One transformer block plus a linear head, one logit per patch token (PatchGuard paper, supplementary sec. I).

    As the official code: ``z = x + P`` with a learnable positional table ``P`` (randn init);
    ``h = LayerNorm(z + Dropout(MHA(z)))``; ``out = h + Dropout(W2 Dropout(GELU(W1 h)))``; ``logit = w^T out + b``.

    Args:
        num_patches (int): Number of patch tokens N.
        embed_dim (int): Token dimension D.
        num_heads (int): Attention heads (4 in the official code).
        mlp_dim (int): Hidden size of the MLP (2048 in the official code).
        dropout (float): Dropout of the attention weights, the residual branches and the MLP (0.2 officially).
    """

    def __init__(self, num_patches: int, embed_dim: int, num_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads:
            msg = f"embed_dim must be divisible by discriminator_heads, got {embed_dim} and {num_heads}"
            raise ValueError(msg)
        self.position = nn.Parameter(torch.randn(num_patches, embed_dim))
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, embed_dim),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(embed_dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B, N)`` from patch tokens ``(B, N, D)``."""
        z = tokens + self.position
        attended, _ = self.attention(z, z, z, need_weights=False)
        h = self.norm(z + self.attention_dropout(attended))
        return self.head(h + self.mlp(h)).squeeze(-1)


class PatchGuardModel(nn.Module):
    """PatchGuard network: ViT backbone, attention discriminator, top-k image score and smoothed anomaly map.

    Defaults follow the official code (ViT-S/14 shape of ``vit_small_patch14_dinov2``: dim 384, 12 blocks, 6 heads,
    LayerScale 1e-5; 224 x 224 input; discriminator with 4 heads, MLP 2048, dropout 0.2; top-k with k = 3; Gaussian
    sigma 6 with a 15 x 15 kernel).

    Args:
        image_size (Sequence[int]): Input size (H, W); both must be multiples of ``patch_size``.
        patch_size (int): ViT patch size.
        embed_dim (int): Token dimension.
        depth (int): Number of ViT blocks.
        num_heads (int): ViT attention heads.
        mlp_ratio (float): ViT MLP ratio.
        layer_scale_init (float | None): LayerScale init value (``None``: no LayerScale).
        attention_layers (Sequence[int] | None): 1-based blocks whose attention maps are captured for the
            regulariser; ``None`` scales the official 6/9/12 of 12 to ``depth`` (:func:`scaled_attention_layers`).
        discriminator_heads (int): Heads of the attention discriminator.
        discriminator_mlp_dim (int): Hidden size of the discriminator's MLP.
        dropout (float): Dropout of the discriminator.
        top_k (int): Number of highest patch logits averaged into the image score (official code 3, paper 5).
        sigma (float): Standard deviation of the Gaussian smoothing of the anomaly map, in pixels.
        kernel_size (int): Size of the Gaussian kernel (odd).
        pretrained_weights (str | Path | None): Optional file with a timm ViT state dict for the backbone (no
            download ever happens); the position embedding is resampled to ``image_size`` by timm.
    """

    def __init__(
        self,
        image_size: Sequence[int] = (224, 224),
        patch_size: int = 14,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = 1e-5,
        attention_layers: Sequence[int] | None = None,
        discriminator_heads: int = 4,
        discriminator_mlp_dim: int = 2048,
        dropout: float = 0.2,
        top_k: int = 3,
        sigma: float = 6.0,
        kernel_size: int = 15,
        pretrained_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.image_size = _check_image_size(image_size, patch_size)
        self.patch_size = patch_size
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if embed_dim % num_heads:
            msg = f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            raise ValueError(msg)
        self.attention_layers = (
            scaled_attention_layers(depth) if attention_layers is None else tuple(int(i) for i in attention_layers)
        )
        if not all(1 <= layer <= depth for layer in self.attention_layers):
            msg = f"attention_layers must be 1-based block indices in [1, {depth}], got {self.attention_layers}"
            raise ValueError(msg)
        self.top_k = check_top_k(top_k, self.num_patches)
        if kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
            msg = (
                f"kernel_size must be odd and positive and sigma positive, got kernel_size={kernel_size}, sigma={sigma}"
            )
            raise ValueError(msg)

        self.backbone = VisionTransformer(
            img_size=self.image_size,
            patch_size=patch_size,
            in_chans=3,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            init_values=layer_scale_init,
            class_token=True,
        )
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        if pretrained_weights is not None:
            self.load_backbone_weights(pretrained_weights)
        self.discriminator = AttentionDiscriminator(
            self.num_patches, embed_dim, discriminator_heads, discriminator_mlp_dim, dropout
        )
        self.blur = GaussianBlur2d(sigma=sigma, channels=1, kernel_size=kernel_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self._captured: list[torch.Tensor] = []
        self._capturing = False
        for layer in self.attention_layers:
            attention = self.backbone.blocks[layer - 1].attn
            attention.fused_attn = False  # the fused kernel never materialises the weights the regulariser needs
            attention.attn_drop.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Record the softmax attention probabilities entering the attention dropout (patch rows/columns only)."""
        del module, output
        if self._capturing:
            prefix = self.num_prefix_tokens
            self._captured.append(inputs[0][:, :, prefix:, prefix:])

    def load_backbone_weights(self, path: str | Path) -> None:
        """Load a timm ViT state dict from ``path`` into the backbone (position embedding resampled by timm)."""
        path = Path(path)
        if not path.is_file():
            msg = f"pretrained_weights must be an existing file, got {str(path)!r}"
            raise ValueError(msg)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
                state_dict = state_dict[key]
        state_dict = checkpoint_filter_fn(state_dict, self.backbone)
        missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not key.startswith("head")]
        if missing:
            msg = f"pretrained_weights {str(path)!r} lacks backbone parameters {missing[:5]} (timm ViT state dict expected)"
            raise ValueError(msg)
        if unexpected:
            logger.warning("Ignored %d unexpected keys of %s, e.g. %s", len(unexpected), path, unexpected[:3])

    def patch_logits(self, images: torch.Tensor, return_attention: bool = False) -> PatchGuardOutput:
        """Patch logits ``(B, N)`` and, if asked, the attention maps of ``attention_layers`` ``(B, heads, N, N)``."""
        _check_images(images, self.image_size)
        self._captured = []
        self._capturing = return_attention
        try:
            tokens = self.backbone.forward_features((images - self.mean) / self.std)
        finally:
            self._capturing = False
        attentions, self._captured = self._captured, []
        if return_attention and len(attentions) != len(self.attention_layers):
            msg = (
                f"captured {len(attentions)} attention maps for attention_layers={self.attention_layers}: the timm "
                "attention blocks bypassed the explicit softmax (fused attention)"
            )
            raise RuntimeError(msg)
        logits = self.discriminator(tokens[:, self.num_prefix_tokens :])
        return PatchGuardOutput(logits, attentions)

    def anomaly_map(self, patch_logits: torch.Tensor) -> torch.Tensor:
        """Patch logits -> ``(B, 1, H, W)`` map: bilinear upsampling, then Gaussian smoothing (sec. G)."""
        grid = patch_logits.reshape(-1, 1, *self.grid_size)
        upsampled = F.interpolate(grid, size=self.image_size, mode="bilinear", align_corners=False)
        return self.blur(upsampled)

    def image_score(self, patch_logits: torch.Tensor) -> torch.Tensor:
        """Mean of the ``top_k`` highest patch logits per image (sec. G), ``(B,)``."""
        return patch_logits.topk(self.top_k, dim=1).values.mean(dim=1)

    def forward(self, images: torch.Tensor) -> PatchGuardOutput | InferenceBatch:
        """Training: :class:`PatchGuardOutput` with attention maps; eval: ``InferenceBatch(pred_score, anomaly_map)``."""
        if self.training:
            return self.patch_logits(images, return_attention=True)
        logits = self.patch_logits(images).patch_logits
        return InferenceBatch(pred_score=self.image_score(logits), anomaly_map=self.anomaly_map(logits))


def check_top_k(top_k: int, num_patches: int) -> int:
    """``top_k`` must be an integer in ``[1, num_patches]``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_patches:
        msg = f"top_k must be an integer between 1 and the number of patches ({num_patches}), got {top_k!r}"
        raise ValueError(msg)
    return top_k


def _check_image_size(image_size: Sequence[int], patch_size: int) -> tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or patch_size < 1:
        msg = f"image_size must be (height, width) and patch_size positive, got {image_size} and {patch_size}"
        raise ValueError(msg)
    height, width = (int(side) for side in image_size)
    if height % patch_size or width % patch_size or height < patch_size or width < patch_size:
        msg = f"image_size must be a multiple of patch_size={patch_size} on both sides, got {height}x{width}"
        raise ValueError(msg)
    return height, width


def _check_images(images: torch.Tensor, image_size: tuple[int, int]) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != image_size:
        msg = f"images must be (B, 3, {image_size[0]}, {image_size[1]}), got {tuple(images.shape)}"
        raise ValueError(msg)
