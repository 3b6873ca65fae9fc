"""Shapes, differentiable attention capture, top-k scoring, anomaly maps and bad-input errors of the torch model."""

import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_robust.models.patch_guard.torch_model import (
    PatchGuardModel,
    PatchGuardOutput,
    patch_labels_from_mask,
    scaled_attention_layers,
)


def test_training_forward_shapes(tiny_model: PatchGuardModel) -> None:
    tiny_model.train()
    output = tiny_model(torch.rand(3, 3, 16, 16))
    assert isinstance(output, PatchGuardOutput)
    assert output.patch_logits.shape == (3, 16)
    assert tiny_model.attention_layers == (1, 2)
    assert [tuple(a.shape) for a in output.attentions] == [(3, 2, 16, 16)] * 2


def test_backbone_tokens_are_patch_tokens_after_the_final_norm(tiny_model: PatchGuardModel) -> None:
    tokens = tiny_model.backbone.forward_features(torch.rand(2, 3, 16, 16))
    assert tokens.shape == (2, 1 + 16, 32)  # CLS + 4 x 4 patches; the model drops the CLS token


def test_captured_attention_is_the_softmax_and_has_gradients(tiny_model: PatchGuardModel) -> None:
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    attentions = tiny_model.patch_logits(images, return_attention=True).attentions
    # Rows of the full (CLS + patches) softmax sum to 1; without the CLS column they sum to a bit less.
    row_sums = attentions[0].sum(dim=-1)
    assert torch.all(row_sums <= 1 + 1e-5) and torch.all(row_sums > 0.5)
    assert all(attention.requires_grad for attention in attentions)
    attentions[-1].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    qkv = tiny_model.backbone.blocks[1].attn.qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_fused_attention_cannot_silently_bypass_the_capture(tiny_model: PatchGuardModel) -> None:
    tiny_model.backbone.blocks[0].attn.fused_attn = True
    with pytest.raises(RuntimeError, match="fused attention"):
        tiny_model.patch_logits(torch.rand(1, 3, 16, 16), return_attention=True)


def test_eval_forward_returns_inference_batch_with_top_k_score(tiny_model: PatchGuardModel) -> None:
    tiny_model.eval()
    images = torch.rand(2, 3, 16, 16)
    output = tiny_model(images)
    assert isinstance(output, InferenceBatch)
    assert output.pred_score.shape == (2,)
    assert output.anomaly_map.shape == (2, 1, 16, 16)
    logits = tiny_model.patch_logits(images).patch_logits
    expected = logits.sort(dim=1, descending=True).values[:, :3].mean(dim=1)
    torch.testing.assert_close(output.pred_score, expected)


def test_anomaly_map_is_upsampled_and_smoothed_logits(tiny_model: PatchGuardModel) -> None:
    logits = torch.zeros(1, 16)
    logits[0, 5] = 10.0  # patch (row 1, column 1): pixels 4..7 x 4..7
    anomaly_map = tiny_model.anomaly_map(logits)[0, 0]
    peak = torch.nonzero(anomaly_map == anomaly_map.max())[0]
    assert 4 <= peak[0] <= 7 and 4 <= peak[1] <= 7
    assert anomaly_map.max() < 10.0  # smoothed
    assert anomaly_map[15, 15] < 0.1 * anomaly_map.max()


def test_eval_score_is_differentiable_for_attacks(tiny_model: PatchGuardModel) -> None:
    tiny_model.eval()
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    tiny_model(images).pred_score.sum().backward()
    assert images.grad.abs().sum() > 0


def test_scaled_attention_layers() -> None:
    assert scaled_attention_layers(12) == (6, 9, 12)
    assert scaled_attention_layers(4) == (2, 3, 4)
    assert scaled_attention_layers(2) == (1, 2)
    with pytest.raises(ValueError, match="depth"):
        scaled_attention_layers(0)


def test_patch_labels_from_mask() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[0, 5, 2] = 1  # patch row 1, column 0 of a 2 x 2 grid of 4 x 4 patches
    assert patch_labels_from_mask(mask, 4).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_labels_from_mask(torch.zeros(1, 9, 8), 4)


def test_pretrained_weights_are_loaded_from_a_file(tiny_model: PatchGuardModel, tiny_args: dict, tmp_path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(tiny_model.backbone.state_dict(), path)
    loaded = PatchGuardModel(**tiny_args, pretrained_weights=path)
    torch.testing.assert_close(loaded.backbone.pos_embed, tiny_model.backbone.pos_embed)
    torch.testing.assert_close(loaded.backbone.blocks[1].mlp.fc2.weight, tiny_model.backbone.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="pretrained_weights must be an existing file"):
        PatchGuardModel(**tiny_args, pretrained_weights=tmp_path / "missing.pth")
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lacks backbone parameters"):
        PatchGuardModel(**tiny_args, pretrained_weights=tmp_path / "bad.pth")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": (18, 16)}, "image_size must be a multiple of patch_size=4"),
        ({"top_k": 17}, r"top_k must be an integer between 1 and the number of patches \(16\), got 17"),
        ({"top_k": 0}, "top_k"),
        ({"attention_layers": (3,)}, r"attention_layers must be 1-based block indices in \[1, 2\]"),
        ({"num_heads": 3}, "embed_dim must be divisible by num_heads"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides: dict, match: str, tiny_args: dict) -> None:
    with pytest.raises(ValueError, match=match):
        PatchGuardModel(**{**tiny_args, **overrides})


def test_wrong_image_shape_raises(tiny_model: PatchGuardModel) -> None:
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        tiny_model(torch.rand(1, 3, 32, 32))
