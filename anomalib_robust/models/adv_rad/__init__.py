"""AdvRAD (AdvRAD paper): diffusion-model robust reconstruction as an adversarially robust anomaly detector."""

from anomalib_robust.models.adv_rad.lightning_model import AdvRAD

__all__ = ["AdvRAD"]
