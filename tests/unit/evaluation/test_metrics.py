"""Rank AUROC on raw scores: equal to scikit-learn's where torchmetrics' sigmoid squashes, ties counted 1/2."""

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from anomalib_robust.evaluation.metrics import mean_and_std, paired_auroc_difference, pixel_auroc, rank_auroc


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


def _two_systems(count: int, shift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of one system ``(N, 3)`` and of a second one that lowers the anomalous scores by ``shift``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    first = torch.randn(count, 3, generator=generator, dtype=torch.float64) + labels[:, None]
    second = first + 0.3 * torch.randn(count, 3, generator=generator, dtype=torch.float64) - shift * labels[:, None]
    return first, second, labels


def test_paired_difference_is_the_difference_of_rank_aurocs_with_an_interval_around_it() -> None:
    first, second, labels = _two_systems(60, shift=0.8)
    result = paired_auroc_difference(first, second, labels)
    expected = sum(rank_auroc(second[:, r], labels) - rank_auroc(first[:, r], labels) for r in range(3)) / 3
    assert result.difference == pytest.approx(expected, abs=1e-12)
    assert result.low < result.difference < result.high < 0  # a clear drop: the interval excludes zero
    assert result.excludes(0.0)
    swapped = paired_auroc_difference(second, first, labels)
    assert swapped.difference == pytest.approx(-result.difference) and swapped.low == pytest.approx(-result.high)


def test_paired_interval_is_zero_for_one_system_and_narrow_for_a_small_paired_change() -> None:
    """Pairing removes the images' own variation: a small change of the same scores has a narrow interval."""
    first, second, labels = _two_systems(60, shift=0.2)
    assert paired_auroc_difference(first, second, labels).high - paired_auroc_difference(first, second, labels).low < 0.2
    identical = paired_auroc_difference(first, first, labels)
    assert (identical.difference, identical.low, identical.high) == (0.0, 0.0, 0.0)
    assert not identical.excludes(0.0)


def test_paired_difference_covers_the_true_difference_at_its_level() -> None:
    """Over many test sets drawn from known distributions, the 90 % interval holds the population difference (1/2
    for AUROC(N(1, 1) vs N(0, 1)) shifted by 0.5 in the second system, computed from the normal CDF) about 90 % of
    the time."""
    normal = torch.distributions.Normal(0.0, 1.0)
    true = float(normal.cdf(torch.tensor(0.5 / 2**0.5)) - normal.cdf(torch.tensor(1 / 2**0.5)))
    covered = 0
    for seed in range(60):
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(80) % 2
        first = torch.randn(80, generator=generator, dtype=torch.float64) + labels
        second = torch.randn(80, generator=generator, dtype=torch.float64) + 0.5 * labels
        result = paired_auroc_difference(first, second, labels, resamples=500, level=0.9, seed=seed)
        covered += result.low <= true <= result.high
    assert 0.75 <= covered / 60 <= 0.99


def test_paired_difference_names_bad_input() -> None:
    first, second, labels = _two_systems(10, shift=0.1)
    with pytest.raises(ValueError, match="the same images"):
        paired_auroc_difference(first, second[:5], labels)
    with pytest.raises(ValueError, match="level must be in"):
        paired_auroc_difference(first, second, labels, level=1.0)
    with pytest.raises(ValueError, match="needs both classes"):
        paired_auroc_difference(first, second, torch.zeros(10))
