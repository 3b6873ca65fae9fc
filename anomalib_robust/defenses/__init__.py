"""Model-agnostic defenses around any anomalib detector: diffusion purifiers (DiffPure, TMA) and robust training.

Example:
    >>> from anomalib_robust.defenses import DiffPure, Purified
    >>> purified = Purified(trained_padim, DiffPure("adv_rad.ckpt", level=50))  # doctest: +SKIP
"""

from anomalib_robust.defenses.purified import Purified, PurifiedModel
from anomalib_robust.defenses.purifiers import TMA, DiffPure, DiffusionPurifier

__all__ = ["TMA", "DiffPure", "DiffusionPurifier", "Purified", "PurifiedModel"]
