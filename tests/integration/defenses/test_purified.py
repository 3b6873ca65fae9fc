"""Purifiers in front of anomalib detectors: Engine.test, RobustEval's defense option, the CLI configs (DiffPure, AGDM
and the training of AGDM's guidance network), the example."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Padim

from anomalib_robust import AdvRAD, RobustEval
from anomalib_robust.models import AGDMGuidance
from anomalib_robust.attacks import PGD
from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses import AGDM, TMA, DiffPure, Purified

REPO = Path(__file__).resolve().parents[3]
SIZE = 32
RESIZE = json.dumps(
    {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {
            "transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [SIZE, SIZE]}}
        },
    }
)
SETTINGS = {"eps": 2 / 255, "steps": 2, "eot_samples": 2, "sanity_checks": False, "plots": False}


def _padim() -> Padim:
    return Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1"],
        n_features=32,
        pre_processor=Padim.configure_pre_processor((SIZE, SIZE)),
    )


@pytest.fixture(scope="module")
def fitted(advrad_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A denoiser (the shared tiny AdvRAD) and Padim fitted on the embedded data, with their checkpoints."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("defenses")
    datamodule = FashionMNIST(root="embedded", image_size=SIZE, num_train=16, num_test=12, train_batch_size=8,
                              eval_batch_size=8)  # fmt: skip
    adv_rad, padim = AdvRAD.load_from_checkpoint(advrad_checkpoint), _padim()
    Engine(default_root_dir=root, logger=False, enable_progress_bar=False).fit(padim, datamodule=datamodule)
    checkpoints = {path.relative_to(root).parts[0]: path for path in root.rglob("*.ckpt")}
    checkpoints["AdvRAD"] = advrad_checkpoint
    return {"adv_rad": adv_rad, "padim": padim, "datamodule": datamodule, "checkpoints": checkpoints, "root": root}


def _engine(tmp_path: Path, **kwargs: object) -> Engine:
    return Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, **kwargs)


def test_purified_pipeline_tests_like_an_anomalib_model(fitted: dict, tmp_path: Path, device: torch.device) -> None:
    padim, datamodule = fitted["padim"], fitted["datamodule"]
    (undefended,) = _engine(tmp_path, accelerator=device.type).test(padim, datamodule=datamodule)
    identity_pipeline = Purified(padim, DiffPure(fitted["adv_rad"], level=0))
    (identity,) = _engine(tmp_path, accelerator=device.type).test(identity_pipeline, datamodule=datamodule)
    assert identity["image_AUROC"] == pytest.approx(undefended["image_AUROC"], abs=1e-6), "p = 0 is the identity"
    assert identity["pixel_AUROC"] == pytest.approx(undefended["pixel_AUROC"], abs=1e-4)
    purified = Purified(padim, DiffPure(fitted["adv_rad"], level=5))
    assert purified.name == "DiffPure(level=5)+Padim"
    (metrics,) = _engine(tmp_path, accelerator=device.type).test(purified, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    images = next(iter(datamodule.test_dataloader())).image.to(device)
    try:
        with torch.no_grad():
            purified.to(device).eval()
            first, second, plain = purified.model(images), purified.model(images), padim.eval().model(images)
    finally:
        purified.cpu()  # the module's shared models stay on the CPU
    assert not torch.equal(first.pred_score, plain.pred_score), "level 5 purifies the images the detector sees"
    assert not torch.equal(first.pred_score, second.pred_score), "fresh purification noise at every call"
    attack = PGD(purified, steps=1)
    assert attack.detector.eot_samples > 1 and attack.label == "EOT-PGD", "attacks on it must average over the noise"


def test_purified_is_not_trained(fitted: dict, tmp_path: Path) -> None:
    purified = Purified(fitted["padim"], TMA(fitted["adv_rad"], depth=10, stride=5))
    with pytest.raises(RuntimeError, match="Purified is an inference-time defense: train the detector on its own"):
        _engine(tmp_path, max_steps=1).fit(purified, datamodule=fitted["datamodule"])
    with pytest.raises(TypeError, match="detector must be a trained anomalib AnomalibModule"):
        Purified(torch.nn.Linear(2, 2), TMA(fitted["adv_rad"], depth=10, stride=5))


def test_robust_eval_attacks_through_the_purifier_with_full_gradients_bpda_and_the_surrogate(
    fitted: dict, tmp_path: Path, device: torch.device
) -> None:
    padim, datamodule = fitted["padim"], fitted["datamodule"]
    pre_processor, training = padim.pre_processor, padim.training
    defense = TMA(fitted["adv_rad"], depth=10, stride=5)
    callback = RobustEval(defense=defense, purifier_gradients=["full", "bpda", "surrogate"], surrogate_steps=1,
                          **SETTINGS)  # fmt: skip
    try:
        (metrics,) = _engine(tmp_path, callbacks=[callback], accelerator=device.type).test(padim, datamodule=datamodule)
    finally:
        fitted["adv_rad"].cpu()  # the evaluation moved the defense's denoiser to the tested model's device
    report = callback.report
    assert report.model == "TMA(depth=10, stride=5, eta=1.0)+Padim"
    assert report.eot_samples == 2
    attacks = ["EOT-PGD", "BPDA+EOT-PGD", "Surrogate-1+EOT-PGD", "Worst case"]
    assert [result.attack for result in report.results] == attacks
    *configured, worst = report.results
    assert all(result.status == "ok" for result in report.results)
    assert all(result.image_auroc <= report.clean_image_auroc + 0.1 for result in report.results)
    assert worst.role == "worst_case" and worst.image_auroc <= min(run.image_auroc for run in configured) + 1e-12
    assert "robust/bpda+eot-pgd_linf_eps0.007843/image_AUROC" in metrics
    assert next(tmp_path.rglob("robust_eval/tma_depth_10_stride_5_eta_1_0_padim/linf/report.json")).is_file()
    assert padim.pre_processor is pre_processor and padim.training == training, "the tested detector is untouched"


def test_each_defense_is_attacked_by_its_measured_default(fitted: dict) -> None:
    """Without ``purifier_gradients``: DiffPure and TMA through the surrogate chain (measured at least as strong as
    the full gradient), AGDM with full gradients and BPDA (nothing cheaper measured); an explicit choice wins."""
    adv_rad = fitted["adv_rad"]
    guidance = AGDMGuidance(image_size=(SIZE, SIZE), base_channels=8, num_levels=2, num_timesteps=100,
                            max_noise_step=5)  # fmt: skip
    defaults = {type(defense).__name__: RobustEval(defense=defense).evaluator.purifier_gradients
                for defense in (DiffPure(adv_rad, level=3), TMA(adv_rad, depth=10, stride=5),
                                AGDM(adv_rad, guidance, depth=5))}  # fmt: skip
    assert defaults == {"DiffPure": ["surrogate"], "TMA": ["surrogate"], "AGDM": ["full", "bpda"]}
    chosen = RobustEval(defense=DiffPure(adv_rad, level=3), purifier_gradients="full")
    assert chosen.evaluator.purifier_gradients == ["full"]


def test_robust_eval_defense_arguments() -> None:
    with pytest.raises(TypeError, match="defense must be a DiffusionPurifier"):
        RobustEval(defense=torch.nn.Identity())
    with pytest.raises(ValueError, match=r"purifier_gradients must be a non-empty subset of \('full', 'bpda', 'surr"):
        RobustEval(purifier_gradients=["exact"])
    with pytest.raises(ValueError, match="surrogate_steps must be"):
        RobustEval(surrogate_steps=0)


def test_cli_with_the_diffpure_config(fitted: dict, tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    """``anomalib test --model Padim ... --callbacks configs/callbacks/robust_eval_diffpure.yaml``, as a user types."""
    checkpoints = fitted["checkpoints"]
    output = anomalib_cli(
        *[
            "test", "--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
            "--model.layers", "[layer1]", "--model.n_features", "32", "--model.pre_processor", RESIZE,
            "--data", str(REPO / "configs/data/fashion_mnist.yaml"), "--data.image_size", str(SIZE),
            "--data.num_train", "16", "--data.num_test", "12", "--data.root", "embedded",
            "--ckpt_path", str(checkpoints["Padim"]), "--default_root_dir", "runs",
            "--callbacks", str(REPO / "configs/callbacks/robust_eval_diffpure.yaml"),
            "--callbacks.init_args.defense.init_args.denoiser", str(checkpoints["AdvRAD"]),
            "--callbacks.init_args.defense.init_args.level", "3",
            "--callbacks.init_args.steps", "1", "--callbacks.init_args.eot_samples", "2",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Robust evaluation of DiffPure(level=3)+Padim" in output
    report = json.loads(next(tmp_path.rglob("robust_eval/diffpure_level_3_padim/linf/report.json")).read_text())
    assert [result["attack"] for result in report["results"]] == ["Surrogate-3+EOT-PGD"]  # DiffPure's measured default


def test_cli_trains_agdm_guidance_and_evaluates_with_the_agdm_config(
    fitted: dict, tmp_path: Path, anomalib_cli: Callable[..., str]
) -> None:
    """``anomalib train --config configs/model/agdm_guidance_cpu.yaml``, resumed with ``anomalib fit --ckpt_path``,
    then ``anomalib test --model Padim ... --callbacks configs/callbacks/robust_eval_agdm.yaml`` with its checkpoint."""
    data = ["--data", str(REPO / "configs/data/fashion_mnist.yaml"), "--data.image_size", str(SIZE),
            "--data.num_train", "16", "--data.num_test", "12", "--data.root", "embedded",
            "--default_root_dir", "runs"]  # fmt: skip
    preset = ["--config", str(REPO / "configs/model/agdm_guidance_cpu.yaml"), "--model.base_channels", "8",
              "--model.num_timesteps", "100", "--model.max_noise_step", "4", *data,
              "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]  # fmt: skip
    anomalib_cli("train", *preset, "--trainer.max_steps", "1", cwd=tmp_path)
    (first,) = list(tmp_path.rglob("AGDMGuidance/**/*.ckpt"))
    assert torch.load(first, weights_only=False)["global_step"] == 1
    anomalib_cli("fit", *preset, "--trainer.max_steps", "2", "--ckpt_path", str(first), cwd=tmp_path)
    guidance = max(tmp_path.rglob("AGDMGuidance/**/*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert torch.load(guidance, weights_only=False)["global_step"] == 2
    output = anomalib_cli(
        *[
            "test", "--model", "Padim", "--model.backbone", "resnet18", "--model.pre_trained", "false",
            "--model.layers", "[layer1]", "--model.n_features", "32", "--model.pre_processor", RESIZE, *data,
            "--ckpt_path", str(fitted["checkpoints"]["Padim"]),
            "--callbacks", str(REPO / "configs/callbacks/robust_eval_agdm.yaml"),
            "--callbacks.init_args.defense.init_args.denoiser", str(fitted["checkpoints"]["AdvRAD"]),
            "--callbacks.init_args.defense.init_args.guidance", str(guidance),
            "--callbacks.init_args.defense.init_args.depth", "4",
            "--callbacks.init_args.steps", "1", "--callbacks.init_args.eot_samples", "2",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Robust evaluation of AGDM(depth=4, guidance_ratio=0.5)+Padim" in output
    (path,) = tmp_path.rglob("robust_eval/agdm_depth_4_guidance_ratio_0_5_padim/linf/report.json")
    report = json.loads(path.read_text())
    assert [result["attack"] for result in report["results"]] == ["EOT-PGD", "BPDA+EOT-PGD", "Worst case"]
    assert all(result["status"] == "ok" for result in report["results"])


def test_engine_tests_the_agdm_pipeline(fitted: dict, tmp_path: Path, device: torch.device) -> None:
    """anomalib tests under inference mode; AGDM still computes its guidance gradients there and, at its default
    guidance ratio, changes the scores."""
    guidance = AGDMGuidance(image_size=(SIZE, SIZE), base_channels=8, num_levels=2, num_timesteps=100,
                            max_noise_step=5)  # fmt: skip
    purified = Purified(fitted["padim"], AGDM(fitted["adv_rad"], guidance, depth=5))
    (metrics,) = _engine(tmp_path, accelerator=device.type).test(purified, datamodule=fitted["datamodule"])
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    images = next(iter(fitted["datamodule"].test_dataloader())).image.to(device)
    purified.to(device).eval()
    try:
        with torch.inference_mode():
            torch.manual_seed(0)
            guided = purified.model(images).pred_score
            purified.model.purifier.guidance_ratio = 0.0
            torch.manual_seed(0)
            unguided = purified.model(images).pred_score
    finally:
        purified.cpu()  # the module's shared models stay on the CPU
    assert not torch.allclose(guided, unguided), "the guidance moves the purified images under inference mode"


def test_diffpure_sweep_example(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("diffpure_sweep_padim.py", "--epochs", "1", "--levels", "0", "2", "--tma-depth", "4",
                         "--tma-stride", "2", "--agdm-depths", "3", "--guidance-epochs", "1", "--steps", "1",
                         "--eot-samples", "2", "--max-samples", "6", "--num-train", "16", "--num-test", "12",
                         "--results", "results", cwd=tmp_path)  # fmt: skip
    for system in ("DiffPure(level=0)+Padim", "DiffPure(level=2)+Padim", "TMA(depth=4, stride=2, eta=1.0)+Padim",
                   "AGDM(depth=3, guidance_ratio=0.5)+Padim"):  # fmt: skip
        assert system in output
    assert len(list((tmp_path / "results").rglob("report.json"))) == 6
