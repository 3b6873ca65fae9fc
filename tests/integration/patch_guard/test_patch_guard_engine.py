"""PatchGuard through anomalib's Engine: fit/test metrics, checkpoint round trip, ONNX/OpenVINO export, RobustEval;
fitted, tested and attacked on each ``device``."""

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine

from anomalib_robust import PatchGuard
from anomalib_robust.callbacks import RobustEval
from anomalib_robust.data import FashionMNIST

SIZE = 32
TINY = {
    "image_size": (SIZE, SIZE),
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "discriminator_heads": 2,
    "discriminator_mlp_dim": 64,
    "sigma": 1.0,
    "kernel_size": 5,
    "attention_weights": (0.01, 0.05),
    "adversarial_steps": 2,
    "foreground": "heuristic",
    "dilation_iterations": 1,
}


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, device: torch.device
) -> tuple[PatchGuard, FashionMNIST, Path, Engine]:
    """The tiny PatchGuard fitted on ``device`` (Lightning hands it back on the CPU), its data, checkpoint, Engine."""
    torch.manual_seed(0)
    datamodule = FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=16, num_test=16,
                              train_batch_size=8, eval_batch_size=8)  # fmt: skip
    model = PatchGuard(**TINY)
    engine = Engine(max_steps=3, default_root_dir=tmp_path_factory.mktemp("results"), logger=False,
                    enable_progress_bar=False, accelerator=device.type)  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    return model, datamodule, Path(engine.trainer.checkpoint_callback.best_model_path), engine


def test_test_reports_image_and_pixel_metrics(trained: tuple) -> None:
    model, datamodule, _, engine = trained
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    assert all(np.isfinite(value) for value in metrics.values())


def test_checkpoint_round_trip_reproduces_predictions(trained: tuple) -> None:
    model, datamodule, checkpoint, _ = trained
    images = next(iter(datamodule.test_dataloader())).image
    loaded = PatchGuard.load_from_checkpoint(checkpoint).eval()
    model.eval()
    with torch.no_grad():
        expected, actual = model.model(images), loaded.model(images)
    torch.testing.assert_close(actual.pred_score, expected.pred_score)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    assert loaded.hparams["adversarial_steps"] == 2 and loaded.model.attention_layers == (1, 2)


def test_checkpoint_rebuilds_the_architecture_from_default_constructor(trained: tuple) -> None:
    model, datamodule, checkpoint, _ = trained
    default = PatchGuard()  # ViT-S/14 at 224: the checkpoint's tiny architecture wins
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    default.on_load_checkpoint(state)
    default.load_state_dict(state["state_dict"])
    assert default.model.image_size == (SIZE, SIZE) and default.model.num_patches == 16
    images = next(iter(datamodule.test_dataloader())).image
    with torch.no_grad():
        torch.testing.assert_close(default.eval().model(images).pred_score, model.eval().model(images).pred_score)
    assert default.pre_processor.transform(torch.rand(1, 3, 50, 50)).shape[-2:] == (SIZE, SIZE)


def test_onnx_export_matches_pytorch(trained: tuple, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, _, _, engine = trained
    model.eval()
    images = torch.rand(2, 3, 40, 48)  # another size: the exported graph resizes
    with torch.no_grad():
        reference = model(images)
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx")
    session = ort.InferenceSession(str(onnx_path))
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    np.testing.assert_allclose(outputs["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        outputs["anomaly_map"].reshape(2, SIZE, SIZE), reference.anomaly_map.reshape(2, SIZE, SIZE).numpy(), atol=1e-4
    )


@pytest.mark.parametrize("device", ["cpu"], indirect=True)  # OpenVINO (an extra) is not on the GPU machine
def test_openvino_export_runs_in_openvino_inferencer_and_matches_pytorch(trained: tuple, tmp_path: Path) -> None:
    model, datamodule, _, engine = trained
    model.eval()
    image = next(iter(datamodule.test_dataloader())).image[:1]
    with torch.no_grad():
        reference = model(image)
    xml_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path)
    assert xml_path.suffix == ".xml" and xml_path.with_suffix(".bin").exists()
    # f32: OpenVINO computes in bf16 on CPUs that have it
    inferencer = OpenVINOInferencer(path=xml_path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    prediction = inferencer.predict(image)
    np.testing.assert_allclose(prediction.pred_score.reshape(-1), reference.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        prediction.anomaly_map.reshape(SIZE, SIZE), reference.anomaly_map.reshape(SIZE, SIZE).numpy(), atol=1e-4
    )
    assert prediction.pred_label is not None


def test_robust_eval_attacks_patch_guard(trained: tuple, device: torch.device) -> None:
    model, datamodule, _, _ = trained
    try:
        report = RobustEval(attacks=["pgd"], eps=8 / 255, steps=2, sanity_checks=False, plots=False).evaluate(
            model.to(device), datamodule.test_dataloader()
        )
    finally:
        model.cpu()  # the other tests of the module use it on the CPU
    (result,) = report.results
    assert result.status == "ok"
    assert result.image_auroc <= report.clean_image_auroc + 1e-6


def test_predict_returns_scores_and_maps(trained: tuple) -> None:
    model, datamodule, _, engine = trained
    predictions = engine.predict(model, dataloaders=datamodule.test_dataloader())
    batch = predictions[0]
    assert batch.pred_score.shape == (8,) and batch.anomaly_map.shape[-2:] == (SIZE, SIZE)
    assert batch.pred_label is not None


def test_anomalib_get_model_finds_patch_guard() -> None:
    from anomalib.models import get_model, list_models

    model = get_model("PatchGuard", **TINY)
    assert isinstance(model, PatchGuard) and "PatchGuard" in list_models(case="pascal")
