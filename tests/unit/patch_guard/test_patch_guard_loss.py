"""Loss terms are finite, the regularisers raise attention entropy and degree when minimised."""

import math

import pytest
import torch

from anomalib_robust.models.patch_guard.loss import (
    PatchGuardLoss,
    attention_degree,
    attention_entropy,
    kl_uniform_regularizer,
    patch_bce,
)
from anomalib_robust.models.patch_guard.torch_model import PatchGuardModel


def test_loss_terms_are_finite_on_the_model(tiny_model: PatchGuardModel) -> None:
    tiny_model.train()
    output = tiny_model(torch.rand(4, 3, 16, 16))
    labels = (torch.rand(4, 16) > 0.7).float()
    losses = PatchGuardLoss(attention_weights=(0.01, 0.05))(output.patch_logits, labels, output.attentions)
    assert set(losses) == {"loss", "bce", "regularization"}
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["regularization"] > 0
    torch.testing.assert_close(losses["loss"], losses["bce"] + losses["regularization"])


def test_patch_bce_sums_patches_and_averages_images() -> None:
    logits = torch.zeros(2, 5)
    assert patch_bce(logits, torch.ones(2, 5)).item() == pytest.approx(5 * math.log(2))
    with pytest.raises(ValueError, match="patch_labels must have the shape"):
        patch_bce(logits, torch.ones(2, 4))


def test_kl_uniform_is_zero_for_uniform_attention_and_positive_otherwise() -> None:
    uniform = torch.full((1, 1, 4, 4), 0.25)
    assert kl_uniform_regularizer(uniform).item() == pytest.approx(0.0, abs=1e-6)
    peaked = torch.softmax(torch.randn(1, 1, 4, 4) * 5, dim=-1)
    assert kl_uniform_regularizer(peaked) > 0


@pytest.mark.parametrize("regularizer", ["kl_uniform", "degree"])
def test_minimising_the_regulariser_raises_attention_entropy(regularizer: str, tiny_model: PatchGuardModel) -> None:
    """Toy: sharpen the backbone's attention, then descend on the regulariser alone; entropy and degree go up."""
    tiny_model.train()
    with torch.no_grad():  # peaked attention to start from: large query/key weights
        for block in tiny_model.backbone.blocks:
            block.attn.qkv.weight[:64] *= 20.0  # entropy ~0.8 of at most log(17) = 2.8
    images = torch.rand(8, 3, 16, 16)
    loss = PatchGuardLoss(attention_weights=(1.0, 1.0), regularizer=regularizer)
    optimizer = torch.optim.Adam(tiny_model.backbone.parameters(), lr=3e-3)

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            attentions = tiny_model.patch_logits(images, return_attention=True).attentions
        entropy = sum(attention_entropy(a) for a in attentions) / len(attentions)
        degree = sum(attention_degree(a).float().mean() for a in attentions) / len(attentions)
        return float(entropy), float(degree)

    entropy_before, degree_before = measure()
    for _ in range(30):
        attentions = tiny_model.patch_logits(images, return_attention=True).attentions
        optimizer.zero_grad()
        loss.regularization(attentions).backward()
        optimizer.step()
    entropy_after, degree_after = measure()
    assert entropy_after > entropy_before + 0.2
    assert degree_after > degree_before


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="regularizer must be one of"):
        PatchGuardLoss(regularizer="entropy")
    with pytest.raises(ValueError, match="attention_weights must be non-negative"):
        PatchGuardLoss(attention_weights=(-1.0,))
    with pytest.raises(ValueError, match="expected 3 attention maps"):
        PatchGuardLoss().regularization([torch.full((1, 1, 4, 4), 0.25)])
