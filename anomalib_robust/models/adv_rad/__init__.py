"""AdvRAD."""
from anomalib_robust.models.adv_rad.lightning_model import AdvRAD

__all__ = ["AdvRAD"]
