"""The adversarial-training PGD stays in the eps-ball, flips patch labels and leaves parameter gradients alone."""

import pytest
import torch

from anomalib_robust.models.patch_guard.adversarial import (
    check_attack_settings,
    label_flip_objective,
    patch_label_flip_pgd,
)
from anomalib_robust.models.patch_guard.torch_model import PatchGuardModel


def test_objective_flips_normal_and_anomalous_patches() -> None:
    logits = torch.tensor([[1.0, 3.0, -1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    labels = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # image 0: mean normal 2 - mean anomalous 2 = 0; image 1: mean normal 2 - (no anomalous patches) 0 = 2
    assert label_flip_objective(logits, labels).item() == pytest.approx(2.0)


@pytest.mark.parametrize("eps", [8 / 255, 2 / 255])
def test_adversarial_images_stay_in_the_eps_ball_and_raise_the_objective(
    eps: float, tiny_model: PatchGuardModel
) -> None:
    tiny_model.eval()
    images = torch.rand(4, 3, 16, 16)
    labels = (torch.rand(4, 16) > 0.5).float()

    def logits(x: torch.Tensor) -> torch.Tensor:
        return tiny_model.patch_logits(x).patch_logits

    adversarial = patch_label_flip_pgd(logits, images, labels, eps=eps, steps=5)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not adversarial.requires_grad
    with torch.no_grad():
        assert label_flip_objective(logits(adversarial), labels) > label_flip_objective(logits(images), labels)
    assert all(parameter.grad is None for parameter in tiny_model.parameters())


def test_random_start_also_stays_in_the_ball(tiny_model: PatchGuardModel) -> None:
    images = torch.rand(2, 3, 16, 16)
    adversarial = patch_label_flip_pgd(
        lambda x: tiny_model.patch_logits(x).patch_logits, images, torch.zeros(2, 16), eps=4 / 255, steps=2,
        random_init=True,
    )  # fmt: skip
    assert (adversarial - images).abs().max() <= 4 / 255 + 1e-6


def test_default_step_is_the_official_two_over_255() -> None:
    assert check_attack_settings(8 / 255, 10, None) == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    ("eps", "steps", "alpha", "match"),
    [(0.0, 10, None, "adversarial_eps"), (2.0, 10, None, "adversarial_eps"), (0.03, 0, None, "adversarial_steps"),
     (0.03, 2.5, None, "adversarial_steps"), (0.03, 10, -1.0, "adversarial_alpha")],
)  # fmt: skip
def test_bad_attack_settings_raise(eps: float, steps: int, alpha: float | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_attack_settings(eps, steps, alpha)
