"""RAP around an anomalib detector end to end: RobustEvaluator/RobustEval with full gradients and BPDA, Engine.test of
the defended pipeline, and the CLI (train the adapter, resume it, evaluate with configs/callbacks/robust_eval_rap.yaml).
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust import RobustEval
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import RAP, Purified
from anomalib_robust.attacks.detector import test_transform as transform_as_tested
from anomalib_robust.evaluation import RobustEvaluator, rank_auroc
from anomalib_robust.models import RAPAdapter

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
TINY = {"image_size": (SIZE, SIZE), "base_channels": 32, "channel_mult": (1,), "steps": 2}
DATA = {"root": "embedded", "image_size": SIZE, "num_train": 8, "num_test": 8, "train_batch_size": 4,
        "eval_batch_size": 4}  # fmt: skip
ENGINE = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
PADIM_ARGS = ["--model.backbone", "resnet18", "--model.pre_trained", "false", "--model.layers", "[layer1]",
              "--model.n_features", "16"]  # fmt: skip
RESIZE = json.dumps({"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": {
    "class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [SIZE, SIZE]}}}})  # fmt: skip
DATA_ARGS = ["--data", str(REPO / "configs/data/fashion_mnist.yaml"), "--data.image_size", str(SIZE),
             "--data.num_train", "8", "--data.num_test", "8", "--data.root", "embedded",
             "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Padim fitted on the embedded Fashion-MNIST (with its checkpoint) and a RAP adapter trained 2 steps."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rap_integration")
    datamodule = FashionMNIST(**DATA)
    padim = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=16,
                  pre_processor=Padim.configure_pre_processor((SIZE, SIZE)))  # fmt: skip
    engine = Engine(default_root_dir=root / "padim", **ENGINE)
    engine.fit(padim, datamodule=datamodule)
    adapter = RAPAdapter(detector=padim, **TINY)
    trainer = Engine(default_root_dir=root / "rap", max_steps=2, limit_val_batches=0, **ENGINE)
    trainer.fit(adapter, datamodule=datamodule)
    trainer.trainer.save_checkpoint(root / "rap.ckpt")
    return {"padim": padim, "padim_ckpt": Path(engine.trainer.checkpoint_callback.best_model_path),
            "adapter": adapter, "adapter_ckpt": root / "rap.ckpt", "datamodule": datamodule}  # fmt: skip


def test_robust_evaluator_attacks_through_rap_with_full_gradients_and_bpda(fitted: dict) -> None:
    padim, datamodule = fitted["padim"], fitted["datamodule"]
    evaluator = RobustEvaluator(eps=2 / 255, steps=2, defense=RAP(fitted["adapter"]), sanity_checks=False,
                                num_grid_images=0)  # fmt: skip
    datamodule.setup()
    report, _ = evaluator.evaluate(padim, [datamodule.test_dataloader()])
    assert report.model == "RAP(steps=2, inference_steps=1)+Padim"
    assert report.eot_samples == 1 and report.eval_repeats == 1, "one-step RAP is deterministic: no EOT, one scoring"
    assert [result.attack for result in report.results] == ["PGD", "BPDA+PGD", "Worst case"]
    assert all(result.status == "ok" for result in report.results)
    assert all(result.image_auroc <= report.clean_image_auroc + 1e-9 for result in report.results)


def test_engine_tests_the_defended_pipeline(fitted: dict, tmp_path: Path, device: torch.device) -> None:
    """anomalib's test of ``Purified(Padim, RAP)`` scores the adapter's output: its raw scores are Padim's scores of
    the one-step reconstruction, and its AUROC is the rank AUROC of its own predictions."""
    purified = Purified(fitted["padim"], RAP(fitted["adapter"]))
    engine = Engine(default_root_dir=tmp_path, accelerator=device.type, **ENGINE)
    (metrics,) = engine.test(purified, datamodule=fitted["datamodule"])
    predictions = engine.predict(purified, dataloaders=fitted["datamodule"].test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    labels = torch.cat([batch.gt_label.flatten() for batch in predictions])
    assert metrics["image_AUROC"] == pytest.approx(rank_auroc(scores, labels), abs=1e-6)
    images = next(iter(fitted["datamodule"].test_dataloader())).image.to(device)
    purified.to(device).eval()
    try:
        with torch.no_grad():
            defended = purified.model(images).pred_score
            reconstruction = purified.model.purifier(images)
            tested = transform_as_tested(fitted["padim"].pre_processor, reconstruction)
            expected = fitted["padim"].model(tested).pred_score
            undefended = fitted["padim"].model(transform_as_tested(fitted["padim"].pre_processor, images)).pred_score
    finally:
        purified.cpu()  # the module's shared models stay on the CPU
    torch.testing.assert_close(defended, expected)
    assert not torch.allclose(defended, undefended), "the adapter must be in the tested pipeline"


def test_cli_trains_and_resumes(fitted: dict, tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    """``anomalib train --config configs/model/rap_adapter_cpu.yaml --model.detector padim.ckpt ...``, then resumed
    with ``anomalib fit ... --ckpt_path``."""
    common = ["--model.detector", str(fitted["padim_ckpt"]), "--model.detector_model", "Padim",
              "--model.channel_mult", "[1]", "--model.steps", "2", *DATA_ARGS, "--default_root_dir", "runs",
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]  # fmt: skip
    preset = str(REPO / "configs/model/rap_adapter_cpu.yaml")
    anomalib_cli("train", "--config", preset, *common, "--trainer.max_steps", "1", cwd=tmp_path)
    (first,) = list(tmp_path.rglob("RAPAdapter/**/*.ckpt"))
    assert torch.load(first, weights_only=False)["global_step"] == 1
    anomalib_cli("fit", "--model", "RAPAdapter", "--model.image_size", f"[{SIZE},{SIZE}]", "--model.base_channels",
                 "32", *common, "--trainer.max_steps", "2", "--ckpt_path", str(first), cwd=tmp_path)  # fmt: skip
    resumed = max(tmp_path.rglob("RAPAdapter/**/*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert torch.load(resumed, weights_only=False)["global_step"] == 2
    assert int(RAP(resumed).adapter.trained_steps) == 2


def test_cli_evaluates_with_the_rap_config(fitted: dict, tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    """``anomalib test --model Padim ... --callbacks configs/callbacks/robust_eval_rap.yaml``, as a user types."""
    output = anomalib_cli(
        "test", "--model", "Padim", *PADIM_ARGS, "--model.pre_processor", RESIZE, *DATA_ARGS,
        "--ckpt_path", str(fitted["padim_ckpt"]), "--default_root_dir", "runs",
        "--callbacks", str(REPO / "configs/callbacks/robust_eval_rap.yaml"),
        "--callbacks.init_args.defense.init_args.denoiser", str(fitted["adapter_ckpt"]),
        "--callbacks.init_args.steps", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Robust evaluation of RAP(steps=2, inference_steps=1)+Padim" in output
    report = json.loads(next(tmp_path.rglob("robust_eval/rap_steps_2_inference_steps_1_padim/linf/report.json"))
                        .read_text())  # fmt: skip
    assert [result["attack"] for result in report["results"]] == ["PGD", "BPDA+PGD", "Worst case"]


def test_robust_eval_callback_takes_rap_as_defense(fitted: dict, tmp_path: Path) -> None:
    callback = RobustEval(defense=RAP(fitted["adapter"]), eps=2 / 255, steps=1, sanity_checks=False, plots=False,
                          purifier_gradients=["bpda"])  # fmt: skip
    Engine(default_root_dir=tmp_path, callbacks=[callback], **ENGINE).test(fitted["padim"],
                                                                            datamodule=fitted["datamodule"])
    assert [result.attack for result in callback.report.results] == ["BPDA+PGD"]
