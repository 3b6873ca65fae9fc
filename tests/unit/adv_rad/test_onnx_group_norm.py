"""The layout-preserving GroupNorm export of ``anomalib_robust.deploy.adv_rad.onnx_translations``."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from anomalib_robust.deploy.adv_rad import onnx_translations


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_translation_equals_pytorch_without_instance_norm(tmp_path: Path, affine: bool) -> None:
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(num_groups=4, num_channels=8, eps=1e-6, affine=affine).eval()
    if affine:  # not the identity initialisation, so that a dropped gamma or beta shows
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    images = 3.0 * torch.randn(2, 8, 5, 7) + 1.5  # a large mean: a one-pass E[x^2] - E[x]^2 would lose digits
    path = tmp_path / "group_norm.onnx"
    torch.onnx.export(norm, (images,), path, dynamo=True, input_names=["input"], output_names=["output"],
                      custom_translation_table=onnx_translations())  # fmt: skip
    node_types = {node.op_type for node in onnx.load(path).graph.node}
    assert "InstanceNormalization" not in node_types
    assert "GroupNormalization" not in node_types
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input": images.numpy()})[0]
    with torch.no_grad():
        expected = norm(images).numpy()
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-5)
