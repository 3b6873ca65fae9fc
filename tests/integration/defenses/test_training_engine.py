"""Adversarial and Gaussian-noise training inside ``Engine.fit``, on the command line and in the example.

The callbacks must perturb the [0, 1] images that the detector's training step actually receives (after them, the
pre-processor resizes and normalises), and must refuse detectors without gradient training.
"""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Fastflow, Patchcore, Stfpm
from lightning.pytorch import Callback

from anomalib_robust.data import FashionMNIST
from anomalib_robust.defenses.training import AdversarialTraining, GaussianNoiseTraining, NotGradientTrainedError
from anomalib_robust.offline import random_init_backbones

REPO = Path(__file__).resolve().parents[3]
SIZE = 32
EPS = 4 / 255
DATA = ["--data", "anomalib_robust.data.FashionMNIST", "--data.category", "trouser", "--data.root", "embedded",
        "--data.image_size", str(SIZE), "--data.num_train", "16", "--data.num_test", "16",
        "--data.train_batch_size", "8"]  # fmt: skip
RESIZE = json.dumps(
    {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {
            "transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [SIZE, SIZE]}}
        },
    }
)
# Fastflow, not Stfpm, on the command line: anomalib's Stfpm always asks timm for a pretrained teacher (a download),
# while Fastflow takes --model.pre_trained false. Both are gradient-trained detectors of Table 8's kind.
FASTFLOW = ["--model", "Fastflow", "--model.backbone", "resnet18", "--model.pre_trained", "false",
            "--model.flow_steps", "2", "--model.pre_processor", RESIZE]  # fmt: skip


