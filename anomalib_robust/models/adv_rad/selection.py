"""Choosing AdvRAD's diffusion step k and mean filter size s from the training images alone (never the test set).

k decides both how well AdvRAD detects and how robust it is: the Gaussian noise of step k must dominate the anomaly
and the adversarial perturbation while the image content survives (AdvRAD paper, sec. 4.3), and the best k differs
from category to category (appendix D.4, Tables 15 and 16: standard AUC falls past k = 200, robust AUC rises up to
k = 200 on MVTec AD). s is the mean filter f_{s x s} of Alg. 4, whose size the paper does not state.

This module holds what the choice needs besides the attack itself, which lives in
:class:`anomalib_robust.callbacks.SelectDiffusionStep` (models do not import the evaluation):

- :func:`held_out_split`: a seeded fraction of the training images, kept out of training;
- :class:`HeldOutDefects`: those images, clean and with each of two kinds of small, often faint defects (anomalib's
  Perlin generator, :func:`anomalib_robust.data.defects.add_small_defect`, and a self-CutPaste patch) on the object;
- :class:`DiffusionStepChoice`: the candidates' numbers and the choice, stored in the model's checkpoints.

The rule that picks a candidate, with its paired comparisons, is
:func:`anomalib_robust.callbacks.diffusion_step.choose_candidate`.
"""

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from anomalib.data import ImageBatch, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from torch.utils.data import Dataset

from anomalib_robust.data.defects import add_small_defect, as_uint8, object_region
from anomalib_robust.models.adv_rad.reconstruction import check_diffusion_step
from anomalib_robust.models.patch_guard.pseudo_anomaly import PseudoAnomalyGenerator

CHECKPOINT_KEY = "adv_rad_diffusion_step_choice"
"""Where a checkpoint keeps the :class:`DiffusionStepChoice` (``DiffusionStepChoice.to_dict()``)."""

LOCAL_DEFECTS = (
    "assumes local defects: the held-out anomalies are small synthetic defects on the object (Perlin, CutPaste), so "
    "the choice suits small local defects; for anomalies that change the whole image (another object or class) "
    "prefer the paper's k = 100 (on Fashion-MNIST's semantic protocol the choice was 7.4 robust AUROC points below "
    "k = 100, docs/benchmarks.md)"
)
"""What the choice assumes about the anomalies, stated with every choice (its log line and its record)."""


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
    labels: list[int] | None = None
    """The evaluated images' labels (1: defective), in the order of the scores below."""
    standard_scores: list[list[float]] | None = None
    """Per image, the raw clean scores of every deployed scoring, for paired comparisons between candidates."""
    robust_scores: list[list[float]] | None = None
    """Per image, the raw scores of the attacked image in every deployed scoring."""


