"""The plugin's rewrites of ``anomalib`` arguments and its routing of ``predict`` on exported models (in-process)."""

import pytest

from anomalib_robust.cli import is_exported_predict, normalize_arguments


@pytest.mark.parametrize("value", ["int8_ptq", "INT8_PTQ", "Int8_Ptq"])
def test_compression_type_takes_anomalib_values_and_names(value: str) -> None:
    expected = ["export", "--compression_type", "INT8_PTQ"]
    assert normalize_arguments(["export", "--compression_type", value]) == expected
    assert normalize_arguments(["export", f"--compression_type={value}"]) == expected


def test_unknown_compression_type_is_left_for_anomalib_to_reject() -> None:
    assert normalize_arguments(["export", "--compression_type", "int4"]) == ["export", "--compression_type", "int4"]


@pytest.mark.parametrize(
    ("args", "exported"),
    [
        (["predict", "--ckpt_path", "weights/openvino/model.xml", "--data", "images"], True),
        (["predict", "--ckpt_path=weights/openvino/model.bin"], True),
        (["predict", "--ckpt_path", "weights/onnx/model.onnx"], True),
        (["predict", "--ckpt_path", "weights/torch/model.pt"], True),
        (["predict", "--ckpt_path", "weights/lightning/model.ckpt"], False),
        (["predict", "--ckpt_path", "a.xml", "--ckpt_path", "b.ckpt"], False),
        (["test", "--ckpt_path", "weights/openvino/model.xml"], False),
        (["predict", "--data", "images"], False),
    ],
)
def test_predict_is_routed_to_the_inferencer_only_for_exported_files(args: list[str], exported: bool) -> None:
    assert is_exported_predict(args) is exported
