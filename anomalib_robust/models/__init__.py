"""Adversarially robust anomaly detectors, registered as anomalib models."""

from anomalib_robust.models.adv_rad import AdvRAD
from anomalib_robust.models.agdm_guidance import AGDMGuidance
from anomalib_robust.models.patch_guard import PatchGuard
from anomalib_robust.models.rap_adapter import RAPAdapter

__all__ = ["AGDMGuidance", "AdvRAD", "PatchGuard", "RAPAdapter"]
