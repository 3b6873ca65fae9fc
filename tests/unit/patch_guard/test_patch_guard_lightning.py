"""The Lightning module: configs and preset agree, a training step gives finite losses, bad arguments are rejected."""

from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import ImageBatch

from anomalib_robust import PatchGuard
from anomalib_robust.models.patch_guard.lightning_model import CPU_PRESET

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "model"


@pytest.fixture
def tiny(tiny_args: dict) -> dict:
    """The tiny model of conftest.py as a Lightning model: two regularised blocks, 2-step adversarial training."""
    return {**tiny_args, "attention_weights": (0.01, 0.05), "adversarial_steps": 2}


def test_cpu_preset_yaml_matches_python_preset() -> None:
    init_args = yaml.safe_load((CONFIGS / "patch_guard_cpu.yaml").read_text())["model"]["init_args"]
    assert {name: tuple(v) if isinstance(v, list) else v for name, v in init_args.items()} == CPU_PRESET


def test_paper_yaml_lists_the_constructor_defaults() -> None:
    init_args = yaml.safe_load((CONFIGS / "patch_guard.yaml").read_text())["model"]["init_args"]
    model = PatchGuard()
    for name, value in init_args.items():
        expected = model.hparams[name]
        assert (list(expected) if isinstance(expected, tuple) else expected) == pytest.approx(value), name
    assert model.model.attention_layers == (6, 9, 12) and model.model.num_patches == 256


def _batch(size: int = 16, batch: int = 2) -> ImageBatch:
    return ImageBatch(image=torch.rand(batch, 3, size, size), gt_label=torch.zeros(batch, dtype=torch.bool))


@pytest.mark.parametrize("adversarial_training", [False, True])
@pytest.mark.parametrize("regularizer", ["kl_uniform", "degree"])
def test_training_step_gives_a_finite_differentiable_loss(
    tiny: dict, adversarial_training: bool, regularizer: str
) -> None:
    model = PatchGuard(**tiny, adversarial_training=adversarial_training, regularizer=regularizer)
    model.log = model.log_dict = lambda *args, **kwargs: None
    model.train()
    loss = model.training_step(_batch())["loss"]
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    head = model.model.discriminator.head.weight
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_gradcam_foreground_needs_an_estimator(tiny: dict) -> None:
    model = PatchGuard(**tiny, foreground="gradcam")
    model.log = model.log_dict = lambda *args, **kwargs: None
    with pytest.raises(RuntimeError, match="set_foreground_estimator"):
        model.training_step(_batch())
    with pytest.raises(TypeError, match="estimator must be a ForegroundEstimator"):
        model.set_foreground_estimator(object())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": (18, 18)}, "multiple of patch_size"),
        ({"top_k": 100}, "top_k must be an integer between 1 and the number of patches"),
        ({"adversarial_eps": -0.1}, "adversarial_eps"),
        ({"adversarial_steps": 0}, "adversarial_steps"),
        ({"attention_weights": (0.1,)}, "one weight per regularised block"),
        ({"regularizer": "l2"}, "regularizer must be one of"),
        ({"foreground": "magic"}, "foreground mode must be one of"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_bad_arguments_raise_clear_errors(tiny: dict, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PatchGuard(**{**tiny, **overrides})


def test_pre_processor_resizes_only(tiny: dict) -> None:
    model = PatchGuard(**tiny)
    resized = model.pre_processor.transform(torch.rand(1, 3, 40, 40))
    assert resized.shape == (1, 3, 16, 16)


def test_training_with_a_gradcam_foreground_from_a_user_classifier(tiny: dict) -> None:
    from torch import nn

    from anomalib_robust.models.patch_guard.foreground import ForegroundEstimator

    classifier = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    model = PatchGuard(**tiny, foreground="gradcam", adversarial_training=False)
    model.set_foreground_estimator(ForegroundEstimator("gradcam", classifier=classifier, target_layers=[classifier[0]]))
    model.log = model.log_dict = lambda *args, **kwargs: None
    assert torch.isfinite(model.training_step(_batch())["loss"])
