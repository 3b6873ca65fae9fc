"""anomalib-robust: adversarially robust industrial anomaly detection for anomalib.

Importing the package registers its models with anomalib (they are ``AnomalibModule`` subclasses, which is how
anomalib's ``get_model``, ``list_models`` and CLI find models) and its callbacks with the CLI shorthands
(``--callbacks robust_eval``).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_robust import AdvRAD
    >>> from anomalib_robust.data import FashionMNIST
    >>> Engine(max_steps=10).fit(AdvRAD.cpu_preset(), datamodule=FashionMNIST())  # doctest: +SKIP
"""

from anomalib_robust import data
from anomalib_robust.callbacks import RobustEval
from anomalib_robust.models import AdvRAD, PatchGuard

__all__ = ["AdvRAD", "PatchGuard", "RobustEval", "data"]
__version__ = "0.1.0"
