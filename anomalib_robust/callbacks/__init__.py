"""Lightning callbacks of anomalib-robust; ``--callbacks robust_eval`` in the ``anomalib`` command."""

from anomalib_robust.callbacks.certify import CertifyEval
from anomalib_robust.callbacks.diffusion_step import SelectDiffusionStep
from anomalib_robust.callbacks.robust_eval import RobustEval
from anomalib_robust.registry import register_callback

register_callback("robust_eval", "anomalib_robust.callbacks.RobustEval")
register_callback("certify", "anomalib_robust.callbacks.CertifyEval")
register_callback("select_diffusion_step", "anomalib_robust.callbacks.SelectDiffusionStep")

__all__ = ["CertifyEval", "RobustEval", "SelectDiffusionStep"]
