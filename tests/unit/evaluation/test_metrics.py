"""Rank AUROC on raw scores: equal to scikit-learn's where torchmetrics' sigmoid squashes, ties counted 1/2."""

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from anomalib_robust.evaluation.metrics import mean_and_std, pixel_auroc, rank_auroc


def _scores(offset: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    normal = offset + scale * torch.randn(300, generator=generator)
    anomalous = offset + scale * (1 + torch.randn(300, generator=generator))
    return torch.cat([normal, anomalous]), torch.cat([torch.zeros(300), torch.ones(300)]).long()


@pytest.mark.parametrize(("offset", "scale"), [(20.0, 1.0), (-50.0, 1.0), (1e6, 1e4), (0.0, 1e-3)])
def test_matches_scikit_learn_on_raw_scores(offset: float, scale: float) -> None:
    scores, labels = _scores(offset, scale)
    expected = roc_auc_score(labels.numpy(), scores.double().numpy())
    assert rank_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_large_scores_are_not_squashed_into_ties() -> None:
    scores, labels = _scores(20.0)  # torchmetrics' sigmoid maps all of them to 1.0 in float32
    assert rank_auroc(scores, labels) > 0.7
    assert float(binary_auroc(scores, labels)) == pytest.approx(0.5)


def test_ties_count_one_half() -> None:
    assert rank_auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5
    assert rank_auroc(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875)
    assert rank_auroc(torch.tensor([3.0, 1.0]), torch.tensor([0, 1])) == 0.0


def test_pixel_auroc_and_repeats() -> None:
    maps = torch.tensor([[[0.0, 5.0], [1.0, 2.0]]])
    masks = torch.tensor([[[False, True], [False, True]]])
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(maps, torch.zeros_like(masks)) is None
    mean, std = mean_and_std([0.5, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1414, abs=1e-4)
    assert mean_and_std([0.8]) == (0.8, 0.0)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="both classes"):
        rank_auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="finite"):
        rank_auroc(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same number"):
        rank_auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        rank_auroc(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
