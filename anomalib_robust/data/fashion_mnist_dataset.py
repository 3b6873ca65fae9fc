"""Fashion-MNIST as an anomalib one-class anomaly detection dataset, offline and CPU-sized.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747; MIT licence) has 28x28 grayscale photos of Zalando articles in ten classes
(:data:`~anomalib_robust.data.fashion_mnist_source.CLASS_NAMES`: ``t_shirt_top``, ``trouser``, ``pullover``,
``dress``, ``coat``, ``sandal``, ``shirt``, ``sneaker``, ``bag``, ``ankle_boot``). Training always uses the
images of one class (``category``) from the official training file. Two test protocols:

- ``"defect"`` (default): held-out images of the same class from the official test file; a seeded half of them get one
  small synthetic defect each (1-4 % of the image, on the object; see :mod:`anomalib_robust.data.defects`, built on
  anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator`), with pixel masks, so image and
  pixel metrics apply (task ``segmentation``).
- ``"semantic"``: the classic one-class protocol (e.g. Ruff et al., "Deep One-Class Classification", ICML 2018):
  held-out images of the class are normal, images of the nine other classes anomalous; no masks (task
  ``classification``, ``gt_mask`` is ``None`` as for anomalib's other image-only datasets).

Selection is deterministic and independent of where the files come from: training images are the first ``num_train``
of the class in file order; normal test images the first of the class in the test file (in ``semantic``, the
anomalies are the first of each other class, spread evenly over the nine classes, lower class indices taking the
remainder). In ``defect``, which test images get a defect and the defects themselves are drawn from ``seed`` and the
image's position in the official file. The embedded subset holds the first 200 training and 100 test images of each
class, so with sizes within those limits it gives exactly the same samples as the full files.

Images are resized from 28x28 to ``image_size`` (bilinear, antialiased, rounded to 8 bits), defects are painted at that
size, and samples are served from memory as 3-channel float images in ``[0, 1]``. Each sample is also written once as a
PNG (and each defect mask as a PNG) under ``cache_dir``, in a folder named after a hash of the content, because
anomalib keeps file paths in its samples table and its ``ImageVisualizer`` re-opens ``image_path``.

The datamodule is :class:`anomalib_robust.data.fashion_mnist.FashionMNIST`.
"""

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data.dataclasses import ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from PIL import Image as PILImage
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import resize, to_dtype
from torchvision.tv_tensors import Image, Mask

from anomalib_robust.data.defects import add_small_defect
from anomalib_robust.data.fashion_mnist_source import (
    CLASS_NAMES,
    SourceSplit,
    class_index,
    load_split,
    resolve_root,
)

Protocol = Literal["defect", "semantic"]
PROTOCOLS = ("defect", "semantic")
MIN_IMAGE_SIZE = 8
MIN_DEFECT_IMAGE_SIZE = 32
"""anomalib's Perlin noise draws grid scales up to 32, so it needs images of at least 32 pixels."""
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "anomalib_robust" / "fashion_mnist"


