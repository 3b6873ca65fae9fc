"""Export of AdvRAD's one-shot pipeline: parity with identical noise, CLI export, inferencers, example, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine

from anomalib_robust import AdvRAD
from anomalib_robust.deploy import export_adv_rad

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

REPO = Path(__file__).resolve().parents[3]
ANOMALIB = str(Path(sys.executable).with_name("anomalib"))
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO picks bf16 on CPUs that have it


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=environment, check=False, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(args)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    )
    return result


def _relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(reference - other).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def trained(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory, tiny_advrad: dict) -> tuple[AdvRAD, Path]:
    model = AdvRAD(**tiny_advrad)
    engine = Engine(max_steps=2, default_root_dir=tmp_path_factory.mktemp("results"), logger=False)
    datamodule = MVTecAD(root=mvtec_root, category="disc", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine.fit(model, datamodule=datamodule)
    return model.eval(), Path(engine.trainer.checkpoint_callback.best_model_path)


def test_onnx_and_openvino_reproduce_pytorch_with_identical_noise(trained: tuple[AdvRAD, Path], tmp_path: Path) -> None:
    model, _ = trained
    onnx_path = export_adv_rad(model, tmp_path, export_type="onnx", noise="input")
    assert [node.name for node in onnx.load(onnx_path).graph.input] == ["input", "noise"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 48, 40, generator=generator)  # another size: the graph resizes
    noise = torch.randn(1, 3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        reference = model(images, noise)
    feed = {"input": images.numpy(), "noise": noise.numpy()}
    session = ort.InferenceSession(str(onnx_path))
    onnx_outputs = dict(zip([output.name for output in session.get_outputs()], session.run(None, feed), strict=True))
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", F32)
    ov_outputs = {key.any_name: value for key, value in compiled(feed).items()}
    for name in ("pred_score", "anomaly_map"):
        expected = getattr(reference, name).numpy()
        assert onnx_outputs[name].shape == expected.shape
        assert _relative_error(expected, onnx_outputs[name]) < 1e-5, name  # measured ~2e-7
        assert _relative_error(expected, ov_outputs[name]) < 2e-3, name  # measured ~2e-4 (f32)


def test_cli_export_keeps_fresh_noise_and_runs_in_openvino_inferencer(
    trained: tuple[AdvRAD, Path],
    tmp_path: Path,
    mvtec_root: Path,
) -> None:
    _, checkpoint = trained
    _run(
        ANOMALIB,
        "export",
        "--model",
        "AdvRAD",
        "--export_type",
        "openvino",
        "--ckpt_path",
        str(checkpoint),
        "--default_root_dir",
        str(tmp_path),
        cwd=tmp_path,
    )
    (model_path,) = tmp_path.glob("**/weights/openvino/model.xml")
    inferencer = OpenVINOInferencer(path=model_path, device="CPU", config=F32)
    image = mvtec_root / "disc" / "test" / "scratch" / "000.png"
    first, second = inferencer.predict(image), inferencer.predict(image)
    assert first.pred_score.size == 1
    assert first.anomaly_map.shape[-2:] == (32, 32)
    assert not np.array_equal(first.anomaly_map, second.anomaly_map), "the graph must draw fresh diffusion noise"


def test_torch_export_runs_in_torch_inferencer(
    trained: tuple[AdvRAD, Path],
    tmp_path: Path,
    mvtec_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = trained
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # TorchInferencer unpickles the whole module
    inferencer = TorchInferencer(path=export_adv_rad(model, tmp_path, export_type="torch"), device="cpu")
    prediction = inferencer.predict(mvtec_root / "disc" / "test" / "good" / "000.png")
    assert prediction.pred_score.numel() == 1
    assert prediction.anomaly_map.shape[-2:] == (32, 32)


@pytest.mark.slow
def test_example_trains_exports_and_scores_a_folder(mvtec_root: Path, tmp_path: Path) -> None:
    images = mvtec_root / "disc" / "test" / "scratch"
    result = _run(
        sys.executable,
        str(REPO / "examples" / "export_adv_rad.py"),
        "--images",
        str(images),
        "--max-steps",
        "2",
        "--num-train",
        "16",
        "--results",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert result.stdout.count("score=") == len(list(images.glob("*.png")))


def test_export_before_fit_is_a_clear_error(tiny_advrad: dict, tmp_path: Path) -> None:
    model = AdvRAD(**tiny_advrad)
    for export in (model.to_torch, model.to_onnx, model.to_openvino):
        with pytest.raises(RuntimeError, match="no training error statistics"):
            export(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"export_type": "tensorrt"}, "export_type must be one of"),
        ({"noise": "fixed"}, "noise must be one of"),
        ({"export_type": "torch", "noise": "input"}, "noise='input' applies to ONNX and OpenVINO"),
        ({"input_size": (32,)}, "input_size must be"),
    ],
)
def test_bad_export_arguments_are_clear_errors(
    trained: tuple[AdvRAD, Path],
    tmp_path: Path,
    kwargs: dict,
    message: str,
) -> None:
    model, _ = trained
    with pytest.raises(ValueError, match=message):
        export_adv_rad(model, tmp_path, **kwargs)


def test_size_the_graph_cannot_take_is_a_clear_error(trained: tuple[AdvRAD, Path], tmp_path: Path) -> None:
    model, checkpoint = trained
    without_resize = AdvRAD.load_from_checkpoint(checkpoint, pre_processor=False)
    with pytest.raises(ValueError, match="only takes"):
        export_adv_rad(without_resize, tmp_path, export_type="onnx")
    with pytest.raises(ValueError, match="only takes"):
        without_resize.to_onnx(tmp_path, input_size=(64, 64))
    model.set_reconstruction(reconstruction="full_shot")
    try:
        with pytest.raises(ValueError, match="only one-shot reconstruction"):
            export_adv_rad(model, tmp_path)
    finally:
        model.set_reconstruction(reconstruction="one_shot")


def test_noise_of_the_wrong_shape_is_a_clear_error(trained: tuple[AdvRAD, Path]) -> None:
    model, _ = trained
    with pytest.raises(ValueError, match=r"noise must be \(num_noise_draws, \*images.shape\)"):
        model(torch.rand(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
