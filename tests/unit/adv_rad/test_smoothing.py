"""Randomised-smoothing certification: Clopper-Pearson, R(h), analytical radius, certified AUC, bad input."""

import itertools

import pytest
import torch
from scipy.stats import binomtest, norm

from anomalib_robust.evaluation.metrics import rank_auroc
from anomalib_robust.evaluation.smoothing import (
    certified_auc,
    certified_radius,
    certify,
    clopper_pearson_lower,
    noisy_scores,
)

SIGMA = 0.25


def _mean_score(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def _toy_data(count: int = 12, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-brightness detector: ``A(x + delta) ~ N(mean(x), sigma^2 / d)``, anomalies are brighter."""
    levels = torch.linspace(0.1, 0.9, count)
    images = levels.reshape(-1, 1, 1, 1).expand(-1, 1, size, size).clone()
    labels = (levels > 0.45).long()
    labels[[2, -3]] = 1 - labels[[2, -3]]  # two mistakes, so that the AUROC is below 1
    return images, labels


def _certify(seed: int = 0, n0: int = 50, n: int = 2000, sigma: float = SIGMA, **kwargs: object) -> tuple:
    images, labels = _toy_data()
    generator = torch.Generator().manual_seed(seed)
    selection = noisy_scores(_mean_score, images, sigma, n0, generator=generator)
    estimation = noisy_scores(_mean_score, images, sigma, n, generator=generator)
    return certify(selection, estimation, sigma=sigma, **kwargs), labels, images


@pytest.mark.parametrize(("k", "n", "alpha"), [(1, 10, 0.05), (57, 100, 0.001), (999, 1000, 0.01), (10, 10, 0.1)])
def test_clopper_pearson_matches_scipy_exact_interval(k: int, n: int, alpha: float) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert float(clopper_pearson_lower(torch.tensor(k), n, alpha)) == pytest.approx(expected, rel=1e-9)
    assert float(clopper_pearson_lower(torch.tensor(0), n, alpha)) == 0.0


def test_radius_formula() -> None:
    p = torch.tensor([0.6, 0.9, 0.999])
    torch.testing.assert_close(
        certified_radius(p, 0.5), 0.5 * torch.as_tensor(norm.ppf(p.numpy()), dtype=torch.float64)
    )
    assert float(certified_radius(torch.tensor(0.5), 1.0)) == 0.0


def test_toy_detector_gives_analytical_radius() -> None:
    """``A = mean`` over d = 16 pixels: ``P[A(x + delta) > h] = Phi((m - h) sqrt(d) / sigma)``, so for a large n
    the certified radius approaches ``sigma * Phi^-1(Phi((m - h) * 4 / sigma)) = 4 (m - h)``."""
    result, _, images = _certify(n=20000, alpha=0.001, thresholds=torch.tensor([0.5]))
    means = images.mean(dim=(1, 2, 3)).double()
    exact_p = torch.as_tensor(norm.cdf((abs(means - 0.5) * 4 / SIGMA).numpy()), dtype=torch.float64)
    clear = (exact_p > 0.6) & (exact_p < 0.995)  # not too close to h (abstains) nor far (p_lower capped by n)
    assert clear.sum() >= 2
    expected = 4 * (means - 0.5).abs()
    assert torch.equal(result.prediction[clear, 0], (means[clear] > 0.5).long())
    assert (result.radius[clear, 0] <= expected[clear] + 0.01).all()  # a lower bound, up to Monte Carlo error
    torch.testing.assert_close(result.radius[clear, 0], expected[clear], atol=0.03, rtol=0)


def test_certified_auc_at_radius_zero_is_auroc_of_smoothed_scores() -> None:
    result, labels, _ = _certify()
    assert (result.prediction >= 0).all(), "the toy setting must not abstain"
    expected = rank_auroc(result.smoothed_score, labels)
    assert expected < 1.0
    assert certified_auc(result, labels, radius=0.0) == pytest.approx(expected, abs=1e-12)


def test_larger_radius_never_raises_certified_auc() -> None:
    result, labels, _ = _certify(n=300, sigma=0.5)
    aucs = [certified_auc(result, labels, radius) for radius in torch.linspace(0, 2.5, 26).tolist()]
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(aucs))
    assert aucs[-1] == 0.0  # beyond the largest certifiable radius nothing is certified


def test_abstentions_count_as_failures() -> None:
    result, labels, _ = _certify(n=5, alpha=0.2)  # p_lower of 5/5 is 0.2 ** (1/5) = 0.72; 4/5 abstains
    assert (result.prediction < 0).any()
    assert result.abstain_rate.max() > 0
    assert certified_auc(result, labels, 0.0) < rank_auroc(result.smoothed_score, labels)


def test_reproducible_with_seed() -> None:
    first, labels, _ = _certify(seed=3, n=100)
    second, _, _ = _certify(seed=3, n=100)
    third, _, _ = _certify(seed=4, n=100)
    assert torch.equal(first.radius, second.radius)
    assert certified_auc(first, labels, 0.1) == certified_auc(second, labels, 0.1)
    assert not torch.equal(first.p_lower, third.p_lower)


def test_batching_does_not_change_scores() -> None:
    images, _ = _toy_data()
    scores = [
        noisy_scores(_mean_score, images, SIGMA, 7, batch_size=size, generator=torch.Generator().manual_seed(0))
        for size in (5, 84)
    ]
    torch.testing.assert_close(scores[0], scores[1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: certify(s, s, sigma=0.0), "sigma"),
        (lambda s: certify(s, s, sigma=-1.0), "sigma"),
        (lambda s: certify(s[:, :0], s, sigma=0.1), "n0"),
        (lambda s: certify(s, s[:, :0], sigma=0.1), "n must"),
        (lambda s: certify(s, s, sigma=0.1, alpha=1.0), "alpha"),
        (lambda s: certify(s, s, sigma=0.1, alpha=0.0), "alpha"),
        (lambda s: certify(s, s, sigma=0.1, thresholds=torch.tensor([0.1, float("nan")])), "finite"),
        (lambda s: certify(s, s, sigma=0.1, thresholds=torch.tensor([float("inf")])), "finite"),
        (lambda s: certified_auc(certify(s, s, sigma=0.1), torch.tensor([0, 1]), radius=-0.1), "radius"),
        (lambda s: noisy_scores(_mean_score, torch.rand(2, 1, 2, 2), 0.1, num=0), "num"),
    ],
)
def test_bad_input_is_named(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, 5))