class TrainingImages(Callback):
    """Records the ``batch.image`` the training step gets, before the pre-processor (it runs after trainer callbacks)."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images.append(batch.image.clone())


def _datamodule() -> FashionMNIST:
    return FashionMNIST(category="trouser", root="embedded", image_size=SIZE, num_train=16, num_test=16,
                        train_batch_size=8)  # fmt: skip


def _stfpm() -> Stfpm:
    torch.manual_seed(0)
    with random_init_backbones():
        return Stfpm(backbone="resnet18", pre_processor=Stfpm.configure_pre_processor((SIZE, SIZE)), evaluator=False)


def _fit(model: torch.nn.Module, callbacks: list[Callback], root: Path) -> None:
    engine = Engine(default_root_dir=root, max_steps=2, logger=False, enable_progress_bar=False, callbacks=callbacks)
    torch.manual_seed(0)  # the same shuffling in every run
    engine.fit(model, datamodule=_datamodule())


def test_stfpm_trains_on_adversarial_images(tmp_path: Path) -> None:
    clean_recorder, adversarial_recorder = TrainingImages(), TrainingImages()
    clean_model, adversarial_model = _stfpm(), _stfpm()
    _fit(clean_model, [clean_recorder], tmp_path / "clean")
    at = AdversarialTraining(eps=EPS, steps=2)
    _fit(adversarial_model, [at, adversarial_recorder], tmp_path / "at")

    assert at.batches_changed == 2
    assert len(adversarial_recorder.images) == len(clean_recorder.images) == 2
    for clean, adversarial in zip(clean_recorder.images, adversarial_recorder.images, strict=True):
        delta = (adversarial - clean).abs()
        assert 0 < delta.max() <= EPS + 1e-6  # the training step saw perturbed images, within eps
        assert adversarial.min() >= 0 and adversarial.max() <= 1  # in pixel space: before the pre-processor
    student = "model.student_model"
    clean_weights = {k: v for k, v in clean_model.state_dict().items() if k.startswith(student)}
    at_weights = {k: v for k, v in adversarial_model.state_dict().items() if k.startswith(student)}
    assert any(not torch.equal(clean_weights[key], at_weights[key]) for key in clean_weights)


def test_fastflow_trains_on_noisy_images(tmp_path: Path) -> None:
    recorder, clean_recorder = TrainingImages(), TrainingImages()
    torch.manual_seed(0)
    model = Fastflow(backbone="resnet18", pre_trained=False, flow_steps=2, evaluator=False,
                     pre_processor=Fastflow.configure_pre_processor((SIZE, SIZE)))  # fmt: skip
    _fit(model, [clean_recorder], tmp_path / "clean")
    noise = GaussianNoiseTraining(stds=[0.05], seed=1)
    _fit(model, [noise, recorder], tmp_path / "gn")
    assert noise.batches_changed == 2
    for clean, noisy in zip(clean_recorder.images, recorder.images, strict=True):
        inside = (clean > 0.25) & (clean < 0.75)  # pixels where clamping to [0, 1] hardly ever acts
        assert inside.sum() > 1000
        assert (noisy - clean)[inside].std() == pytest.approx(0.05, rel=0.1)
        assert noisy.min() >= 0 and noisy.max() <= 1


def test_patchcore_is_refused_at_fit_start(tmp_path: Path) -> None:
    model = Patchcore(
        backbone="resnet18", pre_trained=False, pre_processor=Patchcore.configure_pre_processor((SIZE,) * 2)
    )
    with pytest.raises(NotGradientTrainedError, match="does not apply to Patchcore"):
        _fit(model, [AdversarialTraining()], tmp_path)


def test_cli_long_form(tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    output = anomalib_cli(
        *["train", *FASTFLOW, *DATA, "--trainer.max_steps", "2", "--default_root_dir", "runs",
         "--trainer.callbacks+", "anomalib_robust.defenses.training.AdversarialTraining",
         "--trainer.callbacks.init_args.steps", "2", "--trainer.callbacks.init_args.eps", str(EPS)],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Adversarial training of Fastflow: PGD Linf eps=0.0156863, 2 steps" in output
    assert "Adversarial training of Fastflow: 2 batches attacked." in output
    assert list((tmp_path / "runs").rglob("*.ckpt"))


def test_cli_shorthand(tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    """``--callbacks adversarial_training`` (registered by ``anomalib_robust.defenses``)."""
    output = anomalib_cli(
        *["fit", *FASTFLOW, *DATA, "--trainer.max_steps", "2", "--default_root_dir", "runs",
         "--callbacks", "adversarial_training", "--callbacks.init_args.steps", "1"],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Adversarial training of Fastflow: PGD Linf eps=0.00784314, 1 steps" in output
    assert "Adversarial training of Fastflow: 2 batches attacked." in output


def test_cli_gaussian_noise_yaml(tmp_path: Path, anomalib_cli: Callable[..., str]) -> None:
    output = anomalib_cli(
        *["fit", *FASTFLOW, *DATA, "--trainer.max_steps", "2", "--default_root_dir", "runs",
         "--trainer.callbacks+", str(REPO / "configs/callbacks/gaussian_noise_training.yaml")],
        cwd=tmp_path,
    )  # fmt: skip
    assert "Gaussian-noise training of Fastflow: stds [0.0, 0.005, 0.01, 0.05, 0.1]" in output
    assert "Gaussian-noise training of Fastflow: 2 batches augmented." in output


def test_example_tiny(run_example: Callable[..., str], tmp_path: Path) -> None:
    output = run_example("adversarial_training_stfpm.py", "--tiny", "--root", "embedded", "--results", "results",
                         cwd=tmp_path)  # fmt: skip
    assert "Adversarial training of Stfpm: 2 batches attacked." in output
    lines = [line.split() for line in output.splitlines() if line.startswith(("standard ", "adversarial "))]
    assert [line[0] for line in lines] == ["standard", "adversarial"]
    for _, standard, robust in lines:  # AUROC in percent: the attack never raises it (Stfpm is deterministic)
        assert 0 <= float(robust) <= float(standard) + 0.1 <= 100.1
    for run in ("standard", "adversarial"):
        report = json.loads((tmp_path / "results" / run / "robust_eval/linf/report.json").read_text())
        assert report["model"] == "Stfpm" and report["results"][0]["attack"] == "PGD"
