"""Read Fashion-MNIST from its official idx files, or from the small subset embedded in this package.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747; MIT licence) has 60,000 training and 10,000 test images of 28x28 grayscale
Zalando article photos in ten classes. The official distribution is four gzipped idx files; Debian ships them in the
package ``dataset-fashion-mnist`` under :data:`DEBIAN_ROOT`.

The embedded subset (``assets/fashion_mnist_subset.npz``, about 1.3 MB) holds, for each class, the first
:data:`EMBEDDED_TRAIN_PER_CLASS` images of that class in the official training file and the first
:data:`EMBEDDED_TEST_PER_CLASS` of that class in the official test file, in file order, together with their labels and
their positions in the official files. :mod:`anomalib_robust.data.build_embedded_subset` rebuilds it.

Example:
    >>> from anomalib_robust.data.fashion_mnist_source import load_split, resolve_root
    >>> split = load_split(resolve_root("embedded"), "test")
    >>> split.images.shape, split.images.dtype
    ((1000, 28, 28), dtype('uint8'))
    >>> int(split.labels[0]), int(split.indices[0])
    (9, 0)
"""

import functools
import gzip
import importlib.resources
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

CLASS_NAMES = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
"""Snake-case names of the ten classes, indexed by label (official names: T-shirt/top, Trouser, ..., Ankle boot)."""

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the official idx files."""

EMBEDDED = "embedded"
"""Value of ``root`` that selects the subset shipped inside this package."""

EMBEDDED_TRAIN_PER_CLASS = 200
EMBEDDED_TEST_PER_CLASS = 100

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SourceSplit:
    """One official split (or its embedded subset).

    Attributes:
        images: ``uint8`` array ``[N, 28, 28]``, white object on black background.
        labels: ``uint8`` array ``[N]`` of class indices (see :data:`CLASS_NAMES`).
        indices: ``int64`` array ``[N]``: position of each image in the official idx file, increasing.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray

    def of_class(self, class_index: int) -> np.ndarray:
        """Row numbers of the images of ``class_index``, in official file order."""
        return np.flatnonzero(self.labels == class_index)


def class_index(category: int | str) -> int:
    """Turn a class index (``0``-``9``) or name into the class index.

    Names are matched after lower-casing and replacing every run of non-alphanumeric characters by ``_``, so the
    official names (``"T-shirt/top"``, ``"Ankle boot"``) work as well as :data:`CLASS_NAMES`.

    Example:
        >>> class_index("Ankle boot"), class_index("trouser"), class_index(3)
        (9, 1, 3)

    Raises:
        ValueError: ``category`` is neither.
    """
    if isinstance(category, str):
        name = re.sub(r"[^a-z0-9]+", "_", category.strip().lower()).strip("_")
        if name.isdigit():
            category = int(name)
        elif name in CLASS_NAMES:
            return CLASS_NAMES.index(name)
    if isinstance(category, int) and not isinstance(category, bool) and 0 <= category < len(CLASS_NAMES):
        return category
    msg = f"category must be a class index 0-9 or one of {', '.join(CLASS_NAMES)}; got {category!r}."
    raise ValueError(msg)


def resolve_root(root: str | Path | None) -> Path | str:
    """Decide where the images come from.

    Args:
        root: A directory holding the four official ``*-ubyte.gz`` files; ``"embedded"`` for the packaged subset;
            ``None`` for :data:`DEBIAN_ROOT` when it holds the files, else the packaged subset.

    Returns:
        The directory, or :data:`EMBEDDED`.

    Raises:
        ValueError: ``root`` is a directory without the four files.
    """
    if root is None:
        return DEBIAN_ROOT if not _missing_files(DEBIAN_ROOT) else EMBEDDED
    if str(root) == EMBEDDED:
        return EMBEDDED
    root = Path(root).expanduser()
    if missing := _missing_files(root):
        msg = (
            f"root must be a directory with the Fashion-MNIST idx files, 'embedded' or None; {str(root)!r} lacks "
            f"{', '.join(missing)} (Debian: apt-get install dataset-fashion-mnist, files in {DEBIAN_ROOT})."
        )
        raise ValueError(msg)
    return root


def load_split(root: Path | str, split: Split) -> SourceSplit:
    """Load one split from a directory returned by :func:`resolve_root`, or from the embedded subset.

    Results are cached per process and read-only.
    """
    if split not in IDX_FILES:
        msg = f"split must be one of {', '.join(IDX_FILES)}; got {split!r}."
        raise ValueError(msg)
    return _load_embedded(split) if root == EMBEDDED else _load_idx(Path(root), split)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes (the format of LeCun's MNIST files, reused by Fashion-MNIST).

    The header is two zero bytes, the type code ``0x08`` (unsigned byte), the number of dimensions, then each
    dimension as a big-endian 32-bit integer.
    """
    data = gzip.decompress(path.read_bytes())
    zeros, type_code, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if zeros != 0 or type_code != 0x08 or len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        msg = f"{path} is not an unsigned-byte idx file (header {data[:4].hex()}, {len(data)} bytes for {dims})."
        raise ValueError(msg)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def embedded_path() -> Path:
    """Location of the packaged subset."""
    return Path(str(importlib.resources.files(__package__) / "assets" / "fashion_mnist_subset.npz"))


def _missing_files(root: Path) -> list[str]:
    return [name for names in IDX_FILES.values() for name in names if not (root / name).is_file()]


@functools.lru_cache(maxsize=4)
def _load_idx(root: Path, split: Split) -> SourceSplit:
    image_file, label_file = IDX_FILES[split]
    images, labels = read_idx(root / image_file), read_idx(root / label_file)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        msg = (
            f"{root}: {image_file} has shape {images.shape} and {label_file} {labels.shape}; expected [N, 28, 28], [N]."
        )
        raise ValueError(msg)
    return SourceSplit(images, labels, np.arange(len(labels)))


@functools.lru_cache(maxsize=2)
def _load_embedded(split: Split) -> SourceSplit:
    with np.load(embedded_path()) as arrays:
        split_arrays = [arrays[f"{split}_{key}"] for key in ("images", "labels", "indices")]
    for array in split_arrays:
        array.flags.writeable = False
    images, labels, indices = split_arrays
    return SourceSplit(images, labels, indices.astype(np.int64))
