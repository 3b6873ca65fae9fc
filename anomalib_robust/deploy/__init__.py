"""Deployment helpers: export of AdvRAD's one-shot reconstructor to Torch, ONNX and OpenVINO."""

from anomalib_robust.deploy.adv_rad import NOISE_MODES, check_exportable, export_adv_rad

__all__ = ["NOISE_MODES", "check_exportable", "export_adv_rad"]
