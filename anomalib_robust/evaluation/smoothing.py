"""Randomised smoothing of an anomaly score: certified predictions, radii and certified AUC (AdvRAD paper, sec. 5.7).

For a threshold ``h`` the base classifier is eq. (4): ``f(x) = anomaly`` if ``A(x) > h``, else ``normal``. The smoothed
classifier ``g`` returns the class that ``f(x + delta)``, ``delta ~ N(0, sigma^2 I)``, outputs with probability above
1/2. Theorem 5.1 (after Cohen et al., 2019, Thm. 1): if ``P[f(x + delta) = c] >= p_lower > 1/2`` then ``g`` returns
``c`` for every perturbation of L_2 norm below ``R(h) = sigma * Phi^-1(p_lower)``.

:func:`certify` is Cohen et al.'s CERTIFY per threshold: ``n0`` selection draws pick the majority class ``c``, ``n``
independent estimation draws give ``p_lower``, the one-sided Clopper-Pearson lower bound at confidence ``1 - alpha``
on ``P[f(x + delta) = c]``; the prediction is ``c`` with radius ``R(h)`` if ``p_lower > 1/2``, and an abstention
otherwise. With probability at least ``1 - alpha`` per image and threshold, a non-abstaining prediction is the
smoothed classifier's and is constant within ``R(h)``.

What is certified: the smoothed detector ``g`` at threshold ``h`` (not the base detector ``A``), at confidence
``1 - alpha``. The smoothed prediction at ``h`` is ``anomaly`` iff the median of ``A(x + delta)`` exceeds ``h``, so the
smoothed score ranked by the certified ROC is that median (:func:`smoothed_score`). Certified TPR/FPR at radius
``eps`` (:func:`certified_roc`): an image counts as correctly classified only if its prediction equals its label
AND its radius is at least ``eps``; abstentions count as failures (a missed anomaly, or a false alarm on a normal
image). The certified AUC is the trapezoidal area under these points over all thresholds.

Scale: ``sigma`` and radii are in the [0, 1] pixel scale of the images given to the detector (before its
pre-processor), L_2 over all ``C * H * W`` values; the noisy images are not clipped to [0, 1], as in Cohen et al.

The ``n0 + n`` noisy scores of an image are drawn once (:func:`noisy_scores`) and reused for every threshold; all
thresholds are evaluated at once from the sorted scores.

Example:
    >>> import torch
    >>> from anomalib_robust.evaluation.smoothing import certified_auc, certify, noisy_scores
    >>> images, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    >>> images[3:] += 1.0  # brighter images are anomalous for the mean-brightness detector below
    >>> def score(x):
    ...     return x.mean(dim=(1, 2, 3))
    >>> generator = torch.Generator().manual_seed(0)
    >>> selection = noisy_scores(score, images, sigma=0.25, num=20, generator=generator)
    >>> estimation = noisy_scores(score, images, sigma=0.25, num=200, generator=generator)
    >>> result = certify(selection, estimation, sigma=0.25, alpha=0.001)
    >>> round(certified_auc(result, labels, radius=0.0), 3)
    1.0
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, norm


@dataclass
class Certification:
    """CERTIFY outputs of ``B`` images at ``T`` thresholds.

    Attributes:
        thresholds: ``(T,)`` thresholds ``h`` on the raw anomaly score.
        prediction: ``(B, T)`` smoothed prediction: ``1`` anomaly, ``0`` normal, ``-1`` abstain.
        p_lower: ``(B, T)`` Clopper-Pearson lower bound on the probability of the selected class.
        radius: ``(B, T)`` certified L_2 radius ``sigma * Phi^-1(p_lower)`` (Theorem 5.1); ``0`` on abstention.
        smoothed_score: ``(B,)`` median noisy score of the selection draws (:func:`smoothed_score`).
        sigma: noise standard deviation, [0, 1] pixel scale.
        alpha: the bound holds with probability at least ``1 - alpha``.
    """

    thresholds: torch.Tensor
    prediction: torch.Tensor
    p_lower: torch.Tensor
    radius: torch.Tensor
    smoothed_score: torch.Tensor
    sigma: float
    alpha: float

    @property
    def abstain_rate(self) -> torch.Tensor:
        """``(T,)`` fraction of images on which the smoothed detector abstains, per threshold."""
        return (self.prediction < 0).double().mean(dim=0)


def check_sigma(sigma: float) -> float:
    """``sigma`` as a float, or a ValueError unless it is finite and > 0."""
    if not isinstance(sigma, int | float) or not 0 < float(sigma) < float("inf"):
        msg = f"sigma must be a finite noise standard deviation > 0 (in the [0, 1] pixel scale), got {sigma!r}."
        raise ValueError(msg)
    return float(sigma)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or a ValueError unless 0 < alpha < 1."""
    if not isinstance(alpha, int | float) or not 0 < float(alpha) < 1:
        msg = f"alpha must lie in the open interval (0, 1) (confidence 1 - alpha), got {alpha!r}."
        raise ValueError(msg)
    return float(alpha)


