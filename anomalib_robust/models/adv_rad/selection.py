"""Choosing AdvRAD's diffusion step k and mean filter size s from the training images alone (never the test set).

k decides both how well AdvRAD detects and how robust it is: the Gaussian noise of step k must dominate the anomaly
and the adversarial perturbation while the image content survives (AdvRAD paper, sec. 4.3), and the best k differs
from category to category (appendix D.4, Tables 15 and 16: standard AUC falls past k = 200, robust AUC rises up to
k = 200 on MVTec AD). s is the mean filter f_{s x s} of Alg. 4, whose size the paper does not state.

This module holds what the choice needs besides the attack itself, which lives in
:class:`anomalib_robust.callbacks.SelectDiffusionStep` (models do not import the evaluation):

- :func:`held_out_split`: a seeded fraction of the training images, kept out of training;
- :class:`HeldOutDefects`: those images, half of them with a small synthetic defect made with anomalib's Perlin
  generator (:func:`anomalib_robust.data.defects.add_small_defect`, as the Fashion-MNIST ``defect`` protocol makes
  its test anomalies);
- :func:`choose_candidate`: the rule, the highest robust AUROC among the candidates whose standard AUROC is within
  ``margin`` of the best one;
- :class:`DiffusionStepChoice`: the candidates' numbers and the choice, stored in the model's checkpoints.

Example:
    >>> candidates = [
    ...     DiffusionStepCandidate(50, 5, standard=0.83, robust=0.65),
    ...     DiffusionStepCandidate(100, 5, standard=0.80, robust=0.70),
    ...     DiffusionStepCandidate(200, 5, standard=0.64, robust=0.72),
    ... ]
    >>> chosen = choose_candidate(candidates, margin=0.05)
    >>> chosen.diffusion_step, chosen.mean_filter_size
    (100, 5)
"""

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from torch.utils.data import Dataset

from anomalib_robust.data.defects import add_small_defect
from anomalib_robust.models.adv_rad.reconstruction import check_diffusion_step

CHECKPOINT_KEY = "adv_rad_diffusion_step_choice"
"""Where a checkpoint keeps the :class:`DiffusionStepChoice` (``DiffusionStepChoice.to_dict()``)."""


@dataclass
class DiffusionStepCandidate:
    """One setting tried: k, s, the noise draws and its image AUROC (mean and std over scorings)."""

    diffusion_step: int
    mean_filter_size: int
    standard: float
    robust: float
    standard_std: float = 0.0
    robust_std: float = 0.0
    num_noise_draws: int = 1
    seconds: float = 0.0


