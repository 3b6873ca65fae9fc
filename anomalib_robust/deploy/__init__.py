"""Deployment helpers: export of AdvRAD's one-shot reconstructor to Torch, ONNX and OpenVINO, its raw scores in
OpenVINO for certification, and prediction with any exported model through anomalib's inferencers."""

from anomalib_robust.deploy.adv_rad import NOISE_MODES, export_adv_rad
from anomalib_robust.deploy.openvino_score import PRECISIONS, OpenVINOScore, cpu_config
from anomalib_robust.deploy.predict import ExportedPrediction, load_inferencer, predict_exported

__all__ = [
    "NOISE_MODES",
    "PRECISIONS",
    "ExportedPrediction",
    "OpenVINOScore",
    "cpu_config",
    "export_adv_rad",
    "load_inferencer",
    "predict_exported",
]
