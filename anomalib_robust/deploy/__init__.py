"""Deployment helpers: export of AdvRAD's one-shot reconstructor to Torch, ONNX and OpenVINO, and prediction with
any exported model through anomalib's inferencers."""

from anomalib_robust.deploy.adv_rad import NOISE_MODES, export_adv_rad
from anomalib_robust.deploy.predict import ExportedPrediction, load_inferencer, predict_exported

__all__ = [
    "NOISE_MODES",
    "ExportedPrediction",
    "export_adv_rad",
    "load_inferencer",
    "predict_exported",
]