@dataclass
class DiffusionStepChoice:
    """The candidates' numbers, the rule's parameters and the chosen setting (``candidates[chosen]``).

    ``attack`` describes the attack behind ``robust`` (e.g. ``"EOT-4 PGD-5 Linf 2/255"``); ``num_normal`` and
    ``num_defective`` count the held-out images it was measured on; ``holdout`` and ``seed`` made the held-out split
    (:func:`held_out_split`), so the training split can be rebuilt from the same training set; ``eval_repeats`` counts
    the scorings behind each candidate's mean and std (1 in checkpoints written before it was recorded).
    """

    candidates: list[DiffusionStepCandidate]
    chosen: int
    margin: float
    attack: str
    num_normal: int
    num_defective: int
    holdout: float | None = None
    seed: int = 0
    seconds: float = 0.0
    eval_repeats: int = 1

    @property
    def diffusion_step(self) -> int:
        """The chosen k."""
        return self.candidates[self.chosen].diffusion_step

    @property
    def mean_filter_size(self) -> int:
        """The chosen s."""
        return self.candidates[self.chosen].mean_filter_size

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for a checkpoint (``torch.load(weights_only=True)`` reads it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiffusionStepChoice":
        """The inverse of :meth:`to_dict`."""
        values = dict(values)
        values["candidates"] = [DiffusionStepCandidate(**candidate) for candidate in values["candidates"]]
        return cls(**values)

    def summary(self) -> str:
        """One line for the logs: the choice, then every candidate's standard / robust AUROC in %."""
        cells = ", ".join(
            f"k={c.diffusion_step} s={c.mean_filter_size}: {100 * c.standard:.1f}/{100 * c.robust:.1f}"
            for c in self.candidates
        )
        return (
            f"k = {self.diffusion_step}, mean filter {self.mean_filter_size} (highest robust AUROC with standard AUROC "
            f"within {100 * self.margin:g} points of the best; {self.attack}, {self.num_normal} normal and "
            f"{self.num_defective} defective held-out training images; standard/robust %: {cells})"
        )


def check_candidates(
    diffusion_steps: Sequence[int], mean_filter_sizes: Sequence[int], num_timesteps: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate the candidate lists: non-empty, k in [1, T] (when T is given), s positive and odd."""
    steps, sizes = tuple(diffusion_steps), tuple(mean_filter_sizes)
    for name, values in (("diffusion_steps", steps), ("mean_filter_sizes", sizes)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            msg = f"{name} must be a non-empty list of positive integers, got {values!r}"
            raise ValueError(msg)
        if len(set(values)) != len(values):
            msg = f"{name} must not repeat a value, got {values!r}"
            raise ValueError(msg)
    if any(size % 2 == 0 for size in sizes):
        msg = f"mean_filter_sizes must be odd (a centred mean filter), got {sizes!r}"
        raise ValueError(msg)
    if num_timesteps is not None:
        for step in steps:
            check_diffusion_step(step, num_timesteps)
    return steps, sizes


def choose_candidate(candidates: Sequence[DiffusionStepCandidate], margin: float) -> DiffusionStepCandidate:
    """The highest robust AUROC among the candidates whose standard AUROC is at least the best one's minus ``margin``.

    Ties go to the higher standard AUROC, then to the smaller k (the least noise).
    """
    if not candidates:
        msg = "choose_candidate needs at least one candidate"
        raise ValueError(msg)
    if not 0 <= margin <= 1:
        msg = f"margin must be an AUROC difference in [0, 1], got {margin!r}"
        raise ValueError(msg)
    best_standard = max(candidate.standard for candidate in candidates)
    eligible = [candidate for candidate in candidates if candidate.standard >= best_standard - margin]
    return max(eligible, key=lambda c: (c.robust, c.standard, -c.diffusion_step, -c.mean_filter_size))


def held_out_split(dataset: AnomalibDataset, fraction: float, seed: int) -> tuple[AnomalibDataset, AnomalibDataset]:
    """``(training, held_out)``: a seeded ``fraction`` of ``dataset``'s images, at least 2, kept out of training."""
    if not 0 < fraction < 1:
        msg = f"holdout must be a fraction in (0, 1), got {fraction!r}"
        raise ValueError(msg)
    size = len(dataset)
    count = round(fraction * size)
    if count < 2 or count >= size:
        msg = (
            f"holdout={fraction} of {size} training images holds out {count}: the choice needs at least 2 (one normal, "
            "one with a defect) and training at least 1; use more training images or another holdout"
        )
        raise ValueError(msg)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subsample(sorted(order[count:])), dataset.subsample(sorted(order[:count]))


class HeldOutDefects(Dataset):
    """Held-out normal images, a seeded half of them with one small synthetic defect each (label 1, with its mask).

    ``images`` yields items with an ``image`` in [0, 1] (``(C, H, W)``, H and W at least 32) and an ``image_path``,
    e.g. an anomalib dataset. The defect is drawn by :func:`~anomalib_robust.data.defects.add_small_defect` on the
    channel mean and painted into every channel, so a grayscale image (Fashion-MNIST) gets exactly the ``defect``
    protocol's defects and a colour image a gray one. Items keep the source ``image_path``.
    """

    def __init__(self, images: Dataset, seed: int = 0) -> None:
        count = len(images)
        defective = set(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: count // 2].tolist())
        self.items = [self._item(images[index], index in defective, seed * 100_000 + index) for index in range(count)]
        self.collate_fn = ImageBatch.collate

    @staticmethod
    def _item(item: ImageItem, defective: bool, seed: int) -> ImageItem:
        image = torch.as_tensor(item.image).float()
        mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
        if defective:
            gray = image.mean(0, keepdim=True).mul(255).round().clamp(0, 255).to(torch.uint8)
            painted, mask = add_small_defect(gray, seed=seed)
            image = torch.where(mask, painted.float() / 255, image)
        return ImageItem(image=image, gt_label=torch.tensor(int(defective)), gt_mask=mask, image_path=item.image_path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return copy.copy(self.items[index])