class FashionMNISTDataset(AnomalibDataset):
    """One split (``"train"`` or ``"test"``) of the Fashion-MNIST anomaly detection benchmark, in memory.

    The samples table carries, besides anomalib's columns, ``class_index`` (Fashion-MNIST label),
    ``source_index`` (position in the official idx file) and the pixels: ``image`` (``uint8`` ``[1, H, W]``) and, in
    the ``defect`` protocol, ``mask`` (``bool`` ``[H, W]``). Keeping the pixels in the table lets anomalib's
    ``subsample``/``random_split``/``+`` carry them along; pandas' deep copy copies the table but shares the tensors.

    Args:
        split: ``"train"`` (normal images of ``category``) or ``"test"`` (normal and anomalous images).
        category: Class index ``0``-``9`` or its name (see the module docstring). Defaults to ``0``.
        protocol: ``"defect"`` or ``"semantic"``. Defaults to ``"defect"``.
        root: Directory with the official idx files, ``"embedded"`` or ``None`` (Debian's copy if installed, else
            the embedded subset). Defaults to ``None``.
        image_size: Side of the square output images, at least 32 for ``defect`` (anomalib's Perlin noise needs it),
            8 for ``semantic``. Defaults to ``64``.
        num_images: Number of images; ``None`` for all (the whole class for ``train`` and for ``defect`` tests, the
            whole test file for ``semantic``). Defaults to ``None``.
        seed: Seed of the defects and of which test images get one. Defaults to ``0``.
        cache_dir: Where the PNG copies go. Defaults to ``<temp dir>/anomalib_robust/fashion_mnist``.
        augmentations: Augmentations applied to image (and mask) when loading. Defaults to ``None``.

    Example:
        >>> from anomalib_robust.data import FashionMNISTDataset
        >>> dataset = FashionMNISTDataset("test", category=1, protocol="semantic", root="embedded", num_images=4)
        >>> dataset.samples[["label_index", "class_index", "source_index"]].values.tolist()
        [[0, 1, 2], [0, 1, 3], [1, 2, 1], [1, 0, 19]]
        >>> item = dataset[0]
        >>> item.image.shape, item.gt_mask
        (torch.Size([3, 64, 64]), None)
    """

    def __init__(
        self,
        split: Literal["train", "test"],
        category: int | str = 0,
        protocol: Protocol = "defect",
        root: str | Path | None = None,
        image_size: int = 64,
        num_images: int | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        if split not in ("train", "test"):
            msg = f"split must be 'train' or 'test'; got {split!r}."
            raise ValueError(msg)
        check_options(protocol=protocol, image_size=image_size, seed=seed)
        label = class_index(category)
        source = load_split(resolve_root(root), split)
        maximum = max_images(source, label, protocol, split)
        check_num_images(num_images, name="num_images", minimum=1 if split == "train" else 2, maximum=maximum)
        self.category = CLASS_NAMES[label]

        rows, is_anomalous = select_rows(source, label, protocol, split, num_images, seed)
        images = resize_images(source.images[rows], image_size)
        masks = torch.zeros(len(rows), image_size, image_size, dtype=torch.bool) if protocol == "defect" else None
        if split == "test" and protocol == "defect":
            for i in np.flatnonzero(is_anomalous):
                images[i], masks[i] = add_small_defect(images[i], seed=defect_seed(seed, source.indices[rows[i]]))

        kinds = np.where(
            is_anomalous, "defect" if protocol == "defect" else np.take(CLASS_NAMES, source.labels[rows]), "good"
        )
        folder = Path(cache_dir or DEFAULT_CACHE_DIR) / _fingerprint(images, masks) / "FashionMNIST" / self.category
        samples = pd.DataFrame(
            {
                "split": split,
                "class_index": source.labels[rows].astype(int),
                "source_index": source.indices[rows],
                "label": np.where(is_anomalous, "abnormal", "normal"),
                "label_index": np.where(is_anomalous, int(LabelName.ABNORMAL), int(LabelName.NORMAL)),
                "image_path": [
                    str(folder / split / kind / f"{i:05d}.png")
                    for kind, i in zip(kinds, source.indices[rows], strict=True)
                ],
                "mask_path": [
                    str(folder / "ground_truth" / kind / f"{i:05d}_mask.png") if kind == "defect" else ""
                    for kind, i in zip(kinds, source.indices[rows], strict=True)
                ],
                "image": list(images),
                "mask": list(masks) if masks is not None else None,
            }
        )
        _write_pngs(samples)
        samples.attrs["task"] = TaskType.SEGMENTATION if protocol == "defect" else TaskType.CLASSIFICATION
        self.samples = samples

    def __getitem__(self, index: int) -> ImageItem:
        """Sample ``index`` as a 3-channel float image in ``[0, 1]`` with its label and, for ``defect``, its mask.

        Augmentations are applied as in :meth:`anomalib.data.datasets.base.image.AnomalibDataset.__getitem__`.
        """
        sample = self.samples.iloc[index]
        image = to_dtype(Image(sample["image"].repeat(3, 1, 1)), torch.float32, scale=True)
        gt_mask = Mask(sample["mask"]) if self.task == TaskType.SEGMENTATION else None
        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(sample.label_index),
            image_path=sample.image_path,
            mask_path=sample.mask_path,
        )


