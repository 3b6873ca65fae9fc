"""Rebuild the Fashion-MNIST subset embedded in this package from the official idx files.

Selection rule: for each class, the first :data:`~anomalib_robust.data.fashion_mnist_source.EMBEDDED_TRAIN_PER_CLASS`
images of that class in the official training file and the first
:data:`~anomalib_robust.data.fashion_mnist_source.EMBEDDED_TEST_PER_CLASS` in the official test file, kept in file
order, stored with their labels and file positions as ``uint8``/``int32`` arrays in a compressed ``.npz``.

Example:
    Rebuild the asset from Debian's copy (``apt-get install dataset-fashion-mnist``)::

        $ python -m anomalib_robust.data.build_embedded_subset /usr/share/datasets/fashion-mnist
"""

import argparse
from pathlib import Path

import numpy as np

from anomalib_robust.data.fashion_mnist_source import (
    CLASS_NAMES,
    DEBIAN_ROOT,
    EMBEDDED_TEST_PER_CLASS,
    EMBEDDED_TRAIN_PER_CLASS,
    embedded_path,
    load_split,
    resolve_root,
)


def select_subset(root: str | Path = DEBIAN_ROOT) -> dict[str, np.ndarray]:
    """Arrays of the embedded subset, taken from the official files in ``root``."""
    source = resolve_root(root)
    arrays = {}
    for split, per_class in (("train", EMBEDDED_TRAIN_PER_CLASS), ("test", EMBEDDED_TEST_PER_CLASS)):
        data = load_split(source, split)
        rows = np.sort(np.concatenate([data.of_class(label)[:per_class] for label in range(len(CLASS_NAMES))]))
        arrays |= {
            f"{split}_images": data.images[rows],
            f"{split}_labels": data.labels[rows],
            f"{split}_indices": data.indices[rows].astype(np.int32),
        }
    return arrays


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(DEBIAN_ROOT), help="directory with the official idx files")
    parser.add_argument("--output", default=str(embedded_path()), help="where to write the .npz")
    args = parser.parse_args()
    np.savez_compressed(args.output, **select_subset(args.root))
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
