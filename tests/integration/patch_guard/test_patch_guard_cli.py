"""``anomalib train/test --model PatchGuard`` in-process (as the console script runs them), with ``--callbacks robust_eval``."""

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from anomalib.cli.cli import AnomalibCLI

REPO = Path(__file__).resolve().parents[3]
FASHION_MNIST = [
    "--data", str(REPO / "configs/data/fashion_mnist.yaml"), "--data.category=trouser", "--data.root=embedded",
    "--data.image_size=32", "--data.num_train=16", "--data.num_test=16", "--data.train_batch_size=8",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``anomalib train`` (fit, then test) with the CPU preset YAML on a tiny MVTecAD-layout dataset, in-process."""
    workdir = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as stdout:
        patch.chdir(workdir)
        AnomalibCLI(args=["train", "--config", str(REPO / "configs/model/patch_guard_cpu.yaml"), "--data", "MVTecAD",
                          f"--data.root={mvtec_root}", "--data.category=disc", "--data.train_batch_size=4",
                          "--data.eval_batch_size=4", "--data.num_workers=0", "--model.adversarial_steps=1",
                          "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
                          "--default_root_dir=results"])  # fmt: skip
    (path,) = workdir.glob("results/PatchGuard/MVTecAD/disc/latest/weights/lightning/model.ckpt")
    return path, stdout.getvalue()


def test_train_on_mvtec_layout_reports_image_and_pixel_metrics(trained: tuple[Path, str]) -> None:
    _, output = trained
    assert "image_AUROC" in output and "pixel_AUROC" in output


def test_test_on_embedded_data_with_robust_eval_from_snake_case_name(
    trained: tuple[Path, str], tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    """The checkpoint's architecture is restored without repeating it; RobustEval attacks the trained model."""
    checkpoint, _ = trained
    output = anomalib_cli("test", "--model", "patch_guard", *FASHION_MNIST, f"--ckpt_path={checkpoint}",
                 "--default_root_dir=results", "--callbacks", "robust_eval", "--callbacks.init_args.attacks=[pgd]",
                 "--callbacks.init_args.eps=0.0313725", "--callbacks.init_args.steps=2",
                 "--callbacks.init_args.sanity_checks=false", "--callbacks.init_args.plots=false", cwd=tmp_path)  # fmt: skip
    assert "image_AUROC" in output
    (report_path,) = tmp_path.rglob("robust_eval/linf/report.json")
    report = json.loads(report_path.read_text())
    assert report["model"] == "PatchGuard"
    assert [result["status"] for result in report["results"]] == ["ok"]


def test_predict_from_checkpoint_saves_visualisations(
    trained: tuple[Path, str], mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    checkpoint, _ = trained
    images = mvtec_root / "disc" / "test" / "scratch"
    anomalib_cli("predict", "--model", "PatchGuard", f"--data={images}", f"--ckpt_path={checkpoint}",
        "--default_root_dir=results", cwd=tmp_path)  # fmt: skip
    saved = list(tmp_path.glob("results/**/*.png"))
    assert len(saved) == len(list(images.glob("*.png"))), "anomalib predict should save one visualisation per image"


def test_export_to_openvino_from_checkpoint(
    trained: tuple[Path, str], mvtec_root: Path, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    checkpoint, _ = trained
    anomalib_cli("export", "--model", "patch_guard", "--export_type", "openvino", f"--ckpt_path={checkpoint}",
        "--default_root_dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
    (model_path,) = tmp_path.glob("**/weights/openvino/model.xml")
    prediction = OpenVINOInferencer(path=model_path, device="CPU").predict(mvtec_root / "disc/test/scratch/000.png")
    assert prediction.pred_score.size == 1
    assert prediction.anomaly_map.shape[-2:] == (32, 32)  # the CPU preset's input size, restored from the checkpoint