def check_options(protocol: str, image_size: int, seed: int) -> None:
    """Raise ``ValueError`` for an unknown ``protocol``, a non-integer ``seed`` or a bad ``image_size``.

    ``image_size`` must be an integer of at least :data:`MIN_IMAGE_SIZE`, :data:`MIN_DEFECT_IMAGE_SIZE` for ``defect``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        msg = f"seed must be a non-negative integer; got {seed!r}."
        raise ValueError(msg)
    if protocol not in PROTOCOLS:
        msg = f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}."
        raise ValueError(msg)
    minimum = MIN_DEFECT_IMAGE_SIZE if protocol == "defect" else MIN_IMAGE_SIZE
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < minimum:
        msg = f"image_size must be an integer of at least {minimum} for protocol={protocol!r}; got {image_size!r}."
        raise ValueError(msg)


def check_num_images(value: int | None, name: str, minimum: int, maximum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or an integer from ``minimum`` to ``maximum``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum):
        msg = f"{name} must be None or an integer from {minimum} to {maximum} (what the data holds); got {value!r}."
        raise ValueError(msg)


def max_images(source: SourceSplit, label: int, protocol: str, split: str) -> int:
    """Most images :func:`select_rows` can draw for ``label`` from ``source``."""
    per_class = len(source.of_class(label))
    if split == "train" or protocol == "defect":
        return per_class
    # semantic: at most every normal image, matched by as many anomalies (lower classes first take the remainder)
    others = min(len(source.of_class(other)) for other in range(len(CLASS_NAMES)) if other != label)
    return min(2 * per_class, 2 * 9 * others)


def select_rows(
    source: SourceSplit,
    label: int,
    protocol: str,
    split: str,
    num_images: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``source`` to use and whether each is anomalous (in ``defect`` tests: gets a defect).

    See the module docstring for the rule; in ``defect`` tests a ``torch.randperm`` seeded with ``seed`` picks the
    ``len // 2`` rows that get a defect.
    """
    if split == "train" or protocol == "defect":
        rows = source.of_class(label)[:num_images]
        is_anomalous = np.zeros(len(rows), dtype=bool)
        if split == "test":
            generator = torch.Generator().manual_seed(seed)
            is_anomalous[torch.randperm(len(rows), generator=generator)[: len(rows) // 2].numpy()] = True
        return rows, is_anomalous
    if num_images is None:
        return np.arange(len(source.labels)), source.labels != label
    num_anomalous = num_images // 2
    others = [other for other in range(len(CLASS_NAMES)) if other != label]
    quotas = [num_anomalous // len(others) + (i < num_anomalous % len(others)) for i in range(len(others))]
    anomalous = [source.of_class(other)[:quota] for other, quota in zip(others, quotas, strict=True)]
    rows = np.concatenate([source.of_class(label)[: num_images - num_anomalous], *anomalous])
    return rows, source.labels[rows] != label


def defect_seed(seed: int, source_index: int) -> int:
    """Seed of the defect painted on test image ``source_index``."""
    return seed * 100_000 + int(source_index)


def resize_images(images: np.ndarray, size: int) -> torch.Tensor:
    """Resize ``uint8`` images ``[N, 28, 28]`` to ``uint8`` ``[N, 1, size, size]`` (bilinear, antialiased, rounded)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float()
    return resize(pixels, [size, size], antialias=True).round().clamp(0, 255).to(torch.uint8)


def _fingerprint(images: torch.Tensor, masks: torch.Tensor | None) -> str:
    digest = hashlib.sha1(images.numpy().tobytes(), usedforsecurity=False)
    if masks is not None:
        digest.update(masks.numpy().tobytes())
    return digest.hexdigest()[:16]


def _write_pngs(samples: pd.DataFrame) -> None:
    """Write each image (and defect mask) once; a temporary name and an atomic rename keep concurrent runs safe."""
    for sample in samples.itertuples():
        files = [(Path(sample.image_path), sample.image[0].numpy())]
        if sample.mask_path:
            files.append((Path(sample.mask_path), sample.mask.numpy().astype(np.uint8) * 255))
        for path, pixels in files:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                PILImage.fromarray(pixels).save(temporary, format="PNG")
                temporary.replace(path)