@dataclass
class DiffusionStepChoice:
    """The candidates' numbers, the rule's parameters and the chosen setting (``candidates[chosen]``).

    ``attack`` describes the attack behind ``robust`` (e.g. ``"EOT-8 PGD-10 Linf 2/255"``); ``num_normal`` and
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
    tied: list[int] | None = None
    """The candidates (indices, the chosen one included) that the paired comparison on the held-out images could not
    separate from the chosen one on robust AUROC; ``None`` in checkpoints written before it was recorded."""
    assumption: str = LOCAL_DEFECTS
    """What the choice assumes about the anomalies (:data:`LOCAL_DEFECTS`); checkpoints written before it was
    recorded made the same assumption."""

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
            f"within {100 * self.margin:g} points of the best; "
            f"{self.attack}, {self.num_normal} normal and {self.num_defective} defective held-out training images; "
            f"standard/robust %: {cells}); {self.assumption}"
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


HELD_OUT_PERLIN = {"blend_factor": (0.15, 0.6), "min_contrast": 0.04, "max_area": 0.025}
"""The held-out Perlin defects: fainter and smaller than the Fashion-MNIST ``defect`` protocol's test defects (blend
0.5-1, contrast at least 0.1, up to 4 % of the image), so that the candidates do not all detect them and their AUROCs
spread apart."""

CUTPASTE_MIN_SIDE = 4
"""Smallest side, in pixels, of a held-out CutPaste box. The pasted patch (rotated, then cut to the object) must
cover at least half of such a box."""

CUTPASTE_MAX_SIDE = 0.25
"""Largest side of a held-out CutPaste box, as a fraction of the image side (at most 6 % of the image)."""

CUTPASTE_ATTEMPTS = 30


def paint_cutpaste(image: torch.Tensor, region: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small self-CutPaste patch inside ``region`` (CutPaste paper, Li et al., CVPR 2021, sec. 3.1, as PatchGuard's
    pseudo anomalies make it: :class:`~anomalib_robust.models.patch_guard.pseudo_anomaly.PseudoAnomalyGenerator`).

    ``image`` is ``(C, H, W)`` in [0, 1]; returns the image and its ``bool`` mask. The patch is redrawn (next seed)
    until it covers at least half a :data:`CUTPASTE_MIN_SIDE` box and changes the image by
    ``HELD_OUT_PERLIN["min_contrast"]`` on average, as the Perlin defects must. An object too thin for such boxes
    (a sandal's straps) gets them in its region grown by :data:`CUTPASTE_MIN_SIDE` pixels, then anywhere.
    """
    grown = F.max_pool2d(region[None, None].float(), 2 * CUTPASTE_MIN_SIDE + 1, stride=1, padding=CUTPASTE_MIN_SIDE)
    regions = (region, grown[0, 0] > 0, torch.ones_like(region))
    for attempt in range(CUTPASTE_ATTEMPTS):
        generator = PseudoAnomalyGenerator(
            patch_size=1, min_size=CUTPASTE_MIN_SIDE, max_size_fraction=CUTPASTE_MAX_SIDE,
            seed=seed * CUTPASTE_ATTEMPTS + attempt,
        )  # fmt: skip
        pasted = generator(image[None], regions[attempt * len(regions) // CUTPASTE_ATTEMPTS][None])
        painted, mask = pasted.images[0], pasted.masks[0] > 0
        contrast = (painted - image).abs().mean(0)[mask].mean() if mask.any() else torch.tensor(0.0)
        if mask.sum() >= CUTPASTE_MIN_SIDE**2 / 2 and contrast >= HELD_OUT_PERLIN["min_contrast"]:
            return painted, mask
    msg = f"no CutPaste patch of {CUTPASTE_MIN_SIDE**2 // 2} pixels changing the image in {CUTPASTE_ATTEMPTS} draws"
    raise RuntimeError(msg)


def gray_uint8(image: torch.Tensor) -> torch.Tensor:
    """The channel mean of a ``(C, H, W)`` image in [0, 1] as ``uint8`` ``[1, H, W]``, what the defect makers read."""
    return as_uint8(image.mean(0, keepdim=True))


TEXTURE_CONTRAST_WINDOW = 5
"""Side, in pixels, of the neighbourhood whose mean a pixel's local texture contrast is measured against."""

TEXTURE_CONTRAST_SHARE = 0.5
"""A held-out Perlin defect changes the image by at least this share of the local texture contrast on average (and
at least ``HELD_OUT_PERLIN["min_contrast"]``). Not tuned: half keeps the defects faint (on the embedded
Fashion-MNIST it raises the floor for about one garment in ten, those with folds or gaps), while a defect on a busy
texture is no longer drowned by it."""


def texture_contrast(gray: torch.Tensor, region: torch.Tensor) -> float:
    """The local contrast of the surface in ``region``: the median of each pixel's absolute difference from the mean
    of its :data:`TEXTURE_CONTRAST_WINDOW` neighbourhood, on ``gray`` ``[1, H, W]`` in [0, 1], over the pixels whose
    whole neighbourhood lies in ``region`` (an object's outline is not its texture); 0 where there are none."""
    window = TEXTURE_CONTRAST_WINDOW
    local_mean = F.avg_pool2d(gray[None], window, stride=1, padding=window // 2, count_include_pad=False)[0, 0]
    inside = -F.max_pool2d(-region[None, None].float(), window, stride=1, padding=window // 2)[0, 0] > 0
    return float((gray[0] - local_mean).abs()[inside].median()) if inside.any() else 0.0


def paint_perlin(image: torch.Tensor, region: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A faint, small Perlin defect (:data:`HELD_OUT_PERLIN`) inside ``region``, in the image's own colours.

    The defect is drawn on the channel mean (a brightness change) and added to every channel, so each pixel keeps its
    colour (its channels' differences from their mean; a grayscale image stays gray). Its mean change is at least
    ``HELD_OUT_PERLIN["min_contrast"]`` and at least the local contrast of the texture it lies on
    times :data:`TEXTURE_CONTRAST_SHARE` (:func:`texture_contrast`), so that a busy texture does not drown it.
    ``image`` is ``(C, H, W)`` in [0, 1].
    """
    gray = gray_uint8(image)
    texture = TEXTURE_CONTRAST_SHARE * texture_contrast(gray.float() / 255, region)
    min_contrast = max(HELD_OUT_PERLIN["min_contrast"], texture)
    settings = {**HELD_OUT_PERLIN, "min_contrast": min_contrast}
    painted, mask = add_small_defect(gray, seed=seed, region=region, **settings)
    change = (painted.float() - gray.float()) / 255
    return torch.where(mask, (image + change).clamp(0, 1), image), mask


DEFECT_KINDS = {"perlin": paint_perlin, "cutpaste": paint_cutpaste}
"""The held-out defect kinds: a faint Perlin blob (DRAEM's generator) in the image's colours and a patch of the image
moved elsewhere."""


class HeldOutDefects(Dataset):
    """Every held-out normal image as it is (label 0) and once with each defect kind (label 1, with its mask).

    ``images`` yields items with an ``image`` in [0, 1] (``(C, H, W)``, H and W at least 32) and an ``image_path``,
    e.g. an anomalib dataset. Each defect lies on the object (:func:`~anomalib_robust.data.defects.object_region`:
    the pixels that differ from a flat border, or the whole image of a texture) and is small and often faint
    (:data:`HELD_OUT_PERLIN`, :data:`CUTPASTE_MAX_SIDE`): a defect every candidate k finds gives every candidate the
    same AUROC and cannot tell them apart. Every image appears clean and defective, so a comparison between
    candidates on these images is paired image by image. Items keep the source ``image_path``.
    """

    def __init__(self, images: Dataset, seed: int = 0, kinds: Sequence[str] = tuple(DEFECT_KINDS)) -> None:
        unknown = sorted(set(kinds) - set(DEFECT_KINDS))
        if not kinds or unknown:
            msg = f"kinds must be a non-empty list of {sorted(DEFECT_KINDS)}, got {list(kinds)!r}"
            raise ValueError(msg)
        self.kinds = tuple(kinds)
        self.items = []
        for index in range(len(images)):
            item = images[index]
            image = torch.as_tensor(item.image).float()
            region = object_region(as_uint8(image))
            self.items.append(self._item(item, image, torch.zeros(image.shape[-2:], dtype=torch.bool)))
            for number, kind in enumerate(self.kinds):
                painted, mask = DEFECT_KINDS[kind](image, region, (seed * 100_000 + index) * len(DEFECT_KINDS) + number)
                self.items.append(self._item(item, painted, mask))
        self.collate_fn = ImageBatch.collate

    @staticmethod
    def _item(item: ImageItem, image: torch.Tensor, mask: torch.Tensor) -> ImageItem:
        label = torch.tensor(int(mask.any()))
        return ImageItem(image=image, gt_label=label, gt_mask=mask, image_path=item.image_path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ImageItem:
        return copy.copy(self.items[index])
