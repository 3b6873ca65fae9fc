"""Robust evaluation without Lightning: rank AUROC, the evaluator, sharding, sanity checks, reports and plots.

``RobustEvaluator(...).evaluate(model, dataloaders)`` returns the :class:`RobustReport` that the ``RobustEval``
callback prints; a notebook or a benchmark can call it directly.
"""

from anomalib_robust.evaluation.evaluator import RobustEvaluator
from anomalib_robust.evaluation.metrics import mean_and_std, pixel_auroc, rank_auroc
from anomalib_robust.evaluation.planning import derive_seed
from anomalib_robust.evaluation.report import AttackResult, RobustReport, SanityCheck

__all__ = [
    "AttackResult",
    "RobustEvaluator",
    "RobustReport",
    "SanityCheck",
    "derive_seed",
    "mean_and_std",
    "pixel_auroc",
    "rank_auroc",
]
