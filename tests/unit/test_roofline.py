"""The roofline module of the benchmarks counts FLOPs as the analytic formulas do (2 FLOPs per multiply-add)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from shared_artifacts import TINY_ADVRAD

from anomalib_robust.models.adv_rad.torch_model import AdvRADModel

_SPEC = importlib.util.spec_from_file_location("roofline", Path(__file__).parents[2] / "benchmarks" / "roofline.py")
roofline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(roofline)


def test_linear_forward_and_backward_match_the_analytic_count() -> None:
    layer, inputs = torch.nn.Linear(64, 32), torch.randn(4, 64, requires_grad=True)
    forward = 2 * 4 * 64 * 32
    assert roofline.count_flops(lambda: layer(inputs)) == forward
    # backward: one product for the input gradient, one for the weight gradient
    assert roofline.count_flops(lambda: layer(inputs).sum().backward()) == 3 * forward


def test_convolution_matches_the_analytic_count() -> None:
    conv, inputs = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1), torch.randn(2, 3, 16, 16)
    assert roofline.count_flops(lambda: conv(inputs)) == 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3


def test_unet_flops_scale_with_the_image_area_and_backward_triples_them() -> None:
    config = {key: value for key, value in TINY_ADVRAD.items() if key != "image_size"}
    small, large = AdvRADModel(image_size=(16, 16), **config), AdvRADModel(image_size=(32, 32), **config)
    forward = roofline.unet_flops_per_image(small)
    assert roofline.unet_flops_per_image(large) == pytest.approx(4 * forward, rel=0.01)
    # the time embedding's first layer has no input gradient (integer steps), hence not exactly 3x
    assert roofline.unet_flops_per_image(small, backward=True) == pytest.approx(3 * forward, rel=1e-3)


def test_cells_report_gflops_and_the_share_of_the_fp32_peak() -> None:
    machine = roofline.Roofline(fp32=100.0, bf16=None, threads=1)
    assert machine.cells(2e9, 10.0) == ("2.000", "20.0", "20.0%")