def check_samples(name: str, value: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be an integer number of noise draws >= 1, got {value!r}."
        raise ValueError(msg)
    return value


def check_radius(radius: float) -> float:
    """``radius`` as a float, or a ValueError unless it is finite and >= 0."""
    if not isinstance(radius, int | float) or not 0 <= float(radius) < float("inf"):
        msg = f"radius must be a finite L_2 radius >= 0 (in the [0, 1] pixel scale), got {radius!r}."
        raise ValueError(msg)
    return float(radius)


def clopper_pearson_lower(successes: torch.Tensor, trials: int, alpha: float) -> torch.Tensor:
    """One-sided Clopper-Pearson lower bound at confidence ``1 - alpha``: ``Beta^-1(alpha; k, n - k + 1)``, 0 if k = 0.

    Equals the lower end of the two-sided exact interval at confidence ``1 - 2 alpha`` (Cohen et al.'s
    ``proportion_confint(k, n, alpha=2 * alpha, method="beta")``).
    """
    trials = check_samples("trials", trials)
    alpha = check_alpha(alpha)
    successes = torch.as_tensor(successes)
    if successes.numel() and (successes.min() < 0 or successes.max() > trials):
        msg = f"successes must lie in [0, trials={trials}], got values in [{successes.min()}, {successes.max()}]."
        raise ValueError(msg)
    k = successes.double().cpu().numpy()
    bound = beta.ppf(alpha, k, trials - k + 1)
    return torch.as_tensor(bound, dtype=torch.float64).nan_to_num(0.0).where(successes.cpu() > 0, 0.0)


def certified_radius(p_lower: torch.Tensor, sigma: float) -> torch.Tensor:
    """``R = sigma * Phi^-1(p_lower)`` of Theorem 5.1; meaningful (positive) only where ``p_lower > 1/2``."""
    sigma = check_sigma(sigma)
    p_lower = torch.as_tensor(p_lower, dtype=torch.float64)
    return sigma * torch.as_tensor(norm.ppf(p_lower.cpu().numpy()), dtype=torch.float64)


def noisy_scores(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    sigma: float,
    num: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, num)`` scores ``A(x + delta)``, ``delta ~ N(0, sigma^2 I)``, in forward batches of ``batch_size`` images.

    Args:
        score_fn: maps images ``(N, C, H, W)`` in the [0, 1] scale to raw anomaly scores ``(N,)``.
        images: ``(B, C, H, W)`` clean images in [0, 1].
        sigma: noise standard deviation in the [0, 1] pixel scale.
        num: noise draws per image.
        batch_size: noisy images per call of ``score_fn``.
        generator: draws the Gaussian noise (the detector's own randomness uses its own source).
    """
    sigma = check_sigma(sigma)
    num = check_samples("num", num)
    batch_size = check_samples("batch_size", batch_size)
    if images.dim() != 4:
        msg = f"images must be a batch (B, C, H, W), got shape {tuple(images.shape)}."
        raise ValueError(msg)
    flat_index = torch.arange(images.shape[0] * num, device=images.device) // num
    scores = []
    for chunk in flat_index.split(batch_size):
        clean = images[chunk]
        noise = torch.randn(clean.shape, generator=generator, device=images.device, dtype=images.dtype)
        with torch.no_grad():
            scores.append(score_fn(clean + sigma * noise).reshape(-1))
    return torch.cat(scores).double().cpu().reshape(images.shape[0], num)  # one copy to the host, once all are scored


def smoothed_score(selection_scores: torch.Tensor) -> torch.Tensor:
    """``(B,)`` score whose comparison with ``h`` gives CERTIFY's selected class at every ``h``.

    The anomaly class is selected iff more than half of the ``n0`` selection scores exceed ``h``, i.e. iff ``h`` is
    below the ``(floor(n0 / 2) + 1)``-th largest score: the median for odd ``n0``.
    """
    n0 = selection_scores.shape[1]
    return selection_scores.sort(dim=1, descending=True).values[:, n0 // 2]


def default_thresholds(scores: torch.Tensor) -> torch.Tensor:
    """Midpoints between consecutive distinct ``scores``: every distinct ROC point, no threshold on a score."""
    distinct = torch.unique(scores.double())
    return (distinct[1:] + distinct[:-1]) / 2


def certify(
    selection_scores: torch.Tensor,
    estimation_scores: torch.Tensor,
    sigma: float,
    alpha: float = 0.001,
    thresholds: torch.Tensor | None = None,
) -> Certification:
    """Cohen et al.'s CERTIFY for every threshold at once, from precomputed noisy scores.

    Args:
        selection_scores: ``(B, n0)`` noisy scores that select the class (majority vote of eq. (4)).
        estimation_scores: ``(B, n)`` independent noisy scores that estimate its probability.
        sigma: the noise level the scores were drawn with ([0, 1] pixel scale).
        alpha: failure probability of the Clopper-Pearson bound per image and threshold.
        thresholds: ``(T,)`` finite thresholds on the raw score; ``None`` for :func:`default_thresholds` of the
            smoothed scores. ``-inf`` and ``+inf`` (all anomaly / all normal) are always appended as the ROC ends.
    """
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    if selection_scores.dim() != 2 or estimation_scores.dim() != 2 or len(selection_scores) != len(estimation_scores):
        msg = (
            "selection_scores and estimation_scores must be (B, n0) and (B, n) for the same B images, got "
            f"{tuple(selection_scores.shape)} and {tuple(estimation_scores.shape)}."
        )
        raise ValueError(msg)
    n0 = check_samples("n0", selection_scores.shape[1])
    n = check_samples("n", estimation_scores.shape[1])
    median = smoothed_score(selection_scores.double().cpu())
    if thresholds is None:
        thresholds = default_thresholds(median)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1).cpu()
    if not torch.isfinite(thresholds).all():
        msg = f"thresholds must be finite, got {thresholds[~torch.isfinite(thresholds)].tolist()[:5]}."
        raise ValueError(msg)
    thresholds = torch.cat([thresholds, torch.tensor([-torch.inf, torch.inf], dtype=torch.float64)])
    grid = thresholds.expand(len(median), -1).contiguous()
    anomalous_votes = n0 - torch.searchsorted(selection_scores.double().cpu().sort(dim=1).values, grid, right=True)
    selected = (2 * anomalous_votes > n0).long()
    anomalous_counts = n - torch.searchsorted(estimation_scores.double().cpu().sort(dim=1).values, grid, right=True)
    counts = torch.where(selected.bool(), anomalous_counts, n - anomalous_counts)
    p_lower = clopper_pearson_lower(torch.arange(n + 1), n, alpha)[counts]
    certified = p_lower > 0.5
    radius = torch.where(certified, certified_radius(p_lower, sigma), 0.0)
    prediction = torch.where(certified, selected, -1)
    return Certification(thresholds, prediction, p_lower, radius, median, sigma, alpha)


def certified_roc(certification: Certification, labels: torch.Tensor, radius: float) -> tuple[torch.Tensor, ...]:
    """Certified ``(FPR, TPR)`` per threshold at L_2 radius ``radius``.

    TPR: anomalous images certified ``anomaly`` with radius ``>= radius``. FPR: normal images NOT certified
    ``normal`` with radius ``>= radius`` (an abstention or a too-small radius counts as a false alarm).
    """
    radius = check_radius(radius)
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() != certification.prediction.shape[0]:
        msg = f"labels must hold one label per image ({certification.prediction.shape[0]}), got {labels.numel()}."
        raise ValueError(msg)
    normal, anomalous = labels == 0, labels == 1
    if not normal.any() or not anomalous.any() or not (normal | anomalous).all():
        msg = f"labels must be 0 (normal) or 1 (anomalous) with both present, got {labels.unique().tolist()}."
        raise ValueError(msg)
    robust = certification.radius >= radius
    tpr = ((certification.prediction == 1) & robust)[anomalous].double().mean(dim=0)
    fpr = 1 - ((certification.prediction == 0) & robust)[normal].double().mean(dim=0)
    return fpr, tpr


def certified_auc(certification: Certification, labels: torch.Tensor, radius: float) -> float:
    """Certified AUC at ``radius``: trapezoidal area under the certified ROC points of all thresholds."""
    fpr, tpr = certified_roc(certification, labels, radius)
    order = torch.from_numpy(np.lexsort((tpr.numpy(), fpr.numpy())))
    return float(torch.trapezoid(tpr[order], fpr[order]))
