"""RAP (the RAP paper, "From Malicious to Marvelous: the Art of Adversarial Attack as Diffusion"): the adapter, its
forward and reverse processes (Alg. 1-2) and its training in front of a fitted detector (Alg. 3). The purifier that
puts a trained adapter in front of any detector is :class:`anomalib_robust.defenses.RAP`."""

from anomalib_robust.models.rap_adapter.lightning_model import RAPAdapter
from anomalib_robust.models.rap_adapter.torch_model import RAPAdapterModel

__all__ = ["RAPAdapter", "RAPAdapterModel"]
