"""PatchGuard (PatchGuard paper, CVPR 2025): ViT + attention discriminator + pseudo anomalies + adversarial training."""

from anomalib_robust.models.patch_guard.lightning_model import CPU_PRESET, PatchGuard
from anomalib_robust.models.patch_guard.torch_model import PatchGuardModel

__all__ = ["CPU_PRESET", "PatchGuard", "PatchGuardModel"]
