"""Adversarially robust anomaly detectors, registered as anomalib models."""

from anomalib_robust.models.adv_rad import AdvRAD

__all__ = ["AdvRAD"]
