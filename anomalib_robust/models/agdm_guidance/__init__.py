"""AGDM (the AGDM paper, Lin et al.: adversarially guided diffusion purification): the robust guidance network f_phi
and its training on normal images and pseudo anomalies (sec. 3.2, eq. 6). The purifier that guides the AdvRAD
diffusion model with it in front of any detector is :class:`anomalib_robust.defenses.AGDM`."""

from anomalib_robust.models.agdm_guidance.lightning_model import AGDMGuidance
from anomalib_robust.models.agdm_guidance.torch_model import GuidanceNetworkModel

__all__ = ["AGDMGuidance", "GuidanceNetworkModel"]
